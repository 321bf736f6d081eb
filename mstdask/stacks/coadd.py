"""Image coaddition (STATIC multiple, Xiao et al. 2025, sections 3.2.2 and 4.4, Fig. 13).

Reduced frames are resampled through their full astrometric solution (the TPV header of
``mstdask photometry``, distortion included) onto one TAN grid and combined with weights;
masked pixels never contribute. Everything here is lazy: :func:`coadd` returns an
:class:`xarray.Dataset` of dask arrays (``image``, ``weight``, ``count``) chunked in output
tiles; :mod:`mstdask.jobs.coadd` computes it.

Graph: one task per (output tile, overlapping input frame) resamples the frame's pixels
under that tile (it reads only the input region it needs from the reduced store); for the
weighted mean it also adds them to a running sum handed from task to task along a chain of
at most ``CoaddConfig.frames_per_task`` frames, in frame order, so a task holds one sum and
one resampled frame (memory bounded by the tile, not by N), chains and tiles run in
parallel, and the result does not depend on the tiling. Median and clipped mean need every frame of a
pixel at once: their tiles shrink with N so that N x tile stays within
``CoaddConfig.tile_bytes``.

Flux scale: every frame is brought to the zero point and exposure time of the stack's
first frame (``scale``), after subtracting its sky level, so the coadd is one exposure's
ADU with ``n`` times less variance: its effective gain is ``gain * (sum w)**2 / sum(w**2 s)``
(``gain * N`` for equal weights), which the photometry of the stacks uses.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import _coadd_kernels as K
from ..config import CoaddConfig
from ..errors import BadInputError, InsufficientDataError

__all__ = ["CoaddFrame", "CoaddGrid", "coadd", "depth_figure", "depth_rows", "effective_gain", "fits_header",
           "footprint_box", "noise_correlation", "output_grid", "plan_tiles", "read_region", "resample_frame",
           "stack_photometry", "stack_photometry_task", "write_fits", "wcs_from_text"]


def wcs_from_text(text: str, what: str = "WCS"):
    """An astropy WCS from a FITS header string (``exposures.parquet`` ``wcs`` column)."""
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    if not text or not str(text).strip():
        raise BadInputError(what, "no astrometric solution (empty WCS); run `mstdask photometry` on it first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(fits.Header.fromstring(str(text), sep="\n"))


@dataclass(frozen=True, eq=False)
class CoaddFrame:
    """One input exposure of a coadd.

    Parameters
    ----------
    exposure : str
        Its name (``exposures.parquet`` ``exposure``).
    wcs : str
        Its astrometric solution as a FITS header string (TPV or SIP).
    shape : (int, int)
        Frame shape ``(ny, nx)``.
    store, index : str, int
        Reduced store and frame index to read ``data``/``mask`` from ...
    data, mask : ndarray, optional
        ... or the pixels themselves (small frames: tests, notebooks).
    weight : float
        Weight of the frame in the mean (inverse sky variance after scaling).
    scale : float
        Flux scale to the stack's reference (zero point and exposure time).
    background : float
        Sky level subtracted before scaling (ADU).
    noise : float
        Sky rms of the frame after scaling (ADU; clipping threshold of ``clipped-mean``).
    gain, exptime, zero_point, time : float
        e-/ADU, seconds, magnitude zero point, ns since 1970 (provenance).
    """

    exposure: str
    wcs: str
    shape: tuple[int, int]
    store: str | None = None
    index: int = -1
    data: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)
    weight: float = 1.0
    scale: float = 1.0
    background: float = 0.0
    noise: float = float("nan")
    gain: float = 0.25
    exptime: float = 1.0
    zero_point: float = float("nan")
    time: int = 0

    def __post_init__(self) -> None:
        if self.data is None and self.store is None:
            raise BadInputError(self.exposure, "a coadd frame needs its pixels: a reduced store and index, or data")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise BadInputError(self.exposure, f"weight {self.weight} must be finite and >= 0")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise BadInputError(self.exposure, f"flux scale {self.scale} must be finite and > 0 (zero point?)")

    def get_wcs(self):
        """The frame's astropy WCS."""
        return wcs_from_text(self.wcs, self.exposure)


