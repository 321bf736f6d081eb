"""The skeleton every job shares: what each command did by hand before.

A job (one module of :mod:`mstdask.jobs` per command) is a short sequence of steps on a
Dask client. What they all need is here, once:

* output folders: :func:`check_writable` before any computation, file-system errors turned
  into one clear :class:`~mstdask.errors.StoreError` (:func:`writing`, :func:`write_error`),
  and the rule that a full disk or a read-only output stops the run (:func:`stops_the_run`)
  while any other failing task is one line of the summary;
* atomic writes: Parquet, PNG, JSON and Zarr under a temporary name, then renamed
  (:func:`atomic_parquet`, :func:`write_png`, :func:`atomic_json`, :func:`atomic_zarr`);
  :func:`clear_temporaries` removes what a killed run left;
* "already done": :func:`signature` of what a product is made of;
* submit with retries and gather (:func:`gather`), results as they finish with a progress
  bar (:func:`completed`);
* the manifest: :func:`save_manifest` records the run and writes it atomically;
* :class:`JobReport`: the report every job returns (``summary()``, ``ok``, ``exit_status``).

Only jobs and the command line import this module: library code never computes.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Iterator

from tqdm import tqdm

from ..errors import StoreError
from ..manifest import Manifest

#: Times a task that raised is tried again (a worker that dies is not a failure: Dask
#: reschedules its tasks by itself, up to ``distributed.scheduler.allowed-failures``).
TASK_RETRIES = 2


# ----------------------------------------------------------------------------- reports
@dataclass(kw_only=True)
class JobReport(abc.ABC):
    """What a job did; every job's report extends this.

    A report lists its problems as ``(item, reason)`` pairs in the attributes named by
    ``_LISTED`` (one line each in :meth:`summary`); those named by ``_FAILS`` make the run
    not ``ok`` (exit status 1).
    """

    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    #: ``(label, attribute)`` of the lists of ``(item, reason)`` pairs the summary shows.
    _LISTED: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: Attributes whose entries make the run not ``ok``.
    _FAILS: ClassVar[tuple[str, ...]] = ()
    #: How a note starts in the summary.
    _NOTE: ClassVar[str] = "note:"

    @property
    def ok(self) -> bool:
        """True when nothing asked for failed (see ``_FAILS``)."""
        return not any(getattr(self, name) for name in self._FAILS)

    @property
    def exit_status(self) -> int:
        """0 when :attr:`ok`, else 1 (the command's exit status)."""
        return 0 if self.ok else 1

    @abc.abstractmethod
    def headline(self) -> str:
        """The first line(s) of the summary: what was done, in numbers."""

    def note_lines(self) -> list[str]:
        return [f"  {self._NOTE} {n}" for n in self.notes]

    def summary(self) -> str:
        """Human-readable summary: the headline, the notes, then one line per problem."""
        lines = [self.headline(), *self.note_lines()]
        for label, name in self._LISTED:
            lines += [f"  {label} {what}: {why}" for what, why in getattr(self, name)]
        return "\n".join(lines)


def median_seconds(seconds: list[float]) -> float:
    """The middle value of per-task timings (the upper one of an even count)."""
    return sorted(seconds)[len(seconds) // 2]


# ----------------------------------------------------------------------------- progress and tasks
def progress_bar(total: int, desc: str, enabled: bool, unit: str = "frame") -> tqdm:
    """A progress bar on standard error (shown on a terminal only, never with ``--quiet``)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True,
                file=sys.stderr, dynamic_ncols=True)


def gather(client, obj):
    """Compute one lazy object (or a list of them) on ``client``, with retries, and return
    the result(s)."""
    if isinstance(obj, list):
        return client.gather(client.compute(obj, retries=TASK_RETRIES))
    return client.compute(obj, retries=TASK_RETRIES).result()


def completed(client, futures: list, desc: str, progress: bool, unit: str = "frame",
              outputs: Iterable = ()) -> Iterator[tuple[object, object, BaseException | None]]:
    """``(future, result, error)`` for each future as it finishes, with a progress bar.

    A task that raised is yielded with its error (``result`` None): one bad input never ends
    the run. An error that means the output cannot be written (full disk, read-only folder
    under one of ``outputs``) is raised instead: every other task would fail the same way.
    Whatever way the loop ends, the futures still running are cancelled.
    """
    from distributed import as_completed

    outputs = list(outputs)
    try:
        with progress_bar(len(futures), desc, progress, unit=unit) as b:
            for fut in as_completed(futures):
                try:
                    res, err = fut.result(), None
                except Exception as exc:
                    if stops_the_run(exc, outputs):
                        raise
                    res, err = None, exc
                yield fut, res, err
                b.update()
    finally:
        client.cancel(futures)


def task_key(prefix: str, index: int) -> str:
    """A task key unique to this run (Dask keeps results of equal keys)."""
    return f"{prefix}-{index}-{os.getpid()}-{time.time_ns()}"


def error_text(exc: BaseException) -> str:
    """How a failed task reads in a summary."""
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- write errors
# File-system errors that mean "the output cannot be written", with the fix to suggest.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_FS_ERRNOS = _FULL | _READ_ONLY | {errno.ENOTDIR, errno.EISDIR, errno.EIO, errno.ENOENT, errno.EEXIST}


def is_fs_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a file-system error about the output (not a bug)."""
    return isinstance(exc, OSError) and exc.errno in _FS_ERRNOS


def _under(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
    except ValueError:
        return False
    return True


def stops_the_run(exc: BaseException, outputs: list) -> bool:
    """Whether a task's error is the output failing (full disk, read-only folder): then every
    other task would fail the same way, so the run stops instead of listing each frame."""
    if not is_fs_error(exc):
        return False
    if exc.errno in _FULL or exc.errno == errno.EROFS:
        return True
    return exc.filename is None or any(_under(exc.filename, o) for o in outputs if o is not None)


def write_error(exc: OSError, where: str | os.PathLike, what: str, then: str = "",
                shown: str | os.PathLike | None = None) -> StoreError:
    """A :class:`StoreError` for an output that cannot be written: the path (``shown``, else the
    file the error names, else ``where``), the problem, and the fix (``where`` is the folder to
    free or make writable)."""
    path = shown or exc.filename or where
    problem = exc.strerror or str(exc)
    if exc.errno in _FULL:
        how = "free space on that disk (or choose an output on another disk)"
    elif exc.errno in _READ_ONLY:
        how = f"make {where} writable (or choose another output path)"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        how = "a file is in the way: choose an output path that is a folder"
    else:
        how = "check the disk and the path"
    return StoreError(f"{path}: cannot write {what} ({problem}); {how}{then}")


@contextlib.contextmanager
def writing(where: str | os.PathLike, what: str, then: str = ""):
    """Turn file-system errors while writing ``what`` into one clear :class:`StoreError`."""
    try:
        yield
    except OSError as exc:
        if not is_fs_error(exc):
            raise
        raise write_error(exc, where, what, then) from None


def check_writable(folder: str | os.PathLike, what: str = "the output") -> Path:
    """Create ``folder`` if needed and check that a file can be written in it.

    Commands call this before any computation, so that a read-only or misplaced output
    folder is one clear error at the start, not a failure after an hour of work.

    Raises
    ------
    StoreError
        The folder cannot be created or written (names the path, the problem, the fix).
    """
    folder = Path(folder)
    existing = folder  # the folder to make writable, when the error is that it is not
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mstdask-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if not is_fs_error(exc):
            raise
        raise write_error(exc, existing, what, shown=folder) from None
    return folder


# ----------------------------------------------------------------------------- atomic writes
def unlink(*paths: str | os.PathLike) -> None:
    """Remove files if they are there."""
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


def tmp_name(path: str | os.PathLike) -> Path:
    """The temporary name a product is written under before it is renamed into place."""
    return Path(path).with_name(f".{Path(path).name}.tmp")


def clear_temporaries(folder: Path, patterns: tuple[str, ...] = (".*.tmp", ".manifest.*")) -> None:
    """Remove temporary files a killed run left in ``folder`` (FITS and manifest written
    under a temporary name and renamed; never looked at by readers)."""
    for pattern in patterns:
        for p in folder.glob(pattern):
            if p.is_file():
                unlink(p)


@contextlib.contextmanager
def _renamed(path: Path):
    """Yield the temporary name to write; rename it to ``path`` when the block succeeds."""
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        unlink(tmp)


def atomic_parquet(df, path: Path) -> None:
    """A pandas table written under a temporary name, then renamed: never half a file."""
    with _renamed(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_png(fig, path: Path) -> None:
    """A bare matplotlib ``Figure`` (no pyplot: the session's backend is left alone) as PNG,
    written under a temporary name, then renamed."""
    with _renamed(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def atomic_json(obj, path: Path) -> None:
    """``obj`` as indented JSON, written under a temporary name, then renamed."""
    with _renamed(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def atomic_zarr(client, ds, path: Path, desc: str, progress: bool) -> None:
    """A lazy Dataset computed on ``client`` into a Zarr v3 store under a temporary name,
    then renamed into place (an earlier store of that name is replaced)."""
    tmpz = tmp_name(path)
    shutil.rmtree(tmpz, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        job = ds.to_zarr(str(tmpz), mode="w", compute=False, zarr_format=3)
    fut = client.compute(job, retries=TASK_RETRIES)
    with progress_bar(1, desc, progress, unit="stack") as b:
        fut.result()
        b.update()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmpz, path)


# ----------------------------------------------------------------------------- already done
def signature(kind: str, key: str, frame_keys, cfg: dict, deps=()) -> str:
    """What a product is made of: its frames (exposure identities), the configuration, the
    products it uses and the software version. A product already listed in the manifest with
    the same signature is not made again."""
    from .. import __version__

    # memory budgets only change how the work is split, not the result
    cfg = {k: v for k, v in cfg.items() if k not in ("tile_bytes", "stack_bytes")}
    blob = json.dumps([kind, key, [str(k) for k in frame_keys], cfg, list(deps), __version__],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------- the manifest
def save_manifest(manifest: Manifest, where: str | os.PathLike, argv: list[str] | None, **counts) -> None:
    """Record this run (command line and counts) in ``manifest`` and write it atomically."""
    manifest.record_run(argv, **counts)
    with writing(where, "the manifest"):
        manifest.write()


# ----------------------------------------------------------------------------- free space
def check_free_space(folder: str | os.PathLike, need_bytes: int, what: str = "the output") -> None:
    """Check, before anything is written, that the disk of ``folder`` (or of its nearest
    existing parent) has room for about ``need_bytes``.

    The estimate is of uncompressed pixels, and the stores are compressed (often by half or
    more), so only free space below half the estimate is an error: a plainly full disk is
    found at the start, a tight one still gets its chance (and a full disk during the run
    stops it with one clear message, work done so far kept).

    Raises
    ------
    StoreError
        Too little free space: names the folder, the free space, the estimate and the fix.
    """
    if need_bytes <= 0:
        return
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < 0.5 * need_bytes:
        raise StoreError(f"{folder}: only {free / 1e9:.2f} GB free on its disk ({existing}), and writing "
                         f"{what} needs about {need_bytes / 1e9:.2f} GB (at least {need_bytes / 2e9:.2f} GB even "
                         "if compression halves it); free some space there or choose an output folder on a "
                         "larger disk, then run the same command again")
