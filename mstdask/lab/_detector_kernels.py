"""Pure NumPy kernels of the detector characterisation (no Dask, no xarray).

Zhang et al. 2025 (the MST camera evaluation paper, sections 2-3): bias stability, fixed
pattern of the combined bias, anomalous pixels, dark current, linearity, photon-transfer gain
and read noise (Eq. 1) and the per-pixel gain and read noise (Eqs. 2-3).
:mod:`mstdask.detector` applies them block by block over a store.

Two kinds of kernel live here: per-block kernels (one spatial tile of a few frames, one
frame's central region, one pair of frames) that run in parallel tasks, and small summary
kernels on already reduced numbers (a value per frame or per exposure time) that make the
scalars of ``characterization.json`` and raise
:class:`~mstdask.errors.InsufficientDataError` when a measurement cannot be made.
"""

from __future__ import annotations

import numpy as np

from ..errors import InsufficientDataError

__all__ = [
    "central_slices",
    "partial_moments",
    "finish_moments",
    "pixel_gain",
    "frame_stats",
    "pair_stats",
    "dark_level",
    "row_medians",
    "subarea_counts",
    "linear_fit",
    "bias_stability_summary",
    "fixed_pattern_summary",
    "map_centre_spread",
    "linearity_summary",
    "ptc_summary",
    "dark_summary",
    "pixel_gain_summary",
]

#: Order of the planes returned by :func:`finish_moments`.
MOMENT_PLANES = ("mean", "var", "nsat")


