"""Per-source reductions of the light-curve cube (Xiao et al. 2025, sections 4.3-4.5):
precision against magnitude (Fig. 12), catalogue stacks (Fig. 14), variability and the
light curves to draw (Fig. 15).

Everything here is lazy (one task per source chunk, all epochs) and never computes; the
``precision`` job (:mod:`mstdask.jobs.precision`) does.
"""

from __future__ import annotations

import numpy as np

from ..config import PrecisionConfig
from ..errors import StoreError
from . import _lc_kernels as K
from .cube import _VARS, STAT_COLUMNS, CubeStore, _quiet

__all__ = ["source_statistics", "precision_table", "stacking_table", "theory_curve", "select_light_curves",
           "dask_token"]


def source_statistics(ds, config: PrecisionConfig | None = None):
    """Per-source statistics of the cube, lazily (one task per source chunk).

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`open_cube` (``mag`` required; ``magerr`` and ``flags`` used when there).
    config : PrecisionConfig

    Returns
    -------
    xarray.Dataset
        ``(source,)`` variables :data:`STAT_COLUMNS` and ``stacked`` ``(source, stack_n)``:
        the scatter of the means of N consecutive good epochs. Dask-backed: nothing is
        computed.
    """
    import dask
    import xarray as xr

    config = config or PrecisionConfig()
    ds = ds[[v for v in _VARS if v in ds]]
    if len(ds.chunksizes.get("epoch", ())) > 1:
        # whole light curves per task: merge the epoch chunks explicitly (open_cube does
        # this at read time, which is cheaper)
        ds = ds.chunk({"epoch": -1})
    args = [ds["mag"], ds["magerr"] if "magerr" in ds else None, ds["flags"] if "flags" in ds else None]
    present = [a for a in args if a is not None]

    n_stat = len(STAT_COLUMNS)
    ncol = n_stat + len(config.stack_n)
    fused = _fused_statistics(ds, config, ncol)
    if fused is not None:
        out = xr.DataArray(fused, dims=("source", "column"), coords={"source": ds["source"].values})
        res = xr.Dataset({name: out.isel(column=i, drop=True) for i, name in enumerate(STAT_COLUMNS)})
        res["stacked"] = (out.isel(column=slice(n_stat, None)).rename(column="stack_n")
                          .assign_coords(stack_n=list(config.stack_n)))
        keep = [c for c in ("ra", "dec", "ref_id") if c in ds.coords]
        return res.assign_coords({c: ds.coords[c] for c in keep})

    def kernel(*arrays):
        it = iter(arrays)
        m = next(it)
        e = next(it) if args[1] is not None else None
        f = next(it) if args[2] is not None else None
        *stats, stacked = K.block_statistics_fast(m, e, f, bad_flags=config.bad_flags,
                                                  min_epochs=config.min_epochs, stack_n=config.stack_n)
        return np.concatenate([np.stack(stats, axis=-1), stacked], axis=-1)

    # one output (the statistics side by side along "column"): with several outputs
    # apply_ufunc would run the kernel once per output
    out = xr.apply_ufunc(kernel, *present, input_core_dims=[["epoch"]] * len(present),
                         output_core_dims=[["column"]], dask="parallelized", output_dtypes=[np.float32],
                         dask_gufunc_kwargs={"output_sizes": {"column": n_stat + len(config.stack_n)}})
    # fuse the chunk reads, the transposes and the kernel into one task per source chunk
    # now, once for all columns: the inputs then live only inside that task (bounded memory
    # per worker), and the columns below share it
    (fused,) = dask.optimize(out.data)
    out = out.copy(data=fused)
    res = xr.Dataset({name: out.isel(column=i, drop=True) for i, name in enumerate(STAT_COLUMNS)})
    res["stacked"] = (out.isel(column=slice(n_stat, None)).rename(column="stack_n")
                      .assign_coords(stack_n=list(config.stack_n)))
    keep = [c for c in ("ra", "dec", "ref_id") if c in ds.coords]
    return res.assign_coords({c: ds.coords[c] for c in keep})


