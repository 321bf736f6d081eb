"""Night calibrations as lazy xarray/Dask graphs: master bias, pepper-and-salt map, bad and
saturated pixels (Xiao et al. 2025 section 3.1; Zhang et al. 2025 sections 3.1-3.2).

Every function takes frames from a raw store (``mstdask.open_store``) and returns lazy
results; nothing here computes. Stack reductions are rechunked explicitly to ``frame=-1``
with spatial tiles sized by ``CalibConfig.tile_bytes`` (:func:`mstdask.store.rechunk_for_stack`)
and run the pure NumPy kernels of :mod:`mstdask._calib_kernels` one tile per task.
"""

from __future__ import annotations

from datetime import date

import dask.array as da
import numpy as np
import xarray as xr

from . import _calib_kernels as K
from .config import CalibConfig
from .errors import BadInputError, InsufficientDataError
from .store import rechunk_for_stack

__all__ = [
    "check_frames",
    "master_bias",
    "ps_map",
    "ps_summary",
    "bad_pixel_map",
    "saturation_mask",
    "nearest_night",
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
                  dtype=np.float32, itemsize: int | None = None) -> da.Array:
    """Apply ``kernel(tile_stack) -> (ny, nx)`` (or ``(n_out, ny, nx)``) tile by tile."""
    stacked = rechunk_for_stack(frames, config.tile_bytes, itemsize)
    arr = stacked.data
    if n_out is None:
        return da.map_blocks(kernel, arr, drop_axis=0, dtype=dtype, meta=np.empty((0, 0), dtype))
    chunks = ((n_out,), arr.chunks[1], arr.chunks[2])
    return da.map_blocks(kernel, arr, chunks=chunks, dtype=dtype, meta=np.empty((0, 0, 0), dtype))


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
    """Pepper-and-salt pixels from one night's bias sequence, in a single streaming pass.

    The first ``ps_frames`` bias frames in time are split into ``ps_groups`` consecutive,
    non-overlapping groups; one pass over each tile gives every group's per-pixel count,
    sum and sum of squares, hence per-group mean and std, the all-frame mean and std, and
    the PS decision (std > ``ps_threshold_adu``) per group. The final map is the
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

    def kernel(tile):
        res = K.ps_from_moments(K.group_moments(tile, groups, G, offset), config.ps_threshold_adu, offset)
        return np.concatenate([res["group_mean"], res["group_std"], res["mean"][None], res["std"][None]])

    out = _stack_reduce(frames, kernel, config, n_out=2 * G + 2)
    gstd = out[G:2 * G]
    ds = xr.Dataset(
        {
            "group_mean": (("group", "y", "x"), out[:G]),
            "group_std": (("group", "y", "x"), gstd),
            "group_ps": (("group", "y", "x"), gstd > config.ps_threshold_adu),
            "mean": (("y", "x"), out[2 * G]),
            "std": (("y", "x"), out[2 * G + 1]),
        },
        coords={"group": np.arange(G), "group_frames": ("group", np.bincount(groups, minlength=G))},
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


def saturation_mask(raw: xr.DataArray, config: CalibConfig | None = None) -> xr.DataArray:
    """Per-frame saturated pixels: raw value above ``saturation_adu`` (lazy, bool)."""
    config = config or CalibConfig()
    return (raw > config.saturation_adu).rename("saturated")


def nearest_night(night: str, available: list[str]) -> str:
    """The available night nearest to ``night`` (earlier wins a tie)."""
    if not available:
        raise InsufficientDataError(f"no night with bias frames to calibrate night {night}")
    target = date.fromisoformat(night)
    return min(available, key=lambda n: (abs((date.fromisoformat(n) - target).days), n))
