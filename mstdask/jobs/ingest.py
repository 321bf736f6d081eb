"""``mstdask ingest``: FITS files into a raw Zarr store (idempotent, resumable, tolerant)."""

from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..config import IngestConfig, SiteConfig
from ..errors import BadInputError, MstdaskError
from ..io import FrameInfo, discover, scan_frame
from ..store import IngestLock, RawStore, write_frame
from ._job import TASK_RETRIES, JobReport, check_writable, completed, error_text, writing
from ._plan import Plan, _infos_table, _store_table


@dataclass
class IngestReport(JobReport):
    """What an ingest did.

    Attributes
    ----------
    store : str
        The store path.
    written : list of str
        Files whose pixels were written by this ingest (new frames and resumed ones).
    resumed : list of str
        Of ``written``, the files that finished slots left by an interrupted ingest.
    already : list of str
        Files whose exposure was already in the store (nothing done).
    rejected : list of (str, str)
        Files that could not be ingested, with the reason.
    """

    store: str
    written: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    bytes_written: int = 0
    #: Reports of the steps ``run_pipeline`` ran after the ingest (calibrate, reduce, ...).
    steps: list = field(default_factory=list)

    _FAILS = ("rejected",)

    @property
    def ok(self) -> bool:
        """True when nothing was rejected (and no later step of the run failed)."""
        return super().ok and all(step.ok for step in self.steps)

    def headline(self) -> str:
        """Frames written, resumed, already present and rejected; megabytes and rate."""
        mb = self.bytes_written / 1e6
        rate = f", {mb / self.seconds:.0f} MB/s" if self.seconds > 0 and mb > 0 else ""
        return (f"ingest {self.store}: {len(self.written)} frames written "
                f"({len(self.resumed)} resumed), {len(self.already)} already present, "
                f"{len(self.rejected)} rejected; {mb:.0f} MB in {self.seconds:.1f} s{rate}")

    def summary(self) -> str:
        """Human-readable summary, one line per rejected file (its reason alone when the
        reason already starts with the path)."""
        lines = [super().summary()]
        lines += [f"  REJECTED {reason}" if reason.startswith(path) else f"  REJECTED {path}: {reason}"
                  for path, reason in self.rejected]
        return "\n".join(lines)


# Task wrappers: the job converts our own errors into results so that one bad file is
# a line in the summary, not a failed computation (and not a traceback in the worker log).
def _scan_task(path: str, site: SiteConfig, force: str | None):
    try:
        return scan_frame(path, site, force)
    except MstdaskError as exc:
        return exc


def _write_task(store_path: str, index: int, info: FrameInfo):
    try:
        return write_frame(store_path, index, info)  # looked up now: tests replace it
    except MstdaskError as exc:
        return exc


def _rejection(res) -> tuple[str, str] | None:
    """``(path, reason)`` when a task returned one of our errors, else None."""
    if isinstance(res, BadInputError):
        return (res.path or "?", res.problem)
    if isinstance(res, MstdaskError):
        return ("?", str(res))
    return None


def _first_of_each(infos: list[FrameInfo]) -> tuple[list[FrameInfo], list[FrameInfo]]:
    """The headers in time order, the first of each exposure, and the later copies (the
    same exposure twice in one call, under two paths)."""
    seen: set[str] = set()
    unique, copies = [], []
    for info in sorted(infos, key=lambda i: (i.time, i.path)):
        (copies if info.key in seen else unique).append(info)
        seen.add(info.key)
    return unique, copies


def _of_shape(unique: list[FrameInfo], shape: tuple, rejected: list[tuple[str, str]]) -> list[FrameInfo]:
    """The frames of the store's ``shape``; the others are added to ``rejected``."""
    good = []
    for info in unique:
        if info.shape != shape:
            rejected.append((info.path, f"frame is {info.shape[1]}x{info.shape[0]} pixels, the store holds "
                                        f"{shape[1]}x{shape[0]} frames; ingest it into a store of its own"))
        else:
            good.append(info)
    return good


