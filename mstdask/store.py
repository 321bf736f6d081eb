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
      rejected   (frame,) str           why the pixels could not be read ("" when they could)

The driver (one process) owns every write except the pixels: it reserves frame slots and
their coordinates, then tasks write each frame's shard independently, and the driver marks
them ``ingested``. A slot whose pixels never arrived (killed run) stays ``ingested=False``
and is finished by the next ingest of the same file; a slot whose file turned out unreadable
(negative pixels, truncated) is marked ``rejected`` with the reason, and tried again only
when that file is given again. :func:`open_store` hides both.

Crash safety (a kill at any instant leaves a store the next run finishes): a store is built
under a temporary name and renamed into place when complete; a reservation writes
``frame_key`` last, slots without it do not count and the next reservation writes over them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

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
    "rejected": ("str", ""),
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
    if _half_made(path):
        raise StoreError(f"{path}: the creation of this {what} store was interrupted (it holds no frames); {how} "
                         "(that makes it anew)")
    group = _quiet(zarr.open_group, str(path), mode=mode, zarr_format=3, use_consolidated=False)
    if group.attrs.get("mstdask_store") != kind:
        raise StoreError(f"{path}: a Zarr store, but not an mstdask {what} store (no 'mstdask_store' "
                         f"attribute '{kind}')")
    return group


#: Arrays every store of a kind has (``rejected`` is absent from raw stores made before it).
_REQUIRED: dict[str, tuple[str, ...]] = {}