# ----------------------------------------------------------------------------- geometry
def central_slices(shape: tuple[int, int], size: int) -> tuple[slice, slice]:
    """The central ``size x size`` region of a frame, or its central half on a smaller axis.

    Each axis keeps ``min(size, n // 2)`` pixels around its centre (camera paper: the
    central 2000 x 2000 pixels of a 9576 x 6388 frame; a 600 x 900 frame gives 300 x 450).

    Parameters
    ----------
    shape : (int, int)
        ``(ny, nx)``.
    size : int
        Edge of the region on a full-size frame.

    Returns
    -------
    (slice, slice)
        Rows and columns.
    """
    out = []
    for n in shape:
        edge = max(1, min(int(size), n // 2)) if n > 1 else n
        start = (n - edge) // 2
        out.append(slice(start, start + edge))
    return out[0], out[1]


# ----------------------------------------------------------------------------- streaming moments
def partial_moments(block: np.ndarray, shift: np.ndarray, saturation: float) -> np.ndarray:
    """Per-pixel partial sums of a block of frames, frame by frame.

    The streaming half of a one-pass mean and variance: sums of ``d = frame - shift`` and
    of ``d**2``, and the number of samples at or above ``saturation``. ``shift`` is one
    frame of the same stack (the shifted-data algorithm), so ``d`` stays small and the
    variance keeps its precision. For integer frames and an integer shift every sum is an
    integer below 2**53, exact in float64: partial sums of any grouping of frames add up
    to the same bits, so results do not depend on the chunking.

    Parameters
    ----------
    block : ndarray, shape (n, ny, nx)
        Frames (uint16 raw pixels).
    shift : ndarray, shape (ny, nx)
        Per-pixel shift (float64, integer-valued for raw frames).
    saturation : float
        Samples at or above this count as saturated (ADU).

    Returns
    -------
    ndarray of float64, shape (1, 3, ny, nx)
        Sums of ``d``, sums of ``d**2``, saturated counts (a leading block axis of 1, so
        blocks stack along the frame axis and are summed in a tree).
    """
    out = np.zeros((1, 3) + block.shape[1:], dtype=np.float64)
    d = np.empty(block.shape[1:], dtype=np.float64)
    for frame in block:  # one frame at a time: memory does not grow with the block
        np.subtract(frame, shift, out=d, dtype=np.float64)
        out[0, 0] += d
        out[0, 2] += frame >= saturation
        d *= d
        out[0, 1] += d
    return out


def finish_moments(sums: np.ndarray, shift: np.ndarray, n: int) -> np.ndarray:
    """Per-pixel mean, variance (ddof=1) and saturated count from :func:`partial_moments` sums.

    Parameters
    ----------
    sums : ndarray, shape (3, ny, nx)
        Sums over all blocks.
    shift : ndarray, shape (ny, nx)
        The shift used by :func:`partial_moments`.
    n : int
        Number of frames.

    Returns
    -------
    ndarray of float64, shape (3, ny, nx)
        Mean, variance (NaN for a single frame), saturated count.
    """
    s, ss, nsat = sums
    out = np.empty_like(sums)
    out[0] = shift + s / n
    if n > 1:
        out[1] = np.clip((ss - s * s / n) / (n - 1), 0.0, None)
    else:
        out[1] = np.nan
    out[2] = nsat
    return out


def pixel_gain(flat_mean: np.ndarray, flat_var: np.ndarray, flat_nsat: np.ndarray, bias_mean: np.ndarray,
               bias_var: np.ndarray) -> np.ndarray:
    """Per-pixel gain and read noise, camera paper Eqs. 2-3.

    ``g = (<F> - <B>) / (var F - var B)`` in e-/ADU and ``r = g * std B`` in e-, from many
    flats at one exposure time and many bias frames. Pixels saturated in any flat, or
    without positive signal or excess variance, are NaN.

    Returns
    -------
    ndarray of float32, shape (2, ny, nx)
        Gain, read noise.
    """
    signal = flat_mean - bias_mean
    excess = flat_var - bias_var
    ok = (flat_nsat == 0) & (signal > 0) & (excess > 0)
    out = np.full((2,) + signal.shape, np.nan, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = np.where(ok, signal / np.where(ok, excess, 1.0), np.nan)
        out[0] = g
        out[1] = g * np.sqrt(bias_var)
    return out


# ----------------------------------------------------------------------------- per-frame kernels
def frame_stats(region: np.ndarray, saturation: float) -> np.ndarray:
    """Mean and saturated fraction of each frame's region.

    Parameters
    ----------
    region : ndarray, shape (n, ry, rx)
    saturation : float

    Returns
    -------
    ndarray of float64, shape (n, 2)
        Mean (ADU), fraction of pixels at or above ``saturation``.
    """
    flat = region.reshape(region.shape[0], -1)
    out = np.empty((region.shape[0], 2), dtype=np.float64)
    out[:, 0] = flat.sum(axis=1, dtype=np.float64) / flat.shape[1]  # exact integer sum, then one division
    out[:, 1] = (flat >= saturation).mean(axis=1)
    return out


def pair_stats(first: np.ndarray, second: np.ndarray, saturation: float) -> np.ndarray:
    """What Eq. 1 needs of each pair of frames: both means, the variance of their
    difference image, and the larger saturated fraction of the two.

    Parameters
    ----------
    first, second : ndarray, shape (n, ry, rx)
        The pairs' frames (regions).
    saturation : float

    Returns
    -------
    ndarray of float64, shape (n, 4)
        ``<1>``, ``<2>``, ``var(1 - 2)`` (ddof=1), saturated fraction.
    """
    out = np.empty((first.shape[0], 4), dtype=np.float64)
    for i, (a, b) in enumerate(zip(first, second)):
        a64 = a.astype(np.float64)
        d = a64 - b  # exact for integer frames
        npx = d.size
        s = d.sum()
        out[i, 0] = a64.sum() / npx
        out[i, 1] = b.sum(dtype=np.float64) / npx
        out[i, 2] = (np.dot(d.ravel(), d.ravel()) - s * s / npx) / (npx - 1)
        out[i, 3] = max((a >= saturation).mean(), (b >= saturation).mean())
    return out


def dark_level(region: np.ndarray, bias: np.ndarray, sigma: float) -> np.ndarray:
    """Level of each bias-subtracted dark: its sigma-clipped mean.

    Clipping (median centre, MAD spread) drops cosmic rays and hot pixels, which in a
    long dark would otherwise carry a large part of the mean; the threshold is high
    (20 sigma by default) so the skewed tail of normal dark current is kept.

    Parameters
    ----------
    region : ndarray, shape (n, ry, rx)
        Raw darks.
    bias : ndarray, shape (ry, rx)
        The combined bias of the same region.
    sigma : float

    Returns
    -------
    ndarray of float64, shape (n,)
        Levels in ADU.
    """
    from astropy.stats import sigma_clipped_stats

    out = np.empty(region.shape[0], dtype=np.float64)
    for i, frame in enumerate(region):
        mean, _, _ = sigma_clipped_stats(frame - bias, sigma=sigma, cenfunc="median", stdfunc="mad_std")
        out[i] = mean
    return out


def row_medians(block: np.ndarray, axis: int) -> np.ndarray:
    """Median of a 2-D block along ``axis`` (a row or column profile), float64."""
    return np.median(block, axis=axis).astype(np.float64)


def subarea_counts(mask: np.ndarray, cell: int) -> np.ndarray:
    """Number of ``True`` pixels in each ``cell x cell`` sub-area (edge cells may be partial).

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
    cell : int

    Returns
    -------
    ndarray of int32, shape (ceil(ny / cell), ceil(nx / cell))
    """
    ny, nx = mask.shape
    py, px = -ny % cell, -nx % cell
    m = np.pad(mask.astype(np.int32), ((0, py), (0, px)))
    return m.reshape(m.shape[0] // cell, cell, m.shape[1] // cell, cell).sum(axis=(1, 3)).astype(np.int32)


# ----------------------------------------------------------------------------- summaries
def linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares line ``y = a x + b`` and its coefficient of determination R².

    Returns
    -------
    (slope, intercept, r2)
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    tot = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - np.sum(resid**2) / tot if tot > 0 else np.nan
    return float(slope), float(intercept), float(r2)


def bias_stability_summary(means: np.ndarray, sigma: float) -> dict:
    """Fig. 1 of the camera paper: the 3-sigma-clipped overall mean of the per-frame means
    of the central region, and how far the frames stray from it.

    Returns
    -------
    dict
        ``clipped_mean_adu``, ``clipped_std_adu``, ``n_clipped``, ``peak_to_peak_adu``
        (max - min of the per-frame means), ``max_abs_deviation_adu`` (largest distance of
        a frame from the clipped mean).
    """
    from astropy.stats import sigma_clip

    means = np.asarray(means, dtype=np.float64)
    clipped = sigma_clip(means, sigma=sigma, maxiters=None, cenfunc="median", stdfunc="std", masked=True)
    kept = clipped.compressed()
    centre = float(kept.mean())
    return {
        "clipped_mean_adu": centre,
        "clipped_std_adu": float(kept.std(ddof=1)) if kept.size > 1 else float("nan"),
        "n_clipped": int(means.size - kept.size),
        "peak_to_peak_adu": float(np.ptp(means)),
        "max_abs_deviation_adu": float(np.max(np.abs(means - centre))),
    }


def fixed_pattern_summary(row_profile: np.ndarray, col_profile: np.ndarray, corners: dict[str, np.ndarray],
                          corner_rows: dict[str, np.ndarray]) -> dict:
    """Fixed-pattern noise of a combined bias (camera paper Fig. 2).

    Parameters
    ----------
    row_profile : ndarray, shape (ny,)
        Median of each row (row 0 is the bottom of the frame, FITS convention).
    col_profile : ndarray, shape (nx,)
        Median of each column.
    corners : dict of str to ndarray
        The combined bias in each corner box (``bottom_left``, ...).
    corner_rows : dict of str to ndarray
        ``row_profile`` over the rows of each corner box.

    Returns
    -------
    dict
        ``gradient_bottom_to_top_adu``: the fitted line through the row medians, top row
        minus bottom row (negative when counts fall upwards, as in MST1 and MST3);
        ``gradient_left_to_right_adu``: the same for the column medians;
        ``row_banding_adu``: std of the row medians about that line (horizontal structures);
        ``corner_excess_adu``: per corner, the median of the box minus its rows' medians
        (the warm bottom corners), and ``corner_excess_max_adu``.
    """
    ny, nx = row_profile.size, col_profile.size
    ys = np.arange(ny, dtype=np.float64)
    xs = np.arange(nx, dtype=np.float64)
    a_y, b_y, _ = linear_fit(ys, row_profile) if ny > 1 else (0.0, float(row_profile[0]), np.nan)
    a_x, _, _ = linear_fit(xs, col_profile) if nx > 1 else (0.0, 0.0, np.nan)
    detrended = row_profile - (a_y * ys + b_y)
    excess = {name: float(np.median(box - corner_rows[name][:, None])) for name, box in corners.items()}
    return {
        "gradient_bottom_to_top_adu": float(a_y * (ny - 1)),
        "gradient_left_to_right_adu": float(a_x * (nx - 1)),
        "row_banding_adu": float(detrended.std()),
        "corner_excess_adu": excess,
        "corner_excess_max_adu": max(excess.values()) if excess else float("nan"),
    }


def map_centre_spread(values: np.ndarray, clip_sigma: float | None) -> np.ndarray:
    """Centre and spread of a per-pixel map for the anomalous-pixel thresholds.

    ``clip_sigma=None`` gives the plain mean and standard deviation (the camera paper's
    Figs. 3-4, whose spread includes the anomalous tail); a number gives the
    sigma-clipped mean and std (astropy), a threshold relative to the normal pixels.

    Returns
    -------
    ndarray of float64, shape (2,)
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if clip_sigma is None:
        return np.array([v.mean(), v.std()])
    from astropy.stats import sigma_clipped_stats

    mean, _, std = sigma_clipped_stats(v, sigma=clip_sigma, maxiters=10)
    return np.array([mean, std], dtype=np.float64)


def _level_table(exptime: np.ndarray, stats: np.ndarray, bias_level: float, saturated_fraction: float):
    """Per-exposure-time mean signal (bias-subtracted) of unsaturated frames, and the
    saturated exposure times."""
    exptime = np.asarray(exptime, dtype=np.float64)
    signal = stats[:, 0] - bias_level
    sat = stats[:, 1] > saturated_fraction
    times = np.unique(exptime)
    good_t, good_s, n, bad_t = [], [], [], []
    for t in times:
        sel = exptime == t
        ok = sel & ~sat
        if ok.any():
            good_t.append(float(t))
            good_s.append(float(signal[ok].mean()))
            n.append(int(ok.sum()))
        if (sel & sat).any():
            bad_t.append(float(t))
    return np.array(good_t), np.array(good_s), n, bad_t


def linearity_summary(exptime: np.ndarray, stats: np.ndarray, bias_level: float, *, saturated_fraction: float,
                      floor_adu: float, min_levels: int = 3) -> dict:
    """Fig. 9 of the camera paper: signal vs exposure time, R², and the nonlinearity.

    The mean bias-subtracted signal of the central region is averaged per exposure time
    over the unsaturated flats; a straight line (with intercept) is fitted to all those
    levels; the nonlinearity of a level is ``100 (S - fit) / fit`` per cent.

    Parameters
    ----------
    exptime : ndarray, shape (n,)
        Exposure time of each flat (s).
    stats : ndarray, shape (n, 2)
        :func:`frame_stats` of each flat's central region.
    bias_level : float
        Mean of the combined bias over the same region (ADU).
    saturated_fraction : float
        A flat with more of its region at or above saturation is left out.
    floor_adu : float
        ``max_abs_nonlinearity_above_floor_percent`` uses the levels above this (3000 ADU).
    min_levels : int
        Fewest unsaturated exposure times for a fit.

    Raises
    ------
    InsufficientDataError
        Fewer than ``min_levels`` unsaturated exposure times.
    """
    t, s, n, bad_t = _level_table(exptime, stats, bias_level, saturated_fraction)
    if t.size < min_levels:
        why = (f"{len(bad_t)} exposure time(s) are saturated ({', '.join(f'{x:g}' for x in bad_t[:8])} s)"
               if bad_t else "too few exposure times")
        raise InsufficientDataError(
            f"linearity: {t.size} unsaturated flat exposure time(s), at least {min_levels} needed ({why}); "
            "take flats over a ladder of exposure times below saturation (camera paper Table 2)")
    slope, intercept, r2 = linear_fit(t, s)
    fit = slope * t + intercept
    with np.errstate(invalid="ignore", divide="ignore"):
        nl = np.where(fit > 0, 100.0 * (s - fit) / fit, np.nan)
    above = s >= floor_adu
    return {
        "exptime_s": t.tolist(),
        "signal_adu": s.tolist(),
        "n_flats": n,
        "fit_slope_adu_per_s": slope,
        "fit_intercept_adu": intercept,
        "r2": r2,
        "nonlinearity_percent": nl.tolist(),
        "floor_adu": float(floor_adu),
        "max_abs_nonlinearity_above_floor_percent": float(np.nanmax(np.abs(nl[above]))) if above.any() else None,
        "max_abs_nonlinearity_percent": float(np.nanmax(np.abs(nl))),
        "saturated_exptime_s": bad_t,
    }


def ptc_summary(pair_exptime: np.ndarray, pairs: np.ndarray, bias_pairs: np.ndarray, bias_level: float, *,
                saturated_fraction: float, min_adu: float, max_adu: float) -> dict:
    """Gain and read noise by the conventional photon-transfer method, camera paper Eq. 1.

    For each pair of flats at one exposure time
    ``g = ((<F1> - <B1>) + (<F2> - <B2>)) / (var(F1 - F2) - var(B1 - B2))``, with ``<B>``
    the mean bias level and ``var(B1 - B2)`` the mean over consecutive bias pairs; the
    adopted gain is the median over unsaturated pairs whose mean signal lies in
    ``[min_adu, max_adu]``, and the read noise ``g * sqrt(var(B1 - B2) / 2)`` (e-).

    Parameters
    ----------
    pair_exptime : ndarray, shape (p,)
    pairs : ndarray, shape (p, 4)
        :func:`pair_stats` of the flat pairs (central region).
    bias_pairs : ndarray, shape (q, 4)
        :func:`pair_stats` of the bias pairs.
    bias_level : float
        Mean bias over the region (ADU).

    Raises
    ------
    InsufficientDataError
        No usable pair (all saturated or outside the signal range).
    """
    bias_var = float(np.mean(bias_pairs[:, 2]))
    signal = 0.5 * (pairs[:, 0] + pairs[:, 1]) - bias_level
    excess = pairs[:, 2] - bias_var
    with np.errstate(invalid="ignore", divide="ignore"):
        gains = np.where(excess > 0, 2.0 * signal / excess, np.nan)
    sat = pairs[:, 3] > saturated_fraction
    use = ~sat & (signal >= min_adu) & (signal <= max_adu) & np.isfinite(gains)
    if not use.any():
        reasons = []
        if sat.any():
            reasons.append(f"{int(sat.sum())} of {len(sat)} pair(s) saturated "
                           f"(at {', '.join(f'{t:g}' for t in np.unique(pair_exptime[sat])[:8])} s)")
        low = ~sat & (signal < min_adu)
        high = ~sat & (signal > max_adu)
        if low.any() or high.any():
            reasons.append(f"{int(low.sum() + high.sum())} outside {min_adu:.0f}-{max_adu:.0f} ADU")
        raise InsufficientDataError(
            f"gain_e_per_adu (Eq. 1): no usable pair of flats at equal exposure time ({'; '.join(reasons)}); "
            f"take pairs of flats between {min_adu:.0f} and {max_adu:.0f} ADU")
    gain = float(np.median(gains[use]))
    return {
        "gain_e_per_adu": gain,
        "read_noise_e": float(gain * np.sqrt(bias_var / 2.0)),
        "bias_diff_variance_adu2": bias_var,
        "n_bias_pairs": int(len(bias_pairs)),
        "n_pairs_used": int(use.sum()),
        "pairs": {"exptime_s": np.asarray(pair_exptime, float).tolist(), "signal_adu": signal.tolist(),
                  "diff_variance_adu2": pairs[:, 2].tolist(), "gain_e_per_adu": gains.tolist(),
                  "used": use.tolist()},
    }


def dark_summary(exptime: np.ndarray, levels: np.ndarray, min_exptimes: int = 3) -> dict:
    """Dark current from a line fitted to the bias-subtracted dark level vs exposure time
    (camera paper Fig. 7), in ADU; the caller converts with a gain.

    Raises
    ------
    InsufficientDataError
        Fewer than ``min_exptimes`` distinct exposure times.
    """
    exptime = np.asarray(exptime, dtype=np.float64)
    if np.unique(exptime).size < min_exptimes:
        raise InsufficientDataError(
            f"dark_current_e_per_pix_s: darks at {np.unique(exptime).size} exposure time(s), at least "
            f"{min_exptimes} needed for the fit; take darks over a range of exposure times (camera paper Table 2)")
    slope, intercept, r2 = linear_fit(exptime, levels)
    return {"exptime_s": exptime.tolist(), "level_adu": np.asarray(levels, float).tolist(),
            "slope_adu_per_s": slope, "intercept_adu": intercept, "r2": r2}


def pixel_gain_summary(gain: np.ndarray, read_noise: np.ndarray, min_valid: float, what: str) -> dict:
    """Medians of the per-pixel gain and read-noise maps, and the fraction of valid pixels.

    Raises
    ------
    InsufficientDataError
        Fewer than ``min_valid`` of the pixels have a gain (saturated flats, or no excess
        variance over the bias).

    Returns
    -------
    dict
        ``gain_median`` (e-/ADU), ``read_noise_median`` (e-), ``valid_fraction``.
    """
    ok = np.isfinite(gain)
    frac = float(ok.mean())
    if frac < min_valid:
        raise InsufficientDataError(
            f"pixel_gain_median_e_per_adu (Eqs. 2-3): only {frac:.1%} of the pixels have a gain from {what} "
            "(saturated pixels, or flat variance not above the bias variance); take the series of flats "
            "below saturation")
    # the boolean selections are copies: let the medians partition them in place
    return {"gain_median": float(np.median(gain[ok], overwrite_input=True)),
            "read_noise_median": float(np.median(read_noise[ok], overwrite_input=True)), "valid_fraction": frac}
