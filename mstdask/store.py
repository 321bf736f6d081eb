"""The raw Zarr store: layout, creation, appending, and lazy opening.

Layout (Zarr v3, opens with ``xarray.open_zarr``)::

    STORE.zarr/
      raw        (frame, y, x) uint16   exact FITS pixels; one shard (= one file) per frame,
                                        spatial tiles (Zarr chunks) inside the shard
      header     (frame,) str           full FITS header of each frame (provenance)
      time       (frame,) datetime64    UTC start of exposure (DATE-OBS)
      night      (frame,) str           local observing night, evening date YYYY-MM-DD
      imagetyp   (frame,) str           bias | dark | flat | science
      exptime    (frame,) float64       seconds
      filter, telescope, instrument, object, path, frame_key   (frame,) str
      ra, dec, egain, ccd_temp         (frame,) float64  (NaN where the header has none)
      ingested   (frame,) bool          pixels written and verified

The driver (one process) owns every write except the pixels: it reserves frame slots and
their coordinates, then tasks write each frame's shard independently, and the driver marks
them ``ingested``. A slot whose pixels never arrived (killed run, unreadable file) stays
``ingested=False`` and is finished by the next ingest of the same file; :func:`open_store`
hides such slots.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing
from zarr.codecs import BloscCodec, BloscShuffle

from . import __version__
from .config import SiteConfig, StoreLayout, to_dict
from .errors import BadInputError, StoreError
from .io import FrameInfo, read_pixels

__all__ = ["COORDS", "IngestLock", "RawStore", "ReducedStore", "open_reduced", "open_store", "tile_edge", "write_frame"]

STORE_KIND = "mstdask.raw"
STORE_VERSION = 1

#: Per-frame coordinates: name -> (numpy dtype, fill value used for missing values).
COORDS: dict[str, tuple[str, object]] = {
    "time": ("int64", 0),
    "night": ("str", ""),
    "imagetyp": ("str", ""),
    "exptime": ("float64", np.nan),
    "filter": ("str", ""),
    "telescope": ("str", ""),
    "instrument": ("str", ""),
    "object": ("str", ""),
    "ra": ("float64", np.nan),
    "dec": ("float64", np.nan),
    "egain": ("float64", np.nan),
    "ccd_temp": ("float64", np.nan),
    "path": ("str", ""),
    "frame_key": ("str", ""),
    "ingested": ("bool", False),
}
_TIME_ATTRS = {"units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian",
               "long_name": "UTC start of exposure (DATE-OBS)"}
_META_CHUNK = 65536  # per-frame metadata is tiny: one chunk holds 65536 frames


def tile_edge(n: int, target: int) -> int:
    """The tile edge for an axis of ``n`` pixels: a divisor of ``n`` near ``target``.

    A divisor avoids ragged edge tiles (6388 -> 1597, 9576 -> 1596 for a 1536 target). When
    no divisor lies within a factor 1.5 of the target, the target itself is used and the
    last tile is partial.
    """
    if n <= target:
        return n
    best = None
    for d in range(int(target / 1.5), int(target * 1.5) + 1):
        if n % d == 0 and (best is None or abs(d - target) < abs(best - target)):
            best = d
    return best or target


def _compressors(layout: StoreLayout) -> list | None:
    if layout.compressor == "none":
        return None
    # Byte-shuffle groups the nearly constant high bytes of 16-bit pixels: on MST frames it
    # compresses to ~65 % at ~1 GB/s; bit-shuffle gains 5 % more for 2.5x the time.
    return [BloscCodec(cname=layout.compressor, clevel=layout.clevel, shuffle=BloscShuffle.shuffle, typesize=2)]


def _quiet(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        # the ingest lock file lives in the store while an ingest runs
        warnings.filterwarnings("ignore", message="Object at .mstdask-ingest.lock")
        return func(*args, **kwargs)


def _open_group(path: str | os.PathLike, mode: str, kind: str, what: str, how: str) -> zarr.Group:
    """Open an mstdask store's root group, refusing anything else with a helpful message."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path}: no Zarr store here; {how}")
    group = _quiet(zarr.open_group, str(path), mode=mode, zarr_format=3, use_consolidated=False)
    if group.attrs.get("mstdask_store") != kind:
        raise StoreError(f"{path}: a Zarr store, but not an mstdask {what} store (no 'mstdask_store' "
                         f"attribute '{kind}')")
    return group


