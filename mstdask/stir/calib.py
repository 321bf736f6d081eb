"""Night calibrations as lazy xarray/Dask graphs: master bias, pepper-and-salt map, bad
pixels, master flats (saturated pixels: :func:`mstdask.masks.saturated`) (Xiao et al. 2025 section 3.1; Zhang et al. 2025 sections 3.1-3.2).

Every function takes frames from a raw store (``mstdask.open_store``) and returns lazy
results; nothing here computes. Stack reductions are chunked explicitly to ``frame=-1``
with the stored spatial tiles (split only beyond ``CalibConfig.stack_bytes``,
:func:`mstdask.store.rechunk_for_stack`) and run the pure NumPy kernels of
:mod:`mstdask._calib_kernels` one tile per task, in row strips of ``CalibConfig.tile_bytes``.

Frames may come as Dask arrays (``open_store(path)``, one frame per chunk: the stacks are
rechunks, which on a cluster move each tile's pieces between the workers that read them)
or lazy but not yet in Dask (``open_store(path, chunks=None)``, what ``mstdask calibrate``
uses): then every task reads its own tile of all its frames from the store and nothing
passes between workers. The results are identical.
"""

from __future__ import annotations

from datetime import date

import dask.array as da
import numpy as np
import xarray as xr

from . import _calib_kernels as K
from ..config import CalibConfig
from ..errors import BadInputError, InsufficientDataError
from ..store import rechunk_for_stack

__all__ = [
    "check_frames",
    "master_bias",
    "ps_map",
    "ps_summary",
    "bad_pixel_map",
    "nearest_night",
    "flat_levels",
    "small_scale_flat",
    "nightly_small_scale_flat",
    "flat_window_nights",
    "stack_nightly_flats",
    "flat_scatter_vs_nights",
]


def check_frames(frames: xr.DataArray, imagetyp: str, min_frames: int, what: str) -> None:
    """Refuse a group with frames of another type, or too few frames.

    Raises
    ------
    BadInputError
        A frame of the wrong image type is in the group (names the file).
    InsufficientDataError
        Fewer than ``min_frames`` frames.
    """
    types = np.asarray(frames["imagetyp"].values)
    wrong = np.flatnonzero(types != imagetyp)
    if wrong.size:
        path = str(frames["path"].values[wrong[0]]) if "path" in frames.coords else None
        raise BadInputError(path, f"is a {types[wrong[0]]} frame in a group of {imagetyp} frames for {what}; "
                                  "select the frames by imagetyp")
    n = frames.sizes["frame"]
    if n < min_frames:
        raise InsufficientDataError(f"{what}: {n} {imagetyp} frame(s), at least {min_frames} needed; "
                                    f"take more {imagetyp} frames or lower min_frames (and accept a noisier master)")


def _stack_reduce(frames: xr.DataArray, kernel, config: CalibConfig, n_out: int | None = None,
                  dtype=np.float32) -> da.Array:
    """Apply ``kernel(tile_stack) -> (ny, nx)`` (or ``(n_out, ny, nx)``) tile by tile.

    Rechunks explicitly to ``frame=-1`` with the stored spatial tiles (split only when one
    tile of all frames exceeds ``config.stack_bytes``), so every stored tile is decoded
    once; inside a task the kernel runs on row strips within ``config.tile_bytes``.
    """
    stacked = rechunk_for_stack(frames, config.stack_bytes)
    arr = stacked.data
    budget = config.tile_bytes

    def run(tile):
        return K.in_strips(kernel, tile, budget, n_out, dtype)

    if n_out is None:
        return da.map_blocks(run, arr, drop_axis=0, dtype=dtype, meta=np.empty((0, 0), dtype))
    chunks = ((n_out,), arr.chunks[1], arr.chunks[2])
    return da.map_blocks(run, arr, chunks=chunks, dtype=dtype, meta=np.empty((0, 0, 0), dtype))


