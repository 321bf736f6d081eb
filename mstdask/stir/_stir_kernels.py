"""Pure NumPy kernels of the per-frame STIR step (no Dask, no xarray).

Xiao et al. 2025, sections 3.1.4-3.1.5: every science frame is bias-subtracted and divided by
its night's master flat (:func:`reduce_frame`), satellite and aircraft tracks are found by a
Hough transform of the 2x2-binned frame and the pixels of a band around each centre line are
flagged (:func:`detect_tracks`), and cosmic rays are found with L.A.Cosmic as implemented by
astroscrappy (:func:`detect_cosmic_rays`). Each kernel works on one whole frame and returns
NumPy arrays; the lazy wrappers apply them one frame per task.

Tracks
------
The track kernels live in :mod:`mstdask.stir._tracks_kernels` (re-exported here).

A Hough transform of a thresholded image votes for every bright pixel, so on its own it finds
"lines" through rows of stars, star halos, bad columns and noise. :func:`detect_tracks`
therefore

1. bins the frame 2x2 (ignoring masked pixels), subtracts a smooth background and divides by
   the local noise (a coarse grid, :func:`estimate_background`); fully masked binned pixels
   (saturated cores) take their nearest neighbour's value, so a halo is a disc, not a ring;
2. smooths with a Gaussian about a track's width (a matched filter: a 4-sigma-per-pixel track
   becomes a ~12-sigma ribbon) and thresholds;
3. keeps the connected pieces longer than ``track_min_length_px``, cuts out their round fat
   parts (an opening by a square wider than a track's ribbon: star halos) and reduces what is
   left to skeletons, so a track votes once per pixel along its centre line and a star or a
   halo at most with a short spur;
4. takes the strongest peak of ``skimage.transform.hough_line`` on the skeleton pixels and
   refines the line by a least-squares fit of the pixels near it;
5. verifies the line at full resolution before accepting it: the median of its central
   3 px, per ~64-px segment, must be significant, and brighter than both shoulders (a line
   through or along a star halo is bright beside it too), over most of the detected extent
   (a row of stars is bright in a few segments only), with a mean of at least
   ``track_min_core_sigma`` per pixel; a line within 2 degrees of a row or column must not
   hold its excess in one pixel column (a bad column) or run along a frame edge.

Accepted lines' pixels are removed and the Hough step repeats until no peak is left; pixels
flagged for one track do not count for the next.

The paper's flagging rule, "pixels within a 10-pixel-wide band around the centre line whose
value is more than 3 sigma above the background median", is applied per pixel inside the band,
and also to the track's cross profile (median along the track per 1-px offset): the band is
widened to the first offset where that median falls below 3 sigma (of the median), plus one
pixel. A pixel on the centre line of a 4-sigma track is above 3 sigma only ~75 % of the
time and one at its edges almost never: the per-pixel rule alone flags ~30 % of a 4-sigma
track's pixels (measured on simulated frames); the profile rule flags the whole width where
the track contributes. A track that reaches the
frame edge is flagged up to the edge.

Cosmic rays
-----------
astroscrappy (``detect_cosmics``) on a full 9576 x 6388 frame takes ~110 s with its defaults and
~35 s with one iteration and separable medians, on one core. L.A.Cosmic is local: with one
iteration a pixel's flag depends only on the pixels within 8 px of it (L+ 1, noise and S'
medians 3 + 3, fine structure 2 + 4, two growths 1 + 1). So :func:`detect_cosmic_rays` runs
astroscrappy only where a cosmic ray can be: a cheap, loose pre-filter (L.A.Cosmic's
Laplacian-to-noise and fine-structure tests with a noise model from the background, 20-50 %
slack) picks candidate pixels, cut-outs around them (wide enough for that reach) are packed
into a mosaic, astroscrappy runs on the mosaic, and the centres of the cut-outs are copied
back. The four frame-edge strips are run as they are. The result equals astroscrappy on the
whole frame (``config.cr_region="full"``; checked in the tests and on full frames), at a cost
that scales with the number of cosmic rays and sharp stars instead of the frame size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

# The background and the tracks live in their own modules; their names stay importable here.
from ._background_kernels import (_MAD_TO_SIGMA, _STRIPE_ROWS, Background, _background_from_binned,  # noqa: F401
                                  _bin, _default_config, _fill_grid, estimate_background)
from ._tracks_kernels import (_MEDIAN_NOISE, _component_stats, _fill_nan_nearest, _fit_line,  # noqa: F401
                              _line_pixels, _medians_by_group, _robust_sigma, _verify_and_flag, detect_tracks)

if TYPE_CHECKING:
    from ..config import StirConfig

__all__ = ["Background", "estimate_background", "reduce_frame", "detect_tracks", "detect_cosmic_rays"]

_MOSAIC_BAND_PX = 4 * 2**20  # pixels per astroscrappy call on the cosmic-ray mosaic


# --------------------------------------------------------------------------- reduction
def reduce_frame(raw: np.ndarray, bias: np.ndarray | float, flat: np.ndarray | float) -> np.ndarray:
    """Bias-subtract and flat-field one frame: ``(raw - bias) / flat`` in float32.

    Parameters
    ----------
    raw : ndarray of uint16 (or any real dtype), shape (ny, nx)
        The camera frame.
    bias : float32 ndarray broadcastable to ``raw`` (or a number)
        The night's master bias in ADU.
    flat : float32 ndarray broadcastable to ``raw`` (or a number)
        The night's master flat (normalised, ~1).

    Returns
    -------
    ndarray of float32, shape (ny, nx)
        The reduced frame in ADU; NaN where the flat is not positive and finite.
    """
    out = np.asarray(raw).astype(np.float32)  # uint16 -> float32 is exact
    out -= np.asarray(bias, dtype=np.float32)
    flat = np.asarray(flat, dtype=np.float32)
    good = np.isfinite(flat) & (flat > 0)
    if good.all():
        out /= flat
    else:
        np.divide(out, flat, out=out, where=good)
        out[~np.broadcast_to(good, out.shape)] = np.nan
    return out


# --------------------------------------------------------------------------- cosmic rays
def _fill_isolated(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masked pixels with >= 2 valid 4-neighbours take their mean; returns (filled, still_masked).

    astroscrappy grows its input mask by one pixel, so 3 % of pepper-and-salt pixels would hide
    a quarter of the frame from it; filling the isolated ones keeps their neighbours usable
    without letting the defect itself look like a cosmic ray. Larger masked regions
    (saturated cores, clusters) stay masked.
    """
    filled = image.copy()
    bad = mask | ~np.isfinite(image)
    rows, cols = np.nonzero(bad)
    ny, nx = image.shape
    s = np.zeros(rows.size, dtype=np.float32)
    c = np.zeros(rows.size, dtype=np.float32)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        yy, xx = rows + dy, cols + dx
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        yy, xx = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
        ok &= ~bad[yy, xx]
        s += np.where(ok, image[yy, xx], 0)
        c += ok
    fill = c >= 2
    filled[rows[fill], cols[fill]] = s[fill] / c[fill]
    still = np.zeros_like(bad)
    still[rows[~fill], cols[~fill]] = True
    # astroscrappy never flags them but its medians still read them: keep saturated cores
    # as they are and NaN out (the frame's median instead).
    nan = ~np.isfinite(filled)
    if nan.any():
        filled[nan] = np.float32(np.nanmedian(image[::4, ::4])) if np.isfinite(image).any() else 0
    return filled, still