@dataclass(frozen=True)
class CoaddGrid:
    """The output grid: a TAN WCS (header string) and its shape ``(ny, nx)``."""

    header: str
    shape: tuple[int, int]

    @property
    def wcs(self):
        """The astropy WCS of the grid."""
        return wcs_from_text(self.header, "coadd grid")

    @property
    def pixel_scale_arcsec(self) -> float:
        """Pixel scale at the reference point."""
        from astropy.wcs.utils import proj_plane_pixel_scales

        return float(np.sqrt(np.prod(proj_plane_pixel_scales(self.wcs))) * 3600.0)


def output_grid(frames: Sequence[CoaddFrame], pixel_scale_arcsec: float = 0.862) -> CoaddGrid:
    """The TAN grid covering every frame at ``pixel_scale_arcsec``, north up
    (:func:`reproject.mosaicking.find_optimal_celestial_wcs`)."""
    import astropy.units as u
    from reproject.mosaicking import find_optimal_celestial_wcs

    if not frames:
        raise InsufficientDataError("no frames to choose a coadd grid for")
    wcs, shape = find_optimal_celestial_wcs([(f.shape, f.get_wcs()) for f in frames], projection="TAN",
                                            resolution=pixel_scale_arcsec * u.arcsec)
    return CoaddGrid(wcs.to_header().tostring(sep="\n"), (int(shape[0]), int(shape[1])))


