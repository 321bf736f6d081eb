"""Pure NumPy kernels of image coaddition (STATIC multiple, Xiao et al. 2025, sections 3.2.2
and 4.4): the pixel mapping of an output tile into an input frame, flux-conserving
resampling with masks, and the weighted combination of a stack of resampled tiles.

No Dask or xarray here: :mod:`mstdask.coadd` applies these per (output tile, input frame)
and per output tile.

Resampling (``bilinear``, our kernel) works like SWarp: the full astrometric solution (TPV
or SIP distortion, astropy ``all_world2pix``) is evaluated only on a coarse grid of output
pixels anchored at multiples of ``step`` in the *output grid* (so a pixel's mapping does not
depend on how the grid is cut into tiles) and interpolated bilinearly in between; the input
is interpolated bilinearly at the mapped positions and multiplied by the Jacobian of the
mapping (input pixels per output pixel), which conserves flux when the pixel scales differ.
A masked (or NaN, or off-frame) input pixel with a non-zero interpolation weight makes the
output pixel invalid: masked pixels never contribute.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit
from scipy import ndimage

__all__ = ["COMBINE_METHODS", "accumulate", "combine_stack", "empty_partial", "error_curve", "finish_mean",
           "limiting_magnitude", "mapping", "mapping_nodes", "noise_correlation", "resample_bilinear", "resample_nodes"]

Array = np.ndarray
COMBINE_METHODS = ("mean", "median", "clipped-mean")


# ----------------------------------------------------------------------------- mapping
def _node_axis(lo: int, hi: int, step: int) -> Array:
    """Coarse-grid nodes (multiples of ``step``) covering pixels ``lo .. hi - 1``."""
    first = (lo // step) * step
    last = -(-(hi - 1) // step) * step
    return np.arange(first, max(last, first) + step, step, dtype=np.float64)


def mapping(wcs_out: Any, wcs_in: Any, box: tuple[int, int, int, int], step: int = 16,
            offset: tuple[float, float] = (0.0, 0.0)) -> tuple[Array, Array, Array]:
    """Input pixel coordinates and Jacobian of every output pixel of a box.

    Parameters
    ----------
    wcs_out, wcs_in : astropy.wcs.WCS
        Output grid and input frame (with its distortion).
    box : (y0, y1, x0, x1)
        Output pixels (0-based, end exclusive) in the whole output grid.
    step : int
        Coarse-grid spacing in output pixels; the exact mapping is evaluated on the nodes
        (anchored at multiples of ``step``) and bilinearly interpolated in between.
    offset : (float, float)
        ``(dy, dx)`` added to every output pixel position (sub-pixel samples of oversampling).

    Returns
    -------
    xin, yin : ndarray (y1 - y0, x1 - x0) float64
        0-based input pixel coordinates (NaN where the sky position has no input pixel).
    jac : ndarray, same shape, float64
        ``|d(xin, yin) / d(xout, yout)|``: input pixel area per output pixel.
    """
    y0, y1, x0, x1 = box
    ny0, nx0, xi0, yi0, jac = mapping_nodes(wcs_out, wcs_in, box, step)
    # bilinear interpolation of the node values at every pixel (exact at the nodes)
    fy = (np.arange(y0, y1, dtype=np.float64) + offset[0] - ny0) / step
    fx = (np.arange(x0, x1, dtype=np.float64) + offset[1] - nx0) / step
    coords = np.meshgrid(fy, fx, indexing="ij")

    def interp(v: Array) -> Array:
        return ndimage.map_coordinates(v, coords, order=1, mode="nearest", prefilter=False)

    return interp(xi0), interp(yi0), interp(jac)


# ----------------------------------------------------------------------------- resampling
def resample_bilinear(data: Array, bad: Array, xin: Array, yin: Array, jac: Array,
                      origin: tuple[int, int] = (0, 0), frame_shape: tuple[int, int] | None = None,
                      flags: Array | None = None, min_good: float = 0.5) -> tuple[Array, Array, Array]:
    """Bilinear, flux-conserving resampling of one input region onto output pixels.

    Masked pixels never contribute: the interpolation is normalised over the good
    neighbours only (``sum w_k v_k / sum w_k``, good ``k``), and an output pixel is valid
    when those carry at least ``min_good`` of the weight, so a bad input pixel leaves a
    hole about one output pixel wide instead of spoiling all four neighbours.

    Parameters
    ----------
    data : ndarray (h, w)
        Input pixels (a region of the frame starting at ``origin``); NaN is treated as bad.
    bad : ndarray (h, w) bool
        Masked input pixels.
    xin, yin, jac : ndarray
        From :func:`mapping`, in whole-frame input coordinates.
    origin : (int, int)
        ``(y, x)`` of ``data[0, 0]`` in the frame.
    frame_shape : (int, int), optional
        The whole frame's shape; outside it an output pixel is invalid (default: the region).
    flags : ndarray (h, w) uint8, optional
        Mask bits to carry to the output (e.g. saturated): an output pixel gets the bits of
        the input pixels with a non-zero weight under it.
    min_good : float
        Least interpolation weight on good input pixels for a valid output pixel.

    Returns
    -------
    values : ndarray float32
        Flux per output pixel (0 where invalid).
    valid : ndarray bool
    out_flags : ndarray uint8
        The carried bits (0 where invalid).
    """
    bad = np.asarray(bad, bool) | ~np.isfinite(data)
    good = (~bad).astype(np.float32)
    clean = np.where(bad, 0.0, data).astype(np.float32)
    fy, fx = frame_shape if frame_shape is not None else (origin[0] + data.shape[0], origin[1] + data.shape[1])
    ok = (np.isfinite(xin) & np.isfinite(yin) & (xin >= 0) & (yin >= 0) & (xin <= fx - 1) & (yin <= fy - 1))
    coords = [np.where(ok, yin - origin[0], -10.0), np.where(ok, xin - origin[1], -10.0)]
    num = ndimage.map_coordinates(clean, coords, order=1, mode="constant", cval=0.0, prefilter=False,
                                  output=np.float32)
    den = ndimage.map_coordinates(good, coords, order=1, mode="constant", cval=0.0, prefilter=False,
                                  output=np.float32)
    valid = ok & (den >= min_good)
    with np.errstate(invalid="ignore", divide="ignore"):
        val = np.where(valid, num / np.where(valid, den, 1.0), 0.0).astype(np.float32)
    val *= jac.astype(np.float32)
    out_flags = np.zeros(val.shape, np.uint8)
    if flags is not None and np.any(flags):
        for bit in (1, 2, 4, 8, 16, 32, 64, 128):
            has = (flags & bit) != 0
            if has.any():
                w = ndimage.map_coordinates(has.astype(np.float32), coords, order=1, mode="constant", cval=0.0,
                                            prefilter=False, output=np.float32)
                out_flags[(w > 0) & valid] |= np.uint8(bit)
    return val, valid, out_flags


def mapping_nodes(wcs_out: Any, wcs_in: Any, box: tuple[int, int, int, int], step: int = 16
                  ) -> tuple[int, int, Array, Array, Array]:
    """The exact mapping on the coarse grid covering a box (one pixel of margin).

    Returns ``(ny0, nx0, xi, yi, jac)``: the output pixel of the first node and the input
    coordinates and Jacobian at every node (arrays of the node grid), for
    :func:`resample_nodes`. Nodes sit at multiples of ``step`` in the whole grid.
    """
    y0, y1, x0, x1 = box
    ny_, nx_ = _node_axis(y0 - 1, y1 + 1, step), _node_axis(x0 - 1, x1 + 1, step)
    gx, gy = np.meshgrid(nx_, ny_)
    px = np.concatenate([gx.ravel(), gx.ravel() + 1.0, gx.ravel()])
    py = np.concatenate([gy.ravel(), gy.ravel(), gy.ravel() + 1.0])
    ra, dec = wcs_out.all_pix2world(px, py, 0)
    with np.errstate(all="ignore"):
        # adaptive: every point is iterated on its own, so its result does not depend on the
        # other points of the call (the tile), and different tilings give identical coadds
        xi, yi = wcs_in.all_world2pix(ra, dec, 0, quiet=True, maxiter=50, tolerance=1e-6, adaptive=True)
    xi, yi = xi.reshape(3, *gx.shape), yi.reshape(3, *gx.shape)
    # the nodes and one-pixel offsets: forward differences give the Jacobian
    jac = np.abs((xi[1] - xi[0]) * (yi[2] - yi[0]) - (xi[2] - xi[0]) * (yi[1] - yi[0]))
    return int(ny_[0]), int(nx_[0]), np.ascontiguousarray(xi[0]), np.ascontiguousarray(yi[0]), jac


@njit(cache=True, nogil=True)
def _resample_nodes_nb(clean, good, flags, nxi, nyi, njac, ny0, nx0, step, y0, x0, oy, ox, fry, frx, offy, offx,
                       min_good, out_val, out_valid, out_flags):  # pragma: no cover - compiled
    h, w = clean.shape
    ny, nx = out_val.shape
    for i in range(ny):
        # node row and fraction from integers (tile-independent: nodes are multiples of step)
        qy = y0 + i - ny0
        ky = qy // step
        ty = ((qy - ky * step) + offy) / step
        if ty < 0.0:
            ky -= 1
            ty += 1.0
        for j in range(nx):
            qx = x0 + j - nx0
            kx = qx // step
            tx = ((qx - kx * step) + offx) / step
            if tx < 0.0:
                kx -= 1
                tx += 1.0
            a00 = (1.0 - ty) * (1.0 - tx)
            a01 = (1.0 - ty) * tx
            a10 = ty * (1.0 - tx)
            a11 = ty * tx
            x = a00 * nxi[ky, kx] + a01 * nxi[ky, kx + 1] + a10 * nxi[ky + 1, kx] + a11 * nxi[ky + 1, kx + 1]
            y = a00 * nyi[ky, kx] + a01 * nyi[ky, kx + 1] + a10 * nyi[ky + 1, kx] + a11 * nyi[ky + 1, kx + 1]
            out_val[i, j] = 0.0
            out_valid[i, j] = False
            out_flags[i, j] = 0
            if not (x >= 0.0 and y >= 0.0 and x <= frx - 1 and y <= fry - 1):  # also NaN
                continue
            xr = x - ox
            yr = y - oy
            ix = int(np.floor(xr))
            iy = int(np.floor(yr))
            fx = xr - ix
            fy = yr - iy
            num = 0.0
            den = 0.0
            fl = 0
            for dy in range(2):
                wy = fy if dy else 1.0 - fy
                yy = iy + dy
                if wy == 0.0 or yy < 0 or yy >= h:
                    continue
                for dx in range(2):
                    wx = fx if dx else 1.0 - fx
                    xx = ix + dx
                    if wx == 0.0 or xx < 0 or xx >= w:
                        continue
                    wgt = wy * wx
                    num += wgt * clean[yy, xx]
                    den += wgt * good[yy, xx]
                    fl |= flags[yy, xx]
            if den >= min_good:
                jac = a00 * njac[ky, kx] + a01 * njac[ky, kx + 1] + a10 * njac[ky + 1, kx] + a11 * njac[ky + 1, kx + 1]
                out_val[i, j] = num / den * jac
                out_valid[i, j] = True
                out_flags[i, j] = fl


def resample_nodes(data: Array, bad: Array, nodes: tuple[int, int, Array, Array, Array], box: tuple[int, int, int, int],
                   step: int = 16, origin: tuple[int, int] = (0, 0), frame_shape: tuple[int, int] | None = None,
                   flags: Array | None = None, offset: tuple[float, float] = (0.0, 0.0), min_good: float = 0.5
                   ) -> tuple[Array, Array, Array]:
    """:func:`resample_bilinear` fused with the node interpolation of :func:`mapping`, in one
    compiled pass (about 10x faster than the SciPy path, same results to rounding; no
    full-size coordinate arrays). ``nodes`` comes from :func:`mapping_nodes`."""
    ny0, nx0, xi, yi, jac = nodes
    y0, y1, x0, x1 = box
    bad = np.asarray(bad, bool) | ~np.isfinite(data)
    clean = np.where(bad, 0.0, data).astype(np.float32)
    good = (~bad).astype(np.float32)
    fl = np.zeros(data.shape, np.uint8) if flags is None else np.ascontiguousarray(flags, np.uint8)
    fy, fx = frame_shape if frame_shape is not None else (origin[0] + data.shape[0], origin[1] + data.shape[1])
    shape = (y1 - y0, x1 - x0)
    val = np.empty(shape, np.float32)
    valid = np.empty(shape, np.bool_)
    out_fl = np.empty(shape, np.uint8)
    _resample_nodes_nb(clean, good, fl, xi, yi, jac, ny0, nx0, int(step), y0, x0, int(origin[0]), int(origin[1]),
                       int(fy), int(fx), float(offset[0]), float(offset[1]), float(min_good), val, valid, out_fl)
    return val, valid, out_fl


# ----------------------------------------------------------------------------- combination
def empty_partial(shape: tuple[int, int]) -> dict[str, Array]:
    """A zero running sum for :func:`accumulate` (float64 sums: the order of frames is fixed
    and adding a frame that does not cover a pixel adds exact zeros, so the result does not
    depend on the tiling)."""
    return {"sum": np.zeros(shape, np.float64), "wsum": np.zeros(shape, np.float64),
            "count": np.zeros(shape, np.int16), "flags": np.zeros(shape, np.uint8)}


def accumulate(partial: dict[str, Array], values: Array, valid: Array, weight: float, scale: float = 1.0,
               flags: Array | None = None) -> dict[str, Array]:
    """Add one resampled frame (already flux-scaled) to a running weighted sum, in place.
    (``scale`` is accepted for symmetry with the frame record; the effective gain is a
    per-stack number, :func:`mstdask.coadd.effective_gain`.)"""
    fl = np.zeros(values.shape, np.uint8) if flags is None else np.ascontiguousarray(flags, np.uint8)
    _accumulate_nb(np.ascontiguousarray(values, np.float32), np.ascontiguousarray(valid, np.bool_), fl,
                   float(weight), partial["sum"], partial["wsum"], partial["count"], partial["flags"])
    return partial


@njit(cache=True, nogil=True)
def _accumulate_nb(values, valid, flags, w, s, ws, cnt, fl):  # pragma: no cover - compiled
    ny, nx = values.shape
    for i in range(ny):
        for j in range(nx):
            if valid[i, j]:  # invalid pixels add exact zeros: skipping them changes nothing
                s[i, j] += w * values[i, j]
                ws[i, j] += w
                cnt[i, j] += 1
                fl[i, j] |= flags[i, j]


def finish_mean(partial: dict[str, Array]) -> tuple[Array, Array, Array, Array]:
    """Weighted mean, weight map (sum of weights), exposure count and carried flags (OR) of
    a running sum; NaN where no frame contributes."""
    with np.errstate(invalid="ignore", divide="ignore"):
        img = np.where(partial["wsum"] > 0, partial["sum"] / partial["wsum"], np.nan)
    return (img.astype(np.float32), partial["wsum"].astype(np.float32), partial["count"].astype(np.int16),
            partial["flags"].astype(np.uint8))


def combine_stack(values: Array, valid: Array, weights: Array, method: str = "mean", clip_sigma: float = 3.0,
                  maxiters: int = 5, noise: Array | None = None, ampfrac: float = 0.3, flags: Array | None = None
                  ) -> tuple[Array, Array, Array, Array]:
    """Combine a stack of resampled tiles.

    Parameters
    ----------
    values : ndarray (n, ny, nx)
        Flux-scaled resampled frames.
    valid : ndarray (n, ny, nx) bool
        Pixels that may contribute (False: masked, off-frame).
    weights : ndarray (n,)
        Weight of each frame (inverse sky variance).
    method : {"mean", "median", "clipped-mean"}
        Weighted mean; plain median of the valid values (SWarp's MEDIAN); weighted mean
        after iterative clipping at ``clip_sigma`` sigmas around the median.
    noise : ndarray (n,), optional
        Sky rms of each (scaled) frame. Given, a value is clipped when it is further than
        ``clip_sigma * sqrt(noise**2 + (ampfrac * median)**2)`` from the median (SWarp's
        CLIPPED: the ``ampfrac`` term spares the cores of bright stars, whose seeing
        differs from frame to frame); without it the spread is the MAD of the pixel's values
        (meaningful from 5 values on).

    flags : ndarray (n, ny, nx) uint8, optional
        Carried mask bits of each resampled frame (ORed over the contributing frames).

    Returns
    -------
    image : ndarray float32 (NaN where nothing contributes)
    weight : ndarray float32, the sum of the weights of the contributing frames
    count : ndarray int16, the number of contributing frames
    flags : ndarray uint8
    """
    if method not in COMBINE_METHODS:
        raise ValueError(f"combine method {method!r}; choose one of {', '.join(COMBINE_METHODS)}")
    values = np.asarray(values, np.float64)
    use = np.asarray(valid, bool).copy()
    w = np.asarray(weights, np.float64)[:, None, None]
    if method == "median":
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                img = np.nanmedian(np.where(use, values, np.nan), axis=0)
        wsum = np.sum(np.where(use, w, 0.0), axis=0)
        return img.astype(np.float32), wsum.astype(np.float32), use.sum(axis=0).astype(np.int16), _or(flags, use)
    if method == "clipped-mean":
        import warnings

        for _ in range(int(maxiters)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                v = np.where(use, values, np.nan)
                med = np.nanmedian(v, axis=0)
                n_use = use.sum(axis=0)
                if noise is not None and np.all(np.isfinite(noise)):
                    sig = np.sqrt(np.asarray(noise, np.float64)[:, None, None] ** 2 + (ampfrac * med) ** 2)
                    enough = n_use >= 3  # a median of 3 or more values is a fair centre
                else:
                    sig = 1.4826 * np.nanmedian(np.abs(v - med), axis=0)
                    enough = n_use >= 5  # the MAD of fewer values is too noisy to clip on
            out = use & (np.abs(values - med) > clip_sigma * sig) & enough[None] & (sig > 0)
            if not out.any():
                break
            use &= ~out
    ww = np.where(use, w, 0.0)
    wsum = ww.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        img = np.where(wsum > 0, (ww * values).sum(axis=0) / wsum, np.nan)
    return img.astype(np.float32), wsum.astype(np.float32), use.sum(axis=0).astype(np.int16), _or(flags, use)


def _or(flags: Array | None, use: Array) -> Array:
    if flags is None:
        return np.zeros(use.shape[1:], np.uint8)
    return np.bitwise_or.reduce(np.where(use, flags, 0).astype(np.uint8), axis=0)


# ----------------------------------------------------------------------------- noise
def noise_correlation(image: Array, bad: Array, box: int = 6) -> float:
    """Variance of ``box x box`` sums over ``box**2`` times the pixel variance, on the
    (background-subtracted) sky.

    Resampling correlates neighbouring pixels: the per-pixel rms a photometry code measures
    then underestimates the noise of an aperture sum. This factor (1 for white noise) says
    by how much in variance; robust (MAD) statistics keep the sources out.
    """
    img = np.where(bad | ~np.isfinite(image), np.nan, image).astype(np.float64)
    ny, nx = img.shape
    my, mx = ny // box, nx // box
    if my < 4 or mx < 4:
        return 1.0
    blocks = img[:my * box, :mx * box].reshape(my, box, mx, box).swapaxes(1, 2).reshape(my, mx, box * box)
    full = np.isfinite(blocks).all(axis=2)
    if full.sum() < 16:
        return 1.0
    sums = blocks[full].sum(axis=1)
    pix = blocks[full].ravel()

    def mad(a: Array) -> float:
        return float(1.4826 * np.median(np.abs(a - np.median(a))))

    sp, ss = mad(pix), mad(sums)
    if not (sp > 0 and np.isfinite(ss)):
        return 1.0
    return float(max(ss**2 / (box * box * sp**2), 1e-3))


# ----------------------------------------------------------------------------- depth
def error_curve(mag: Array, err: Array, bin_mag: float = 0.5) -> dict[str, Array]:
    """Median magnitude error in magnitude bins (the solid lines of Fig. 13).

    Returns ``mag`` (bin centres), ``err`` (median), ``n`` (sources per bin); bins with fewer
    than 3 sources are left out.
    """
    mag, err = np.asarray(mag, float), np.asarray(err, float)
    ok = np.isfinite(mag) & np.isfinite(err) & (err > 0)
    mag, err = mag[ok], err[ok]
    if mag.size == 0:
        return {"mag": np.zeros(0), "err": np.zeros(0), "n": np.zeros(0, np.int64)}
    lo = math.floor(mag.min() / bin_mag) * bin_mag
    idx = np.floor((mag - lo) / bin_mag).astype(np.int64)
    centres, meds, ns = [], [], []
    for k in np.unique(idx):
        sel = idx == k
        if sel.sum() >= 3:
            centres.append(lo + (k + 0.5) * bin_mag)
            meds.append(float(np.median(err[sel])))
            ns.append(int(sel.sum()))
    return {"mag": np.asarray(centres), "err": np.asarray(meds), "n": np.asarray(ns, np.int64)}


def limiting_magnitude(curve_mag: Array, curve_err: Array, snr: float = 5.0) -> tuple[float, bool]:
    """Magnitude where the median error reaches ``2.5 / ln 10 / snr`` (0.217 mag at 5 sigma).

    Interpolated in ``log10(err)`` between the two bins that bracket it; when no bin is that
    faint, extrapolated from a straight line fitted to ``log10(err)`` of the faint,
    background-limited bins (errors above 0.02 mag). Returns ``(magnitude, extrapolated)``;
    NaN when there are too few bins.
    """
    target = 2.5 / math.log(10) / snr
    m, e = np.asarray(curve_mag, float), np.asarray(curve_err, float)
    if m.size < 2:
        return float("nan"), False
    le, lt = np.log10(e), math.log10(target)
    above = np.flatnonzero(e >= target)
    if above.size and above[0] > 0:
        k = above[0]
        t = (lt - le[k - 1]) / (le[k] - le[k - 1]) if le[k] != le[k - 1] else 0.0
        return float(m[k - 1] + t * (m[k] - m[k - 1])), False
    faint = e > 0.02
    if faint.sum() < 2:
        faint = np.zeros_like(faint)
        faint[-min(3, m.size):] = True
    slope, icpt = np.polyfit(m[faint], le[faint], 1)
    if not slope > 0:
        return float("nan"), True
    return float((lt - icpt) / slope), True