def _read_block(path: str, s0: int, s1: int, epochs: np.ndarray, names: tuple[str, ...], config: PrecisionConfig,
                ncol: int) -> np.ndarray:
    """Read rows ``s0:s1`` (the given epoch slots) of a cube and reduce them, in one task."""
    import zarr

    g = _quiet(zarr.open_group, path, mode="r", zarr_format=3, use_consolidated=False)
    ne = g["mag"].shape[1]
    full = epochs.size == ne and bool((epochs == np.arange(ne)).all())
    arrs = {}
    for name in names:
        a = np.asarray(g[name][s0:s1])
        arrs[name] = a if full else a[:, epochs]
    *stats, stacked = K.block_statistics_fast(arrs["mag"], arrs.get("magerr"), arrs.get("flags"),
                                              bad_flags=config.bad_flags, min_epochs=config.min_epochs,
                                              stack_n=config.stack_n)
    return np.concatenate([np.stack(stats, axis=-1), stacked], axis=-1)


def _fused_statistics(ds, config: PrecisionConfig, ncol: int):
    """For a dataset straight from :func:`open_cube` (all sources, any epoch selection):
    one task per source chunk that reads its rows and reduces them, so the inputs live only
    inside that task. ``None`` when ``ds`` was reshaped (then the generic path runs)."""
    import dask.array as da

    path = ds.attrs.get("mstdask_cube_path")
    if not path or "mag" not in ds or ds["mag"].chunks is None:
        return None
    try:
        store = CubeStore.open(path, mode="r")
    except StoreError:
        return None
    n = store.shape[0]
    if ds.sizes["source"] != n or not np.array_equal(ds["source"].values, np.arange(n)):
        return None
    epochs = np.asarray(ds["epoch"].values, np.int64)
    names = tuple(v for v in _VARS if v in ds)
    chunks = ds["mag"].chunks[ds["mag"].dims.index("source")]
    rows = da.arange(n, chunks=(chunks,))

    def block(r: np.ndarray) -> np.ndarray:
        if r.size == 0:
            return np.empty((0, ncol), np.float32)
        return _read_block(path, int(r[0]), int(r[-1]) + 1, epochs, names, config, ncol)

    return rows.map_blocks(block, new_axis=1, chunks=(chunks, (ncol,)), dtype=np.float32,
                           name=f"source-statistics-{dask_token(path, epochs, names, config, ncol)}")


def dask_token(*args) -> str:
    from dask.base import tokenize

    return tokenize(*args)


def theory_curve(mag: np.ndarray, config: PrecisionConfig | None = None) -> dict[str, np.ndarray]:
    """The theoretical magnitude error of Eqs. 1-5 at ``mag`` (photon, sky, read, dark,
    scintillation and total), see :func:`mstdask._lc_kernels.snr_theory`."""
    return K.snr_theory(np.asarray(mag, float), config or PrecisionConfig())


def _edges(config: PrecisionConfig) -> np.ndarray:
    lo, hi = config.mag_range
    return lo + config.mag_bin * np.arange(int(round((hi - lo) / config.mag_bin)) + 1)


def _blocks(da):
    """A Dask-backed variable as a list of its blocks' Delayed objects, *not* optimized: the
    per-chunk statistics task keeps its key, so every product computed together (or from
    persisted statistics) shares it. (Passing the array itself to ``dask.delayed`` would
    optimize each argument alone and fuse the statistics kernel into every column.)"""
    return list(da.data.to_delayed(optimize_graph=False).ravel())


def _cat(blocks) -> np.ndarray:
    return np.concatenate([np.asarray(b) for b in blocks], axis=0)


def _precision_frame(mean_mag, std, rstd, rms_err, config: PrecisionConfig):
    import pandas as pd

    mean_mag, std, rstd, rms_err = (_cat(b) for b in (mean_mag, std, rstd, rms_err))
    edges = _edges(config)
    a = K.binned_median(mean_mag, std, edges, config.min_per_bin)
    b = K.binned_median(mean_mag, rstd, edges, config.min_per_bin)
    c = K.binned_median(mean_mag, rms_err, edges, config.min_per_bin)
    th = K.snr_theory(a["center"], config)
    return pd.DataFrame({"mag_center": a["center"], "mag_lo": edges[:-1], "mag_hi": edges[1:], "count": a["count"],
                         "std_median": a["median"], "std_p16": a["p16"], "std_p84": a["p84"],
                         "robust_std_median": b["median"], "rms_err_median": c["median"],
                         "theory_total": th["total"], "theory_photon": th["photon"], "theory_sky": th["sky"],
                         "theory_scintillation": th["scintillation"]})