def _half_made(path: Path) -> bool:
    """Whether ``path`` holds the skeleton of a store whose creation was killed (by versions
    that built it in place): a bare root group, or an mstdask store missing arrays. It holds
    no frames, so it is made anew."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError):
        return False
    kind = attrs.get("mstdask_store")
    if kind is None:
        return not attrs and {p.name for p in path.iterdir()} <= {"zarr.json", ".mstdask-ingest.lock"}
    return kind in _REQUIRED and not all((path / name / "zarr.json").exists() for name in _REQUIRED[kind])


def _alive(host: str, pid: int) -> bool:
    """Whether process ``pid`` of ``host`` may still run (one of another host is assumed to)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build(path: Path, refusal: str, fill: Callable[[zarr.Group], None]) -> None:
    """Create a store at ``path`` atomically: ``fill(group)`` builds its skeleton under a
    temporary name beside it, then renamed into place. A kill at any instant leaves no store
    or a complete one (and a temporary folder the next creation removes). Raises
    :class:`StoreError` (``refusal``) when ``path`` holds something else."""
    if path.exists() and any(path.iterdir()) and not ((path / "zarr.json").exists() and _half_made(path)):
        raise StoreError(refusal)
    prefix = f".{path.name}.creating-"
    for old in path.parent.glob(prefix + "*"):  # left by killed creations
        host, _, pid = old.name[len(prefix):].rpartition("-")
        if not (pid.isdigit() and _alive(host, int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    tmp = path.with_name(f"{prefix}{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the store ({exc}); check the folder is writable") from None
        fill(group)
        _quiet(zarr.consolidate_metadata, str(tmp), zarr_format=3)
        if path.exists() and any(path.iterdir()):
            shutil.rmtree(path)  # a half-made skeleton (checked above)
        os.rename(tmp, path)  # replaces an empty folder too
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (path / "zarr.json").exists():
            raise
        # another process made the store meanwhile: use that one


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
    _spec: dict[str, tuple[str, object]] = COORDS  # per-frame coordinates

    def __init__(self, path: str | os.PathLike, group: zarr.Group) -> None:
        self.path = str(path)
        self.group = group
        self._n: int | None = None  # complete slots, read once (a reservation resets it)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of every frame in the store."""
        return tuple(self.group.attrs["frame_shape"])  # type: ignore[return-value]

    @classmethod
    def half_made(cls, path: str | os.PathLike) -> bool:
        """Whether ``path`` holds a store whose creation was killed (``create`` makes it anew)."""
        return Path(path, "zarr.json").exists() and _half_made(Path(path))

    def __len__(self) -> int:
        """The number of complete slots. A reservation writes ``frame_key`` last: slots of a
        reservation cut short (a killed run) have no key, are not counted, and are written
        over by the next reservation."""
        if self._n is not None:
            return self._n
        n = min(int(self.group["frame_key"].shape[0]), int(self.group[self._pixels].shape[0]))
        keyed = np.flatnonzero(np.asarray(self.group["frame_key"][:n]) != "") if n else []
        self._n = int(keyed[-1]) + 1 if len(keyed) else 0
        return self._n

    def coord(self, name: str) -> np.ndarray:
        """One per-frame coordinate of the complete slots as a NumPy array (no Dask)."""
        n = len(self)
        if name not in self.group:  # ``rejected`` in a store made before it existed
            dtype, fill = self._spec[name]
            return np.full(n, fill, dtype=object if dtype == "str" else dtype)
        return np.asarray(self.group[name][:n])

    def _resize_all(self, n: int) -> None:
        """Give every per-frame array ``n`` slots (creating coordinates a store made by an
        older version lacks)."""
        self._n = None
        for name, (dtype, fill) in self._spec.items():
            if name not in self.group:
                _create_coords(self.group, {name: (dtype, fill)})
        for name in (*self._frame_arrays, *(["header"] if "header" in self.group else []), *self._spec):
            arr = self.group[name]
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))

    def _write_slots(self, n0: int, values: dict[str, object]) -> None:
        """Write the coordinates of new slots from ``n0``, ``frame_key`` last (that completes them)."""
        self._n = None
        for name in [*(k for k in values if k != "frame_key"), "frame_key"]:
            dtype = self._spec[name][0] if name in self._spec else "str"
            vals = np.asarray(values[name], dtype=object if dtype == "str" else dtype)
            self.group[name][n0:n0 + len(vals)] = vals

    def set_coords(self, index: int | Sequence[int], **values) -> None:
        """Update per-frame coordinates of existing slots (driver side)."""
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if idx.size == 0:
            return
        n = len(self)
        for name, vals in values.items():
            if name not in self.group:
                self._resize_all(n)
            arr = self.group[name]
            cur = np.asarray(arr[:n], dtype=object if arr.dtype.kind in "OUT" else arr.dtype)
            cur[idx] = vals
            arr[:n] = cur

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
        ty, tx = tile_edge(shape[0], layout.tile), tile_edge(shape[1], layout.tile)
        _build(path, f"{path}: exists and is not an mstdask store; choose a new --store path",
               lambda group: cls._skeleton(group, shape, (ty, tx), layout, site))
        return cls.open(path, mode="r+")

    @staticmethod
    def _skeleton(group: zarr.Group, shape: tuple[int, int], tile: tuple[int, int], layout: StoreLayout,
                  site: SiteConfig) -> None:
        """The attributes and empty arrays of a new raw store."""
        ty, tx = tile
        shard = (1, -(-shape[0] // ty) * ty, -(-shape[1] // tx) * tx)
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

        Idempotent by frame key: a frame that has a slot already (reserved by a killed run,
        say) keeps it. Slots of a reservation cut short are written over; called with no
        frames, it only removes them.

        Returns the frame index given to each info, in the order given.
        """
        for info in infos:
            if info.shape != self.frame_shape:
                raise BadInputError(info.path, f"frame is {info.shape[1]}x{info.shape[0]} pixels but the store "
                                                f"holds {self.frame_shape[1]}x{self.frame_shape[0]} frames; "
                                                "ingest it into a store of its own")
        n0 = len(self)
        slot = {str(k): i for i, k in enumerate(self.coord("frame_key"))}
        given, infos = infos, list({i.key: i for i in infos if i.key not in slot}.values())
        slot.update({info.key: n0 + k for k, info in enumerate(infos)})
        self._resize_all(n0 + len(infos))
        if not infos:
            self.consolidate()  # also when a killed run did not: tasks may open the store consolidated
            return [slot[i.key] for i in given]
        values = {
            "header": [i.header for i in infos],
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
            "rejected": [""] * len(infos),
        }
        self._write_slots(n0, values)
        self.consolidate()
        return [slot[i.key] for i in given]

    def mark_ingested(self, indices: Iterable[int]) -> None:
        """Record that these frames' pixels are written (and so no longer rejected)."""
        idx = np.fromiter(indices, dtype=np.int64)
        if idx.size == 0:
            return
        self.set_coords(idx, ingested=True)
        if "rejected" in self.group and (self.coord("rejected")[idx] != "").any():
            self.set_coords(idx, rejected="")

    def mark_rejected(self, reasons: dict[int, str]) -> None:
        """Record why these slots' pixels could not be read: they are not work left for a
        rerun (only an ingest given the same exposure again tries it again)."""
        if reasons:
            self.set_coords(list(reasons), rejected=list(reasons.values()))

    def update_paths(self, updates: dict[int, str]) -> None:
        """Point existing slots at the file they are (re)ingested from."""
        if updates:
            self.set_coords(list(updates), path=list(updates.values()))

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
            return _alive(host, int(pid))
        except (OSError, ValueError):
            return False

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
    # slots whose file was unreadable are no work left: a rerun cannot finish them
    why, paths = store.coord("rejected"), store.coord("path")
    rejected = np.flatnonzero(~done & (why != ""))
    summary: dict = {
        "store": str(Path(path).resolve()),
        "frames": int(done.sum()),
        "pending_slots": int(n - done.sum()) - len(rejected),
        "rejected_slots": len(rejected),
        "rejected": [{"path": str(paths[i]), "reason": str(why[i])} for i in rejected],
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
_REDUCED_COPY = [c for c in COORDS if c not in ("ingested", "rejected")]
_REDUCED_SPEC = {**{c: COORDS[c] for c in _REDUCED_COPY}, **REDUCED_COORDS}
_REQUIRED[STORE_KIND] = ("raw", "header", *(c for c in COORDS if c != "rejected"))
_REQUIRED[REDUCED_KIND] = ("data", "mask", *_REDUCED_SPEC)


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
    _spec = _REDUCED_SPEC

    @classmethod
    def create(cls, path: str | os.PathLike, shape: tuple[int, int], tile: tuple[int, int],
               layout: StoreLayout, attrs: dict) -> "ReducedStore":
        """Create an empty reduced store for frames of ``shape``, tiled like the raw store."""
        path = Path(path)
        _build(path, f"{path}: exists and is not an mstdask reduced store; choose another --out",
               lambda group: cls._skeleton(group, shape, tile, layout, attrs))
        return cls.open(path, mode="r+")

    @staticmethod
    def _skeleton(group: zarr.Group, shape: tuple[int, int], tile: tuple[int, int], layout: StoreLayout,
                  attrs: dict) -> None:
        """The attributes and empty arrays of a new reduced store."""
        ty, tx = tile
        shard = (1, -(-shape[0] // ty) * ty, -(-shape[1] // tx) * tx)
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

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+") -> "ReducedStore":
        """Open an existing reduced store."""
        return cls(path, _open_group(path, mode, REDUCED_KIND, "reduced",
                                     f"make one with `mstdask reduce STORE --calib CALDIR --out {path}`"))

    def reserve(self, coords: dict[str, np.ndarray]) -> list[int]:
        """Append slots with the given per-frame coordinates (the raw ones plus ``raw_index``
        and ``calib_*``); the rest start at their fill values.

        Idempotent by ``frame_key``: a frame that has a slot already (reserved by a killed
        run) keeps it, unchanged. Slots of a reservation cut short are written over; called
        with no frames (``{}``), it only removes them. Returns the slot of each frame given."""
        keys = [str(k) for k in coords.get("frame_key", ())]
        n0 = len(self)
        slot = {str(k): i for i, k in enumerate(self.coord("frame_key"))}
        fresh = [j for j, k in enumerate(keys) if k not in slot and k not in keys[:j]]
        slot.update({keys[j]: n0 + k for k, j in enumerate(fresh)})
        self._resize_all(n0 + len(fresh))
        if fresh:
            values = {}
            for name, (dtype, fill) in _REDUCED_SPEC.items():
                given = coords.get(name)
                values[name] = [fill] * len(fresh) if given is None else np.asarray(given, dtype=object)[fresh]
            self._write_slots(n0, values)
        self.consolidate()  # always: a killed run may have left it stale, and tasks open the store consolidated
        return [slot[k] for k in keys]


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
