"""Repeated photometry at survey scale (Xiao et al. 2025, sections 4.3-4.5): the source x
epoch light-curve cube and its per-source reductions.

The cube ``LC.zarr`` (Zarr v3, opens with :func:`xarray.open_zarr`)::

    mag, magerr, flags   (source, epoch) float32   NaN where not measured
    source               (source,) int64           row number = source id
    ra, dec              (source,) float64         reference-catalogue or mean detected position
    ref_id               (source,) int64           reference-catalogue row, -1 for a new source
    epoch                (epoch,) int64
    time                 (epoch,) datetime64[ns]   UTC start of exposure
    exposure, night, telescope, filter  (epoch,) str
    mjd_mid, zero_point  (epoch,) float64
    written              (epoch,) bool             the epoch's column is complete

``flags`` is float32 so that it can hold NaN like ``mag``; its values are the small mask
bit sums of the catalogues (exact in float32). Epochs are in order of arrival (an append
adds epochs at the end whatever their time): sort by ``time`` if you need to.

Chunks are ``(LightcurveConfig.source_chunk, LightcurveConfig.epoch_chunk)``: one writing
task fills one column of chunks (``epoch_chunk`` exposures), so an append touches only new
chunks and at most the last, partial chunk column. The reductions read all epochs of
``source_chunk`` sources per task (:func:`open_cube` asks for ``epoch=-1``: a read chunk
is a row of disk chunks, no rechunk graph).

:func:`match_task` and :func:`write_task` are the Dask tasks of ``mstdask lightcurves``
(:func:`mstdask.runner.lightcurves` submits them); the reductions below are lazy and never
compute.
"""

from __future__ import annotations

import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from . import _lc_kernels as K
from .config import LightcurveConfig, PrecisionConfig, to_dict
from .errors import BadInputError, ChunkingError, StoreError

__all__ = ["CUBE_KIND", "CubeStore", "open_cube", "match_task", "write_task", "source_statistics",
           "precision_table", "stacking_table", "theory_curve", "select_light_curves", "STAT_COLUMNS"]

CUBE_KIND = "mstdask.lightcurves"
CUBE_VERSION = 1
_TIME_ATTRS = {"units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian",
               "long_name": "UTC start of exposure"}
_VARS = ("mag", "magerr", "flags")
#: Per-epoch coordinates: name -> (dtype, fill value).
EPOCH_COORDS: dict[str, tuple[Any, Any]] = {
    "epoch": ("int64", -1), "time": ("int64", 0), "mjd_mid": ("float64", np.nan), "exposure": (str, None),
    "night": (str, None), "telescope": (str, None), "filter": (str, None), "zero_point": ("float64", np.nan),
    "written": ("bool", False)}
#: Per-source coordinates.
SOURCE_COORDS: dict[str, tuple[Any, Any]] = {
    "source": ("int64", -1), "ra": ("float64", np.nan), "dec": ("float64", np.nan), "ref_id": ("int64", -1),
    "ref_mag": ("float32", np.nan)}
_COORD_CHUNK = 1 << 20
#: Columns of the per-source statistics (``source_statistics``), after ``source, ra, dec``.
STAT_COLUMNS = K.STAT_NAMES


