"""Detector characterisation of a lab set as lazy xarray/Dask graphs (Zhang et al. 2025,
the MST camera evaluation paper, sections 2-3, Tables 2-3, Figs. 1-10, Eqs. 1-3).

Every function takes frames of a raw store (``mstdask.open_store(...).raw`` selected by
imagetyp and telescope) and returns a ``dict`` of lazy results: per-pixel maps and
per-frame values as Dask-backed :class:`xarray.DataArray`, and the scalars of each
measurement as a ``summary``: a 0-d object Dask array holding a dict (a small kernel on
already reduced numbers; ``summary.compute()`` gives the dict). Nothing here computes:
``dask.compute(result)`` or ``client.compute`` does.

Per-pixel statistics over the frame axis are streaming reductions
(:func:`frame_moments`): blocks of ``DetectorConfig.block_frames`` frames with the stored
spatial tiles give partial sums (exact in float64), summed in a tree, so memory per task
does not grow with the number of frames. Per-frame statistics read each frame's central
region in one task. A measurement that cannot be made raises
:class:`~mstdask.errors.InsufficientDataError` (or :class:`~mstdask.errors.BadInputError`)
saying why: when the graph is built for what the frame list shows (no pairs at equal
exposure time), when it is computed for what only the pixels show (saturated flats).

The ``plot_*`` functions draw the paper's figures from computed results (NumPy arrays
and the summary dicts) on :class:`matplotlib.figure.Figure` objects (no pyplot state).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from . import _detector_kernels as K
from ..stir.calib import check_frames
from ..config import DetectorConfig
from ..errors import InsufficientDataError

__all__ = [
    "central_region",
    "frame_moments",
    "bias_level",
    "bias_stability",
    "fixed_pattern",
    "anomalous_pixels",
    "flat_pairs",
    "linearity",
    "photon_transfer",
    "dark_current",
    "dark_in_electrons",
    "series_exptime",
    "pixel_gain",
    "plot_bias_stability",
    "plot_combined_bias",
    "plot_pixel_histogram",
    "plot_anomalous_density",
    "plot_mean_vs_std",
    "plot_dark_current",
    "plot_dark_histogram",
    "plot_linearity",
    "plot_photon_transfer",
    "plot_pixel_gain",
]


# ----------------------------------------------------------------------------- helpers
def _summary(kernel, *args, **kwargs) -> da.Array:
    """A small summary kernel on reduced inputs, as one task: a 0-d object Dask array that
    computes to the kernel's dict.

    Dask-array arguments are passed whole (each rechunked to one chunk), other arguments
    as they are. Not a bare ``Delayed``: dask 2026.8 returns the results of
    ``dask.compute`` and ``Client.compute`` in the wrong order (even under the wrong dict
    keys) when Delayed objects and arrays are computed together; arrays only are safe.
    """
    spec: list = []
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    for a in args:
        if isinstance(a, da.Array):
            spec += [a.rechunk(-1) if a.ndim else a, tuple(next(letters) for _ in range(a.ndim))]
        else:
            spec += [a, None]
    return da.blockwise(kernel, (), *spec, concatenate=True, dtype=object, meta=np.empty((), dtype=object),
                        **kwargs)


def _data(frames: xr.DataArray) -> da.Array:
    """The frames as a Dask array (one frame per chunk when they were in memory)."""
    if isinstance(frames.data, da.Array):
        return frames.data
    return da.from_array(frames.values, chunks=(1, -1, -1))


def _time_order(frames: xr.DataArray) -> xr.DataArray:
    if "time" not in frames.coords:
        return frames
    return frames.isel(frame=np.argsort(frames["time"].values, kind="stable"))


def _paths(frames: xr.DataArray) -> list[str]:
    return [str(p) for p in frames["path"].values] if "path" in frames.coords else []


def central_region(shape: tuple[int, int], config: DetectorConfig | None = None) -> tuple[slice, slice]:
    """The central region the frame-level statistics use: ``region_px`` square, or the
    central half of a smaller frame (:func:`mstdask._detector_kernels.central_slices`)."""
    config = config or DetectorConfig()
    return K.central_slices(tuple(shape), config.region_px)


def _region_frames(frames: xr.DataArray, config: DetectorConfig) -> da.Array:
    """Each frame's central region, one chunk per frame (a task reads one region)."""
    ys, xs = central_region((frames.sizes["y"], frames.sizes["x"]), config)
    return _data(frames)[:, ys, xs].rechunk({0: 1, 1: -1, 2: -1})


