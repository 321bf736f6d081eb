"""Repeated photometry at survey scale (Xiao et al. 2025, sections 4.3-4.5): the source x
epoch light-curve cube (its reductions are in :mod:`mstdask.lightcurves.statistics`).

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
(:mod:`mstdask.jobs.lightcurves` submits them).
"""

from __future__ import annotations

import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from . import _lc_kernels as K
from ..config import LightcurveConfig, to_dict
from ..errors import BadInputError, ChunkingError, StoreError

__all__ = ["CUBE_KIND", "CubeStore", "open_cube", "match_task", "write_task", "STAT_COLUMNS"]

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

    Only the driver (:mod:`mstdask.jobs.lightcurves`) changes shapes and coordinates; tasks write
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