def _quiet(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        # the 1-D coordinates are stored in big chunks and replaced by in-memory copies
        warnings.filterwarnings("ignore", message="The specified chunks separate the stored chunks")
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- the store
class CubeStore:
    """The Zarr group of a light-curve cube (create, grow, mark epochs written).

    Only the driver (:mod:`mstdask.runner`) changes shapes and coordinates; tasks write
    data regions with :func:`write_task`.
    """

    def __init__(self, path: str | Path, group) -> None:
        self.path = str(path)
        self.group = group

    @classmethod
    def create(cls, path: str | Path, config: LightcurveConfig) -> "CubeStore":
        """A new, empty cube (0 sources x 0 epochs)."""
        import zarr
        from zarr.codecs import BloscCodec, BloscShuffle

        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path}: exists and is not a light-curve cube; choose a new output path")
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        group.attrs.update({"mstdask_store": CUBE_KIND, "mstdask_store_version": CUBE_VERSION,
                            "mstdask_version": __version__,
                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "config": to_dict(config),
                            "description": "source x epoch light curves of mstdask lightcurves; open with "
                                           "xarray.open_zarr or mstdask.lightcurves.open_cube"})
        coords = " ".join([*SOURCE_COORDS, *EPOCH_COORDS])
        comp = [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle, typesize=4)]
        attrs = {"mag": {"units": "mag", "long_name": f"calibrated mag_{config.magnitude}"},
                 "magerr": {"units": "mag", "long_name": f"error of mag_{config.magnitude}"},
                 "flags": {"long_name": "mask bits under the source (mstdask.masks.Flag); float for NaN"}}
        for name in _VARS:
            group.create_array(name, shape=(0, 0), dtype="float32", chunks=(config.source_chunk, config.epoch_chunk),
                               fill_value=np.nan, compressors=comp, dimension_names=("source", "epoch"),
                               attributes={**attrs[name], "coordinates": coords})
        for spec, dim in ((SOURCE_COORDS, "source"), (EPOCH_COORDS, "epoch")):
            for name, (dtype, fill) in spec.items():
                group.create_array(name, shape=(0,), dtype=dtype, chunks=(_COORD_CHUNK,), dimension_names=(dim,),
                                   fill_value=fill, attributes=dict(_TIME_ATTRS) if name == "time" else {})
        store = cls(path, group)
        store.consolidate()
        return store

    @classmethod
    def open(cls, path: str | Path, mode: str = "r+") -> "CubeStore":
        """Open an existing cube; :class:`StoreError` when ``path`` is not one."""
        import zarr

        path = Path(path)
        if not (path / "zarr.json").exists():
            raise StoreError(f"{path}: no light-curve cube here; build one with `mstdask lightcurves CATDIR --out "
                             f"{path}`")
        group = _quiet(zarr.open_group, str(path), mode=mode, zarr_format=3, use_consolidated=False)
        if group.attrs.get("mstdask_store") != CUBE_KIND:
            raise StoreError(f"{path}: a Zarr store, but not an mstdask light-curve cube (no 'mstdask_store' "
                             f"attribute '{CUBE_KIND}')")
        return cls(path, group)

    @property
    def shape(self) -> tuple[int, int]:
        """``(sources, epochs)``."""
        return tuple(self.group["mag"].shape)  # type: ignore[return-value]

    @property
    def chunks(self) -> tuple[int, int]:
        """On-disk ``(source, epoch)`` chunk."""
        return tuple(self.group["mag"].chunks)  # type: ignore[return-value]

    def coord(self, name: str) -> np.ndarray:
        """One coordinate as a NumPy array (read directly, no Dask)."""
        return np.asarray(self.group[name][...])

    def add_sources(self, values: dict[str, np.ndarray]) -> None:
        """Append sources (``ra, dec, ref_id, ref_mag``); ``source`` numbers them."""
        n0, ne = self.shape
        k = len(values["ra"])
        if k == 0:
            return
        values = {**values, "source": np.arange(n0, n0 + k)}
        for name in _VARS:  # old epochs of new sources read as the fill value, NaN: nothing to write
            self.group[name].resize((n0 + k, ne))
        for name, (dtype, fill) in SOURCE_COORDS.items():
            arr = self.group[name]
            arr.resize((n0 + k,))
            arr[n0:] = np.asarray(values.get(name, np.full(k, fill)), dtype=dtype)

    def add_epochs(self, values: dict[str, Sequence]) -> range:
        """Append epochs (``written`` False until :meth:`mark_written`); returns their slots."""
        ns, n0 = self.shape
        k = len(values["exposure"])
        if k:
            for name in _VARS:
                self.group[name].resize((ns, n0 + k))
            vals = {**values, "epoch": np.arange(n0, n0 + k), "written": np.zeros(k, bool)}
            for name, (dtype, fill) in EPOCH_COORDS.items():
                arr = self.group[name]
                arr.resize((n0 + k,))
                v = vals.get(name, [fill] * k)
                arr[n0:] = np.array(v, dtype=object) if dtype is str else np.asarray(v, dtype=dtype)
        return range(n0, n0 + k)

    def mark_written(self, slots: Sequence[int]) -> None:
        """Record that these epochs' columns are complete (a rerun skips them)."""
        slots = np.asarray(sorted(slots), np.int64)
        if slots.size:
            arr = self.group["written"]
            lo, hi = int(slots[0]), int(slots[-1]) + 1
            cur = np.asarray(arr[lo:hi])
            cur[slots - lo] = True
            arr[lo:hi] = cur

    def consolidate(self) -> None:
        """Refresh consolidated metadata (shapes) for :func:`xarray.open_zarr`."""
        import zarr

        _quiet(zarr.consolidate_metadata, self.path, zarr_format=3)