def _create_coords(group: zarr.Group, spec: dict[str, tuple[str, object]]) -> None:
    """Empty per-frame coordinate arrays (name -> (dtype, fill)), grown by ``reserve``."""
    for name, (dtype, fill) in spec.items():
        group.create_array(name, shape=(0,), dtype=str if dtype == "str" else dtype, chunks=(_META_CHUNK,),
                           dimension_names=("frame",), fill_value=None if dtype == "str" else fill,
                           attributes=dict(_TIME_ATTRS) if name == "time" else {})


class _FrameStore:
    """What the raw and reduced stores share: a root group, frames along ``frame``."""

    _pixels = "raw"  # the (frame, y, x) array that sets the number of frames
    _frame_arrays: tuple[str, ...] = ("raw",)  # (frame, y, x) arrays written by tasks, one shard per frame

    def __init__(self, path: str | os.PathLike, group: zarr.Group) -> None:
        self.path = str(path)
        self.group = group

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of every frame in the store."""
        return tuple(self.group.attrs["frame_shape"])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.group[self._pixels].shape[0])

    def coord(self, name: str) -> np.ndarray:
        """One per-frame coordinate as a NumPy array (read directly, no Dask)."""
        return np.asarray(self.group[name][...])

    def consolidate(self) -> None:
        """Refresh consolidated metadata so ``xarray.open_zarr`` opens the store quickly."""
        _quiet(zarr.consolidate_metadata, self.path, zarr_format=3)

    def clear_partial(self, indices: Iterable[int]) -> int:
        """Remove the temporary files a task killed while writing left in these frames' shard
        folders (Zarr writes a shard to ``NAME.<id>.partial`` and renames it, so a shard itself
        is never half-written). Only for slots no running task writes. Returns the count."""
        n = 0
        for name in self._frame_arrays:
            for i in indices:
                folder = Path(self.path, name, "c", str(int(i)))
                if folder.is_dir():
                    for f in folder.rglob("*.partial"):
                        try:
                            f.unlink()
                            n += 1
                        except OSError:
                            pass
        return n


class RawStore(_FrameStore):
    """Driver-side handle on a raw store: create it, reserve frames, mark them ingested.

    Use :meth:`create` or :meth:`open`; pixels are written by :func:`write_frame` in tasks.
    """

    # ----------------------------------------------------------------- creation / opening
    @classmethod
    def create(cls, path: str | os.PathLike, shape: tuple[int, int], layout: StoreLayout,
               site: SiteConfig) -> "RawStore":
        """Create an empty store for frames of ``shape = (ny, nx)``."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path}: exists and is not an mstdask store; choose a new --store path")
        ty, tx = tile_edge(shape[0], layout.tile), tile_edge(shape[1], layout.tile)
        shard = (1, -(-shape[0] // ty) * ty, -(-shape[1] // tx) * tx)
        try:
            group = zarr.open_group(str(path), mode="w", zarr_format=3)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the store ({exc}); check the folder is writable") from None
        group.attrs.update({
            "mstdask_store": STORE_KIND,
            "mstdask_store_version": STORE_VERSION,
            "mstdask_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "frame_shape": list(shape),
            "tile": [ty, tx],
            "layout": to_dict(layout),
            "site": to_dict(site),
            "description": "Raw camera frames ingested by mstdask; open with xarray.open_zarr or mstdask.open_store",
        })
        coord_names = " ".join(COORDS)
        group.create_array(
            "raw", shape=(0, *shape), dtype="uint16", chunks=(1, ty, tx), shards=shard,
            compressors=_compressors(layout), fill_value=0, dimension_names=("frame", "y", "x"),
            attributes={"units": "adu", "long_name": "raw camera counts (exact FITS pixels)",
                        "coordinates": coord_names},
        )
        group.create_array("header", shape=(0,), dtype=str, chunks=(4096,), dimension_names=("frame",),
                           attributes={"long_name": "FITS header of the frame", "coordinates": coord_names})
        _create_coords(group, COORDS)
        store = cls(path, group)
        store.consolidate()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+") -> "RawStore":
        """Open an existing store (``mode='r'`` read-only, ``'r+'`` to append)."""
        return cls(path, _open_group(path, mode, STORE_KIND, "raw",
                                     f"create one with `mstdask ingest FILES --store {path}`"))

    @property
    def site(self) -> SiteConfig:
        """The site the store's nights refer to."""
        return SiteConfig(**self.group.attrs["site"])

    def known_keys(self) -> dict[str, tuple[int, bool]]:
        """``frame_key -> (frame index, ingested)`` for every reserved slot."""
        keys = self.coord("frame_key")
        done = self.coord("ingested")
        return {str(k): (i, bool(d)) for i, (k, d) in enumerate(zip(keys, done))}

    # ------------------------------------------------------------------------ driver writes
    def reserve(self, infos: Sequence[FrameInfo]) -> list[int]:
        """Append slots for new frames and write their coordinates (pixels come later).

        Returns the frame index given to each info, in the order given.
        """
        if not infos:
            return []
        n0 = len(self)
        n1 = n0 + len(infos)
        for info in infos:
            if info.shape != self.frame_shape:
                raise BadInputError(info.path, f"frame is {info.shape[1]}x{info.shape[0]} pixels but the store "
                                                f"holds {self.frame_shape[1]}x{self.frame_shape[0]} frames; "
                                                "ingest it into a store of its own")
        self.group["raw"].resize((n1, *self.frame_shape))
        self.group["header"].resize((n1,))
        self.group["header"][n0:n1] = np.array([i.header for i in infos], dtype=object)
        values = {
            "time": np.array([np.datetime64(i.time, "ns") for i in infos]).astype("int64"),
            "night": [i.night for i in infos],
            "imagetyp": [i.imagetyp for i in infos],
            "exptime": [i.exptime for i in infos],
            "filter": [i.filter for i in infos],
            "telescope": [i.telescope for i in infos],
            "instrument": [i.instrument for i in infos],
            "object": [i.object for i in infos],
            "ra": [i.ra for i in infos],
            "dec": [i.dec for i in infos],
            "egain": [i.egain for i in infos],
            "ccd_temp": [i.ccd_temp for i in infos],
            "path": [i.path for i in infos],
            "frame_key": [i.key for i in infos],
            "ingested": np.zeros(len(infos), dtype=bool),
        }
        for name, (dtype, _) in COORDS.items():
            arr = self.group[name]
            arr.resize((n1,))
            arr[n0:n1] = np.array(values[name], dtype=object if dtype == "str" else dtype)
        self.consolidate()
        return list(range(n0, n1))

    def mark_ingested(self, indices: Iterable[int]) -> None:
        """Record that these frames' pixels are written."""
        idx = np.fromiter(indices, dtype=np.int64)
        if idx.size == 0:
            return
        arr = self.group["ingested"]
        flags = np.asarray(arr[...])
        flags[idx] = True
        arr[...] = flags

    def update_paths(self, updates: dict[int, str]) -> None:
        """Point existing slots at the file they are (re)ingested from."""
        if not updates:
            return
        arr = self.group["path"]
        paths = np.asarray(arr[...], dtype=object)
        for i, p in updates.items():
            paths[i] = p
        arr[...] = paths

    def size_on_disk(self) -> int:
        """Bytes used by the store's files."""
        total = 0
        for root, _, files in os.walk(self.path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total


class IngestLock:
    """An exclusive lock file so two ingests never write the same store at once.

    A lock left by a process that no longer runs on this host (killed ingest) is taken
    over; a live one raises :class:`~mstdask.errors.StoreError`.
    """

    def __init__(self, store_path: str | os.PathLike) -> None:
        self.file = Path(store_path) / ".mstdask-ingest.lock"

    def _holder_alive(self) -> bool:
        try:
            host, pid = self.file.read_text().split()
            pid_i = int(pid)
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return True  # cannot check another machine: assume it is alive
        try:
            os.kill(pid_i, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __enter__(self) -> "IngestLock":
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._holder_alive():
                    raise StoreError(f"{self.file.parent}: another ingest is writing this store "
                                     f"({self.file.read_text().strip()}); wait for it to finish, or delete "
                                     f"{self.file} if that process is gone") from None
                self.file.unlink(missing_ok=True)  # stale lock of a killed ingest
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{socket.gethostname()} {os.getpid()}\n")
            return self
        raise StoreError(f"{self.file}: cannot take the ingest lock")

    def __exit__(self, *exc: object) -> None:
        self.file.unlink(missing_ok=True)


def write_frame(store_path: str, index: int, info: FrameInfo) -> dict:
    """Read one FITS frame and write its pixels into slot ``index`` of the store.

    Runs inside a task. The frame is one shard, written in one piece, so tasks never
    touch each other's files and a rewrite of the same frame is harmless.

    Returns
    -------
    dict
        ``{"index", "path", "bytes"}``.
    """
    data = read_pixels(info)
    raw = _quiet(zarr.open_array, store=store_path, path="raw", mode="r+", zarr_format=3)
    if raw.shape[1:] != data.shape:
        raise BadInputError(info.path, f"frame shape {data.shape} does not match the store {raw.shape[1:]}")
    raw[index] = data
    return {"index": index, "path": info.path, "bytes": int(data.nbytes)}


class _RawFrames(BackendArray):
    """The ``raw`` array of a store for xarray's lazy indexing (``open_store(chunks=None)``).

    Reads each frame with a basic Zarr slice: that decodes only the tiles asked for, where
    Zarr's orthogonal selection (what ``open_zarr`` uses for a list of frames) decoded whole
    shards, 10-30x slower. Holds only the path, so it pickles to workers and every read
    task opens the array itself.
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)

    def __getitem__(self, key):
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._read)

    def _read(self, key: tuple) -> np.ndarray:
        arr = zarr.open_array(self.path, path="raw", mode="r", zarr_format=3)
        fsel, ysel, xsel = key
        if isinstance(fsel, (int, np.integer)):
            return arr[int(fsel), ysel, xsel]
        frames = np.arange(self.shape[0])[fsel]
        if len(frames) == 0:
            return arr[0:0, ysel, xsel]
        out = None
        for k, i in enumerate(frames):  # one frame at a time: a frame's tiles are one shard
            plane = arr[int(i), ysel, xsel]
            if out is None:
                out = np.empty((len(frames), *plane.shape), dtype=self.dtype)
            out[k] = plane
        return out


def open_store(path: str | os.PathLike, *, include_pending: bool = False,
               chunks: dict | str | None = "auto") -> xr.Dataset:
    """Open a raw store lazily as an :class:`xarray.Dataset`.

    Parameters
    ----------
    path : path-like
        The store.
    include_pending : bool
        Also return slots whose pixels are not (yet) written; default hides them.
    chunks : dict, "auto" or None
        ``"auto"`` keeps the on-disk tiles (one frame, one tile per Dask chunk), which suits
        per-frame work; stack reductions rechunk to ``frame=-1`` with spatial tiles
        themselves, explicitly. ``None``: lazy but not yet in Dask; the stack reductions
        of :mod:`mstdask.calib` then read each tile of all their frames in one task
        (:func:`rechunk_for_stack`), with no transfer between workers; use ``.chunk()``
        for anything else.

    Returns
    -------
    xarray.Dataset
        ``raw`` as a Dask array and the per-frame coordinates loaded in memory.
    """
    store = RawStore.open(path, mode="r")
    ds = _quiet(xr.open_zarr, str(path), chunks={} if chunks == "auto" else chunks, zarr_format=3)
    if chunks is None:
        raw = ds["raw"]
        ds["raw"] = xr.Variable(raw.dims, indexing.LazilyIndexedArray(
            _RawFrames(str(Path(path).resolve()), raw.shape, raw.dtype)), attrs=raw.attrs, encoding=raw.encoding)
    # Per-frame coordinates are small: hold them in memory (read with zarr, not Dask) so
    # selections like ds.sel(frame=ds.imagetyp == "bias") need no computation.
    coords = {name: ("frame", store.coord(name)) for name in COORDS}
    coords["time"] = ("frame", store.coord("time").astype("datetime64[ns]"))
    ds = ds.assign_coords(coords)
    ds.attrs.update(dict(store.group.attrs))
    if not include_pending:
        ds = ds.isel(frame=np.flatnonzero(coords["ingested"][1]))
    return ds


def describe(path: str | os.PathLike) -> dict:
    """A JSON-ready summary of a store (what ``mstdask info`` prints)."""
    store = RawStore.open(path, mode="r")
    n = len(store)
    done = store.coord("ingested")
    summary: dict = {
        "store": str(Path(path).resolve()),
        "frames": int(done.sum()),
        "pending_slots": int(n - done.sum()),
        "frame_shape": list(store.frame_shape),
        "tile": store.group.attrs.get("tile"),
        "size_on_disk_bytes": store.size_on_disk(),
        "raw_bytes": int(done.sum()) * store.frame_shape[0] * store.frame_shape[1] * 2,
        "site": store.group.attrs.get("site", {}).get("name"),
        "nights": {},
    }
    if n == 0:
        return summary
    cols = {name: store.coord(name)[done] for name in ("night", "telescope", "filter", "imagetyp", "exptime")}
    times = store.coord("time")[done].astype("datetime64[ns]")
    summary["telescopes"] = sorted(set(map(str, cols["telescope"])))
    summary["filters"] = sorted(set(map(str, cols["filter"])))
    summary["imagetyp_counts"] = {t: int((cols["imagetyp"] == t).sum()) for t in ("bias", "dark", "flat", "science")}
    for night in sorted(set(map(str, cols["night"]))):
        sel = cols["night"] == night
        entry: dict = {"frames": int(sel.sum()),
                       "first_utc": str(times[sel].min())[:19], "last_utc": str(times[sel].max())[:19]}
        for t in ("bias", "dark", "flat", "science"):
            entry[t] = int((sel & (cols["imagetyp"] == t)).sum())
        entry["telescopes"] = sorted(set(map(str, cols["telescope"][sel])))
        entry["filters"] = sorted(set(map(str, cols["filter"][sel & (cols["imagetyp"] != "bias")
                                                            & (cols["imagetyp"] != "dark")])))
        summary["nights"][night] = entry
    return summary


def dumps(summary: dict) -> str:
    """Indented JSON (for ``mstdask info --json``)."""
    return json.dumps(summary, indent=2, default=str)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def stack_tiles(n_frames: int, frame_shape: tuple[int, int], base_tile: tuple[int, int], itemsize: int,
                budget_bytes: int) -> tuple[int, int]:
    """Spatial tile for a ``frame=-1`` stack reduction within a memory budget.

    The tile divides the store's on-disk tile where possible (so each task reads whole
    parts of few Zarr chunks) and keeps ``n_frames * ty * tx * itemsize <= budget_bytes``.
    """
    max_px = max(1, budget_bytes // max(1, n_frames * itemsize))
    if base_tile[0] * base_tile[1] <= max_px:
        return base_tile  # a whole stored tile per task: each tile is decoded once
    ty_opts = [d for d in _divisors(base_tile[0])] or [base_tile[0]]
    tx_opts = [d for d in _divisors(base_tile[1])] or [base_tile[1]]
    best = (1, 1)
    for ty in ty_opts:
        for tx in tx_opts:
            # prefer the largest tile under the budget, then the squarest
            if ty * tx <= max_px and (ty * tx, -abs(ty - tx)) > (best[0] * best[1], -abs(best[0] - best[1])):
                best = (ty, tx)
    if best[0] * best[1] < max_px // 4:
        # the on-disk tile has awkward divisors (e.g. 1597 is prime): use a square tile
        edge = int(max_px ** 0.5)
        best = (min(edge, frame_shape[0]), min(max_px // max(1, min(edge, frame_shape[0])), frame_shape[1]))
    return best


def stored_tile(raw: xr.DataArray) -> tuple[int, int]:
    """The spatial tile of ``raw``: its Dask chunks, or for a lazy array not yet in Dask
    (``open_store(..., chunks=None)``) the on-disk tile; the whole frame when neither is known."""
    if raw.chunks is not None:
        return raw.chunks[raw.get_axis_num("y")][0], raw.chunks[raw.get_axis_num("x")][0]
    pref = raw.encoding.get("preferred_chunks") or {}
    return int(pref.get("y", raw.sizes["y"])), int(pref.get("x", raw.sizes["x"]))


def rechunk_for_stack(raw: xr.DataArray, budget_bytes: int, itemsize: int | None = None) -> xr.DataArray:
    """Chunk a ``(frame, y, x)`` array as ``frame=-1`` with spatial tiles (explicitly).

    This is the access pattern of every stack reduction (master bias, PS map, flats):
    each task holds one tile of all frames, so memory is bounded by ``budget_bytes``
    whatever the frame size, and tasks never need each other.

    Two kinds of input, one result:

    * a lazy array not yet in Dask (``open_store(path, chunks=None).raw`` and selections
      of it): each task reads its tile of every frame from the store itself. Nothing
      passes between workers; this is what ``mstdask calibrate`` uses.
    * a Dask array (``open_store(path).raw``: one frame per chunk): a rechunk, which on a
      cluster gathers each tile's frames from the workers that read them.

    Parameters
    ----------
    raw : DataArray (frame, y, x)
    budget_bytes : int
        Most bytes of one task's stack (frames x tile pixels x ``itemsize``).
    itemsize : int, optional
        Bytes per pixel and frame to budget for (default: the array's itemsize); larger
        when the task holds float copies of the stack.
    """
    ny, nx = raw.sizes["y"], raw.sizes["x"]
    # tiles divide the stored tiles, so every stored tile is decoded by one task only
    ty, tx = stack_tiles(raw.sizes["frame"], (ny, nx), stored_tile(raw), itemsize or raw.dtype.itemsize,
                         budget_bytes)
    return raw.chunk({"frame": -1, "y": ty, "x": tx})


# ----------------------------------------------------------------------------- reduced store
REDUCED_KIND = "mstdask.reduced"

#: Per-frame coordinates a reduced store adds to the raw ones (name -> dtype, fill).
REDUCED_COORDS: dict[str, tuple[str, object]] = {
    "raw_index": ("int64", -1),
    "calib_bias": ("str", ""),
    "calib_flat": ("str", ""),
    "calib_ps": ("str", ""),
    "calib_bad": ("str", ""),
    "n_tracks": ("int32", -1),
    "track_pixels": ("int64", -1),
    "cosmic_ray_pixels": ("int64", -1),
    "masked_fraction": ("float64", np.nan),
    "tracks": ("str", ""),
    "reduced": ("bool", False),
}
_REDUCED_COPY = [c for c in COORDS if c != "ingested"]
_REDUCED_SPEC = {**{c: COORDS[c] for c in _REDUCED_COPY}, **REDUCED_COORDS}


class ReducedStore(_FrameStore):
    """Driver-side handle on a reduced store (``mstdask reduce``).

    Layout (Zarr v3, ``xarray.open_zarr``)::

        REDUCED.zarr/
          data   (frame, y, x) float32   (raw - master bias) / master flat
          mask   (frame, y, x) uint8     bits of Table 1 (mstdask.masks.Flag)
          the raw store's per-frame coordinates (time, night, filter, telescope, path, ...),
          raw_index, calib_bias/flat/ps/bad (calibration products used), n_tracks,
          track_pixels, cosmic_ray_pixels, masked_fraction, tracks (JSON list of the
          track centrelines: angle, dist, x0, y0, x1, y1, ...), reduced (bool: frame done)

    One shard per frame and variable, spatial tiles inside, like the raw store: tasks
    write their own frame's files, the driver reserves slots and marks them ``reduced``.
    """

    _pixels = "data"
    _frame_arrays = ("data", "mask")

    @classmethod
    def create(cls, path: str | os.PathLike, shape: tuple[int, int], tile: tuple[int, int],
               layout: StoreLayout, attrs: dict) -> "ReducedStore":
        """Create an empty reduced store for frames of ``shape``, tiled like the raw store."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path}: exists and is not an mstdask reduced store; choose another --out")
        ty, tx = tile
        shard = (1, -(-shape[0] // ty) * ty, -(-shape[1] // tx) * tx)
        try:
            group = zarr.open_group(str(path), mode="w", zarr_format=3)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the store ({exc}); check the folder is writable") from None
        group.attrs.update({"mstdask_store": REDUCED_KIND, "mstdask_store_version": STORE_VERSION,
                            "mstdask_version": __version__,
                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "frame_shape": list(shape), "tile": [ty, tx], **attrs,
                            "description": "Frames reduced by mstdask reduce (STIR); open with xarray.open_zarr "
                                           "or mstdask.open_reduced"})
        names = " ".join(_REDUCED_SPEC)
        comp = None if layout.compressor == "none" else BloscCodec(
            cname=layout.compressor, clevel=layout.clevel, shuffle=BloscShuffle.shuffle, typesize=4)
        group.create_array("data", shape=(0, *shape), dtype="float32", chunks=(1, ty, tx), shards=shard,
                           compressors=comp, fill_value=np.nan, dimension_names=("frame", "y", "x"),
                           attributes={"units": "adu", "coordinates": names,
                                       "long_name": "bias-subtracted, flat-fielded counts"})
        mcomp = None if layout.compressor == "none" else BloscCodec(
            cname=layout.compressor, clevel=layout.clevel, shuffle=BloscShuffle.noshuffle, typesize=1)
        group.create_array("mask", shape=(0, *shape), dtype="uint8", chunks=(1, ty, tx), shards=shard,
                           compressors=mcomp, fill_value=0, dimension_names=("frame", "y", "x"),
                           attributes={"coordinates": names, "flag_masks": [1, 2, 4, 8, 16],
                                       "flag_meanings": "bad_pixel saturated pepper_and_salt "
                                                        "satellite_track cosmic_ray"})
        _create_coords(group, _REDUCED_SPEC)
        store = cls(path, group)
        store.consolidate()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+") -> "ReducedStore":
        """Open an existing reduced store."""
        return cls(path, _open_group(path, mode, REDUCED_KIND, "reduced",
                                     f"make one with `mstdask reduce STORE --calib CALDIR --out {path}`"))

    def reserve(self, coords: dict[str, np.ndarray]) -> list[int]:
        """Append slots with the given per-frame coordinates (the raw ones plus ``raw_index``
        and ``calib_*``); the rest start at their fill values. Returns the new indices."""
        n_new = len(coords["raw_index"])
        if n_new == 0:
            return []
        n0 = len(self)
        n1 = n0 + n_new
        for name in ("data", "mask"):
            self.group[name].resize((n1, *self.frame_shape))
        for name, (dtype, fill) in _REDUCED_SPEC.items():
            arr = self.group[name]
            arr.resize((n1,))
            values = coords.get(name)
            if values is None:
                values = np.full(n_new, fill, dtype=object if dtype == "str" else dtype)
            arr[n0:n1] = np.asarray(values, dtype=object if dtype == "str" else dtype)
        self.consolidate()
        return list(range(n0, n1))

    def set_coords(self, index: int | Sequence[int], **values) -> None:
        """Update per-frame coordinates of existing slots (driver side)."""
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if idx.size == 0:
            return
        for name, vals in values.items():
            arr = self.group[name]
            cur = np.asarray(arr[...], dtype=object if arr.dtype.kind in "OUT" else arr.dtype)
            cur[idx] = vals
            arr[...] = cur



def open_reduced(path: str | os.PathLike, *, include_pending: bool = False,
                 chunks: dict | str | None = "auto") -> xr.Dataset:
    """Open a reduced store lazily: ``data``, ``mask`` (frame, y, x) and per-frame coordinates.

    Frames not (yet) reduced are hidden unless ``include_pending``.
    """
    store = ReducedStore.open(path, mode="r")
    ds = _quiet(xr.open_zarr, str(path), chunks={} if chunks == "auto" else chunks, zarr_format=3)
    coords = {name: ("frame", store.coord(name)) for name in _REDUCED_SPEC}
    coords["time"] = ("frame", store.coord("time").astype("datetime64[ns]"))
    ds = ds.assign_coords(coords)
    ds.attrs.update(dict(store.group.attrs))
    if not include_pending:
        ds = ds.isel(frame=np.flatnonzero(coords["reduced"][1]))
    return ds