def footprint_box(frame: CoaddFrame, grid: CoaddGrid, wcs_out=None, margin: int = 2
                  ) -> tuple[int, int, int, int] | None:
    """Bounding box ``(y0, y1, x0, x1)`` of a frame on the grid (None: no overlap)."""
    ny, nx = frame.shape
    t = np.linspace(0.0, 1.0, 33)
    bx = np.concatenate([t * (nx - 1), np.full_like(t, nx - 1), (1 - t) * (nx - 1), np.zeros_like(t)])
    by = np.concatenate([np.zeros_like(t), t * (ny - 1), np.full_like(t, ny - 1), (1 - t) * (ny - 1)])
    ra, dec = frame.get_wcs().all_pix2world(bx, by, 0)
    xo, yo = (wcs_out or grid.wcs).all_world2pix(ra, dec, 0)
    if not (np.isfinite(xo).all() and np.isfinite(yo).all()):
        return None
    gy, gx = grid.shape
    y0, y1 = max(0, int(math.floor(yo.min())) - margin), min(gy, int(math.ceil(yo.max())) + margin + 1)
    x0, x1 = max(0, int(math.floor(xo.min())) - margin), min(gx, int(math.ceil(xo.max())) + margin + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    return y0, y1, x0, x1


def plan_tiles(frames: Sequence[CoaddFrame], grid: CoaddGrid, tile: int | tuple[int, int]
               ) -> list[tuple[tuple[int, int, int, int], list[int]]]:
    """Output tiles (row-major) with the indices of the frames that may cover each."""
    ty, tx = (tile, tile) if isinstance(tile, int) else tile
    w = grid.wcs
    boxes = [footprint_box(f, grid, w) for f in frames]
    gy, gx = grid.shape
    tiles = []
    for y0 in range(0, gy, ty):
        for x0 in range(0, gx, tx):
            y1, x1 = min(gy, y0 + ty), min(gx, x0 + tx)
            hit = [i for i, b in enumerate(boxes)
                   if b is not None and b[0] < y1 and b[1] > y0 and b[2] < x1 and b[3] > x0]
            tiles.append(((y0, y1, x0, x1), hit))
    return tiles


def read_region(frame: CoaddFrame, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and mask of a region of a frame (only that region is read from the store)."""
    if frame.data is not None:
        data = np.asarray(frame.data[y0:y1, x0:x1], np.float32)
        mask = (np.zeros(data.shape, np.uint8) if frame.mask is None
                else np.asarray(frame.mask[y0:y1, x0:x1], np.uint8))
        return data, mask
    import zarr

    try:
        group = zarr.open_group(frame.store, mode="r")
        return (np.asarray(group["data"][frame.index, y0:y1, x0:x1], np.float32),
                np.asarray(group["mask"][frame.index, y0:y1, x0:x1], np.uint8))
    except (KeyError, FileNotFoundError) as exc:
        raise BadInputError(frame.store, f"cannot read frame {frame.index} ({exc}); is this the reduced store "
                                         "the catalogues were made from?") from None


def _oversampling(config: CoaddConfig, jac: np.ndarray) -> int:
    if config.oversample:
        return int(config.oversample)
    jmax = float(np.nanmax(jac)) if np.isfinite(jac).any() else 1.0
    # output pixels larger than ~1.2 input pixels are sampled on a finer grid (SWarp's
    # OVERSAMPLING): point samples of an undersampled star do not add up to its flux
    return max(1, int(math.ceil(math.sqrt(jmax) - 0.1)))


def resample_frame(frame: CoaddFrame, grid_header: str, box: tuple[int, int, int, int], config: CoaddConfig
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frame resampled onto one output box: flux-scaled values (sky subtracted), the
    valid-pixel map and the carried mask bits (those not in ``config.bad_bits``, i.e.
    saturated by default). Reads only the input region under the box. Runs inside a task."""
    wcs_out = wcs_from_text(grid_header, "coadd grid")
    wcs_in = frame.get_wcs()
    y0, y1, x0, x1 = box
    shape = (y1 - y0, x1 - x0)
    step = config.map_step_px
    nodes = K.mapping_nodes(wcs_out, wcs_in, box, step)
    xi, yi, jac = nodes[2], nodes[3], nodes[4]
    ny, nx = frame.shape
    fin = np.isfinite(xi) & np.isfinite(yi)
    empty = (np.zeros(shape, np.float32), np.zeros(shape, bool), np.zeros(shape, np.uint8))
    if not fin.any():
        return empty
    # the input region under the box: interpolated positions stay within the nodes' range
    pad = 3  # bilinear neighbours, with room to spare
    ry0, ry1 = max(0, int(np.floor(yi[fin].min())) - pad), min(ny, int(np.ceil(yi[fin].max())) + pad + 1)
    rx0, rx1 = max(0, int(np.floor(xi[fin].min())) - pad), min(nx, int(np.ceil(xi[fin].max())) + pad + 1)
    if ry0 >= ry1 or rx0 >= rx1:
        return empty
    data, mask = read_region(frame, ry0, ry1, rx0, rx1)
    bad = (mask & np.uint8(config.bad_bits)) != 0
    carry = mask & np.uint8(~config.bad_bits & 0xFF)
    data = data - np.float32(frame.background)
    if config.resampling == "adaptive":
        vals, valid = _resample_adaptive(data, bad, wcs_in, (ry0, rx0), wcs_out, box)
        _, _, fl = K.resample_nodes(data, bad, nodes, box, step, (ry0, rx0), frame.shape, carry)
        fl[~valid] = 0
    else:
        o = _oversampling(config, jac)
        if o == 1:
            vals, valid, fl = K.resample_nodes(data, bad, nodes, box, step, (ry0, rx0), frame.shape, carry)
        else:  # sub-pixel samples share the nodes (they cover one pixel of margin)
            vals = np.zeros(shape, np.float32)
            valid = np.ones(shape, bool)
            fl = np.zeros(shape, np.uint8)
            offs = (np.arange(o) + 0.5) / o - 0.5
            for dy in offs:
                for dx in offs:
                    v, ok, f = K.resample_nodes(data, bad, nodes, box, step, (ry0, rx0), frame.shape, carry,
                                                offset=(dy, dx))
                    vals += v
                    valid &= ok
                    fl |= f
            vals /= np.float32(o * o)
            vals[~valid] = 0.0
            fl[~valid] = 0
    vals *= np.float32(frame.scale)
    return vals, valid, fl


def _resample_adaptive(data, bad, wcs_in, origin, wcs_out, box):
    """reproject's adaptive (anti-aliased, flux-conserving) resampling of a region; a pixel
    touched by a masked input pixel is invalid."""
    from reproject import reproject_adaptive

    y0, y1, x0, x1 = box
    ry0, rx0 = origin
    h, w = data.shape
    w_in = wcs_in.slice((slice(ry0, ry0 + h), slice(rx0, rx0 + w)))
    w_out = wcs_out.slice((slice(y0, y1), slice(x0, x1)))
    shape = (y1 - y0, x1 - x0)
    clean = np.where(bad | ~np.isfinite(data), 0.0, data)
    vals, cov = reproject_adaptive((clean, w_in), w_out, shape_out=shape, conserve_flux=True,
                                   boundary_mode="ignore", roundtrip_coords=False)
    badf, _ = reproject_adaptive(((bad | ~np.isfinite(data)).astype(np.float32), w_in), w_out, shape_out=shape,
                                 conserve_flux=False, boundary_mode="ignore", roundtrip_coords=False)
    valid = np.isfinite(vals) & (cov > 0.999) & (np.nan_to_num(badf, nan=1.0) <= 1e-6)
    vals = np.where(valid, vals, 0.0).astype(np.float32)
    return vals, valid


def _resample_task(frame: CoaddFrame, grid_header: str, box, config: CoaddConfig):
    return resample_frame(frame, grid_header, box, config)


def _fold_task(partial, frame: CoaddFrame, grid_header: str, box, config: CoaddConfig, shape):
    """Resample one frame onto a box and add it to the running sum of its chain. The sum is
    updated in place: it belongs to this chain alone, and it is touched only after the
    resampling, so a task that fails (a read error) leaves it as it was."""
    vals, valid, flags = resample_frame(frame, grid_header, box, config)
    if partial is None:
        partial = K.empty_partial(shape)
    return K.accumulate(partial, vals, valid, frame.weight, frame.scale, flags)


def _finish_task(shape, *partials):
    """Add the chains' sums in chain order (a chain without a frame on a pixel adds exact
    zeros there, so this does not depend on the tiling) and divide."""
    total = K.empty_partial(shape)
    for p in partials:
        for key in total:
            if key == "flags":
                total[key] |= p[key]
            else:
                total[key] += p[key]
    return K.finish_mean(total)


def _stack_task(weights, noise, shape, method, clip_sigma, maxiters, *resampled):
    if not resampled:
        return (np.full(shape, np.nan, np.float32), np.zeros(shape, np.float32), np.zeros(shape, np.int16),
                np.zeros(shape, np.uint8))
    vals = np.stack([r[0] for r in resampled])
    valid = np.stack([r[1] for r in resampled])
    flags = np.stack([r[2] for r in resampled])
    return K.combine_stack(vals, valid, np.asarray(weights), method, clip_sigma, maxiters, np.asarray(noise),
                           flags=flags)


def effective_gain(frames: Sequence[CoaddFrame], method: str = "mean") -> float:
    """e-/ADU of the coadd of ``frames`` (the Poisson variance of a source of flux F in it
    is F / gain): ``gain * (sum w)**2 / sum(w**2 s)``; a median is noisier (x pi/2)."""
    w = np.array([f.weight for f in frames], float)
    s = np.array([f.scale for f in frames], float)
    g = float(np.median([f.gain for f in frames]))
    geff = g * w.sum() ** 2 / max(float(np.sum(w * w * s)), 1e-300)
    return geff * (2 / math.pi if method == "median" else 1.0)


def noise_correlation(frames: Sequence[CoaddFrame], grid: CoaddGrid, config: CoaddConfig | None = None,
                      sample: int = 48) -> float:
    """How much the per-pixel sky variance of the (bilinear, weighted-mean) coadd
    underestimates the variance of aperture sums, from the resampling geometry.

    An output pixel is ``sum_k w_k x_k`` over four input pixels: its white-noise variance is
    ``c = sum_k w_k**2`` times the input's, ``((1 - fx)**2 + fx**2) ((1 - fy)**2 + fy**2)`` for
    fractional input position ``fx, fy``, while a sum over many output pixels keeps the
    input variance per unit area. With frame ``i`` entering the mean as ``a_i = w_i**2
    noise_i**2``, the factor is ``sum a_i / sum a_i c_i`` (1 for no resampling; at most 4).
    Evaluated on a ``sample x sample`` grid of output pixels. NaN for the other kernels
    (oversampled, adaptive, median), whose factor is measured on the coadd instead.
    """
    config = config or CoaddConfig()
    if config.resampling != "bilinear" or config.combine == "median":
        return float("nan")
    wcs_out = grid.wcs
    gy, gx = grid.shape
    ys = np.linspace(0, gy - 1, sample).round()
    xs = np.linspace(0, gx - 1, sample).round()
    px, py = np.meshgrid(xs, ys)
    ra, dec = wcs_out.all_pix2world(px.ravel(), py.ravel(), 0)
    num = den = 0.0
    for f in frames:
        w_in = f.get_wcs()
        with np.errstate(all="ignore"):
            xi, yi = w_in.all_world2pix(ra, dec, 0, quiet=True, adaptive=True)
        ny, nx = f.shape
        ok = np.isfinite(xi) & np.isfinite(yi) & (xi >= 0) & (yi >= 0) & (xi <= nx - 1) & (yi <= ny - 1)
        if not ok.any():
            continue
        fx, fy = xi[ok] % 1.0, yi[ok] % 1.0
        c = float(np.mean(((1 - fx) ** 2 + fx**2) * ((1 - fy) ** 2 + fy**2)))
        if _oversampling(config, np.array([1.0])) != 1:
            return float("nan")
        noise = f.noise if math.isfinite(f.noise) else 1.0
        a = (f.weight * noise) ** 2
        num += a
        den += a * c
    return float(num / den) if den > 0 else float("nan")


def coadd(frames: Sequence[CoaddFrame], grid: CoaddGrid | None = None, config: CoaddConfig | None = None,
          tile: int | None = None):
    """The lazy coadd of ``frames``.

    Parameters
    ----------
    frames : sequence of CoaddFrame
        In the order they are summed (time order).
    grid : CoaddGrid, optional
        Output grid; default :func:`output_grid` at ``config.pixel_scale_arcsec``.
    config : CoaddConfig, optional
    tile : int, optional
        Output tile edge (default ``config.tile_px``, shrunk for median/clipped-mean so N
        tiles fit in ``config.tile_bytes``).

    Returns
    -------
    xarray.Dataset
        ``image`` (float32, the flux-weighted mean in ADU of the reference exposure, sky
        subtracted; NaN where no frame contributes), ``weight`` (float32, sum of weights),
        ``count`` (int16, contributing exposures), ``flags`` (uint8, the mask bits not
        excluded by ``config.bad_bits`` of the contributing input pixels, ORed: saturated by
        default), dims ``(y, x)``, one dask chunk per tile;
        ``attrs``: ``wcs`` (header string), ``ncombine``, ``exposures``, ``gain``,
        ``exptime``, ``zero_point``, ``combine``, ``resampling``. Nothing is computed.
    """
    import dask
    import dask.array as da
    import xarray as xr

    config = config or CoaddConfig()
    frames = list(frames)
    if not frames:
        raise InsufficientDataError("no frames to coadd")
    grid = grid or output_grid(frames, config.pixel_scale_arcsec)
    n = len(frames)
    if tile is None:
        tile = config.tile_px
        if config.combine != "mean":  # N resampled tiles at once, ~32 bytes per value in the combine
            tile = min(tile, max(64, int(math.sqrt(config.tile_bytes / (32.0 * n)))))
    tiles = plan_tiles(frames, grid, tile)
    # a frame held in memory enters the graph once; a frame read from a store (a few strings)
    # goes into each of its tasks, so the chains share no root and the scheduler finishes
    # them one by one (depth first) instead of starting every chain and holding their sums
    dframes = [dask.delayed(f, pure=True) if f.data is not None else f for f in frames]
    weights = [f.weight for f in frames]
    blocks: dict[tuple[int, int], list] = {}
    ty, tx = tile, tile
    g = config.frames_per_task
    for box, hit in tiles:
        y0, y1, x0, x1 = box
        shape = (y1 - y0, x1 - x0)
        if config.combine == "mean":
            # chains of frames (fixed groups of the frame list, so the sums do not depend on
            # the tiling), each a sequence of resample-and-add tasks holding one running sum:
            # memory per task is bounded by the tile whatever N; chains run in parallel
            chains = []
            for k in sorted({i // g for i in hit}):
                part = None
                for i in (i for i in hit if i // g == k):
                    part = dask.delayed(_fold_task, pure=True)(part, dframes[i], grid.header, box, config, shape)
                chains.append(part)
            out = dask.delayed(_finish_task, pure=True)(shape, *chains)
        else:
            res = [dask.delayed(_resample_task, pure=True)(dframes[i], grid.header, box, config) for i in hit]
            out = dask.delayed(_stack_task, pure=True)([weights[i] for i in hit], [frames[i].noise for i in hit],
                                                        shape, config.combine,
                                                        config.clip_sigma, config.clip_maxiters, *res)
        blocks[(y0 // ty, x0 // tx)] = [
            da.from_delayed(dask.delayed(operator.getitem, pure=True)(out, k), shape, dtype=dt)
            for k, dt in enumerate((np.float32, np.float32, np.int16, np.uint8))]
    nby, nbx = max(k[0] for k in blocks) + 1, max(k[1] for k in blocks) + 1
    arrays = [da.block([[blocks[(r, c)][k] for c in range(nbx)] for r in range(nby)]) for k in range(4)]
    ref = frames[0]
    attrs = {"wcs": grid.header, "ncombine": n, "exposures": [f.exposure for f in frames],
             "gain": effective_gain(frames, config.combine), "exptime": float(ref.exptime),
             "zero_point": float(ref.zero_point), "combine": config.combine, "resampling": config.resampling,
             "pixel_scale_arcsec": grid.pixel_scale_arcsec, "tile": int(tile),
             "noise_correlation": noise_correlation(frames, grid, config)}
    return xr.Dataset({"image": (("y", "x"), arrays[0], {"units": "adu", "long_name": "coadd, sky subtracted"}),
                       "weight": (("y", "x"), arrays[1], {"long_name": "sum of weights"}),
                       "count": (("y", "x"), arrays[2], {"long_name": "exposures contributing"}),
                       "flags": (("y", "x"), arrays[3], {"long_name": "mask bits carried from the inputs (OR)",
                                                         "flag_masks": [1, 2, 4, 8, 16]})}, attrs=attrs)


# ----------------------------------------------------------------------------- products
def fits_header(attrs: dict[str, Any], extra: dict[str, Any] | None = None):
    """FITS header of a coadd: its WCS, NCOMBINE, GAIN, EXPTIME, MAGZERO and provenance."""
    from astropy.io import fits

    from .. import __version__

    hdr = fits.Header()
    hdr.update(wcs_from_text(attrs["wcs"], "coadd grid").to_header(relax=True))
    hdr["NCOMBINE"] = (int(attrs["ncombine"]), "exposures combined")
    hdr["GAIN"] = (float(attrs["gain"]), "effective e-/ADU of the coadd")
    hdr["EXPTIME"] = (float(attrs["exptime"]), "[s] exposure time of the flux reference")
    if math.isfinite(float(attrs.get("zero_point", float("nan")))):
        hdr["MAGZERO"] = (float(attrs["zero_point"]), "zero point of the flux reference (mag, 1 ADU/s)")
    hdr["COMBINE"] = (str(attrs["combine"]), "combination of the resampled frames")
    hdr["RESAMPL"] = (str(attrs["resampling"]), "resampling kernel")
    hdr["SOFTWARE"] = f"mstdask {__version__}"
    for k, e in enumerate(attrs.get("exposures", [])):
        hdr[f"IMCMB{k + 1:03d}"] = str(e)[:68]
    for key, value in (extra or {}).items():
        hdr[key] = value
    return hdr


def write_fits(zarr_path: str, fits_path: str, header, rows: int = 512) -> None:
    """Write a coadd Zarr store (``image``, ``weight``, ``count``, ``flags``) as a FITS file with
    four HDUs (SCI primary, WHT, CNT, FLG), streamed in strips of ``rows`` rows so memory stays bounded
    whatever the coadd size. Not atomic by itself (the coadd job writes to a temporary name)."""
    import os

    import zarr
    from astropy.io import fits

    group = zarr.open_group(zarr_path, mode="r")
    if os.path.exists(fits_path):
        os.unlink(fits_path)
    for name, extname in (("image", "SCI"), ("weight", "WHT"), ("count", "CNT"), ("flags", "FLG")):
        arr = group[name]
        big_endian = {np.dtype(np.int16): np.dtype(">i2"), np.dtype(np.uint8): np.dtype("u1")}
        dtype = big_endian.get(arr.dtype, np.dtype(">f4"))
        hdr = fits.Header()
        if name == "image":
            hdr["SIMPLE"] = True
        else:
            hdr["XTENSION"] = "IMAGE"
        hdr["BITPIX"] = {"i": 16, "u": 8}.get(dtype.kind, -32)
        hdr["NAXIS"] = 2
        hdr["NAXIS1"] = arr.shape[1]
        hdr["NAXIS2"] = arr.shape[0]
        if name == "image":
            hdr["EXTEND"] = True
        else:
            hdr["PCOUNT"] = 0
            hdr["GCOUNT"] = 1
        hdr["EXTNAME"] = extname
        hdr.update(header)
        shdu = fits.StreamingHDU(fits_path, hdr)
        try:
            for r0 in range(0, arr.shape[0], rows):
                shdu.write(np.asarray(arr[r0:r0 + rows], dtype=dtype))
        finally:
            shdu.close()


def stack_photometry(zarr_path: str, refcat, *, ra0: float, dec0: float, meta: dict[str, Any] | None = None,
                     config=None, astro_config=None):
    """STATIC on a coadd (in a task): :func:`mstdask.photometry.measure_exposure` with the
    coadd's effective gain and reference exposure time, pixels without any contributing
    exposure masked, and the noise correlation the resampling introduces (the geometric
    factor of the kernel, else :func:`mstdask._coadd_kernels.noise_correlation` measured on
    the coadd's sky) in the sky term of the aperture and PSF errors.

    Returns
    -------
    mstdask.photometry.ExposureResult
        ``record`` gains ``ncombine``, ``gain_eff`` and ``noise_correlation``.
    """
    import zarr

    from ..masks import Flag
    from ..static.photometry import measure_exposure

    group = zarr.open_group(zarr_path, mode="r")
    attrs = dict(group.attrs)
    data = np.asarray(group["image"][...], np.float32)
    count = np.asarray(group["count"][...])
    empty = (count <= 0) | ~np.isfinite(data)
    mask = np.where(empty, np.uint8(Flag.BAD_PIXEL), np.asarray(group["flags"][...], np.uint8))
    data = np.where(empty, np.nan, data).astype(np.float32)
    # noise correlation on the sky: background-subtracted coadd, sources and empty pixels out
    k = float(attrs.get("noise_correlation", float("nan")))
    if not math.isfinite(k):  # no geometric factor for this kernel: measure it on the sky
        import sep
        from scipy import ndimage

        img = np.ascontiguousarray(np.nan_to_num(data, nan=0.0), dtype=np.float32)
        bkg = sep.Background(img, mask=np.ascontiguousarray(empty), bw=64, bh=64)
        sub = img - bkg.back()
        # bright pixels (sources, and their noisy wings) are left out
        src = ndimage.binary_dilation(np.abs(sub) > 3.0 * bkg.globalrms, iterations=3)
        k = K.noise_correlation(np.where(src, np.nan, sub), empty | src, box=6) if (~src).sum() > 1000 else 1.0
    # the sky term of every aperture and PSF error, and so the best aperture, includes it
    res = measure_exposure(data, mask, refcat, exptime=float(attrs["exptime"]), ra0=ra0, dec0=dec0,
                           gain=float(attrs["gain"]), meta=meta, config=config, astro_config=astro_config,
                           noise_correlation=max(float(k), 1.0))
    res.record.update(ncombine=int(attrs["ncombine"]), gain_eff=float(attrs["gain"]), noise_correlation=float(k))
    return res


def stack_photometry_task(zarr_path: str, out_file: str, refcat_path: str, refcat_config, *, ra0: float, dec0: float,
                          radius_deg: float, meta: dict[str, Any], signature: str, config=None,
                          astro_config=None) -> dict[str, Any]:
    """STATIC on one coadd inside a task: :func:`stack_photometry`, then the sources written
    atomically to ``out_file`` (the exposure record, with ``signature``, in its metadata).
    A coadd that cannot be calibrated returns ``status="flagged"`` and writes nothing."""
    from pathlib import Path

    from ..static.photometry import ExposureFlagged, _write_parquet
    from ..static.refcat import load_refcat

    refcat = load_refcat(refcat_path, refcat_config, meta.get("filter")).cone(ra0, dec0, radius_deg)
    try:
        res = stack_photometry(zarr_path, refcat, ra0=ra0, dec0=dec0, meta=meta, config=config,
                               astro_config=astro_config)
    except ExposureFlagged as exc:
        return {**meta, "status": "flagged", "reason": str(exc), "signature": signature}
    res.record.update(catalog=str(out_file), signature=signature)
    _write_parquet(Path(out_file), res.sources, meta, res.record)
    return res.record


def depth_rows(sources: dict[str, np.ndarray] | Any, n: int, bin_mag: float, snr: float) -> dict[str, Any]:
    """Error-versus-magnitude curve and limiting magnitude of one stack's sources (not
    saturated, no aperture entirely masked or with a non-positive sum)."""
    from ..masks import Flag

    mag = np.asarray(sources["mag_aper"], float)
    err = np.asarray(sources["magerr_aper"], float)
    ok = (((np.asarray(sources["flags"]) & int(Flag.SATURATED)) == 0)
          & ((np.asarray(sources["extract_flags"]) & (64 | 128)) == 0))  # sep APER_ALLMASKED, APER_NONPOSITIVE
    curve = K.error_curve(mag[ok], err[ok], bin_mag)
    lim, extrap = K.limiting_magnitude(curve["mag"], curve["err"], snr)
    return {"n": int(n), "limiting_mag": lim, "extrapolated": bool(extrap), "n_sources": int(ok.sum()),
            "curve_mag": curve["mag"].tolist(), "curve_err": curve["err"].tolist(), "curve_n": curve["n"].tolist()}


def depth_figure(rows: list[dict[str, Any]], points: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                 title: str = ""):
    """Fig. 13 of the pipeline paper: median magnitude error versus magnitude for every N
    (dotted: the single-exposure curve divided by sqrt(N)), and the limiting magnitude
    versus N beside the background-limited expectation ``m1 + 1.25 log10 N``."""
    # a bare Figure (no pyplot state): the caller's backend and open figures are left alone
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda r: r["n"])
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    cmap = colormaps["viridis"]
    base = next((r for r in rows if r["n"] == 1), None)
    for k, r in enumerate(rows):
        c = cmap(k / max(1, len(rows) - 1))
        if points and r["n"] in points:
            m, e = points[r["n"]]
            ax.scatter(m, e, s=2, color=c, alpha=0.25, lw=0)
        ax.plot(r["curve_mag"], r["curve_err"], "-", color=c, label=f"N = {r['n']}")
        if base is not None and r["n"] > 1:
            ax.plot(base["curve_mag"], np.asarray(base["curve_err"]) / math.sqrt(r["n"]), ":", color=c)
    ax.axhline(2.5 / math.log(10) / 5, color="0.5", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("magnitude")
    ax.set_ylabel("magnitude error")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or "stack photometry (dotted: N = 1 / sqrt(N))", fontsize=9)
    ns = np.array([r["n"] for r in rows], float)
    lim = np.array([r["limiting_mag"] for r in rows], float)
    bx.plot(ns, lim, "o-", label="measured (5 sigma)")
    if base is not None and np.isfinite(base["limiting_mag"]):
        nn = np.geomspace(1, max(ns.max(), 2), 50)
        bx.plot(nn, base["limiting_mag"] + 1.25 * np.log10(nn), "k:", label="N = 1 + 1.25 log10 N (SNR ~ sqrt N)")
    bx.set_xscale("log", base=2)
    bx.set_xlabel("N exposures stacked")
    bx.set_ylabel("limiting magnitude (5 sigma)")
    bx.legend(fontsize=8)
    return fig
