"""``mstdask ingest``: FITS files into a raw Zarr store (idempotent, resumable, tolerant)."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..config import IngestConfig, SiteConfig
from ..errors import BadInputError, MstdaskError
from ..io import FrameInfo, discover, scan_frame
from ..store import IngestLock, RawStore, write_frame
from ._job import TASK_RETRIES, check_writable, progress_bar, stops_the_run, writing
from ._plan import Plan, _infos_table, _store_table


@dataclass
class IngestReport:
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
    seconds: float = 0.0
    bytes_written: int = 0
    #: Reports of the steps ``run_pipeline`` ran after the ingest (calibrate, reduce, ...).
    steps: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was rejected (and no later step of the run failed)."""
        return not self.rejected and all(step.ok for step in self.steps)

    def summary(self) -> str:
        """Human-readable summary, one line per rejected file."""
        mb = self.bytes_written / 1e6
        rate = f", {mb / self.seconds:.0f} MB/s" if self.seconds > 0 and mb > 0 else ""
        lines = [f"ingest {self.store}: {len(self.written)} frames written "
                 f"({len(self.resumed)} resumed), {len(self.already)} already present, "
                 f"{len(self.rejected)} rejected; {mb:.0f} MB in {self.seconds:.1f} s{rate}"]
        for path, reason in self.rejected:
            lines.append(f"  REJECTED {path}: {reason}" if not reason.startswith(path) else f"  REJECTED {reason}")
        return "\n".join(lines)


# Task wrappers: the runner converts our own errors into results so that one bad file is
# a line in the summary, not a failed computation (and not a traceback in the worker log).
def _scan_task(path: str, site: SiteConfig, force: str | None):
    try:
        return scan_frame(path, site, force)
    except MstdaskError as exc:
        return exc


def _write_task(store_path: str, index: int, info: FrameInfo):
    try:
        return write_frame(store_path, index, info)
    except MstdaskError as exc:
        return exc

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
    from distributed import as_completed

    config = config or IngestConfig()
    t0 = time.perf_counter()
    store_path = str(Path(store_path).resolve())
    report = IngestReport(store=store_path)
    files, missing = discover(inputs)
    report.rejected.extend(missing)

    # 1. Headers, in parallel: cheap, and every header problem is known before any write.
    infos: list[FrameInfo] = []
    if files:
        futures = client.map(_scan_task, files, site=config.site, force=config.force_imagetyp, pure=False,
                             retries=TASK_RETRIES)
        with progress_bar(len(files), "scan headers", progress) as bar:
            for fut in as_completed(futures):
                res = fut.result()
                if isinstance(res, BadInputError):
                    report.rejected.append((res.path or "?", res.problem))
                elif isinstance(res, MstdaskError):
                    report.rejected.append(("?", str(res)))
                else:
                    infos.append(res)
                bar.update()
    infos.sort(key=lambda i: (i.time, i.path))

    # The same exposure twice in one call (copies under two paths): keep the first.
    seen: dict[str, str] = {}
    unique: list[FrameInfo] = []
    for info in infos:
        if info.key in seen:
            report.already.append(info.path)
        else:
            seen[info.key] = info.path
            unique.append(info)

    if not unique:
        report.seconds = time.perf_counter() - t0
        return report

    # 2. Open or create the store; the frame shape comes from the store, or from the
    # most common shape of a first ingest. One ingest at a time writes a store.
    exists = Path(store_path, "zarr.json").exists()
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
    report.seconds = time.perf_counter() - t0
    return report