def _sepmed_at(a: np.ndarray, yy: np.ndarray, xx: np.ndarray, k: int) -> np.ndarray:
    """astroscrappy's separable k x k median (rows first, then the column) at given pixels."""
    r = k // 2
    ny, nx = a.shape
    row_meds = []
    for dy in range(-r, r + 1):
        y = np.clip(yy + dy, 0, ny - 1)
        vals = np.stack([a[y, np.clip(xx + dx, 0, nx - 1)] for dx in range(-r, r + 1)])
        row_meds.append(np.median(vals, axis=0))
    return np.median(np.stack(row_meds), axis=0)


def _lplus_stripe(e: np.ndarray) -> np.ndarray:
    """L.A.Cosmic's L+ (2x subsampled Laplacian, negatives clipped, rebinned) of the interior
    of ``e`` (one pixel dropped on every side), in closed form without subsampling.

    A subpixel of the 2x subsampled frame has two neighbours in its own pixel and one in each
    of two adjacent pixels, so its Laplacian is ``2 c - n_vertical - n_horizontal``.
    """
    c2 = 2 * e[1:-1, 1:-1]
    up, dn, lf, rt = e[:-2, 1:-1], e[2:, 1:-1], e[1:-1, :-2], e[1:-1, 2:]
    acc = np.maximum(c2 - up - lf, 0)
    acc += np.maximum(c2 - up - rt, 0)
    acc += np.maximum(c2 - dn - lf, 0)
    acc += np.maximum(c2 - dn - rt, 0)
    acc *= np.float32(0.25)
    return acc