def master_bias(bias: xr.DataArray, config: CalibConfig | None = None) -> xr.DataArray:
    """Master bias of one telescope and night: the sigma-clipped mean (or median) of its bias frames.

    Parameters
    ----------
    bias : DataArray (frame, y, x)
        The night's bias frames (``raw`` of a store, selected by imagetyp, telescope, night).
    config : CalibConfig, optional

    Returns
    -------
    DataArray (y, x) float32, lazy, with attrs ``ncombine``, ``combine``, ``inputs``.
    """
    config = config or CalibConfig()
    check_frames(bias, "bias", config.min_frames, "master bias")
    if config.bias_combine == "median":
        def kernel(t):
            return np.median(t, axis=0).astype(np.float32)
    else:
        def kernel(t):
            return K.clipped_mean(t, config.clip_sigma, config.clip_maxiters)
    out = _stack_reduce(bias, kernel, config)
    return xr.DataArray(out, dims=("y", "x"), name="master_bias", attrs={
        "units": "adu", "ncombine": int(bias.sizes["frame"]), "combine": config.bias_combine,
        "clip_sigma": config.clip_sigma, "inputs": [str(p) for p in bias["path"].values]})


def ps_map(bias: xr.DataArray, config: CalibConfig | None = None) -> xr.Dataset:
    """Pepper-and-salt pixels from one night's bias sequence, in a single pass.

    The first ``ps_frames`` bias frames in time are split into ``ps_groups`` consecutive,
    non-overlapping groups; one pass over each tile of all of them gives every group's
    per-pixel count, sum and sum of squares, hence per-group mean and std, the all-frame
    mean and std, and the PS decision (std > ``ps_threshold_adu``) per group. The final map is the
    intersection of the groups (Xiao et al. 2025, section 3.1.3).

    Returns
    -------
    Dataset, lazy: ``group_mean``, ``group_std`` (group, y, x) float32, ``group_ps`` (bool),
    ``mean``, ``std`` (y, x) float32, ``ps`` (y, x) bool; attrs with the frames used.
    """
    config = config or CalibConfig()
    check_frames(bias, "bias", config.ps_min_frames, "pepper-and-salt map")
    order = np.argsort(bias["time"].values, kind="stable")[: config.ps_frames]
    frames = bias.isel(frame=order)
    n = frames.sizes["frame"]
    G = config.ps_groups
    groups = np.concatenate([np.full(len(part), g) for g, part in enumerate(np.array_split(np.arange(n), G))])
    offset = 500.0  # near the bias level, so float64 sums of squares keep their precision
    counts = np.bincount(groups, minlength=G)
    threshold = config.ps_threshold_adu
    # one task per tile holds that tile of every frame (as the other stacks) and streams the
    # group sums over them in row strips of tile_bytes: no partial sums to gather
    arr = rechunk_for_stack(frames, config.stack_bytes).data

    def run(tile):
        return K.in_strips(lambda t: K.ps_stack(t, groups, G, offset, threshold), tile, config.tile_bytes,
                           2 * G + 2, np.float32)

    out = da.map_blocks(run, arr, chunks=((2 * G + 2,), arr.chunks[1], arr.chunks[2]), dtype=np.float32,
                        meta=np.empty((0, 0, 0), np.float32))
    gstd = out[G:2 * G]
    ds = xr.Dataset(
        {
            "group_mean": (("group", "y", "x"), out[:G]),
            "group_std": (("group", "y", "x"), gstd),
            "group_ps": (("group", "y", "x"), gstd > config.ps_threshold_adu),
            "mean": (("y", "x"), out[2 * G]),
            "std": (("y", "x"), out[2 * G + 1]),
        },
        coords={"group": np.arange(G), "group_frames": ("group", counts)},
        attrs={"ps_threshold_adu": config.ps_threshold_adu, "nframes": n, "ngroups": G,
               "night": str(frames["night"].values[0]) if n else "",
               "inputs": [str(p) for p in frames["path"].values]},
    )
    ds["ps"] = ds["group_ps"].all("group")
    return ds


def ps_summary(ps: xr.Dataset) -> dict[str, xr.DataArray]:
    """Lazy scalars: PS fraction, per-group fractions and the agreement between groups.

    ``agreement`` is, for each group, the fraction of its PS pixels that are PS in every
    group (the paper reports > 90 %); ``fraction`` is the final PS fraction.
    """
    per_group = ps["group_ps"].sum(("y", "x"))
    final = ps["ps"].sum()
    return {
        "fraction": ps["ps"].mean(),
        "group_fraction": ps["group_ps"].mean(("y", "x")),
        "agreement": final / per_group.where(per_group > 0),
    }