def _write_frames(store: RawStore, unique: list[FrameInfo], client, config: IngestConfig, progress: bool,
                  report: IngestReport) -> None:
    from distributed import as_completed

    store_path = store.path
    shape = store.frame_shape
    good = []
    for info in unique:
        if info.shape != shape:
            report.rejected.append((info.path, f"frame is {info.shape[1]}x{info.shape[0]} pixels, the store holds "
                                               f"{shape[1]}x{shape[0]} frames; ingest it into a store of its own"))
        else:
            good.append(info)

    # 3. What is new, what was interrupted, what is there already.
    known = store.known_keys()
    new = [i for i in good if i.key not in known]
    pending = [i for i in good if i.key in known and not known[i.key][1]]
    report.already.extend(i.path for i in good if i.key in known and known[i.key][1])
    jobs: list[tuple[int, FrameInfo, bool]] = [(known[i.key][0], i, True) for i in pending]
    store.update_paths({idx: info.path for idx, info, _ in jobs})
    jobs += [(idx, info, False) for idx, info in zip(store.reserve(new), new)]
    if not jobs:
        return
    store.clear_partial([idx for idx, _, _ in jobs])  # left by workers killed while writing

    # 4. Pixels, one frame per task; the driver records finished frames every few seconds.
    # A task is idempotent (it writes its own frame's shard, the same bytes every time), so
    # Dask may run it again when a worker dies, and a killed ingest is finished by the next.
    futures = [client.submit(_write_task, store_path, idx, info, pure=False, retries=TASK_RETRIES)
               for idx, info, _ in jobs]
    resumed_by_index = {idx: was_pending for idx, _, was_pending in jobs}
    path_of = {fut.key: info.path for fut, (_, info, _) in zip(futures, jobs)}
    done: list[int] = []
    last_mark = time.monotonic()
    completed = False
    try:
        with progress_bar(len(futures), "ingest frames", progress) as bar:
            for fut in as_completed(futures):
                try:
                    res = fut.result()
                except Exception as exc:  # one file that cannot be written never ends the run ...
                    if stops_the_run(exc, [store_path]):
                        raise  # ... but a full disk or a read-only store does: every frame would fail
                    res = BadInputError(path_of[fut.key], f"cannot be ingested ({type(exc).__name__}: {exc})")
                if isinstance(res, BadInputError):
                    report.rejected.append((res.path or "?", res.problem))
                elif isinstance(res, MstdaskError):
                    report.rejected.append(("?", str(res)))
                else:
                    done.append(res["index"])
                    report.written.append(res["path"])
                    if resumed_by_index[res["index"]]:
                        report.resumed.append(res["path"])
                    report.bytes_written += res["bytes"]
                bar.update()
                if time.monotonic() - last_mark > config.mark_every_s:
                    store.mark_ingested(done)
                    done.clear()
                    last_mark = time.monotonic()
        completed = True
    finally:
        # Also on Ctrl-C or a full disk: what is written is recorded, the rest is finished
        # next time (when recording fails too, those frames are simply written again).
        client.cancel(futures)
        try:
            store.mark_ingested(done)
            store.consolidate()
        except OSError:
            if completed:
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
            if isinstance(res, BadInputError):
                rejected.append((res.path or "?", res.problem))
            elif isinstance(res, MstdaskError):
                rejected.append(("?", str(res)))
            else:
                infos.append(res)
    infos.sort(key=lambda i: (i.time, i.path))
    seen: set[str] = set()
    unique, dups = [], 0
    for info in infos:
        if info.key in seen:
            dups += 1
        else:
            seen.add(info.key)
            unique.append(info)
    store_path = Path(store_path)
    if Path(store_path, "zarr.json").exists():
        store = RawStore.open(store_path, mode="r")
        shape, tile, known, table = store.frame_shape, tuple(store.group.attrs["tile"]), store.known_keys(), \
            _store_table(store)
    else:
        shape = Counter(i.shape for i in unique).most_common(1)[0][0] if unique else (0, 0)
        tile = (tile_edge(shape[0], config.layout.tile), tile_edge(shape[1], config.layout.tile))
        known, table = {}, _infos_table([])
    good = []
    for info in unique:
        if info.shape != shape:
            rejected.append((info.path, f"frame is {info.shape[1]}x{info.shape[0]} pixels, the store holds "
                                        f"{shape[1]}x{shape[0]} frames; ingest it into a store of its own"))
        else:
            good.append(info)
    jobs = [i for i in good if i.key not in known or not known[i.key][1]]
    resumed = sum(1 for i in jobs if i.key in known)
    already = len(good) - len(jobs) + dups
    npix = int(np.prod(shape))
    plan = Plan("ingest", str(store_path), frames=Counter((i.night, i.telescope, i.imagetyp) for i in jobs),
                tasks=len(files) + len(jobs), bytes_read=sum(os.path.getsize(i.path) for i in jobs),
                bytes_written=len(jobs) * npix * 2)
    plan.steps.append(f"{len(jobs)} frames to write ({resumed} resumed), {already} already in the store, "
                      f"{len(rejected)} rejected; {len(files)} header scans + {len(jobs)} frame writes")
    if not Path(store_path, "zarr.json").exists() and jobs:
        plan.steps.append(f"new store of {shape[1]}x{shape[0]} frames, tiles {tile[1]}x{tile[0]}")
    plan.notes += [f"REJECTED {p}: {r}" for p, r in rejected]
    return plan, jobs, table, tuple(shape), tuple(tile)


def plan_ingest(inputs: Iterable[str | os.PathLike], store_path: str | os.PathLike,
                config: IngestConfig | None = None) -> Plan:
    """What ``ingest`` would do: the headers are read (in threads, no cluster), nothing is written."""
    return _ingest_plan(inputs, store_path, config or IngestConfig())[0]