def open_cube(path: str | Path, source_chunk: int | None = None, written_only: bool = True):
    """Open a light-curve cube lazily as an :class:`xarray.Dataset` chunked for per-source work.

    Parameters
    ----------
    path : path-like
        ``LC.zarr``.
    source_chunk : int, optional
        Sources per Dask chunk (default: the on-disk chunk). Every Dask chunk holds *all*
        epochs (``epoch=-1``): the per-source reductions need whole light curves, and reading
        a row of disk chunks per task is cheaper than a rechunk graph. Memory per chunk is
        ``source_chunk x epochs x 4`` bytes per variable (4096 x 3000: ~50 MB).
    written_only : bool
        Hide epochs whose column is not complete (an interrupted run).

    Returns
    -------
    xarray.Dataset
        ``mag, magerr, flags`` as Dask arrays; the coordinates in memory.
    """
    import xarray as xr

    store = CubeStore.open(path, mode="r")
    sc, _ = store.chunks
    if source_chunk is not None and (source_chunk < 1 or source_chunk % sc):
        raise ChunkingError(f"{path}: source_chunk={source_chunk} must be a multiple of the cube's on-disk "
                            f"source chunk {sc}, so that tasks read whole chunks")
    # inline_array: every chunk read is a root task, so the scheduler's queuing keeps only
    # about one chunk per worker thread in memory (with a shared array-opening task the
    # reads are not roots and a worker would load chunks far ahead of the reductions)
    ds = _quiet(xr.open_dataset, str(path), engine="zarr", chunks={"source": source_chunk or sc, "epoch": -1},
                inline_array=True, consolidated=True, zarr_format=3)
    coords = {name: (("source",) if name in SOURCE_COORDS else ("epoch",), store.coord(name))
              for name in (*SOURCE_COORDS, *EPOCH_COORDS)}
    coords["time"] = ("epoch", store.coord("time").astype("datetime64[ns]"))
    ds = ds.assign_coords(coords)
    ds.attrs.update(dict(store.group.attrs))
    ds.attrs["mstdask_cube_path"] = str(Path(path).resolve())
    if written_only and not coords["written"][1].all():
        ds = ds.isel(epoch=np.flatnonzero(coords["written"][1]))
    return ds


