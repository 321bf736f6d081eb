"""Sky level and noise of a reduced frame on a coarse grid: the shared input of the STIR
detectors (pure NumPy, no Dask, no xarray).

Both :func:`~mstdask.stir._tracks_kernels.detect_tracks` and
:func:`~mstdask.stir._stir_kernels.detect_cosmic_rays` read the frame's background from one
:class:`Background` (:func:`estimate_background`), measured on the 2x2-binned frame.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

if TYPE_CHECKING:
    from ..config import StirConfig

__all__ = ["Background", "estimate_background"]

_STRIPE_ROWS = 512  # rows per stripe of the full-frame passes: keeps temporaries ~20 MB
_MAD_TO_SIGMA = 1.4826


def _default_config() -> StirConfig:
    from ..config import StirConfig

    return StirConfig()


@dataclass(frozen=True)
class Background:
    """Smooth sky level and noise of a frame, on a coarse grid.

    Attributes
    ----------
    level : ndarray of float32, shape (gy, gx)
        Median sky level (ADU) of each grid cell, median-filtered over 3 x 3 cells.
    sigma_binned : ndarray of float32, shape (gy, gx)
        Robust noise (1.4826 MAD, ADU) of the ``binning`` x ``binning`` binned frame per cell.
    box : int
        Edge of a grid cell in full-resolution pixels.
    binning : int
        Binning of the image the statistics were measured on.
    shape : (int, int)
        Full-resolution frame shape.
    """

    level: np.ndarray
    sigma_binned: np.ndarray
    box: int
    binning: int
    shape: tuple[int, int]

    def _weights(self, coord: np.ndarray, n_grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Cell centres sit at full-res coordinate (i + 0.5) * box - 0.5; linear in between,
        # constant beyond the outer centres.
        u = (np.asarray(coord, dtype=np.float64) + 0.5) / self.box - 0.5
        u = np.clip(u, 0.0, n_grid - 1)
        i0 = np.minimum(np.floor(u).astype(np.intp), max(n_grid - 2, 0))
        w = (u - i0).astype(np.float32)
        i1 = np.minimum(i0 + 1, n_grid - 1)
        return i0, i1, w

    def at(self, y: np.ndarray, x: np.ndarray, which: str = "level") -> np.ndarray:
        """Bilinear value of ``level`` or ``sigma_binned`` at full-resolution positions."""
        grid = getattr(self, which)
        y0, y1, wy = self._weights(y, grid.shape[0])
        x0, x1, wx = self._weights(x, grid.shape[1])
        top = grid[y0, x0] * (1 - wx) + grid[y0, x1] * wx
        bot = grid[y1, x0] * (1 - wx) + grid[y1, x1] * wx
        return (top * (1 - wy) + bot * wy).astype(np.float32)

    def rows(self, y_start: int, y_stop: int, which: str = "level", binned: bool = False) -> np.ndarray:
        """Bilinear ``level`` (or ``sigma_binned``) for a block of full rows, float32.

        With ``binned=True`` the block is in binned pixels (rows and columns of the binned
        frame), otherwise in full-resolution pixels.
        """
        grid = getattr(self, which)
        b = self.binning if binned else 1
        nx = self.shape[1] // b
        yc = np.arange(y_start, y_stop) * b + (b - 1) / 2.0
        xc = np.arange(nx) * b + (b - 1) / 2.0
        y0, y1, wy = self._weights(yc, grid.shape[0])
        g = grid[y0] * (1 - wy)[:, None] + grid[y1] * wy[:, None]  # (rows, gx): tiny
        x0, x1, wx = self._weights(xc, grid.shape[1])
        return (g[:, x0] * (1 - wx) + g[:, x1] * wx).astype(np.float32)


def _bin(image: np.ndarray, mask: np.ndarray | None, b: int) -> np.ndarray:
    """Mean of the valid (unmasked, finite) pixels of each ``b x b`` block; NaN if none.

    The last rows/columns that do not fill a block are dropped. Computed in stripes so that
    the temporaries stay small.
    """
    ny, nx = image.shape
    by, bx = ny // b, nx // b
    out = np.empty((by, bx), dtype=np.float32)
    step = max(1, _STRIPE_ROWS // b)
    for r0 in range(0, by, step):
        r1 = min(by, r0 + step)
        blk = image[r0 * b:r1 * b, :bx * b]
        valid = np.isfinite(blk)
        if mask is not None:
            valid &= ~mask[r0 * b:r1 * b, :bx * b]
        v = np.where(valid, blk, np.float32(0)).astype(np.float32, copy=False)
        s = np.zeros((r1 - r0, bx), dtype=np.float32)
        c = np.zeros((r1 - r0, bx), dtype=np.float32)
        for dy in range(b):
            for dx in range(b):
                s += v[dy::b, dx::b]
                c += valid[dy::b, dx::b]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[r0:r1] = s / c
    return out


def _background_from_binned(binned: np.ndarray, b: int, box: int, shape: tuple[int, int]) -> Background:
    """Grid statistics (median, MAD) of a binned frame; see :func:`estimate_background`."""
    bb = max(4, box // b)  # cell edge in binned pixels
    ny, nx = binned.shape
    gy, gx = max(1, ny // bb), max(1, nx // bb)
    # Cells tile the frame; the remainder rows/columns join the last cell row/column.
    ey = np.linspace(0, ny, gy + 1).astype(int)
    ex = np.linspace(0, nx, gx + 1).astype(int)
    level = np.full((gy, gx), np.nan, dtype=np.float32)
    sigma = np.full((gy, gx), np.nan, dtype=np.float32)
    for i in range(gy):
        band = binned[ey[i]:ey[i + 1]]
        # Equal-width cells of one row at once: (cells, pixels) with NaN padding.
        widths = np.diff(ex)
        w = int(widths.max())
        cells = np.full((gx, band.shape[0] * w), np.nan, dtype=np.float32)
        for j in range(gx):
            blk = band[:, ex[j]:ex[j + 1]]
            cells[j, :blk.size] = blk.reshape(-1)
        with warnings.catch_warnings():  # all-NaN cells (fully masked) are filled below
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(cells, axis=1)
            mad = np.nanmedian(np.abs(cells - med[:, None]), axis=1)
        level[i] = med
        sigma[i] = _MAD_TO_SIGMA * mad
    level = _fill_grid(level)
    sigma = _fill_grid(sigma)
    if min(gy, gx) >= 3:  # cells dominated by a bright star or a track: 3x3 median (Background2D style)
        level = ndi.median_filter(level, size=3, mode="nearest")
        sigma = ndi.median_filter(sigma, size=3, mode="nearest")
    sigma = np.maximum(sigma, np.float32(1e-6))
    return Background(level=level, sigma_binned=sigma, box=bb * b, binning=b, shape=tuple(shape))


def _fill_grid(grid: np.ndarray) -> np.ndarray:
    """Replace NaN cells (all pixels masked) by the nearest valid cell."""
    bad = ~np.isfinite(grid)
    if not bad.any():
        return grid
    if bad.all():
        return np.zeros_like(grid)
    idx = ndi.distance_transform_edt(bad, return_distances=False, return_indices=True)
    return grid[tuple(idx)]


def estimate_background(image: np.ndarray, mask: np.ndarray | None = None,
                        config: StirConfig | None = None) -> Background:
    """Sky level and noise of a reduced frame on a coarse grid (shared by the detectors).

    The frame is binned ``config.track_binning`` x ``config.track_binning`` (masked pixels
    ignored), cut into cells of ``config.background_box_px`` full-resolution pixels, and each
    cell gets the median and the robust std (1.4826 MAD) of its binned pixels; the grids are
    median-filtered over 3 x 3 cells so that a bright star or a track does not lift a cell.

    Parameters
    ----------
    image : ndarray of float32, shape (ny, nx)
        Reduced frame (ADU, sky included).
    mask : ndarray of bool, optional
        Pixels to ignore.
    config : StirConfig, optional

    Returns
    -------
    Background
    """
    config = config or _default_config()
    image = np.asarray(image, dtype=np.float32)
    b = config.track_binning
    return _background_from_binned(_bin(image, mask, b), b, config.background_box_px, image.shape)