_RING = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1))


def _cr_candidates(filled: np.ndarray, still: np.ndarray, bkg: Background, gain: float, read_noise_e: float,
                   config: StirConfig) -> np.ndarray:
    """Loose pre-filter of L.A.Cosmic's seed test: bool map of pixels that may be cosmic rays.

    astroscrappy seeds need ``S' > sigclip`` and ``S'/F > objlim`` where ``S = L+ / (2 N)``,
    ``S' = S - med7(S)``, ``N`` the noise and ``F`` the fine structure
    ``med5(I) - med9(med5(I))`` (separable medians). Here ``N`` comes from the background
    (lower than astroscrappy's median-filtered noise near stars, so S is higher) and ``F`` is
    ``med5(I)`` minus the highest ``med5`` 4 px away in 8 directions (never above the true
    fine structure by more than the slack), with ``config.cr_candidate_slack`` on both
    thresholds. Measured on simulated frames: every astroscrappy seed is a candidate.
    """
    ny, nx = filled.shape
    slack_s, slack_o = config.cr_candidate_slack
    thr = slack_s * config.cr_sigclip
    s_full = np.zeros((ny, nx), dtype=np.float32)
    rn2 = np.float32(read_noise_e * read_noise_e)
    g = np.float32(gain)
    for r0 in range(0, ny, _STRIPE_ROWS):
        r1 = min(ny, r0 + _STRIPE_ROWS)
        a0, a1 = max(0, r0 - 1), min(ny, r1 + 1)
        e = np.pad(filled[a0:a1] * g, ((1 if r0 == 0 else 0, 1 if r1 == ny else 0), (1, 1)), mode="edge")
        lp = _lplus_stripe(e)
        noise = bkg.rows(r0, r1)
        noise *= g
        np.maximum(noise, 0, out=noise)
        noise += rn2
        np.sqrt(noise, out=noise)
        noise *= 2
        s_full[r0:r1] = lp / noise
    cy, cx = np.nonzero(s_full > thr)
    cy, cx = cy[~still[cy, cx]], cx[~still[cy, cx]]
    if cy.size == 0:
        return np.zeros((ny, nx), dtype=bool)
    sp = s_full[cy, cx] - _sepmed_at(s_full, cy, cx, 7)
    k = sp > thr
    cy, cx, sp = cy[k], cx[k], sp[k]
    del s_full
    e = filled  # fine structure in ADU, divided by the noise in ADU below
    c0 = _sepmed_at(e, cy, cx, 5)
    ring = np.max(np.stack([_sepmed_at(e, np.clip(cy + 4 * dy, 0, ny - 1), np.clip(cx + 4 * dx, 0, nx - 1), 5)
                            for dy, dx in _RING]), axis=0)
    lev = bkg.at(cy, cx)
    noise_adu = np.sqrt(np.maximum(lev * g, 0) + rn2) / g
    f = np.maximum((c0 - np.maximum(ring, lev)) / noise_adu, 0.01)
    k = sp / f > slack_o * config.cr_objlim
    cand = np.zeros((ny, nx), dtype=bool)
    cand[cy[k], cx[k]] = True
    return cand