def _frame_stats(frames: xr.DataArray, config: DetectorConfig) -> xr.DataArray:
    """Lazy (frame, stat) table: mean of the central region and its saturated fraction."""
    reg = _region_frames(frames, config)
    stats = da.blockwise(K.frame_stats, "fk", reg, "fyx", new_axes={"k": 2}, concatenate=True,
                         dtype=np.float64, meta=np.empty((0, 0), np.float64), saturation=config.saturation_adu)
    coords: dict = {"stat": ["mean", "saturated_fraction"]}
    if "exptime" in frames.coords:
        coords["exptime"] = ("frame", frames["exptime"].values)
    return xr.DataArray(stats, dims=("frame", "stat"), coords=coords, name="frame_stats")


# ----------------------------------------------------------------------------- moments
def frame_moments(frames: xr.DataArray, config: DetectorConfig | None = None) -> xr.Dataset:
    """Per-pixel mean, variance and saturated count over the frame axis, in one streaming pass.

    The frames are rechunked to blocks of ``config.block_frames`` frames with their
    stored spatial tiles; each task sums ``d = frame - first frame`` and ``d**2`` over its
    block, frame by frame (:func:`mstdask._detector_kernels.partial_moments`), and the
    partial sums are added in a tree (``split_every``). The sums of integer frames are
    exact, so the result does not depend on the chunking.

    Parameters
    ----------
    frames : DataArray (frame, y, x)
        Raw frames (uint16).
    config : DetectorConfig, optional

    Returns
    -------
    Dataset, lazy: ``mean``, ``var`` (ddof=1), ``std`` (y, x) float64 in ADU, ``nsat``
    (samples at or above ``saturation_adu``); attrs ``nframes`` and ``inputs``.

    Raises
    ------
    InsufficientDataError
        Fewer than 2 frames (no variance).
    """
    config = config or DetectorConfig()
    n = frames.sizes["frame"]
    if n < 2:
        raise InsufficientDataError(f"per-pixel mean and variance: {n} frame(s), at least 2 needed")
    arr = _data(frames)
    blocks = arr.rechunk({0: config.block_frames})
    # the first frame is the shift of the shifted-data variance (keeps float64 sums exact)
    shift = arr[0].astype(np.float64).rechunk(blocks.chunks[1:])
    parts = da.blockwise(K.partial_moments, "fcyx", blocks, "fyx", shift, "yx", new_axes={"c": 3},
                         adjust_chunks={"f": 1}, dtype=np.float64, meta=np.empty((0, 0, 0, 0), np.float64),
                         saturation=config.saturation_adu)
    sums = parts.sum(axis=0, split_every=config.split_every)
    out = da.blockwise(K.finish_moments, "cyx", sums, "cyx", shift, "yx", dtype=np.float64,
                       meta=np.empty((0, 0, 0), np.float64), n=n)
    coords = {k: frames.coords[k] for k in ("y", "x") if k in frames.coords}
    ds = xr.Dataset({name: (("y", "x"), out[i]) for i, name in enumerate(K.MOMENT_PLANES)}, coords=coords,
                    attrs={"nframes": n, "inputs": _paths(frames)})
    ds["std"] = np.sqrt(ds["var"])
    return ds


def bias_level(moments: xr.Dataset, config: DetectorConfig | None = None) -> xr.DataArray:
    """Lazy mean of the combined bias (per-pixel mean of the bias frames) over the central region."""
    ys, xs = central_region((moments.sizes["y"], moments.sizes["x"]), config)
    return moments["mean"].isel(y=ys, x=xs).mean()


# ----------------------------------------------------------------------------- bias
def bias_stability(bias: xr.DataArray, config: DetectorConfig | None = None) -> dict:
    """Bias stability (camera paper Sect. 3.1, Fig. 1): the mean of the central region of
    each bias frame, their 3-sigma-clipped overall mean and the frame-to-frame spread.

    Returns
    -------
    dict
        ``frame_mean`` (DataArray (frame,), lazy, ADU, in time order) and ``summary``
        (0-d object array holding the dict of :func:`mstdask._detector_kernels.bias_stability_summary`).
    """
    config = config or DetectorConfig()
    check_frames(bias, "bias", 3, "bias stability")
    bias = _time_order(bias)
    means = _frame_stats(bias, config)[:, 0].rename("frame_mean")
    return {"frame_mean": means,
            "summary": _summary(K.bias_stability_summary, means.data, config.bias_clip_sigma)}