def ingest(inputs: Iterable[str | os.PathLike], store_path: str | os.PathLike, client,
           config: IngestConfig | None = None, progress: bool = True) -> IngestReport:
    """Ingest FITS files, folders or globs into a raw Zarr store, in parallel on ``client``.

    Idempotent (an exposure already in the store is skipped, whatever its path), resumable
    (slots left by an interrupted ingest are finished), and tolerant (bad files are reported
    in the returned summary, every good file is still ingested).

    Parameters
    ----------
    inputs : iterable of path-like
        Files, folders (searched recursively) or glob patterns.
    store_path : path-like
        The store; created when it does not exist.
    client : distributed.Client
        Where the work runs.
    config : IngestConfig, optional
        Site, layout and options.
    progress : bool
        Show progress bars (on a terminal).

    Returns
    -------
    IngestReport
    """
    config = config or IngestConfig()
    t0 = time.perf_counter()
    store_path = str(Path(store_path).resolve())
    report = IngestReport(store=store_path)
    files, missing = discover(inputs)
    report.rejected.extend(missing)
    unique, copies = _first_of_each(_scan_headers(files, client, config, progress, report))
    report.already.extend(i.path for i in copies)
    if unique:
        _into_store(store_path, unique, client, config, progress, report)
    report.seconds = time.perf_counter() - t0
    return report


def _scan_headers(files: list[str], client, config: IngestConfig, progress: bool,
                  report: IngestReport) -> list[FrameInfo]:
    """Every file's header, in parallel: cheap, and every header problem is known before any
    write. Files that cannot be read are added to ``report.rejected``."""
    if not files:
        return []
    futures = client.map(_scan_task, files, site=config.site, force=config.force_imagetyp, pure=False,
                         retries=TASK_RETRIES)
    infos: list[FrameInfo] = []
    for _, res, err in completed(client, futures, "scan headers", progress):
        if err is not None:  # not one of our errors: a bug, not a bad file
            raise err
        bad = _rejection(res)
        if bad:
            report.rejected.append(bad)
        else:
            infos.append(res)
    return infos


def _into_store(store_path: str, unique: list[FrameInfo], client, config: IngestConfig, progress: bool,
                report: IngestReport) -> None:
    """Open or create the store and write the frames into it.

    The frame shape comes from the store, or from the most common shape of a first ingest.
    One ingest at a time writes a store. A store whose creation was killed (by an older
    version: stores are now made under a temporary name) is made anew."""
    exists = _store_exists(store_path)
    if exists:
        RawStore.open(store_path, mode="r")  # not an mstdask store: that error first
    check_writable(store_path if exists else Path(store_path).parent, "the store")
    with writing(store_path, "the store", "; frames already written are kept: run the same command again "
                                           "to finish"):
        if not exists:
            shape = Counter(i.shape for i in unique).most_common(1)[0][0]
            RawStore.create(store_path, shape, config.layout, config.site)
        with IngestLock(store_path):
            _write_frames(RawStore.open(store_path, mode="r+"), unique, client, config, progress, report)


def _store_exists(store_path: str | os.PathLike) -> bool:
    """Whether there is a store (maybe not an mstdask one) at ``store_path``, not counting the
    skeleton a killed creation left."""
    return Path(store_path, "zarr.json").exists() and not RawStore.half_made(store_path)


def _write_frames(store: RawStore, unique: list[FrameInfo], client, config: IngestConfig, progress: bool,
                  report: IngestReport) -> None:
    """Write the pixels of the frames not yet in ``store`` (and finish interrupted ones)."""
    jobs = _frame_jobs(store, unique, report)
    if jobs:
        store.clear_partial([idx for idx, _, _ in jobs])  # left by workers killed while writing
        _write_pixels(store, jobs, client, config, progress, report)


def _frame_jobs(store: RawStore, unique: list[FrameInfo], report: IngestReport) -> list[tuple[int, FrameInfo, bool]]:
    """What is new, what was interrupted, what is there already.

    Returns ``(frame index, info, resumed)`` for each frame to write: the slots an interrupted
    ingest left first (pointed at their new path), then new slots reserved for new frames.
    Frames already written are added to ``report.already``, those of another shape to
    ``report.rejected``."""
    good = _of_shape(unique, store.frame_shape, report.rejected)
    known = store.known_keys()
    new = [i for i in good if i.key not in known]
    pending = [i for i in good if i.key in known and not known[i.key][1]]
    report.already.extend(i.path for i in good if i.key in known and known[i.key][1])
    jobs: list[tuple[int, FrameInfo, bool]] = [(known[i.key][0], i, True) for i in pending]
    store.update_paths({idx: info.path for idx, info, _ in jobs})
    jobs += [(idx, info, False) for idx, info in zip(store.reserve(new), new)]
    return jobs