def bad_pixel_map(darks: xr.DataArray, bias: xr.DataArray, config: CalibConfig | None = None) -> xr.Dataset:
    """Bad pixels from dark frames: outside ``bad_pixel_nsigma`` robust sigmas of the
    bias-subtracted combined dark (Xiao et al. 2025, section 3.1.5).

    The darks are median-combined (with the 3-5 darks of a night a clipped mean cannot reject
    a cosmic ray, the median can), the master bias is subtracted, and the robust centre (median) and spread
    (1.4826 x MAD) are taken over the whole frame.

    Returns
    -------
    Dataset, lazy: ``dark`` (bias-subtracted combined dark, float32), ``bad`` (bool),
    attrs ``centre`` and ``sigma`` as lazy scalars in ``stats``.
    """
    config = config or CalibConfig()
    check_frames(darks, "dark", config.min_frames, "bad-pixel map")
    dark = _stack_reduce(darks, lambda t: np.median(t, axis=0).astype(np.float32), config)
    diff = dark - bias.data
    flat = diff.ravel()
    centre = _exact_median(flat)
    sigma = 1.4826 * _exact_median(da.absolute(flat - centre))
    bad = da.absolute(diff - centre) > config.bad_pixel_nsigma * sigma
    return xr.Dataset({"dark": (("y", "x"), diff), "bad": (("y", "x"), bad),
                       "centre": ((), centre), "sigma": ((), sigma)},
                      attrs={"nsigma": config.bad_pixel_nsigma, "ncombine": int(darks.sizes["frame"]),
                             "exptime": float(np.median(darks["exptime"].values)),
                             "inputs": [str(p) for p in darks["path"].values]})


def _exact_median(x: da.Array) -> da.Array:
    """Exact median of a 1-D Dask array, gathered into one task.

    The frames are tens of millions of pixels: this gathers the values of one frame in
    one task (4 bytes each: 245 MB for an MST frame), which is bounded and exact.
    """
    return da.map_blocks(lambda v: np.median(v).reshape(()).astype(np.float64), x.rechunk(-1).astype(np.float32),
                         drop_axis=0, dtype=np.float64, meta=np.empty((), np.float64))


def nearest_night(night: str, available: list[str]) -> str:
    """The available night nearest to ``night`` (earlier wins a tie)."""
    if not available:
        raise InsufficientDataError(f"no night with bias frames to calibrate night {night}")
    target = date.fromisoformat(night)
    return min(available, key=lambda n: (abs((date.fromisoformat(n) - target).days), n))


# ----------------------------------------------------------------------------- flats
def flat_levels(flats: xr.DataArray, bias: xr.DataArray) -> xr.DataArray:
    """Lazy median level of each bias-subtracted flat (on a 4x-subsampled grid: a level
    check, not a product), used to leave out under- and over-exposed flats."""
    # one task per flat reads every 4th pixel of it (a Dask input is rechunked to that)
    sub = (flats[:, ::4, ::4].chunk({"frame": 1, "y": -1, "x": -1}).data.astype(np.float32)
           - bias.data[::4, ::4].rechunk(-1))
    levels = da.map_blocks(lambda b: np.median(b.reshape(b.shape[0], -1), axis=1), sub, drop_axis=(1, 2),
                           dtype=np.float64)
    return xr.DataArray(levels, dims=("frame",), coords={"path": flats["path"]}, name="level")


def small_scale_flat(frame: np.ndarray, window: int = 51, mode: str = "reflect") -> np.ndarray:
    """One bias-subtracted flat divided by its ``window``-pixel running median (the
    large-scale flat), i.e. the pixel-to-pixel response (Xiao et al. 2025, section 3.1.2).

    Pixels whose large-scale level is not positive become NaN.
    """
    from ._median import running_median

    f = np.asarray(frame, dtype=np.float32)
    large = running_median(f, size=window, mode=mode)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(large > 0, f / large, np.nan).astype(np.float32)