def fixed_pattern(combined: xr.DataArray, config: DetectorConfig | None = None) -> dict:
    """Fixed-pattern summary of a combined bias (camera paper Fig. 2): vertical and
    horizontal gradients, corner excess and row banding.

    Row and column medians are computed on full rows (columns) of the map, one strip of
    rows (columns) per task; the corner boxes are ``corner_fraction`` of each edge.

    Returns
    -------
    dict
        ``row_profile`` (y,) and ``col_profile`` (x,) DataArrays (lazy, ADU) and
        ``summary`` (0-d object array holding the dict of :func:`mstdask._detector_kernels.fixed_pattern_summary`).
    """
    config = config or DetectorConfig()
    m = combined.data
    ny, nx = m.shape
    rows = da.map_blocks(K.row_medians, m.rechunk({1: -1}), axis=1, drop_axis=1, dtype=np.float64,
                         meta=np.empty((0,), np.float64))
    cols = da.map_blocks(K.row_medians, m.rechunk({0: -1}), axis=0, drop_axis=0, dtype=np.float64,
                         meta=np.empty((0,), np.float64))
    h = max(1, int(round(config.corner_fraction * ny)))
    w = max(1, int(round(config.corner_fraction * nx)))
    summary = _summary(_fixed_pattern, rows, cols, m[:h, :w], m[:h, nx - w:], m[ny - h:, :w], m[ny - h:, nx - w:])
    return {"row_profile": xr.DataArray(rows, dims=("y",), name="row_profile"),
            "col_profile": xr.DataArray(cols, dims=("x",), name="col_profile"), "summary": summary}


def _fixed_pattern(rows: np.ndarray, cols: np.ndarray, bl: np.ndarray, br: np.ndarray, tl: np.ndarray,
                   tr: np.ndarray) -> dict:
    h = bl.shape[0]
    return K.fixed_pattern_summary(rows, cols, {"bottom_left": bl, "bottom_right": br, "top_left": tl, "top_right": tr},
                                   {"bottom_left": rows[:h], "bottom_right": rows[:h],
                                    "top_left": rows[rows.size - h:], "top_right": rows[rows.size - h:]})


def _centre_spread(values: da.Array, clip_sigma: float | None) -> da.Array:
    """Lazy (centre, spread) of a map: plain mean/std as tree reductions, or sigma-clipped
    (astropy) on the whole map in one task (float32: 245 MB for an MST frame)."""
    if clip_sigma is None:
        return da.stack([da.nanmean(values), da.nanstd(values)])
    return da.map_blocks(K.map_centre_spread, values.astype(np.float32).rechunk(-1), clip_sigma,
                         drop_axis=(0, 1), new_axis=0, chunks=((2,),), dtype=np.float64,
                         meta=np.empty((0,), np.float64))