# ----------------------------------------------------------------------------- tasks
def _read_catalog(path: str, magnitude: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    cols = ["ra", "dec", f"mag_{magnitude}", f"magerr_{magnitude}", "flags"]
    try:
        tab = pq.read_table(path, columns=cols)
    except Exception as exc:  # a missing column, a truncated file
        raise BadInputError(path, f"cannot read the catalogue columns {cols} ({exc}); run `mstdask photometry` "
                                  "again for this exposure") from None
    return {"ra": tab["ra"].to_numpy(), "dec": tab["dec"].to_numpy(),
            "mag": tab[f"mag_{magnitude}"].to_numpy().astype(np.float32),
            "magerr": tab[f"magerr_{magnitude}"].to_numpy().astype(np.float32),
            "flags": tab["flags"].to_numpy().astype(np.float32)}


def match_task(files: Sequence[str], cand_ra: np.ndarray, cand_dec: np.ndarray, radius_arcsec: float,
               magnitude: str = "aper") -> dict[str, Any]:
    """Pass 1 of the cross-match, one block of exposures in one task: which candidate
    sources (cube sources, then reference stars) are detected, and where the detections
    that match none are.

    Returns ``{"hit": unique candidate rows, "ra", "dec": unmatched detections,
    "rows": detections read, "bad": [(file, problem)]}``; an unreadable catalogue is listed
    in ``bad`` and the others go on.
    """
    from scipy.spatial import cKDTree

    tree = cKDTree(K.unit_vectors(cand_ra, cand_dec))
    hits, ura, udec, rows, bad = [], [], [], 0, []
    for f in files:
        try:
            cat = _read_catalog(f, magnitude)
        except BadInputError as exc:
            bad.append((f, str(exc)))
            continue
        good = np.isfinite(cat["ra"]) & np.isfinite(cat["dec"])
        ra, dec = cat["ra"][good], cat["dec"][good]
        rows += len(ra)
        idx, _ = K.match_nearest(tree, K.unit_vectors(ra, dec), radius_arcsec, unique=False)
        hits.append(np.unique(idx[idx >= 0]))
        ura.append(ra[idx < 0])
        udec.append(dec[idx < 0])
    return {"hit": np.unique(np.concatenate(hits)) if hits else np.empty(0, np.int64),
            "ra": np.concatenate(ura) if ura else np.empty(0), "dec": np.concatenate(udec) if udec else np.empty(0),
            "rows": rows, "bad": bad}


def write_task(cube_path: str, files: Sequence[str], slots: Sequence[int], master_ra: np.ndarray,
               master_dec: np.ndarray, radius_arcsec: float, magnitude: str = "aper") -> dict[str, Any]:
    """Pass 2, one block of exposures in one task: match every detection to the master
    list (nearest within the radius, one detection per source and exposure) and write the
    block's epochs ``slots`` (all inside one chunk column) source chunk by source chunk.

    Returns ``{"slots", "rows", "matched", "unassigned", "seconds"}``.
    """
    import zarr
    from scipy.spatial import cKDTree

    t0 = time.perf_counter()
    group = _quiet(zarr.open_group, cube_path, mode="r+", zarr_format=3, use_consolidated=False)
    arrays = {name: group[name] for name in _VARS}
    ns, ne = arrays["mag"].shape
    if len(master_ra) != ns:
        raise StoreError(f"{cube_path}: {ns} sources in the cube, {len(master_ra)} in the master list; run "
                         "`mstdask lightcurves` again")
    sc, ec = arrays["mag"].chunks
    e0 = (min(slots) // ec) * ec
    e1 = min(ne, e0 + ec)
    if max(slots) >= e1:
        raise ChunkingError(f"{cube_path}: epochs {min(slots)}..{max(slots)} span two chunk columns of {ec}")
    tree = cKDTree(K.unit_vectors(master_ra, master_dec))
    rows_l, cols_l, vals_l = [], [], {k: [] for k in _VARS}
    n_rows = n_matched = 0
    for f, slot in zip(files, slots):
        cat = _read_catalog(f, magnitude)
        good = np.isfinite(cat["ra"]) & np.isfinite(cat["dec"])
        n_rows += int(good.size)
        idx, _ = K.match_nearest(tree, K.unit_vectors(cat["ra"][good], cat["dec"][good]), radius_arcsec)
        ok = idx >= 0
        n_matched += int(ok.sum())
        rows_l.append(idx[ok])
        cols_l.append(np.full(int(ok.sum()), slot - e0, np.int32))
        for k in _VARS:
            vals_l[k].append(cat[k][good][ok])
    rows = np.concatenate(rows_l) if rows_l else np.empty(0, np.int64)
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    cols = np.concatenate(cols_l)[order] if cols_l else np.empty(0, np.int32)
    vals = {k: np.concatenate(v)[order] if v else np.empty(0, np.float32) for k, v in vals_l.items()}
    # epochs of this chunk column that this task does not own (slots already written, in a
    # partial block) keep their values: read them back first
    own = np.zeros(e1 - e0, bool)
    own[np.asarray(slots) - e0] = True
    for s0 in range(0, ns, sc):
        s1 = min(ns, s0 + sc)
        blocks = K.fill_block(rows, cols, vals, s0, s1, e1 - e0)
        if not own.all():
            for k in _VARS:
                old = np.asarray(arrays[k][s0:s1, e0:e1])
                blocks[k][:, ~own] = old[:, ~own]
        elif np.isnan(blocks["mag"]).all():
            continue  # nothing measured here: the chunk stays absent and reads as NaN
        for k in _VARS:
            arrays[k][s0:s1, e0:e1] = blocks[k]
    return {"slots": list(map(int, slots)), "rows": n_rows, "matched": n_matched,
            "unassigned": n_rows - n_matched, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- reductions
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