def nightly_small_scale_flat(flats: xr.DataArray, bias: xr.DataArray, config: CalibConfig | None = None,
                             mode: str = "reflect") -> xr.DataArray:
    """One night's small-scale flat: the clipped mean of its flats' small-scale flats.

    Each flat is bias-subtracted and divided by its own 51-px running median, then the
    frames are combined pixel by pixel. One task per spatial tile holds that tile of every
    flat (``frame=-1``, chunked explicitly) with a 25-px halo on each side
    (``dask.array.overlap``), so the running median equals the whole-frame median exactly,
    borders included, and the per-frame ratios never leave the task.

    Returns
    -------
    DataArray (y, x) float32, lazy.
    """
    config = config or CalibConfig()
    check_frames(flats, "flat", config.min_frames, "nightly small-scale flat")
    from ._median import dask_boundary

    window = config.flat_window_px
    r = window // 2
    # budget: the raw stack plus its float32 copy and ratios
    raw = rechunk_for_stack(flats, config.stack_bytes, itemsize=flats.dtype.itemsize + 8).data
    # a tile narrower than the halo is merged with its neighbour (small frames only)
    tiles = tuple(da.overlap.ensure_minimum_chunksize(max(r, 1), c) for c in raw.chunks[1:])
    raw = raw.rechunk((-1,) + tiles)
    edge = dask_boundary(mode)
    depth, boundary = {0: 0, 1: r, 2: r}, {0: "none", 1: edge, 2: edge}
    padded = da.overlap.overlap(raw, depth=depth, boundary=boundary)
    bpad = da.overlap.overlap(bias.data.astype(np.float32).rechunk(tiles)[None], depth=depth, boundary=boundary)

    def run(stack, bias_tile):
        return K.small_scale_stack(stack, bias_tile[0], window, config.clip_sigma, config.clip_maxiters,
                                   config.tile_bytes)

    out = da.map_blocks(run, padded, bpad, drop_axis=0, chunks=tiles, dtype=np.float32,
                        meta=np.empty((0, 0), np.float32))
    return xr.DataArray(out, dims=("y", "x"), name="small_scale_flat", attrs={
        "ncombine": int(flats.sizes["frame"]), "window_px": window, "mode": mode,
        "inputs": [str(p) for p in flats["path"].values]})


def flat_window_nights(night: str, flat_nights: list[str], config: CalibConfig | None = None) -> list[str]:
    """Nights whose small-scale flats are stacked into the master flat of ``night``.

    Up to ``flat_half_window_nights`` nights with flats before and as many after (the night
    itself when it has flats), the nearest first, never more than ``flat_max_days`` away
    (Xiao et al. 2025: 11 nights, d-5 .. d+5, within two months).
    """
    config = config or CalibConfig()
    d = date.fromisoformat(night)
    days = {n: (date.fromisoformat(n) - d).days for n in flat_nights}
    ok = [n for n in flat_nights if abs(days[n]) <= config.flat_max_days]
    before = sorted((n for n in ok if days[n] < 0), key=lambda n: -days[n])[: config.flat_half_window_nights]
    after = sorted((n for n in ok if days[n] > 0), key=lambda n: days[n])[: config.flat_half_window_nights]
    same = [n for n in ok if days[n] == 0]
    return sorted(before + same + after)


def stack_nightly_flats(nightly: list[xr.DataArray]) -> xr.DataArray:
    """The master flat: the mean of nightly small-scale flats (NaN-aware), lazy."""
    if not nightly:
        raise InsufficientDataError("no nightly small-scale flat to stack")
    stacked = xr.concat(nightly, dim="night")
    return stacked.mean("night", skipna=True).astype(np.float32).rename("master_flat")


def flat_scatter_vs_nights(nightly: list[xr.DataArray], clip: tuple[float, float] = (0.8, 1.2)) -> xr.DataArray:
    """The paper's Fig. 4: standard deviation of the stacked small-scale flat vs the number
    of nights N stacked (nights taken in the given order, N = 1 .. len(nightly)).

    The scatter falls as the photon noise of the flats averages down (noise^2 / N) and
    levels off at the pixel-to-pixel response (PRNU) when N passes ~11. Pixels outside
    ``clip`` (bad pixels, edges) are left out.

    Returns
    -------
    DataArray (n_nights,) float64, lazy, with coordinate ``n_nights``.
    """
    if not nightly:
        raise InsufficientDataError("no nightly small-scale flat for the scatter curve")
    stacked = xr.concat(nightly, dim="night")
    n = xr.DataArray(np.arange(1, stacked.sizes["night"] + 1), dims="night")
    cum = stacked.fillna(1.0).cumsum("night") / n
    good = ((stacked >= clip[0]) & (stacked <= clip[1])).all("night")
    scatter = cum.where(good).std(("y", "x"))
    return scatter.rename({"night": "n_nights"}).assign_coords(n_nights=n.values).rename("flat_scatter")