def anomalous_pixels(moments: xr.Dataset, config: DetectorConfig | None = None) -> dict:
    """Anomalous response pixels from a bias sequence (camera paper Sect. 3.2, Figs. 3-6).

    A pixel is anomalous when its mean over the bias frames lies below ``mean - 5 sigma`` or
    above ``mean + 5 sigma`` of the distribution of per-pixel means, or when its standard
    deviation lies above ``mean + 5 sigma`` of the distribution of per-pixel standard
    deviations (``anomalous_nsigma``; centre and spread plain as in the paper, or
    sigma-clipped with ``anomalous_clip_sigma``). The anomalous pixels are counted in
    ``subarea_px`` x ``subarea_px`` sub-areas (Fig. 5; edge sub-areas may be partial).

    Parameters
    ----------
    moments : Dataset
        :func:`frame_moments` of the bias frames.

    Returns
    -------
    dict
        ``flags`` (y, x) uint8 (1 low mean, 2 high mean, 4 high std), ``density``
        (suby, subx) int32 counts per sub-area, and lazy 0-d DataArrays ``mean_centre``,
        ``mean_spread``, ``std_centre``, ``std_spread``, ``low_threshold``,
        ``high_threshold``, ``std_threshold`` (ADU), ``fraction_below``,
        ``fraction_above``, ``fraction_std_above``, ``fraction_any``.
    """
    config = config or DetectorConfig()
    mean, std = moments["mean"].data, moments["std"].data
    k = config.anomalous_nsigma
    cm = _centre_spread(mean, config.anomalous_clip_sigma)
    cs = _centre_spread(std, config.anomalous_clip_sigma)
    lo, hi, hs = cm[0] - k * cm[1], cm[0] + k * cm[1], cs[0] + k * cs[1]
    low, high, noisy = mean < lo, mean > hi, std > hs
    flags = (low.astype(np.uint8) | (high.astype(np.uint8) << 1) | (noisy.astype(np.uint8) << 2))
    cell = config.subarea_px
    # chunks in whole sub-areas, so each task counts its own cells
    any_ = (flags > 0).rechunk(tuple(max(cell, (c[0] // cell) * cell) for c in flags.chunks))
    out_chunks = tuple(tuple(-(-c // cell) for c in ch) for ch in any_.chunks)
    density = da.map_blocks(K.subarea_counts, any_, cell, chunks=out_chunks, dtype=np.int32,
                            meta=np.empty((0, 0), np.int32))
    scalars = {"mean_centre": cm[0], "mean_spread": cm[1], "std_centre": cs[0], "std_spread": cs[1],
               "low_threshold": lo, "high_threshold": hi, "std_threshold": hs,
               "fraction_below": low.mean(), "fraction_above": high.mean(), "fraction_std_above": noisy.mean(),
               "fraction_any": (flags > 0).mean()}
    out = {name: xr.DataArray(v, name=name) for name, v in scalars.items()}
    out["flags"] = xr.DataArray(flags, dims=("y", "x"), name="anomalous_flags",
                                attrs={"flag_values": "1 mean low, 2 mean high, 4 std high"})
    out["density"] = xr.DataArray(density, dims=("suby", "subx"), name="anomalous_density",
                                  attrs={"subarea_px": cell})
    return out


# ----------------------------------------------------------------------------- flats
def flat_pairs(flats: xr.DataArray) -> list[tuple[int, int]]:
    """Pairs of flats at equal exposure time for Eq. 1: at each exposure time the flats
    in time order, taken two by two (a lone last flat is left out).

    Returns
    -------
    list of (int, int)
        Positions in ``flats``.
    """
    exptime = np.round(np.asarray(flats["exptime"].values, dtype=np.float64), 6)
    order = np.argsort(flats["time"].values, kind="stable") if "time" in flats.coords else np.arange(len(exptime))
    pairs = []
    for t in np.unique(exptime):
        idx = [int(i) for i in order if exptime[i] == t]
        pairs += [(idx[j], idx[j + 1]) for j in range(0, len(idx) - 1, 2)]
    return sorted(pairs)


def linearity(flats: xr.DataArray, level: xr.DataArray, config: DetectorConfig | None = None) -> dict:
    """Linearity (camera paper Sect. 3.4, Fig. 9): mean bias-subtracted signal of the
    central region vs exposure time, R² of a straight line, nonlinearity per level.

    Parameters
    ----------
    flats : DataArray (frame, y, x)
        Flats over a ladder of exposure times (any number per exposure time).
    level : DataArray
        Mean bias over the central region (:func:`bias_level`), lazy or computed.

    Returns
    -------
    dict
        ``frame_stats`` (frame, stat) lazy DataArray and ``summary`` (0-d object array holding the dict of
        :func:`mstdask._detector_kernels.linearity_summary`; raises InsufficientDataError
        when computed with fewer than 3 unsaturated exposure times).
    """
    config = config or DetectorConfig()
    check_frames(flats, "flat", 1, "linearity")
    stats = _frame_stats(flats, config)
    summary = _summary(K.linearity_summary, flats["exptime"].values, stats.data, level.data,
                       saturated_fraction=config.saturated_fraction, floor_adu=config.nonlinearity_floor_adu,
                       min_levels=config.min_linearity_levels)
    return {"frame_stats": stats, "summary": summary}


def _pair_table(frames: xr.DataArray, pairs: list[tuple[int, int]], config: DetectorConfig) -> da.Array:
    reg = _region_frames(frames, config)
    first = reg[[a for a, _ in pairs]]
    second = reg[[b for _, b in pairs]]
    return da.blockwise(K.pair_stats, "pk", first, "pyx", second, "pyx", new_axes={"k": 4}, concatenate=True,
                        dtype=np.float64, meta=np.empty((0, 0), np.float64), saturation=config.saturation_adu)


def photon_transfer(flats: xr.DataArray, bias: xr.DataArray, level: xr.DataArray,
                    config: DetectorConfig | None = None) -> dict:
    """Gain and read noise by the conventional photon-transfer method (camera paper Eq. 1,
    Table 3) from pairs of flats at equal exposure time and pairs of bias frames, over the
    central region.

    Raises
    ------
    InsufficientDataError
        No two flats share an exposure time, or fewer than 2 bias frames (at graph time);
        every pair saturated or outside ``ptc_min_adu``-``ptc_max_adu`` (when computed).

    Returns
    -------
    dict
        ``pairs`` (pair, stat) and ``bias_pairs`` lazy DataArrays of
        :func:`mstdask._detector_kernels.pair_stats`, and ``summary`` (0-d object array holding the dict of
        :func:`mstdask._detector_kernels.ptc_summary`).
    """
    config = config or DetectorConfig()
    check_frames(flats, "flat", 1, "photon-transfer gain")
    check_frames(bias, "bias", 2, "photon-transfer read noise")
    pairs = flat_pairs(flats)
    if not pairs:
        n_t = np.unique(np.round(flats["exptime"].values.astype(float), 6)).size
        raise InsufficientDataError(
            f"gain_e_per_adu and read_noise_e (Eq. 1): no two flats share an exposure time ({flats.sizes['frame']} "
            f"flat(s) at {n_t} exposure time(s)); Eq. 1 needs pairs of flats at equal exposure time")
    bias = _time_order(bias)
    nb = bias.sizes["frame"] // 2
    bias_pairs = [(2 * i, 2 * i + 1) for i in range(nb)]
    table = _pair_table(flats, pairs, config)
    btable = _pair_table(bias, bias_pairs, config)
    pair_t = np.asarray(flats["exptime"].values, dtype=np.float64)[[a for a, _ in pairs]]
    summary = _summary(K.ptc_summary, pair_t, table, btable, level.data,
                       saturated_fraction=config.saturated_fraction, min_adu=config.ptc_min_adu,
                       max_adu=config.ptc_max_adu)
    stat = ["mean_1", "mean_2", "diff_variance", "saturated_fraction"]
    return {"pairs": xr.DataArray(table, dims=("pair", "stat"), coords={"stat": stat, "exptime": ("pair", pair_t)}),
            "bias_pairs": xr.DataArray(btable, dims=("pair", "stat"), coords={"stat": stat}), "summary": summary}


def series_exptime(flats: xr.DataArray, config: DetectorConfig | None = None) -> float:
    """The exposure time with the most flats (the series of identical flats of Eqs. 2-3).

    Raises
    ------
    InsufficientDataError
        No exposure time has ``pixel_min_flats`` flats.
    """
    config = config or DetectorConfig()
    exptime = np.round(np.asarray(flats["exptime"].values, dtype=np.float64), 6)
    if exptime.size == 0:
        raise InsufficientDataError("pixel gain (Eqs. 2-3): no flats")
    times, counts = np.unique(exptime, return_counts=True)
    best = int(np.lexsort((times, counts))[-1])  # most flats; the longest exposure on a tie
    if counts[best] < config.pixel_min_flats:
        raise InsufficientDataError(
            f"pixel_gain_median_e_per_adu and pixel_read_noise_median_e (Eqs. 2-3): at least "
            f"{config.pixel_min_flats} flats at one exposure time needed, the most at one exposure time are "
            f"{counts[best]} (at {times[best]:g} s); take a series of flats at one exposure time "
            "(the paper: 144 at 2 s)")
    return float(times[best])


def pixel_gain(flats: xr.DataArray, bias_moments: xr.Dataset, config: DetectorConfig | None = None,
               exptime: float | None = None) -> dict:
    """Per-pixel gain and read noise (camera paper Eqs. 2-3, Fig. 10).

    ``g_ij = (<F_ij> - <B_ij>) / (var F_ij - var B_ij)`` and ``r_ij = g_ij std B_ij``, with
    the per-pixel means and variances of the flats at one exposure time and of the bias
    frames from the streaming :func:`frame_moments`. Pixels saturated in any flat are NaN.

    The median of ``g_ij`` over pixels is biased high by the skew of a sample variance:
    by ``1 / median(chi2_k / k) - 1`` for ``k = n - 1`` flats (0.47 % for the paper's 144
    flats, 1.4 % for 48).

    Parameters
    ----------
    flats : DataArray (frame, y, x)
        Flats; those at ``exptime`` (default :func:`series_exptime`) are used.
    bias_moments : Dataset
        :func:`frame_moments` of the bias frames.

    Returns
    -------
    dict
        ``gain`` (e-/ADU) and ``read_noise`` (e-) maps (y, x) float32, lazy;
        ``flat_moments`` (Dataset); ``summary`` (summary dict: ``gain_median``,
        ``read_noise_median``, ``valid_fraction``; raises InsufficientDataError when
        computed if fewer than ``pixel_min_valid`` of the pixels have a gain).
    """
    config = config or DetectorConfig()
    check_frames(flats, "flat", 1, "pixel gain")
    t = series_exptime(flats, config) if exptime is None else float(exptime)
    series = flats.isel(frame=np.flatnonzero(np.isclose(flats["exptime"].values.astype(float), t, rtol=0, atol=1e-6)))
    if series.sizes["frame"] < config.pixel_min_flats:
        raise InsufficientDataError(f"pixel gain (Eqs. 2-3): {series.sizes['frame']} flat(s) at {t:g} s, "
                                    f"at least {config.pixel_min_flats} needed")
    fm = frame_moments(series, config)
    b = bias_moments
    planes = da.stack([fm["mean"].data, fm["var"].data, fm["nsat"].data,
                       b["mean"].data.rechunk(fm["mean"].data.chunks), b["var"].data.rechunk(fm["mean"].data.chunks)])
    maps = da.map_blocks(lambda p: K.pixel_gain(*p), planes.rechunk({0: -1}), dtype=np.float32,
                         chunks=((2,),) + planes.chunks[1:], meta=np.empty((0, 0, 0), np.float32))
    gain = xr.DataArray(maps[0], dims=("y", "x"), name="pixel_gain",
                        attrs={"units": "electron/adu", "exptime": t, "nflats": series.sizes["frame"],
                               "nbias": b.attrs.get("nframes"), "inputs": _paths(series) + b.attrs.get("inputs", [])})
    rn = xr.DataArray(maps[1], dims=("y", "x"), name="pixel_read_noise", attrs={**gain.attrs, "units": "electron"})
    what = f"the {series.sizes['frame']} flats at {t:g} s"
    summary = _summary(K.pixel_gain_summary, gain.data, rn.data, config.pixel_min_valid, what)
    return {"gain": gain, "read_noise": rn, "flat_moments": fm, "summary": summary}


# ----------------------------------------------------------------------------- darks
def dark_current(darks: xr.DataArray, bias_moments: xr.Dataset, config: DetectorConfig | None = None,
                 gain: float | None = None) -> dict:
    """Dark current (camera paper Sect. 3.3, Figs. 7-8): the sigma-clipped mean of each
    bias-subtracted dark (central region; cosmic rays and hot pixels clipped at
    ``dark_clip_sigma``), and a straight line fitted to level vs exposure time.

    Parameters
    ----------
    darks : DataArray (frame, y, x)
    bias_moments : Dataset
        :func:`frame_moments` of the bias frames (its ``mean`` is the combined bias).
    gain : float, optional
        e-/ADU: the summary then also has ``dark_current_e_per_pix_s`` and ``level_e``.

    Returns
    -------
    dict
        ``level`` (frame,) lazy DataArray (ADU), ``longest`` (y, x) the bias-subtracted
        central region of the longest dark (float32, lazy, for Fig. 8), and ``summary``
        (0-d object array holding the dict of :func:`mstdask._detector_kernels.dark_summary`).
    """
    config = config or DetectorConfig()
    check_frames(darks, "dark", 1, "dark current")
    ys, xs = central_region((darks.sizes["y"], darks.sizes["x"]), config)
    bias_reg = bias_moments["mean"].data[ys, xs].rechunk(-1)
    reg = _region_frames(darks, config)
    levels = da.blockwise(K.dark_level, "f", reg, "fyx", bias_reg, "yx", concatenate=True, dtype=np.float64,
                          meta=np.empty((0,), np.float64), sigma=config.dark_clip_sigma)
    exptime = np.asarray(darks["exptime"].values, dtype=np.float64)
    summary = _summary(_dark_summary, exptime, levels, config.min_dark_exptimes, gain)
    i = int(np.argmax(exptime))
    longest = (reg[i] - bias_reg).astype(np.float32)
    return {"level": xr.DataArray(levels, dims=("frame",), coords={"exptime": ("frame", exptime)}, name="dark_level"),
            "longest": xr.DataArray(longest, dims=("y", "x"), name="dark_minus_bias",
                                    attrs={"exptime": float(exptime[i])}),
            "summary": summary}


def _dark_summary(exptime: np.ndarray, levels: np.ndarray, min_exptimes: int, gain: float | None) -> dict:
    out = K.dark_summary(exptime, levels, min_exptimes)
    return out if gain is None else dark_in_electrons(out, gain)


def dark_in_electrons(summary: dict, gain: float) -> dict:
    """A computed dark-current summary with the rate in e-/pix/s and the levels in e-,
    converted with ``gain`` (e-/ADU)."""
    g = float(gain)
    return {**summary, "gain_e_per_adu": g, "dark_current_e_per_pix_s": summary["slope_adu_per_s"] * g,
            "level_e": [v * g for v in summary["level_adu"]]}


# ----------------------------------------------------------------------------- figures
def _figure(*args, **kwargs):
    from matplotlib.figure import Figure

    return Figure(*args, **kwargs)


def plot_bias_stability(frame_mean: np.ndarray, summary: dict, title: str = ""):
    """Fig. 1: the central-region mean of each bias frame and the clipped overall mean."""
    fig = _figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(frame_mean) + 1), frame_mean, "o", ms=3, color="tab:blue")
    ax.axhline(summary["clipped_mean_adu"], color="r", ls=":", label="3σ-clipped mean")
    ax.text(0.98, 0.95, f"mean {summary['clipped_mean_adu']:.3f} ADU\n"
                        f"peak-to-peak {summary['peak_to_peak_adu']:.3f} ADU",
            transform=ax.transAxes, ha="right", va="top", fontsize=9)
    ax.set_xlabel("bias frame")
    ax.set_ylabel("mean of central region [ADU]")
    ax.set_title(title or "Bias stability (Fig. 1)")
    ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_combined_bias(combined: np.ndarray, title: str = ""):
    """Fig. 2: the combined (mean-stacked) bias, colour-coded with a z-scale stretch."""
    from astropy.visualization import ZScaleInterval

    fig = _figure(figsize=(7, 4.6), layout="constrained")
    ax = fig.add_subplot()
    vmin, vmax = ZScaleInterval().get_limits(combined[:: max(1, combined.shape[0] // 1000),
                                                      :: max(1, combined.shape[1] // 1000)])
    im = ax.imshow(combined, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="ADU")
    ax.set_title(title or "Combined bias (Fig. 2)")
    return fig


def plot_pixel_histogram(values: np.ndarray, centre: float, spread: float, nsigma: float, xlabel: str,
                         title: str = "", two_sided: bool = True, bins: int = 200):
    """Figs. 3-4: histogram of a per-pixel statistic, linear (top) and logarithmic (bottom),
    with the mean (green) and the ``nsigma`` thresholds (red)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    lo = centre - (nsigma + 3) * spread if two_sided else max(0.0, v.min())
    hi = centre + (nsigma + 3) * spread
    lo, hi = min(lo, np.percentile(v, 0.01)), max(hi, np.percentile(v, 99.99))
    fig = _figure(figsize=(7, 5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, log in zip(axes, (False, True)):
        ax.hist(v, bins=bins, range=(lo, hi), color="0.35", log=log)
        ax.axvline(centre, color="g", ls="--", label=f"mean {centre:.2f}")
        ax.axvline(centre + nsigma * spread, color="r", ls="--", label=f"{nsigma:g}σ {centre + nsigma * spread:.2f}")
        if two_sided:
            ax.axvline(centre - nsigma * spread, color="r", ls="--")
        ax.set_ylabel("pixels")
    axes[0].legend(fontsize=8)
    axes[0].set_title(title)
    axes[1].set_xlabel(xlabel)
    return fig


def plot_anomalous_density(density: np.ndarray, subarea_px: int, title: str = ""):
    """Fig. 5: anomalous pixels per ``subarea_px`` x ``subarea_px`` sub-area over the sensor."""
    fig = _figure(figsize=(7, 4.6), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(density, origin="lower", cmap="magma", interpolation="nearest",
                   extent=(0, density.shape[1] * subarea_px, 0, density.shape[0] * subarea_px))
    fig.colorbar(im, ax=ax, label=f"anomalous pixels per {subarea_px}×{subarea_px} px")
    ax.set_xlabel("x [px]")
    ax.set_ylabel("y [px]")
    ax.set_title(title or "Anomalous pixels (Fig. 5)")
    return fig


def plot_mean_vs_std(mean: np.ndarray, std: np.ndarray, title: str = "", bins: int = 200):
    """Fig. 6: 2-D distribution of per-pixel mean and standard deviation over the bias frames."""
    from matplotlib.colors import LogNorm

    m, s = np.asarray(mean, np.float64).ravel(), np.asarray(std, np.float64).ravel()
    ok = np.isfinite(m) & np.isfinite(s)
    m, s = m[ok], s[ok]
    fig = _figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.add_subplot()
    rng = ((np.percentile(m, 0.001), np.percentile(m, 99.999)), (0.0, np.percentile(s, 99.999)))
    h = ax.hist2d(m, s, bins=bins, range=rng, norm=LogNorm(), cmap="viridis")
    fig.colorbar(h[3], ax=ax, label="pixels")
    ax.set_xlabel("per-pixel mean [ADU]")
    ax.set_ylabel("per-pixel std [ADU]")
    ax.set_title(title or "Mean vs std of each pixel (Fig. 6)")
    return fig


def plot_dark_current(summary: dict, title: str = ""):
    """Fig. 7: bias-subtracted dark level (e- when a gain is known, else ADU) vs exposure time."""
    t = np.asarray(summary["exptime_s"])
    electrons = "level_e" in summary
    y = np.asarray(summary["level_e"] if electrons else summary["level_adu"])
    g = summary.get("gain_e_per_adu", 1.0)
    fig = _figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(t, y, "o", color="tab:orange", label="darks")
    tt = np.linspace(0, t.max(), 50)
    scale = g if electrons else 1.0
    label = (f"{summary['dark_current_e_per_pix_s']:.4f} e⁻/pix/s" if electrons
             else f"{summary['slope_adu_per_s']:.4f} ADU/pix/s")
    ax.plot(tt, scale * (summary["slope_adu_per_s"] * tt + summary["intercept_adu"]), "k--", lw=1, label=label)
    ax.set_xlabel("exposure time [s]")
    ax.set_ylabel("dark level [e⁻/pix]" if electrons else "dark level [ADU]")
    ax.set_title(title or "Dark current (Fig. 7)")
    ax.legend()
    return fig


def plot_dark_histogram(values: np.ndarray, exptime: float, title: str = "", bins: int = 200):
    """Fig. 8: distribution of the bias-subtracted pixel values of the longest dark (log counts)."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    fig = _figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(v, bins=bins, range=(np.percentile(v, 0.01), np.percentile(v, 99.99)), log=True, color="0.35")
    ax.axvline(v.mean(), color="r", ls="--", label=f"mean {v.mean():.2f} ADU")
    ax.set_xlabel(f"dark - combined bias, {exptime:g} s [ADU]")
    ax.set_ylabel("pixels")
    ax.set_title(title or "Dark current distribution (Fig. 8)")
    ax.legend()
    return fig


def plot_linearity(summary: dict, title: str = ""):
    """Fig. 9: signal vs exposure time with the fitted line and R² (left), nonlinearity
    in per cent vs signal (right)."""
    t, s = np.asarray(summary["exptime_s"]), np.asarray(summary["signal_adu"])
    nl = np.asarray(summary["nonlinearity_percent"], dtype=np.float64)
    fig = _figure(figsize=(11, 4), layout="constrained")
    a, b = fig.subplots(1, 2)
    a.plot(t, s / 1e4, "o", ms=3)
    tt = np.linspace(0, t.max(), 50)
    a.plot(tt, (summary["fit_slope_adu_per_s"] * tt + summary["fit_intercept_adu"]) / 1e4, "k--", lw=1,
           label=f"R² = {summary['r2']:.6f}")
    a.set_xlabel("exposure time [s]")
    a.set_ylabel("signal [10⁴ ADU]")
    a.legend()
    b.plot(s / 1e4, nl, "o", ms=3)
    b.axvline(summary["floor_adu"] / 1e4, color="0.5", ls=":", label=f"{summary['floor_adu']:.0f} ADU")
    b.axhline(0, color="k", lw=0.5)
    above = s >= summary["floor_adu"]
    if above.any():
        lim = max(0.5, 1.5 * np.nanmax(np.abs(nl[above])))
        b.set_ylim(-lim, lim)
    b.set_xlabel("signal [10⁴ ADU]")
    b.set_ylabel("nonlinearity [%]")
    b.legend()
    fig.suptitle(title or "Linearity (Fig. 9)")
    return fig


def plot_photon_transfer(summary: dict, title: str = ""):
    """Photon-transfer curve of the flat pairs (Eq. 1): difference variance vs signal."""
    p = summary["pairs"]
    s, v = np.asarray(p["signal_adu"]), np.asarray(p["diff_variance_adu2"])
    used = np.asarray(p["used"], bool)
    fig = _figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.loglog(s[~used & (s > 0)], v[~used & (s > 0)], "o", ms=3, color="0.6", label="not used")
    ax.loglog(s[used], v[used], "o", ms=3, color="tab:blue", label="used")
    ss = np.geomspace(max(1.0, s[s > 0].min()), s.max(), 50)
    g = summary["gain_e_per_adu"]
    ax.loglog(ss, 2 * ss / g + summary["bias_diff_variance_adu2"], "k--", lw=1, label=f"g = {g:.4f} e⁻/ADU")
    ax.set_xlabel("mean signal [ADU]")
    ax.set_ylabel("var(F1 - F2) [ADU²]")
    ax.set_title(title or "Photon transfer (Eq. 1)")
    ax.legend()
    return fig


def plot_pixel_gain(gain: np.ndarray, read_noise: np.ndarray, summary: dict, title: str = "", bins: int = 200):
    """Fig. 10: histograms of the per-pixel gain (left) and read noise (right), linear
    (top) and logarithmic (bottom), with the medians (blue)."""
    fig = _figure(figsize=(11, 6), layout="constrained")
    axes = fig.subplots(2, 2)
    for col, (vals, med, label) in enumerate(((gain, summary["gain_median"], "gain [e⁻/ADU]"),
                                              (read_noise, summary["read_noise_median"], "read noise [e⁻]"))):
        v = np.asarray(vals, np.float64).ravel()
        v = v[np.isfinite(v)]
        rng = (max(0.0, np.percentile(v, 0.05)), np.percentile(v, 99.95))
        for row, log in enumerate((False, True)):
            ax = axes[row, col]
            ax.hist(v, bins=bins, range=rng, log=log, color="0.35")
            ax.axvline(med, color="b", ls="--", label=f"median {med:.3f}")
            ax.set_xlabel(label)
            ax.set_ylabel("pixels")
        axes[0, col].legend(fontsize=8)
    fig.suptitle(title or "Per-pixel gain and read noise (Fig. 10)")
    return fig