def _pack(heights: np.ndarray, widths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Shelf packing of rectangles (tallest first) into a strip ``width`` wide."""
    order = np.argsort(-heights, kind="stable")
    py = np.zeros(heights.size, dtype=np.intp)
    px = np.zeros(heights.size, dtype=np.intp)
    x = y = shelf = 0
    for k in order:
        h, w = int(heights[k]), int(widths[k])
        if x + w > width:
            y, x, shelf = y + shelf, 0, 0
        py[k], px[k] = y, x
        x += w
        shelf = max(shelf, h)
    return py, px, y + shelf


def _scrappy(data: np.ndarray, inmask: np.ndarray, gain: float, read_noise_e: float, config: StirConfig,
             pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> np.ndarray:
    """astroscrappy's cosmic-ray mask of ``data``, mirrored by ``pad`` = (top, bottom, left,
    right) pixels first: astroscrappy copies its input at a 2-4 px border instead of
    filtering it, which flags star cores at the frame edges; mirrored, an edge pixel sees a
    full neighbourhood."""
    import astroscrappy

    t, b, l, r = pad
    if any(pad):
        data = np.pad(data, ((t, b), (l, r)), mode="reflect")
        inmask = np.pad(inmask, ((t, b), (l, r)), mode="reflect")
    crmask, _ = astroscrappy.detect_cosmics(
        np.ascontiguousarray(data, dtype=np.float32), inmask=np.ascontiguousarray(inmask), gain=gain,
        readnoise=read_noise_e, satlevel=np.inf, sigclip=config.cr_sigclip, sigfrac=config.cr_sigfrac,
        objlim=config.cr_objlim, niter=config.cr_niter, sepmed=config.cr_sepmed, cleantype=config.cr_cleantype,
        fsmode=config.cr_fsmode, psffwhm=config.cr_psffwhm_px)
    return crmask[t:crmask.shape[0] - b, l:crmask.shape[1] - r]


def _scrappy_bands(mosaic: np.ndarray, mmask: np.ndarray, tops: np.ndarray, gain: float, read_noise_e: float,
                   config: StirConfig) -> np.ndarray:
    """astroscrappy's mask of the mosaic, run on bands of whole shelves (rows ``tops``).

    astroscrappy holds ~15 float32 copies of its input (4 of them 2x subsampled): run it on
    bands of whole shelves (no cut-out straddles two) of <= ``_MOSAIC_BAND_PX`` pixels.
    """
    height, width = mosaic.shape
    crm = np.zeros((height, width), dtype=bool)
    band_rows = max(1, _MOSAIC_BAND_PX // width)
    a = 0
    while a < height:
        nxt = tops[tops > a]
        fit = nxt[nxt - a <= band_rows]
        z = int(fit[-1]) if fit.size else int(nxt[0])
        crm[a:z] = _scrappy(mosaic[a:z], mmask[a:z], gain, read_noise_e, config)
        a = z
    return crm


def _scrappy_candidates(out: np.ndarray, cand: np.ndarray, filled: np.ndarray, still: np.ndarray, margin: int,
                        keep: int, gain: float, read_noise_e: float, config: StirConfig) -> None:
    """astroscrappy on cut-outs (``margin`` px around each group of candidates) packed into a
    mosaic; the trusted interior of each cut-out is ORed into ``out``."""
    ny, nx = out.shape
    labels, n = ndi.label(cand, structure=np.ones((3, 3), dtype=bool))
    if not n:
        return
    slices = ndi.find_objects(labels)
    del labels
    y0 = np.array([max(s[0].start - margin, 0) for s in slices])
    y1 = np.array([min(s[0].stop + margin, ny) for s in slices])
    x0 = np.array([max(s[1].start - margin, 0) for s in slices])
    x1 = np.array([min(s[1].stop + margin, nx) for s in slices])
    width = max(2048, int((x1 - x0).max()))
    py, px, height = _pack(y1 - y0, x1 - x0, width)
    mosaic = np.zeros((height, width), dtype=np.float32)
    mmask = np.ones((height, width), dtype=bool)  # the gaps are masked
    for k in range(n):
        h, w = y1[k] - y0[k], x1[k] - x0[k]
        mosaic[py[k]:py[k] + h, px[k]:px[k] + w] = filled[y0[k]:y1[k], x0[k]:x1[k]]
        mmask[py[k]:py[k] + h, px[k]:px[k] + w] = still[y0[k]:y1[k], x0[k]:x1[k]]
    crm = _scrappy_bands(mosaic, mmask, np.unique(np.append(py, height)), gain, read_noise_e, config)
    g = margin - keep  # trusted interior of each cut-out (frame edges come from the strips)
    for k in range(n):
        a0, a1 = g, y1[k] - y0[k] - g
        b0, b1 = g, x1[k] - x0[k] - g
        out[y0[k] + a0:y0[k] + a1, x0[k] + b0:x0[k] + b1] |= crm[py[k] + a0:py[k] + a1, px[k] + b0:px[k] + b1]


def _scrappy_edges(out: np.ndarray, filled: np.ndarray, still: np.ndarray, margin: int, reach: int, gain: float,
                   read_noise_e: float, config: StirConfig) -> None:
    """astroscrappy on the four frame-edge strips (``2 margin`` px wide), copied into ``out``.

    Mirrored at the frame edges like the whole frame in "full" mode: exact within
    (strip - reach - 1) px of the edge.
    """
    ny, nx = out.shape
    sw = 2 * margin
    exact = sw - reach - 1
    p = reach
    for sl, inner, pad in (((slice(0, sw), slice(None)), (slice(0, exact), slice(None)), (p, 0, p, p)),
                           ((slice(ny - sw, ny), slice(None)), (slice(sw - exact, sw), slice(None)), (0, p, p, p)),
                           ((slice(None), slice(0, sw)), (slice(None), slice(0, exact)), (p, p, p, 0)),
                           ((slice(None), slice(nx - sw, nx)), (slice(None), slice(sw - exact, sw)), (p, p, 0, p))):
        strip = _scrappy(filled[sl], still[sl], gain, read_noise_e, config, pad)
        view = out[sl]
        view[inner] = strip[inner]


def detect_cosmic_rays(image: np.ndarray, mask: np.ndarray | None, gain_e_per_adu: float, read_noise_e: float,
                       config: StirConfig | None = None, *, background: Background | None = None) -> np.ndarray:
    """Cosmic-ray pixels of one reduced frame with astroscrappy (L.A.Cosmic, van Dokkum 2001).

    Parameters tuned for undersampled CMOS frames (FWHM 2-3 px): ``sigclip`` 5, ``objlim``
    15 (astroscrappy's default 5 flags ~10 % of star cores at FWHM 1.6 px), one iteration
    with separable medians. Isolated masked pixels (pepper & salt, bad pixels) are replaced
    by the mean of their valid neighbours first, larger masked regions are given to
    astroscrappy as its mask. With ``config.cr_region == "candidates"`` (default)
    astroscrappy runs only on cut-outs around candidate pixels (see the module docstring);
    ``"full"`` runs it on the whole frame (same result, several times slower).

    Parameters
    ----------
    image : ndarray of float32, shape (ny, nx)
        Reduced frame in ADU with the sky included (the noise model needs it).
    mask : ndarray of bool, shape (ny, nx), or None
        Pixels to ignore (bad, saturated, pepper & salt); they are never flagged.
    gain_e_per_adu : float
        Gain (MST: 0.25 e-/ADU).
    read_noise_e : float
        Read noise in electrons (MST: ~1.0 e-).
    config : StirConfig, optional
    background : Background, optional
        From :func:`estimate_background` (used by the candidate pre-filter).

    Returns
    -------
    ndarray of bool, shape (ny, nx)
        Cosmic-ray pixels.
    """
    config = config or _default_config()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, not shape {image.shape}")
    if not (gain_e_per_adu > 0 and read_noise_e >= 0):
        raise ValueError(f"gain_e_per_adu={gain_e_per_adu} must be > 0 and read_noise_e={read_noise_e} >= 0")
    ny, nx = image.shape
    mask = np.zeros((ny, nx), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    filled, still = _fill_isolated(image, mask)
    # L.A.Cosmic's reach per iteration: L+ 1, noise med7 3, S' med7 3, fine structure
    # med5 + med9 6, two growths 2 -> 8 px, + 2 px of cleaning before each further iteration.
    reach = 8 * config.cr_niter + 2 * (config.cr_niter - 1)
    # Flagged pixels lie within 2 px of a first-iteration seed, or of a later seed, which
    # can only appear within reach + 2 of a pixel cleaned before.
    keep = 2 + (config.cr_niter - 1) * (reach // config.cr_niter + 4)
    margin = keep + reach  # inputs within `reach` of the kept pixels are inside the cut-out
    if config.cr_region == "full" or min(ny, nx) <= 4 * margin:
        crm = _scrappy(filled, still, gain_e_per_adu, read_noise_e, config, (reach,) * 4)
        return crm & ~mask
    if background is None:
        background = estimate_background(image, mask, config)
    cand = _cr_candidates(filled, still, background, gain_e_per_adu, read_noise_e, config)
    out = np.zeros((ny, nx), dtype=bool)
    _scrappy_candidates(out, cand, filled, still, margin, keep, gain_e_per_adu, read_noise_e, config)
    _scrappy_edges(out, filled, still, margin, reach, gain_e_per_adu, read_noise_e, config)
    return out & ~mask