def precision_table(stats, config: PrecisionConfig | None = None):
    """Fig. 12, lazily: medians of the per-source std and robust std (and of the rms of the
    reported errors) in magnitude bins, beside the theory of Eqs. 1-5.

    Returns a :class:`dask.delayed.Delayed` of a :class:`pandas.DataFrame` with one row per
    bin: ``mag_center, mag_lo, mag_hi, count, std_median, std_p16, std_p84,
    robust_std_median, rms_err_median, theory_total, theory_photon, theory_sky,
    theory_scintillation``. The binning gathers four ``(source,)`` columns into one task
    (32 MB for a million sources), never the cube.
    """
    import dask

    config = config or PrecisionConfig()
    cols = [_blocks(stats[c]) for c in ("mean_mag", "std", "robust_std", "rms_err")]
    return dask.delayed(_precision_frame, pure=True)(*cols, config)


def _stacking_frame(mean_mag, stacked, config: PrecisionConfig):
    import pandas as pd

    mean_mag, stacked = _cat(mean_mag), _cat(stacked)
    edges = _edges(config)
    frames = []
    single = K.binned_median(mean_mag, stacked[:, 0], edges, config.min_per_bin)["median"] \
        if config.stack_n[0] == 1 else None
    for j, n in enumerate(config.stack_n):
        r = K.binned_median(mean_mag, stacked[:, j], edges, config.min_per_bin)
        frames.append(pd.DataFrame({"n_stack": n, "mag_center": r["center"], "count": r["count"],
                                    "scatter_median": r["median"], "scatter_p16": r["p16"], "scatter_p84": r["p84"],
                                    "sqrt_n_expected": (single / np.sqrt(n)) if single is not None else np.nan}))
    return pd.concat(frames, ignore_index=True)


def stacking_table(stats, config: PrecisionConfig | None = None):
    """Fig. 14, lazily: the median scatter of catalogue stacks of N consecutive epochs in
    magnitude bins, for every N, beside the single-epoch median divided by sqrt(N).

    Returns a :class:`dask.delayed.Delayed` of a long :class:`pandas.DataFrame`:
    ``n_stack, mag_center, count, scatter_median, scatter_p16, scatter_p84, sqrt_n_expected``.
    """
    import dask

    config = config or PrecisionConfig()
    return dask.delayed(_stacking_frame, pure=True)(_blocks(stats["mean_mag"]), _blocks(stats["stacked"]), config)


def select_light_curves(table, config: PrecisionConfig | None = None) -> dict[str, np.ndarray]:
    """Sources to draw (Fig. 15) from a computed variability table (``pandas``, one row per
    source with ``source, mean_mag, chi2_dof, n_epochs``): the ``n_variables`` highest
    ``chi2_dof`` and ``n_constants`` well-sampled stars with ``chi2_dof`` near 1 spread
    over the magnitude range. Returns ``{"variable": ids, "constant": ids}``."""
    config = config or PrecisionConfig()
    t = table[np.isfinite(table["chi2_dof"])]
    var = t.nlargest(config.n_variables, "chi2_dof")["source"].to_numpy()
    rest = t[~t["source"].isin(var) & (t["n_epochs"] >= t["n_epochs"].median()) & (t["chi2_dof"] < 2.0)]
    const = np.empty(0, np.int64)
    if len(rest) and config.n_constants:
        rest = rest.sort_values("mean_mag")
        pick = np.unique(np.linspace(0, len(rest) - 1, config.n_constants).round().astype(int))
        const = rest["source"].to_numpy()[pick]
    return {"variable": np.asarray(var, np.int64), "constant": np.asarray(const, np.int64)}