def _write_pixels(store: RawStore, jobs: list[tuple[int, FrameInfo, bool]], client, config: IngestConfig,
                  progress: bool, report: IngestReport) -> None:
    """Pixels, one frame per task; the driver records finished frames every few seconds.

    A task is idempotent (it writes its own frame's shard, the same bytes every time), so
    Dask may run it again when a worker dies, and a killed ingest is finished by the next."""
    futures = [client.submit(_write_task, store.path, idx, info, pure=False, retries=TASK_RETRIES)
               for idx, info, _ in jobs]
    resumed_by_index = {idx: was_pending for idx, _, was_pending in jobs}
    path_of = {fut.key: info.path for fut, (_, info, _) in zip(futures, jobs)}
    slot_of = {fut.key: idx for fut, (idx, _, _) in zip(futures, jobs)}
    done: list[int] = []
    unreadable: dict[int, str] = {}  # slot -> why its file was rejected: no work left for a rerun
    last_mark = time.monotonic()
    all_done = False
    try:
        # a full disk or a read-only store ends the run (every frame would fail): completed raises
        with closing(completed(client, futures, "ingest frames", progress, outputs=[store.path])) as results:
            for fut, res, err in results:
                if err is not None:  # one file that cannot be written never ends the run
                    res = BadInputError(path_of[fut.key], f"cannot be ingested ({error_text(err)})")
                bad = _rejection(res)
                if bad:
                    report.rejected.append(bad)
                    unreadable[slot_of[fut.key]] = bad[1]
                else:
                    done.append(res["index"])
                    report.written.append(res["path"])
                    if resumed_by_index[res["index"]]:
                        report.resumed.append(res["path"])
                    report.bytes_written += res["bytes"]
                if time.monotonic() - last_mark > config.mark_every_s:
                    store.mark_ingested(done)
                    done.clear()
                    last_mark = time.monotonic()
        all_done = True
    finally:
        # Also on Ctrl-C or a full disk (the frames still running are cancelled first): what
        # is written is recorded, the rest is finished next time (when recording fails too,
        # those frames are simply written again).
        try:
            store.mark_ingested(done)
            store.mark_rejected(unreadable)
            store.consolidate()
        except OSError:
            if all_done:
                raise
        store.clear_partial([idx for idx, _, _ in jobs])


def _ingest_plan(inputs, store_path, config: IngestConfig):
    """The ingest plan, the frames it would write, the table of the store and its layout."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from ..store import tile_edge

    files, missing = discover(inputs)
    rejected = list(missing)
    infos: list[FrameInfo] = []
    with ThreadPoolExecutor(max_workers=8) as pool:  # headers only: I/O bound
        for res in pool.map(lambda f: _scan_task(f, config.site, config.force_imagetyp), files):
            bad = _rejection(res)
            if bad:
                rejected.append(bad)
            else:
                infos.append(res)
    unique, copies = _first_of_each(infos)
    store_path = Path(store_path)
    exists = _store_exists(store_path)
    if exists:
        store = RawStore.open(store_path, mode="r")
        shape, tile, known, table = store.frame_shape, tuple(store.group.attrs["tile"]), store.known_keys(), \
            _store_table(store)
    else:
        shape = Counter(i.shape for i in unique).most_common(1)[0][0] if unique else (0, 0)
        tile = (tile_edge(shape[0], config.layout.tile), tile_edge(shape[1], config.layout.tile))
        known, table = {}, _infos_table([])
    good = _of_shape(unique, shape, rejected)
    jobs = [i for i in good if i.key not in known or not known[i.key][1]]
    resumed = sum(1 for i in jobs if i.key in known)
    already = len(good) - len(jobs) + len(copies)
    npix = int(np.prod(shape))
    plan = Plan("ingest", str(store_path), frames=Counter((i.night, i.telescope, i.imagetyp) for i in jobs),
                tasks=len(files) + len(jobs), bytes_read=sum(os.path.getsize(i.path) for i in jobs),
                bytes_written=len(jobs) * npix * 2)
    plan.steps.append(f"{len(jobs)} frames to write ({resumed} resumed), {already} already in the store, "
                      f"{len(rejected)} rejected; {len(files)} header scans + {len(jobs)} frame writes")
    if not exists and jobs:
        plan.steps.append(f"new store of {shape[1]}x{shape[0]} frames, tiles {tile[1]}x{tile[0]}")
    plan.notes += [f"REJECTED {p}: {r}" for p, r in rejected]
    return plan, jobs, table, tuple(shape), tuple(tile)


def plan_ingest(inputs: Iterable[str | os.PathLike], store_path: str | os.PathLike,
                config: IngestConfig | None = None) -> Plan:
    """What ``ingest`` would do: the headers are read (in threads, no cluster), nothing is written."""
    return _ingest_plan(inputs, store_path, config or IngestConfig())[0]
