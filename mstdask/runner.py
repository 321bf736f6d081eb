"""Runs jobs on a Dask client: the only code that submits, waits and catches errors.

Library modules build pure functions and lazy graphs; this module sends them to the
cluster, shows progress, turns one frame's failure into a line of the summary instead of
the end of the run, and records what was done.
"""

from __future__ import annotations

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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from .config import IngestConfig, SiteConfig, to_dict
from .errors import BadInputError, MstdaskError, StoreError
from .io import FrameInfo, discover, scan_frame
from .manifest import Manifest
from .store import IngestLock, RawStore, describe, write_frame

__all__ = ["CalibReport", "IngestReport", "Plan", "ReduceReport", "calibrate", "check_writable", "ingest",
           "plan_calibrate", "plan_ingest", "plan_reduce", "plan_run", "reduce", "run_pipeline"]

#: Seconds between the driver's records of finished frames (``reduced``) in ``reduce``: a
#: killed run loses at most this much finished work, which the next run redoes.
MARK_EVERY_S = 2.0
#: Times a task that raised is tried again (a worker that dies is not a failure: Dask
#: reschedules its tasks by itself, up to ``distributed.scheduler.allowed-failures``).
TASK_RETRIES = 2


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


def _bar(total: int, desc: str, enabled: bool, unit: str = "frame"):
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True,
                file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------- write errors
# File-system errors that mean "the output cannot be written", with the fix to suggest.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_FS_ERRNOS = _FULL | _READ_ONLY | {errno.ENOTDIR, errno.EISDIR, errno.EIO, errno.ENOENT, errno.EEXIST}


def _is_fs_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FS_ERRNOS


def _under(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
    except ValueError:
        return False
    return True


def _stops_the_run(exc: BaseException, outputs: list) -> bool:
    """Whether a task's error is the output failing (full disk, read-only folder): then every
    other task would fail the same way, so the run stops instead of listing each frame."""
    if not _is_fs_error(exc):
        return False
    if exc.errno in _FULL or exc.errno == errno.EROFS:
        return True
    return exc.filename is None or any(_under(exc.filename, o) for o in outputs if o is not None)


def _write_error(exc: OSError, where: str | os.PathLike, what: str, then: str = "",
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
def _writing(where: str | os.PathLike, what: str, then: str = ""):
    """Turn file-system errors while writing ``what`` into one clear :class:`StoreError`."""
    try:
        yield
    except OSError as exc:
        if not _is_fs_error(exc):
            raise
        raise _write_error(exc, where, what, then) from None


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
        if not _is_fs_error(exc):
            raise
        raise _write_error(exc, existing, what, shown=folder) from None
    return folder


def _unlink(*paths: str | os.PathLike) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


def _clear_temporaries(folder: Path, patterns: tuple[str, ...] = (".*.tmp", ".manifest.*")) -> None:
    """Remove temporary files a killed run left in ``folder`` (FITS and manifest written
    under a temporary name and renamed; never looked at by readers)."""
    for pattern in patterns:
        for p in folder.glob(pattern):
            if p.is_file():
                _unlink(p)


def _atomic_parquet(df, path: Path) -> None:
    """A pandas table written under a temporary name, then renamed: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        _unlink(tmp)


def _write_png(fig, path: Path) -> None:
    """A bare matplotlib ``Figure`` (no pyplot: the session's backend is left alone) as PNG,
    written under a temporary name, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        _unlink(tmp)


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
        with _bar(len(files), "scan headers", progress) as bar:
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
    with _writing(store_path, "the store", "; frames already written are kept: run the same command again "
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
        with _bar(len(futures), "ingest frames", progress) as bar:
            for fut in as_completed(futures):
                try:
                    res = fut.result()
                except Exception as exc:  # one file that cannot be written never ends the run ...
                    if _stops_the_run(exc, [store_path]):
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


def run_pipeline(raw_inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, client,
                 config: IngestConfig | None = None, progress: bool = True,
                 argv: list[str] | None = None, refcat: str | os.PathLike | None = None,
                 refcat_config=None) -> tuple[IngestReport, Manifest]:
    """The main job: ingest raw frames into ``OUT/raw.zarr``, calibrate into ``OUT``, reduce
    the science frames into ``OUT/reduced.zarr``, then every later pipeline step: with a
    reference catalogue (``refcat``), STATIC photometry into ``OUT/catalog``, the image
    stacks into ``OUT/coadd``, the light-curve cube ``OUT/lightcurves.zarr`` and its
    precision, stacking and variability statistics into ``OUT/precision``.

    Writes ``OUT/manifest.json`` listing every product (also those of the steps that write
    into subfolders with manifests of their own). Every step is resumable: a run that was
    killed is finished by running it again, which does only the missing work. The reports
    of the steps after the ingest are in the returned report's ``steps``.

    Returns
    -------
    (IngestReport, Manifest)
    """
    config = config or IngestConfig()
    out = check_writable(Path(out_dir), "the output folder")
    store_path = out / "raw.zarr"
    report = ingest(raw_inputs, store_path, client, config, progress=progress)
    manifest = Manifest(out)
    info = describe(store_path) if Path(store_path, "zarr.json").exists() else None
    if info is not None:
        store = RawStore.open(store_path, mode="r")
        done = store.coord("ingested")
        manifest.add(
            "raw_store", store_path,
            telescope=info.get("telescopes", []), filter=info.get("filters", []),
            night=sorted(info["nights"]), inputs=[str(p) for p in store.coord("path")[done]],
            config=to_dict(config), frames=info["frames"], frame_shape=info["frame_shape"],
            imagetyp_counts=info.get("imagetyp_counts", {}),
        )
    manifest.data["rejected"] = [{"path": p, "reason": r} for p, r in report.rejected]
    manifest.record_run(argv, frames_written=len(report.written), rejected=len(report.rejected))
    with _writing(out, "the manifest"):
        manifest.write()
    if info is not None and info["frames"]:
        calib_report = calibrate(store_path, out, client, progress=progress, argv=argv)
        print(calib_report.summary(), file=sys.stderr)
        report.steps.append(calib_report)
        if info.get("imagetyp_counts", {}).get("science"):
            red_report = reduce(store_path, out, out / "reduced.zarr", client, progress=progress, argv=argv)
            print(red_report.summary(), file=sys.stderr)
            report.steps.append(red_report)
            if refcat is not None:
                phot = photometry(out / "reduced.zarr", refcat, out / "catalog", client,
                                  refcat_config=refcat_config, progress=progress, argv=argv)
                print(phot.summary(), file=sys.stderr)
                report.steps.append(phot)
                _adopt_products(out, out / "catalog")
                _catalog_steps(out, client, progress, argv, report)
        manifest = Manifest(out)
    return report, manifest


def _catalog_steps(out: Path, client, progress: bool, argv: list[str] | None, report: IngestReport) -> None:
    """The steps of the main job after the photometry: image stacks (``OUT/coadd``), the
    light-curve cube (``OUT/lightcurves.zarr``) and its statistics (``OUT/precision``).

    A step with too little to work on (every exposure flagged, a single epoch) is a note in
    the summary, not a failure of the run; the later steps still run when they can."""
    from .errors import InsufficientDataError

    steps = (("coadd", lambda: coadd(out / "catalog", out / "coadd", client, progress=progress, argv=argv),
              out / "coadd"),
             ("lightcurves", lambda: lightcurves(out / "catalog", out / "lightcurves.zarr", client,
                                                 progress=progress, argv=argv), None),
             ("precision", lambda: precision(out / "lightcurves.zarr", out / "precision", client,
                                             progress=progress, argv=argv), out / "precision"))
    for name, step, folder in steps:
        try:
            rep = step()
        except InsufficientDataError as exc:
            print(f"{name}: not run: {exc}", file=sys.stderr)
            if name == "lightcurves":
                break  # no cube: no precision either
            continue
        print(rep.summary(), file=sys.stderr)
        report.steps.append(rep)
        if folder is not None:
            _adopt_products(out, folder)


def _adopt_products(out: Path, sub: Path) -> None:
    """List the products of a step that wrote into the subfolder ``sub`` (with its own
    manifest) in ``out``'s manifest too, with paths relative to ``out``."""
    if not (sub / "manifest.json").exists():
        return
    manifest = Manifest(out)
    for p in Manifest(sub).products:
        fields = {k: v for k, v in p.items() if k not in ("kind", "path", "n_inputs", "created")}
        manifest.add(p["kind"], sub / p["path"], **fields)
    with _writing(out, "the manifest"):
        manifest.write()


# ----------------------------------------------------------------------------- calibrate
@dataclass
class CalibReport:
    """What ``calibrate`` made, what an earlier run had already made, and what it could not
    make (with the reason)."""

    out_dir: str
    products: list[dict] = field(default_factory=list)
    already: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every product that was asked for could be made."""
        return not self.skipped

    def summary(self) -> str:
        """Human-readable summary."""
        kinds = Counter(p["kind"] for p in self.products)
        lines = [f"calibrate {self.out_dir}: " + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing")
                 + f" made, {len(self.already)} already done in {self.seconds:.1f} s"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  SKIPPED {what}: {why}" for what, why in self.skipped]
        return "\n".join(lines)


@dataclass
class _CalStep:
    """One calibration product (or nightly small-scale flat) to make, and the frames it reads."""

    kind: str  # master_bias | ps_mask | bad_pixel_mask | small_scale_flat | master_flat
    telescope: str
    night: str
    filter: str = ""
    frames: tuple = ()  # indices into the frame table
    window: tuple = ()  # master_flat: the nights whose small-scale flats it stacks (as planned)

    @property
    def key(self) -> str:
        if self.kind in ("small_scale_flat", "master_flat"):
            return f"{self.telescope}_{self.filter}_{self.night}"
        return f"{self.telescope}_{self.night}"


def _strs(values):
    """Any 1-D array of strings (object, ``<U``, NumPy's StringDType from Zarr) as ``<U``."""
    import numpy as np

    return np.array([str(v) for v in values], dtype=str)


def _calib_steps(cols: dict, config) -> list[_CalStep]:
    """Every step of ``calibrate`` in order, from the per-frame table of a store (``telescope``,
    ``imagetyp``, ``night``, ``filter``, ``time``): per telescope the master bias of each night,
    the PS mask of the night with the longest bias sequence, the bad-pixel mask of each night
    with darks, then per filter the nightly small-scale flats and the master flats."""
    import numpy as np

    from .stir import calib

    tel_all, typ, night, filt = (_strs(cols[k]) for k in ("telescope", "imagetyp", "night", "filter"))
    times = np.asarray(cols["time"])

    def by_time(idx):
        return idx[np.argsort(times[idx], kind="stable")]

    steps: list[_CalStep] = []
    for tel in sorted(set(tel_all)):
        t = tel_all == tel
        bias = t & (typ == "bias")
        bias_nights = sorted(set(night[bias]))
        for n in bias_nights:
            idx = by_time(np.flatnonzero(bias & (night == n)))[: config.bias_max_frames]
            steps.append(_CalStep("master_bias", tel, n, frames=tuple(int(i) for i in idx)))
        if bias_nights:
            counts = {n: int((bias & (night == n)).sum()) for n in bias_nights}
            ps_night = max(bias_nights, key=lambda n: (counts[n], n))
            idx = by_time(np.flatnonzero(bias & (night == ps_night)))[: config.ps_frames]
            steps.append(_CalStep("ps_mask", tel, ps_night, frames=tuple(int(i) for i in idx)))
        dark = t & (typ == "dark")
        for n in sorted(set(night[dark])):
            steps.append(_CalStep("bad_pixel_mask", tel, n,
                                  frames=tuple(int(i) for i in np.flatnonzero(dark & (night == n)))))
        flat = t & (typ == "flat")
        for f in sorted(set(filt[flat])):
            ff = flat & (filt == f)
            flat_nights = sorted(set(night[ff]))
            for n in flat_nights:
                steps.append(_CalStep("small_scale_flat", tel, n, f,
                                      frames=tuple(int(i) for i in np.flatnonzero(ff & (night == n)))))
            # a master flat for every night with flats or science frames of this filter
            for n in sorted(set(night[t & ((typ == "science") | (typ == "flat")) & (filt == f)])):
                steps.append(_CalStep("master_flat", tel, n, f,
                                      window=tuple(calib.flat_window_nights(n, flat_nights, config))))
    return steps


def _signature(kind: str, key: str, frame_keys, cfg: dict, deps=()) -> str:
    """What a product is made of: its frames (exposure identities), the configuration, the
    products it uses and the software version. A product already listed in the manifest with
    the same signature is not made again."""
    from . import __version__

    # memory budgets only change how the work is split, not the result
    cfg = {k: v for k, v in cfg.items() if k not in ("tile_bytes", "stack_bytes")}
    blob = json.dumps([kind, key, [str(k) for k in frame_keys], cfg, list(deps), __version__],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _done_product(manifest: Manifest, out: Path, kind: str, key: str, signature: str) -> dict | None:
    """The manifest entry of a complete product with this signature (FITS and Zarr group there)."""
    if kind == "small_scale_flat":
        rec = manifest.data.get("intermediates", {}).get(f"{kind}/{key}")
        ok = rec is not None and rec.get("signature") == signature
    else:
        rec = manifest.get(f"{kind}_{key}.fits")
        ok = rec is not None and rec.get("signature") == signature and (out / rec["path"]).is_file()
    return rec if ok and (out / "calib.zarr" / kind / key / "zarr.json").is_file() else None


def calibrate(store_path: str | os.PathLike, out_dir: str | os.PathLike, client, config=None,
              progress: bool = True, argv: list[str] | None = None) -> CalibReport:
    """Night calibrations of a raw store: master biases, PS masks, bad-pixel masks, master flats.

    Writes FITS products with provenance headers into ``out_dir``, the same products into
    ``out_dir/calib.zarr`` (one group per product, ``xarray.open_zarr(..., group=KIND/KEY)``)
    and entries in ``out_dir/manifest.json`` (kinds ``master_bias``, ``master_flat``,
    ``ps_mask``, ``bad_pixel_mask``). Nightly small-scale flats are kept in
    ``calib.zarr/small_scale_flat/TEL_FILTER_NIGHT`` for the 11-night stacks and Fig. 4. A
    product that cannot be made (too few frames...) is reported and skipped; the others are
    still made.

    Resumable: each product is written (Zarr group, then FITS under a temporary name, renamed)
    before it is listed in the manifest, and the manifest is rewritten atomically after each
    one, so the manifest lists only complete products. A rerun skips every product listed
    with the same signature (same frames, configuration, inputs and software version).

    Raises
    ------
    StoreError
        The store is missing, or the output cannot be written (read-only folder, full disk):
        the product being written is removed, the ones before it are kept.
    """
    import numpy as np
    import xarray as xr

    from .stir import calib
    from .config import CalibConfig
    from .io import write_product
    from .masks import Flag, flag
    from .store import open_store

    config = config or CalibConfig()
    t0 = time.perf_counter()
    # lazy, not in Dask: each stack task reads its tile of all its frames itself (no transfers
    # between workers); a missing store is an error before anything is written
    ds = open_store(store_path, chunks=None)
    out = check_writable(out_dir, "the calibrations")
    _clear_temporaries(out)  # FITS and manifest temporaries of a killed run
    report = CalibReport(out_dir=str(out.resolve()))
    manifest = Manifest(out)
    intermediates = manifest.data.setdefault("intermediates", {})
    zpath = out / "calib.zarr"
    cfg = to_dict(config)
    steps = _calib_steps({k: ds[k].values for k in ("telescope", "imagetyp", "night", "filter", "time")}, config)
    frame_keys = _strs(ds["frame_key"].values)

    def gather(obj):
        if isinstance(obj, list):
            return client.gather(client.compute(obj, retries=TASK_RETRIES))
        return client.compute(obj, retries=TASK_RETRIES).result()

    def commit(kind: str, key: str, write, record) -> None:
        """Write one product, then list it: the manifest only ever lists complete products."""
        group = f"{kind}/{key}"
        fpath = None if kind == "small_scale_flat" else out / f"{kind}_{key}.fits"
        try:
            # being made again (other frames or configuration): unlisted before it is overwritten
            if intermediates.pop(group, None) is not None or (fpath is not None and manifest.remove(fpath.name)):
                manifest.write()
            write()
            record()
            manifest.write()
        except OSError as exc:
            shutil.rmtree(zpath / kind / key, ignore_errors=True)
            if fpath is not None:
                _unlink(fpath.with_name(f".{fpath.name}.tmp"), fpath)  # io.write_product's temporary
                manifest.remove(fpath.name)
            intermediates.pop(group, None)
            if not _is_fs_error(exc):
                raise
            made = len(report.products) + len(report.already)
            raise _write_error(exc, out, f"{kind} {key}", f"; the {made} products made before are kept: run "
                                                          "the same command again to make the rest",
                               shown=fpath or zpath / kind / key) from None

    def write_zarr(group: str, zds) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr v3 notes on string attributes
            zds.to_zarr(zpath, group=group, mode="w", zarr_format=3, consolidated=True)

    def save(kind: str, key: str, data: np.ndarray, ds_extra: dict, *, telescope: str, night: str,
             inputs: list[str], method: str, params: dict, signature: str, filter: str = "",
             extra_hdr: dict | None = None, entry_extra: dict | None = None) -> None:
        path = out / f"{kind}_{key}.fits"

        def write() -> None:
            write_zarr(f"{kind}/{key}", xr.Dataset({kind: (("y", "x"), data), **ds_extra},
                                                   attrs={"telescope": telescope, "night": night, "filter": filter,
                                                          "method": method}))
            write_product(path, data, kind=kind, telescope=telescope, filter=filter, night=night, inputs=inputs,
                          method=method, params=params, extra=extra_hdr)

        def record() -> None:
            report.products.append(manifest.add(
                kind, path, telescope=telescope, filter=filter, night=night, inputs=inputs, config=cfg,
                zarr_group=f"calib.zarr/{kind}/{key}", signature=signature, **(entry_extra or {})))

        commit(kind, key, write, record)

    def bias_for(tel: str, night: str, what: str, notes: list[str]) -> tuple[str, object, str]:
        available = sorted(n for t, n in biases if t == tel)
        bias_night = calib.nearest_night(night, available)
        if bias_night != night:
            notes.append(f"{what}: no master bias that night, used the one of {bias_night}")
        data, sig = biases[(tel, bias_night)]
        return bias_night, data, sig

    biases: dict[tuple[str, str], tuple[xr.DataArray, str]] = {}
    nightly: dict[tuple[str, str], dict[str, tuple[list[str], str]]] = {}
    # Master biases and PS masks need nothing made before them: each is submitted as soon as
    # its step comes and written once computed, while the workers go on with the next steps
    # (no idle workers while the driver writes, no idle worker at the end of each step).
    # Products are still written one at a time by the driver; a PS mask may be written after
    # products of later steps, the master biases always before the steps that use them.
    pending: list[tuple[str, list, object]] = []  # (kind, futures, write(results)) in step order

    def submit(kind: str, objs: list, write) -> None:
        pending.append((kind, client.compute(objs, retries=TASK_RETRIES), write))

    def finish(ready_only: bool = False, biases_only: bool = False) -> None:
        """Write submitted products: all of them, those computed already, or as many as
        needed for every master bias to be written."""
        while pending:
            if ready_only and not all(f.done() for f in pending[0][1]):
                return
            if biases_only and all(kind != "master_bias" for kind, _, _ in pending):
                return
            _, futures, write = pending.pop(0)
            write(client.gather(futures))
            bar.update()

    with _bar(len(steps), "calibrate", progress, unit="step") as bar:
        for step in steps:
            tel, night, filt, key = step.telescope, step.night, step.filter, step.key
            bar.set_postfix_str(f"{step.kind} {key}", refresh=False)
            frames = ds.raw.isel(frame=list(step.frames))
            keys = frame_keys[list(step.frames)]
            if step.kind in ("bad_pixel_mask", "small_scale_flat"):
                finish(biases_only=True)  # these read the master biases written before them
            if step.kind == "master_bias":
                sig = _signature(step.kind, key, keys, cfg)

                def bias_written(tel=tel, night=night, key=key, sig=sig) -> None:
                    # later steps read the written master back (lazily) instead of recomputing its graph
                    biases[(tel, night)] = (xr.open_zarr(zpath, group=f"master_bias/{key}")["master_bias"], sig)

                if (done := _done_product(manifest, out, step.kind, key, sig)) is not None:
                    report.already.append(done)
                    bias_written()
                else:
                    try:
                        mb = calib.master_bias(frames, config)
                    except MstdaskError as exc:
                        report.skipped.append((f"master_bias {key}", str(exc)))
                        bar.update()
                        continue

                    def write_bias(res, tel=tel, night=night, key=key, sig=sig, mb=mb, done=bias_written) -> None:
                        save("master_bias", key, res[0], {}, telescope=tel, night=night,
                             inputs=mb.attrs["inputs"], method=f"{config.bias_combine} of bias frames",
                             params={"clip_sigma": config.clip_sigma}, extra_hdr={"BUNIT": "adu"}, signature=sig)
                        done()

                    submit("master_bias", [mb.data], write_bias)
                    finish(ready_only=True)
                    continue
            elif step.kind == "ps_mask":
                sig = _signature(step.kind, key, keys, cfg)
                if (done := _done_product(manifest, out, step.kind, key, sig)) is not None:
                    report.already.append(done)
                else:
                    try:
                        ps = calib.ps_map(frames, config)
                        summ = calib.ps_summary(ps)
                    except MstdaskError as exc:
                        report.skipped.append((f"ps_mask {tel}", str(exc)))
                    else:
                        def write_ps(res, tel=tel, night=night, key=key, sig=sig, ps=ps) -> None:
                            ps_np, frac, agree, std = res
                            save("ps_mask", key, flag(ps_np, Flag.PEPPER_SALT), {"std": (("y", "x"), std)},
                                 telescope=tel, night=night, inputs=ps.attrs["inputs"], signature=sig,
                                 method=f"std over {ps.attrs['nframes']} bias > {config.ps_threshold_adu} ADU in "
                                        f"all {config.ps_groups} groups",
                                 params={"ps_threshold": config.ps_threshold_adu},
                                 extra_hdr={"PSFRAC": (float(frac), "fraction of PS pixels"),
                                            "PSAGREE": (float(np.nanmin(agree)), "min agreement between groups")},
                                 entry_extra={"ps_fraction": float(frac),
                                              "group_agreement": [float(a) for a in agree]})

                        submit("ps_mask", [ps["ps"].data, summ["fraction"].data, summ["agreement"].data, ps["std"].data],
                               write_ps)
                        finish(ready_only=True)
                        continue
            elif step.kind == "bad_pixel_mask":
                try:
                    bias_night, bias, bias_sig = bias_for(tel, night, f"bad_pixel_mask {key}", report.notes)
                    sig = _signature(step.kind, key, keys, cfg, [bias_sig])
                    done = _done_product(manifest, out, step.kind, key, sig)
                    if done is None:
                        res = calib.bad_pixel_map(frames, bias, config)
                        bad, centre, sigma = gather([res["bad"].data, res["centre"].data, res["sigma"].data])
                except MstdaskError as exc:
                    report.skipped.append((f"bad_pixel_mask {key}", str(exc)))
                else:
                    if done is not None:
                        report.already.append(done)
                    else:
                        save("bad_pixel_mask", key, flag(bad, Flag.BAD_PIXEL), {}, telescope=tel, night=night,
                             inputs=res.attrs["inputs"], signature=sig,
                             method=f"median dark - master bias outside {config.bad_pixel_nsigma} robust sigma",
                             params={"nsigma": config.bad_pixel_nsigma},
                             extra_hdr={"DARKMED": (float(centre), "[adu] median of bias-subtracted dark"),
                                        "DARKSIG": (float(sigma), "[adu] robust sigma"), "BIASNGHT": bias_night},
                             entry_extra={"bias_night": bias_night, "bad_fraction": float(bad.mean())})
            elif step.kind == "small_scale_flat":
                _small_scale_flat(step, frames, keys, config, cfg, bias_for, gather, commit, write_zarr, manifest,
                                  out, report, nightly.setdefault((tel, filt), {}))
            else:  # master_flat
                _master_flat(step, config, cfg, gather, save, manifest, out, report, zpath,
                             nightly.setdefault((tel, filt), {}))
            finish(ready_only=True)
            bar.update()
        finish()
    manifest.record_run(argv, products=len(report.products), already=len(report.already),
                        skipped=len(report.skipped))
    with _writing(out, "the manifest"):
        manifest.write()
    report.seconds = time.perf_counter() - t0
    return report


def _small_scale_flat(step: _CalStep, flats, keys, config, cfg: dict, bias_for, gather, commit, write_zarr,
                      manifest: Manifest, out: Path, report: CalibReport, nightly: dict) -> None:
    """One night's small-scale flat of one filter: flats outside the level limits left out."""
    import numpy as np
    import xarray as xr

    from .stir import calib

    tel, filt, night, key = step.telescope, step.filter, step.night, step.key
    notes: list[str] = []
    try:
        bias_night, bias, bias_sig = bias_for(tel, night, f"flats {key}", notes)
        sig = _signature(step.kind, key, keys, cfg, [bias_sig])
        done = _done_product(manifest, out, step.kind, key, sig)
        if done is not None:
            report.notes.extend(done.get("notes", []))
            nightly[night] = (done["inputs"], sig)
            return
        levels = gather(calib.flat_levels(flats, bias).data)
        ok = (levels >= config.flat_min_adu) & (levels <= config.flat_max_adu)
        for path, level in zip(flats["path"].values[~ok], levels[~ok]):
            notes.append(f"flat {path} left out: level {level:.0f} ADU outside "
                         f"{config.flat_min_adu:.0f}-{config.flat_max_adu:.0f} ADU")
        ssf = calib.nightly_small_scale_flat(flats.isel(frame=np.flatnonzero(ok)), bias, config)
        data = gather(ssf.data)
    except MstdaskError as exc:
        report.notes.extend(notes)
        report.skipped.append((f"small_scale_flat {key}", str(exc)))
        return
    report.notes.extend(notes)
    inputs = list(ssf.attrs["inputs"])
    zds = xr.Dataset({"small_scale_flat": (("y", "x"), data)},
                     attrs={"telescope": tel, "filter": filt, "night": night, "bias_night": bias_night,
                            "inputs": inputs})

    def record() -> None:
        manifest.data.setdefault("intermediates", {})[f"small_scale_flat/{key}"] = {
            "signature": sig, "inputs": inputs, "notes": notes, "bias_night": bias_night}

    commit("small_scale_flat", key, lambda: write_zarr(f"small_scale_flat/{key}", zds), record)
    nightly[night] = (inputs, sig)


def _master_flat(step: _CalStep, config, cfg: dict, gather, save, manifest: Manifest, out: Path,
                 report: CalibReport, zpath: Path, nightly: dict) -> None:
    """The master flat of one night: the nightly small-scale flats of the nights around it."""
    import xarray as xr

    from .stir import calib

    tel, filt, night, key = step.telescope, step.filter, step.night, step.key
    use = calib.flat_window_nights(night, sorted(nightly), config)
    if not use:
        report.skipped.append((f"master_flat {key}", f"no nightly flat within {config.flat_max_days:.0f} days"))
        return
    sig = _signature(step.kind, key, [], cfg, [nightly[n][1] for n in use])
    done = _done_product(manifest, out, step.kind, key, sig)
    if done is not None:
        report.already.append(done)
        return
    parts = [xr.open_zarr(zpath, group=f"small_scale_flat/{tel}_{filt}_{n}")["small_scale_flat"] for n in use]
    data = gather(calib.stack_nightly_flats(parts).data)
    inputs = [p for n in use for p in nightly[n][0]]
    save("master_flat", key, data, {}, telescope=tel, filter=filt, night=night, inputs=inputs, signature=sig,
         method=f"mean of {len(use)} nightly small-scale flats ({config.flat_window_px}-px median)",
         params={"window_px": config.flat_window_px, "half_window_nights": config.flat_half_window_nights},
         extra_hdr={"NNIGHTS": (len(use), "nights stacked"),
                    **{f"FLATN{i:03d}": n for i, n in enumerate(use, start=1)}},
         entry_extra={"nights": use})


# ----------------------------------------------------------------------------- reduce
@dataclass
class ReduceReport:
    """What ``reduce`` did: frames reduced now, frames already done, frames that failed."""

    out: str
    reduced: list[str] = field(default_factory=list)
    already: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tracks: int = 0
    frame_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no frame failed."""
        return not self.failed

    def summary(self) -> str:
        """Human-readable summary."""
        per = f", median {sorted(self.frame_seconds)[len(self.frame_seconds) // 2]:.1f} s per frame in its task" \
            if self.frame_seconds else ""
        lines = [f"reduce {self.out}: {len(self.reduced)} frames reduced, {self.already} already done, "
                 f"{len(self.failed)} failed, {self.tracks} tracks found in {self.seconds:.1f} s{per}"]
        lines += [f"  note: {n}" for n in sorted(set(self.notes))]
        lines += [f"  FAILED {p}: {why}" for p, why in self.failed]
        return "\n".join(lines)


def _reduce_work(raw: RawStore, red, caldir, calib_config, report: ReduceReport):
    """The science frames still to reduce, with their calibrations.

    Returns ``(coords, todo, new)``: the raw store's per-frame coordinates, the unfinished
    slots of an earlier run ``(raw index, slot, CalibSet)`` and the frames without a slot
    ``(raw index, CalibSet)``; frames already reduced are counted in ``report.already``,
    frames without calibrations listed in ``report.failed``.

    Raises
    ------
    StoreError
        ``caldir`` is not the output of ``mstdask calibrate``.
    """
    import numpy as np

    from .stir.frame import find_calibrations
    from .store import _REDUCED_COPY

    imagetyp, done = raw.coord("imagetyp"), raw.coord("ingested")
    sci = np.flatnonzero((imagetyp == "science") & done)
    coords = {name: raw.coord(name) for name in _REDUCED_COPY}
    known = {} if red is None else {
        str(k): (i, bool(r)) for i, (k, r) in enumerate(zip(red.coord("frame_key"), red.coord("reduced")))}
    calibs: dict[tuple[str, str, str], object] = {}
    todo: list[tuple[int, int, object]] = []  # (raw index, out index, calib set)
    new: list[tuple[int, object]] = []
    for i in sci:
        key = str(coords["frame_key"][i])
        if key in known and known[key][1]:
            report.already += 1
            continue
        tfn = (str(coords["telescope"][i]), str(coords["filter"][i]), str(coords["night"][i]))
        if tfn not in calibs:
            try:
                calibs[tfn] = find_calibrations(caldir, *tfn, calib_config)
            except MstdaskError as exc:
                calibs[tfn] = exc
        cs = calibs[tfn]
        if isinstance(cs, MstdaskError):
            if isinstance(cs, StoreError):
                raise cs
            report.failed.append((str(coords["path"][i]), str(cs)))
            continue
        report.notes.extend(cs.notes)
        if key in known:
            todo.append((int(i), known[key][0], cs))
        else:
            new.append((int(i), cs))
    return coords, todo, new


def _fits_path(fits_root: Path | None, coords: dict, i: int) -> str | None:
    if fits_root is None:
        return None
    return str(fits_root / str(coords["night"][i]) / (Path(str(coords["path"][i])).name.split(".")[0] + ".fits"))


def _fits_tmp(fpath: str) -> Path:
    # the temporary name stir._write_fits writes to before renaming
    return Path(fpath).with_name(f".{Path(fpath).name}.tmp")


def reduce(store_path: str | os.PathLike, caldir: str | os.PathLike, out_path: str | os.PathLike, client,
           config=None, calib_config=None, fits_dir: str | os.PathLike | None = None, progress: bool = True,
           argv: list[str] | None = None) -> ReduceReport:
    """STIR per frame for every science frame of a raw store: ``out_path`` (a reduced store).

    One task per frame (:func:`mstdask.stir.process_frame`); a frame that fails is reported
    and skipped while the others finish, and a rerun reduces only frames not yet done. With
    ``fits_dir`` each frame is also written as ``FITS_DIR/NIGHT/NAME.fits`` (SCI + MASK).
    ``manifest.json`` beside the store (and in ``fits_dir``) lists the products.

    Tasks are idempotent (each writes its own frame's shards, the same bytes every time): a
    worker that dies has its tasks run again elsewhere, and a killed run is finished by the
    next one. The driver marks frames ``reduced`` every :data:`MARK_EVERY_S` seconds, after
    their pixels are written; unmarked slots are hidden by :func:`mstdask.store.open_reduced`.

    Raises
    ------
    StoreError
        No raw store, no calibrations, or the output cannot be written (read-only folder,
        full disk): the run stops, frames finished before are kept and marked.
    """
    from .config import CalibConfig, StirConfig, StoreLayout
    from .store import ReducedStore

    config = config or StirConfig()
    calib_config = calib_config or CalibConfig()
    t0 = time.perf_counter()
    out_path = Path(out_path)
    report = ReduceReport(out=str(out_path.resolve()))
    raw = RawStore.open(store_path, mode="r")
    red = ReducedStore.open(out_path) if out_path.exists() and any(out_path.iterdir()) else None
    if red is not None and tuple(red.frame_shape) != tuple(raw.frame_shape):
        raise StoreError(f"{out_path}: holds {red.frame_shape} frames, {store_path} has {raw.frame_shape}; "
                         "reduce into a new --out")
    coords, todo, new = _reduce_work(raw, red, caldir, calib_config, report)
    check_writable(out_path if red is not None else out_path.parent, "the reduced store")
    fits_root = check_writable(fits_dir, "the FITS frames") if fits_dir else None
    then = "; frames reduced before are kept: run the same command again to reduce the rest"
    try:
        if red is None:
            red = ReducedStore.create(out_path, raw.frame_shape, tuple(raw.group.attrs["tile"]), StoreLayout(),
                                      {"raw_store": str(Path(store_path).resolve()),
                                       "calib_dir": str(Path(caldir).resolve()), "stir_config": to_dict(config)})
        _reduce_frames(red, raw, coords, todo, new, store_path, caldir, out_path, fits_root, client, config,
                       calib_config, progress, argv, report)
    except OSError as exc:
        if not _is_fs_error(exc):
            raise
        raise _write_error(exc, out_path, "the reduced frames", then) from None
    report.seconds = time.perf_counter() - t0
    return report


def _reduce_frames(red, raw: RawStore, coords: dict, todo: list, new: list, store_path, caldir, out_path: Path,
                   fits_root: Path | None, client, config, calib_config, progress: bool, argv, report) -> None:
    import numpy as np
    from distributed import as_completed

    from .stir.frame import process_frame
    from .store import _REDUCED_COPY

    if todo:  # unfinished slots of an earlier run: record the calibrations used this time
        red.set_coords([s for _, s, _ in todo], calib_bias=[c.bias for *_, c in todo],
                       calib_flat=[c.flat for *_, c in todo], calib_ps=[c.ps for *_, c in todo],
                       calib_bad=[c.bad for *_, c in todo])
    if new:
        idx = np.array([i for i, _ in new])
        fields = {name: coords[name][idx] for name in _REDUCED_COPY}
        fields.update(raw_index=idx, calib_bias=[c.bias for _, c in new], calib_flat=[c.flat for _, c in new],
                      calib_ps=[c.ps for _, c in new], calib_bad=[c.bad for _, c in new])
        slots = red.reserve(fields)
        todo = todo + [(i, s, c) for (i, c), s in zip(new, slots)]
    slots_now = [s for _, s, _ in todo]
    red.clear_partial(slots_now)  # left by workers killed while writing
    egain = coords["egain"]
    futures, meta = [], {}
    for i, s, cs in todo:
        gain = float(egain[i]) if np.isfinite(egain[i]) and egain[i] > 0 else config.gain_e_per_adu
        fpath = _fits_path(fits_root, coords, i)
        if fpath:
            _unlink(_fits_tmp(fpath))
        fut = client.submit(process_frame, str(store_path), i, str(coords["path"][i]), str(out_path), s, cs, config,
                            gain, calib_config.saturation_adu, fpath, pure=False, retries=TASK_RETRIES,
                            key=f"stir-{s}-{os.getpid()}-{time.time_ns()}")
        futures.append(fut)
        meta[fut.key] = (i, s, cs, fpath)

    finished: list[dict] = []
    last = time.monotonic()
    written_fits: list[tuple[int, int, object, str, dict]] = []
    completed = False

    def flush() -> None:
        if not finished:
            return
        red.set_coords([f["out_index"] for f in finished], reduced=[True] * len(finished),
                       n_tracks=[f["n_tracks"] for f in finished], track_pixels=[f["track_pixels"] for f in finished],
                       cosmic_ray_pixels=[f["cosmic_ray_pixels"] for f in finished],
                       masked_fraction=[f["masked_fraction"] for f in finished],
                       tracks=[json.dumps(f["lines"]) for f in finished])
        finished.clear()

    try:
        with _bar(len(futures), "reduce frames", progress) as bar:
            for fut in as_completed(futures):
                i, s, cs, fpath = meta[fut.key]
                try:
                    res = fut.result()
                except Exception as exc:  # one bad frame never ends the run ...
                    if _stops_the_run(exc, [out_path, fits_root]):
                        raise  # ... but a full disk or a read-only output does: every frame would fail
                    report.failed.append((str(coords["path"][i]), f"{type(exc).__name__}: {exc}"))
                else:
                    finished.append(res)
                    report.reduced.append(res["path"])
                    report.tracks += res["n_tracks"]
                    report.frame_seconds.append(res["seconds"])
                    if fpath:
                        written_fits.append((i, s, cs, fpath, res))
                bar.update()
                if time.monotonic() - last > MARK_EVERY_S:
                    flush()
                    last = time.monotonic()
        completed = True
    finally:
        # Also on Ctrl-C or a full disk: what is written is recorded, the rest is done next
        # time (when recording fails too, those frames are simply reduced again).
        client.cancel(futures)
        try:
            flush()
            red.consolidate()
        except OSError:
            if completed:
                raise
        red.clear_partial(slots_now)
        done_fits = {w[3] for w in written_fits}
        _unlink(*(_fits_tmp(m[3]) for m in meta.values() if m[3] and m[3] not in done_fits))

    cfg = to_dict(config)
    done_mask = red.coord("reduced")
    manifest = Manifest(out_path.parent)
    manifest.add("reduced_store", out_path,
                 telescope=sorted(set(map(str, red.coord("telescope")[done_mask]))),
                 filter=sorted(set(map(str, red.coord("filter")[done_mask]))),
                 night=sorted(set(map(str, red.coord("night")[done_mask]))),
                 inputs=[str(p) for p in red.coord("path")[done_mask]], config=cfg,
                 frames=int(done_mask.sum()), calib_dir=str(Path(caldir).resolve()),
                 failed=[{"path": p, "reason": r} for p, r in report.failed])
    manifest.record_run(argv, reduced=len(report.reduced), already=report.already, failed=len(report.failed))
    manifest.write()
    if fits_root is not None and written_fits:
        fman = Manifest(fits_root)
        for i, s, cs, fpath, res in written_fits:
            fman.add("reduced_frame", fpath, telescope=str(coords["telescope"][i]), filter=str(coords["filter"][i]),
                     night=str(coords["night"][i]), inputs=[str(coords["path"][i]), *cs.files().values()],
                     config=cfg, n_tracks=res["n_tracks"], store=str(out_path.resolve()), store_index=s)
        fman.record_run(argv, written=len(written_fits))
        fman.write()


# ----------------------------------------------------------------------------- dry runs
@dataclass
class Plan:
    """What a command would do (``--dry-run``), found from FITS headers and store metadata
    only: nothing is computed and nothing is written.

    Attributes
    ----------
    command : str
        ``ingest``, ``calibrate``, ``reduce`` or ``run``.
    target : str
        The store or folder the command would write.
    frames : Counter
        ``(night, telescope, imagetyp) -> frames`` the command would read.
    steps : list of str
        What it would do, one line each, and what is already done.
    tasks : int
        Dask tasks it would submit (for calibrate an estimate: about one per frame and stored
        tile read, plus the combining tasks).
    bytes_read, bytes_written : int
        Estimated data volume (pixels, before compression).
    notes : list of str
        What the run would report (rejected files, frames without calibrations...).
    parts : list of Plan
        ``run``: the plans of ingest, calibrate and reduce.
    """

    command: str
    target: str
    frames: Counter = field(default_factory=Counter)
    steps: list[str] = field(default_factory=list)
    tasks: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    notes: list[str] = field(default_factory=list)
    parts: list["Plan"] = field(default_factory=list)
    tasks_estimated: bool = False

    def frame_table(self) -> list[str]:
        """Frames per night and telescope, one column per image type."""
        kinds = ("bias", "dark", "flat", "science")
        rows = sorted({(n, t) for n, t, _ in self.frames})
        total = Counter()
        for (_, _, k), v in self.frames.items():
            total[k] += v
        by_kind = ", ".join(f"{k} {total[k]}" for k in kinds if total[k])
        lines = [f"frames: {sum(self.frames.values())}" + (f" ({by_kind})" if by_kind else "")]
        if rows:
            lines.append(f"  {'night':<12}{'telescope':<11}" + "".join(f"{k:>9}" for k in kinds))
            for n, t in rows:
                lines.append(f"  {n:<12}{t:<11}" + "".join(f"{self.frames.get((n, t, k), 0):>9}" for k in kinds))
        return lines

    def text(self, _part: bool = False) -> str:
        """The plan as printed by ``--dry-run``."""
        lines = [f"{self.command} {self.target}" + (":" if _part else ": dry run, nothing computed or written")]
        body = self.frame_table() + self.steps
        if self.parts:
            for part in self.parts:
                body += [""] + part.text(_part=True).splitlines()
            body.append("")
            label = "total: "
        else:
            label = ""
        body.append(f"{label}tasks: {'~' if self.tasks_estimated else ''}{self.tasks}"
                    + (" (estimated: one per frame and stored tile read, plus the combining ones)"
                       if self.tasks_estimated and not self.parts else ""))
        body.append(f"{label}data: {self.bytes_read / 1e6:.1f} MB read, {self.bytes_written / 1e6:.1f} MB written "
                    "(pixels, before compression)")
        body += [f"note: {n}" for n in self.notes]
        return "\n".join(lines + ["  " + b if b else "" for b in body])


_TABLE = ("telescope", "imagetyp", "night", "filter", "time", "path", "frame_key")


def _store_table(store: RawStore) -> dict:
    """Per-frame coordinates of the ingested frames of a store (no pixels read)."""
    done = store.coord("ingested")
    table = {k: store.coord(k)[done] for k in _TABLE}
    table["time"] = table["time"].astype("datetime64[ns]")
    return table


def _infos_table(infos: list[FrameInfo]) -> dict:
    import numpy as np

    table = {k: np.array([getattr(i, "key" if k == "frame_key" else k) for i in infos], dtype=object)
             for k in _TABLE if k != "time"}
    table["time"] = np.array([np.datetime64(i.time, "ns") for i in infos], dtype="datetime64[ns]")
    return table


def _concat(a: dict, b: dict) -> dict:
    import numpy as np

    return {k: np.concatenate([np.asarray(a[k], dtype=b[k].dtype if k == "time" else object),
                               np.asarray(b[k], dtype=b[k].dtype if k == "time" else object)]) for k in _TABLE}


def _tiles(shape: tuple[int, int], tile) -> int:
    return -(-shape[0] // tile[0]) * -(-shape[1] // tile[1])


def _ingest_plan(inputs, store_path, config: IngestConfig):
    """The ingest plan, the frames it would write, the table of the store and its layout."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from .store import tile_edge

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


def _calib_plan(table: dict, shape, tile, out: Path, config) -> Plan:
    import numpy as np

    from .stir import calib

    steps = _calib_steps(table, config)
    cfg = to_dict(config)
    manifest = Manifest(out)  # reads manifest.json when there is one, creates nothing
    keys = _strs(table["frame_key"])
    npix, ntiles = int(np.prod(shape)), _tiles(shape, tile)
    plan = Plan("calibrate", str(out))
    biases: dict[tuple[str, str], str] = {}
    nightly: dict[tuple[str, str], dict[str, str]] = {}
    read: set[int] = set()
    todo = done = skipped = 0
    for step in steps:
        tel, night, kind, key = step.telescope, step.night, step.kind, step.key
        n = len(step.frames)
        k = keys[list(step.frames)]
        sig, why = None, None
        if kind == "master_bias":
            sig = _signature(kind, key, k, cfg)
            if n < config.min_frames:
                why = f"{n} bias frames, at least {config.min_frames} needed"
            else:
                biases[(tel, night)] = sig
        elif kind == "ps_mask":
            sig = _signature(kind, key, k, cfg)
            if n < config.ps_min_frames:
                why = f"{n} bias frames, at least {config.ps_min_frames} needed"
        elif kind in ("bad_pixel_mask", "small_scale_flat"):
            available = sorted(b for t, b in biases if t == tel)
            if not available:
                why = "no master bias"
            elif n < config.min_frames:
                why = f"{n} frames, at least {config.min_frames} needed"
            else:
                sig = _signature(kind, key, k, cfg, [biases[(tel, calib.nearest_night(night, available))]])
                if kind == "small_scale_flat":
                    nightly.setdefault((tel, step.filter), {})[night] = sig
        else:
            flats = nightly.get((tel, step.filter), {})
            use = calib.flat_window_nights(night, sorted(flats), config)
            if not use:
                why = f"no nightly flat within {config.flat_max_days:.0f} days"
            else:
                sig = _signature(kind, key, [], cfg, [flats[u] for u in use])
                n = len(use)
        if why is not None:
            status = f"would be skipped: {why}"
            skipped += 1
        elif _done_product(manifest, out, kind, key, sig) is not None:
            status = "already done"
            done += 1
        else:
            status = "to make"
            todo += 1
            read.update(step.frames)
            per_frame = 4 if kind == "master_flat" else 2
            plan.bytes_read += n * npix * per_frame + (npix * 4 if kind in ("bad_pixel_mask", "small_scale_flat")
                                                        else 0)
            plan.bytes_written += npix * {"master_bias": 8, "master_flat": 8, "ps_mask": 6, "bad_pixel_mask": 2,
                                          "small_scale_flat": 4}[kind]
            plan.tasks += (n + 1) * ntiles
        plan.steps.append(f"  {kind:<17}{key:<28}{n:>5} {'nights' if kind == 'master_flat' else 'frames'}  {status}")
    idx = sorted(read)
    plan.frames = Counter(zip(_strs(table["night"])[idx], _strs(table["telescope"])[idx], _strs(table["imagetyp"])[idx]))
    plan.steps.insert(0, f"products: {todo} to make, {done} already done, {skipped} would be skipped")
    plan.tasks_estimated = True
    return plan


def plan_calibrate(store_path: str | os.PathLike, out_dir: str | os.PathLike, config=None) -> Plan:
    """What ``calibrate`` would do: products to make and already made (the store's frame
    table and ``out_dir/manifest.json`` are read, nothing is computed or written)."""
    from .config import CalibConfig

    store = RawStore.open(store_path, mode="r")
    return _calib_plan(_store_table(store), store.frame_shape, tuple(store.group.attrs["tile"]), Path(out_dir),
                       config or CalibConfig())


def plan_reduce(store_path: str | os.PathLike, caldir: str | os.PathLike, out_path: str | os.PathLike,
                config=None, calib_config=None, fits_dir: str | os.PathLike | None = None) -> Plan:
    """What ``reduce`` would do: frames to reduce, already reduced, without calibrations (the
    stores' metadata and the calibration manifest are read, nothing is computed or written)."""
    import numpy as np

    from .config import CalibConfig
    from .store import ReducedStore

    raw = RawStore.open(store_path, mode="r")
    out_path = Path(out_path)
    red = ReducedStore.open(out_path, mode="r") if out_path.exists() and any(out_path.iterdir()) else None
    report = ReduceReport(out=str(out_path))
    coords, todo, new = _reduce_work(raw, red, caldir, calib_config or CalibConfig(), report)
    frames = [i for i, _, _ in todo] + [i for i, _ in new]
    sets = {cs for *_, cs in todo} | {cs for _, cs in new}
    npix = int(np.prod(raw.frame_shape))
    plan = Plan("reduce", str(out_path), tasks=len(frames),
                frames=Counter((str(coords["night"][i]), str(coords["telescope"][i]), "science") for i in frames),
                bytes_read=len(frames) * npix * 2 + len(sets) * npix * 10,
                bytes_written=len(frames) * npix * 5 * (2 if fits_dir else 1))
    plan.steps.append(f"{len(frames)} frames to reduce ({len(todo)} left unfinished by an earlier run), "
                      f"{report.already} already done, {len(report.failed)} without calibrations; "
                      f"one task per frame")
    plan.notes += sorted(set(report.notes))
    for reason, n in Counter(r for _, r in report.failed).items():
        plan.notes.append(f"{n} frames would fail: {reason}")
    return plan


def plan_run(raw_inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
             config: IngestConfig | None = None) -> Plan:
    """What ``run`` would do: the ingest, calibrate and reduce plans, from the headers and
    whatever an earlier run left in ``out_dir``; nothing is computed or written."""
    import numpy as np

    from .config import CalibConfig
    from .store import ReducedStore

    config = config or IngestConfig()
    out = Path(out_dir)
    ing, jobs, stored, shape, tile = _ingest_plan(raw_inputs, out / "raw.zarr", config)
    table = _concat(stored, _infos_table(jobs))
    cal = _calib_plan(table, shape, tile, out, CalibConfig())
    red_path = out / "reduced.zarr"
    done_keys: set[str] = set()
    if red_path.exists() and any(red_path.iterdir()):
        red = ReducedStore.open(red_path, mode="r")
        done_keys = set(map(str, red.coord("frame_key")[red.coord("reduced")]))
    types = _strs(table["imagetyp"])
    sci = [i for i, (t, k) in enumerate(zip(types, _strs(table["frame_key"]))) if t == "science" and k not in done_keys]
    n_sci = int((types == "science").sum())
    npix = int(np.prod(shape))
    red = Plan("reduce", str(red_path), tasks=len(sci), bytes_read=len(sci) * npix * 2,
               bytes_written=len(sci) * npix * 5,
               frames=Counter((str(table["night"][i]), str(table["telescope"][i]), "science") for i in sci))
    red.steps.append(f"{len(sci)} frames to reduce, {n_sci - len(sci)} already done; one task per frame, with "
                     "the calibrations above")
    parts = [ing, cal, red]
    all_frames = Counter(zip(_strs(table["night"]), _strs(table["telescope"]), types))
    return Plan("run", str(out), frames=all_frames, parts=parts, tasks=sum(p.tasks for p in parts),
                tasks_estimated=cal.tasks > 0, bytes_read=sum(p.bytes_read for p in parts), bytes_written=sum(p.bytes_written for p in parts))


# ----------------------------------------------------------------------------- characterize
@dataclass
class CharacterizeReport:
    """What ``characterize`` measured, and what it could not measure (with the reason).

    Attributes
    ----------
    out_dir : str
        The output folder.
    telescope : str
        The camera characterised.
    products : list of dict
        Manifest entries written.
    skipped : list of (str, str)
        Measurements that could not be made, and why.
    notes : list of str
        Things the user should know (a gain taken from the headers, flats left out...).
    results : dict
        The content of ``characterization.json``.
    """

    out_dir: str
    telescope: str = ""
    products: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every measurement could be made."""
        return not self.skipped

    def summary(self) -> str:
        """Human-readable summary: the headline numbers, then notes and skipped measurements."""
        r = self.results

        def fmt(key: str, unit: str, digits: int = 4) -> str:
            v = r.get(key)
            return f"{v:.{digits}f} {unit}" if isinstance(v, (int, float)) else "-"

        lines = [f"characterize {self.telescope} -> {self.out_dir}: {len(self.products)} products "
                 f"in {self.seconds:.1f} s",
                 f"  gain (Eq. 1) {fmt('gain_e_per_adu', 'e-/ADU')}, read noise {fmt('read_noise_e', 'e-', 3)}; "
                 f"per pixel (Eqs. 2-3) median gain {fmt('pixel_gain_median_e_per_adu', 'e-/ADU')}, "
                 f"median read noise {fmt('pixel_read_noise_median_e', 'e-', 3)}",
                 f"  dark current {fmt('dark_current_e_per_pix_s', 'e-/pix/s', 5)}"]
        lin = r.get("linearity") or {}
        if lin:
            nl = lin.get("max_abs_nonlinearity_above_floor_percent")
            lines.append(f"  linearity R2 {lin['r2']:.6f}, max |nonlinearity| above {lin['floor_adu']:.0f} ADU "
                         + (f"{nl:.3f} %" if nl is not None else "-"))
        bs = r.get("bias_stability") or {}
        an = r.get("anomalous_pixels") or {}
        if bs:
            lines.append(f"  bias {bs['clipped_mean_adu']:.3f} ADU, peak-to-peak {bs['peak_to_peak_adu']:.3f} ADU")
        if an:
            lines.append(f"  anomalous pixels: {an['fraction_below']:.4%} below, {an['fraction_above']:.4%} above "
                         f"the mean +-{an['nsigma']:g} sigma, {an['fraction_std_above']:.3%} noisy")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  SKIPPED {what}: {why}" for what, why in self.skipped]
        return "\n".join(lines)


def _json_ready(obj):
    """Numbers and containers as plain JSON (NaN and inf become null)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_ready(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def characterize(store_path: str | os.PathLike, out_dir: str | os.PathLike, client, config=None,
                 progress: bool = True, argv: list[str] | None = None,
                 telescope: str | None = None) -> CharacterizeReport:
    """Detector characterisation of one camera's lab set (Zhang et al. 2025, sections 2-3).

    From the bias, flat and dark frames of one telescope in a raw store: bias stability
    (Fig. 1), the combined bias and its fixed pattern (Fig. 2), anomalous pixels (Figs.
    3-6), dark current (Figs. 7-8), linearity (Fig. 9), gain and read noise by the
    photon-transfer method (Eq. 1, Table 3) and per pixel (Eqs. 2-3, Fig. 10). Writes
    ``out_dir/characterization.json``, FITS maps with provenance headers
    (``combined_bias_TEL``, ``anomalous_flags_TEL``, ``anomalous_density_TEL``,
    ``pixel_gain_TEL``, ``pixel_read_noise_TEL``), PNG figures (``figNN_*_TEL.png``) and an
    entry per product in ``out_dir/manifest.json``. Everything is computed in one
    ``client.compute`` call, so frames read by several measurements are read once. A
    measurement that cannot be made (no pairs of flats at equal exposure time, saturated
    flats, too few frames...) is reported with the reason and skipped; the others are
    still made.

    Parameters
    ----------
    store_path : path-like
        The raw store.
    out_dir : path-like
        Output folder (created).
    client : distributed.Client
    config : DetectorConfig, optional
    progress : bool
        Show a progress bar (on a terminal).
    argv : list of str, optional
        The command line recorded in the manifest.
    telescope : str, optional
        The camera to characterise; needed when the store holds several.

    Returns
    -------
    CharacterizeReport

    Raises
    ------
    BadInputError
        The store holds several telescopes and none was chosen, or not the one chosen.
    InsufficientDataError
        The store holds no frames.
    """
    import json

    import numpy as np
    from distributed import as_completed

    from . import __version__
    from .lab import detector as D
    from .config import DetectorConfig
    from .errors import InsufficientDataError
    from .io import write_product
    from .store import open_store

    config = config or DetectorConfig()
    t0 = time.perf_counter()
    ds = open_store(store_path)  # a missing store is an error before anything is written
    out = check_writable(out_dir, "the characterization")
    tels = sorted(set(map(str, ds.telescope.values)))
    if not tels:
        raise InsufficientDataError(f"{store_path}: the store holds no frames; ingest the lab set first")
    if telescope is None:
        if len(tels) > 1:
            raise BadInputError(None, f"the store holds frames of {', '.join(tels)}; characterise one camera at a "
                                      "time with --telescope")
        telescope = tels[0]
    elif telescope not in tels:
        raise BadInputError(None, f"no frames of telescope {telescope!r} in the store (it holds {', '.join(tels)})")
    tel = telescope
    tds = ds.isel(frame=np.flatnonzero(ds.telescope.values == tel))

    def frames_of(kind: str):
        f = tds.raw.isel(frame=np.flatnonzero(tds.imagetyp.values == kind))
        return f.isel(frame=np.argsort(f["time"].values, kind="stable"))

    bias, flats, darks = frames_of("bias"), frames_of("flat"), frames_of("dark")
    nights = sorted(set(map(str, tds.night.values)))
    night_label = nights[0] if len(nights) == 1 else f"{nights[0]}..{nights[-1]}"
    instrument = next((str(v) for v in tds.instrument.values if str(v)), "")
    report = CharacterizeReport(out_dir=str(out.resolve()), telescope=tel)
    manifest = Manifest(out)
    cfg = to_dict(config)
    ys, xs = D.central_region((ds.sizes["y"], ds.sizes["x"]), config)
    res: dict = {
        "telescope": tel, "instrument": instrument, "store": str(Path(store_path).resolve()), "nights": nights,
        "mstdask_version": __version__, "config": cfg,
        "frames": {"bias": bias.sizes["frame"], "flat": flats.sizes["frame"], "dark": darks.sizes["frame"]},
        "region": {"y": [ys.start, ys.stop], "x": [xs.start, xs.stop]},
        "bias_stability": None, "combined_bias": None, "anomalous_pixels": None,
        "dark_current_e_per_pix_s": None, "dark_current": None, "linearity": None,
        "gain_e_per_adu": None, "read_noise_e": None, "photon_transfer": None,
        "pixel_gain_median_e_per_adu": None, "pixel_read_noise_median_e": None, "pixel_gain": None,
        "figures": {}, "skipped": {}, "notes": report.notes,
    }

    def skip(what: str, why: str) -> None:
        report.skipped.append((what, why))
        res["skipped"][what] = why

    # 1. Lazy graphs. What the frame list already rules out is skipped here, with the reason.
    lazy: dict[str, dict] = {}

    def build(name: str, make) -> None:
        try:
            lazy[name] = make()
        except MstdaskError as exc:
            skip(name, str(exc))

    need = {"bias": (bias, config.min_bias_frames), "flat": (flats, 1), "dark": (darks, 1)}
    missing = {k: f"{f.sizes['frame']} {k} frame(s) of {tel} in the store, at least {n} needed"
               for k, (f, n) in need.items() if f.sizes["frame"] < n}
    requires = {"bias_stability": ["bias"], "combined_bias": ["bias"], "anomalous_pixels": ["bias"],
                "linearity": ["bias", "flat"], "photon_transfer": ["bias", "flat"], "pixel_gain": ["bias", "flat"],
                "dark_current": ["bias", "dark"]}
    bm = level = None
    if "bias" not in missing:
        bm = D.frame_moments(bias, config)
        level = D.bias_level(bm, config)
    makers = {
        "bias_stability": lambda: D.bias_stability(bias, config),
        "combined_bias": lambda: {"mean": bm["mean"].astype(np.float32), "std": bm["std"].astype(np.float32),
                                  "level": level, **D.fixed_pattern(bm["mean"], config)},
        "anomalous_pixels": lambda: D.anomalous_pixels(bm, config),
        "linearity": lambda: D.linearity(flats, level, config),
        "photon_transfer": lambda: D.photon_transfer(flats, bias, level, config),
        "pixel_gain": lambda: D.pixel_gain(flats, bm, config),
        "dark_current": lambda: D.dark_current(darks, bm, config),
    }
    for name, kinds in requires.items():
        lacking = [missing[k] for k in kinds if k in missing]
        if lacking:
            skip(name, "; ".join(lacking))
        else:
            build(name, makers[name])

    # 2. One compute for everything (shared reads and moments are done once); each
    # measurement is gathered on its own, so one that fails leaves the others standing.
    wanted = {"bias_stability": ("frame_mean", "summary"), "combined_bias": ("mean", "std", "level", "summary"),
              "anomalous_pixels": ("flags", "density", "mean_centre", "mean_spread", "std_centre", "std_spread",
                                   "low_threshold", "high_threshold", "std_threshold", "fraction_below",
                                   "fraction_above", "fraction_std_above", "fraction_any"),
              "linearity": ("summary",), "photon_transfer": ("summary",),
              "pixel_gain": ("gain", "read_noise", "summary"), "dark_current": ("summary", "longest")}
    # plain Dask arrays only: dask 2026.8 mixes up results of Delayed and arrays computed together
    items = [(name, key, getattr(lazy[name][key], "data", lazy[name][key])) for name in lazy for key in wanted[name]]
    futures = client.compute([obj for _, _, obj in items], retries=TASK_RETRIES) if items else []
    with _bar(len(futures), f"characterize {tel}: compute", progress, unit="result") as bar:
        for _ in as_completed(futures):
            bar.update()
    got: dict[str, dict] = {}
    for name in lazy:
        try:
            got[name] = {key: fut.result() for (n, key, _), fut in zip(items, futures) if n == name}
        except MstdaskError as exc:
            skip(name, str(exc))
    client.cancel(futures)

    # 3. Products: FITS maps and figures, each under a temporary name and renamed.
    n_files = {"bias_stability": 1, "combined_bias": 2, "anomalous_pixels": 6 if "combined_bias" in got else 0,
               "photon_transfer": 1, "linearity": 1, "pixel_gain": 3, "dark_current": 2}
    wbar = _bar(sum(n_files[name] for name in got) + 1, f"characterize {tel}: write", progress, unit="file")

    def product(kind: str, fname: str, data, inputs: list[str], method: str, extra: dict | None = None,
                **entry) -> str:
        path = out / fname
        with _writing(out, f"the {kind} map"):
            write_product(path, data, kind=kind, telescope=tel, night=night_label, inputs=inputs, method=method,
                          params={k: cfg[k] for k in entry.pop("params", [])}, extra=extra)
        report.products.append(manifest.add(kind, path, telescope=tel, filter="", night=nights, inputs=inputs,
                                            config=cfg, **entry))
        wbar.update()
        return fname

    def figure(number: int, what: str, fig, inputs: list[str]) -> None:
        # a bare matplotlib Figure (no pyplot): PNG through Agg whatever the session's backend
        fname = f"fig{number:02d}_{what}_{tel}.png"
        try:
            _write_png(fig, out / fname)
        except OSError as exc:
            if not _is_fs_error(exc):
                raise
            raise _write_error(exc, out, f"figure {fname}") from None
        res["figures"][f"fig{number:02d}_{what}"] = fname
        report.products.append(manifest.add("figure", out / fname, telescope=tel, filter="", night=nights,
                                            inputs=inputs, config=cfg, figure=number, what=what))
        wbar.update()

    def item(x):
        return x.item() if isinstance(x, np.ndarray) and x.dtype == object else x

    bias_paths = [str(p) for p in bias["path"].values]
    flat_paths = [str(p) for p in flats["path"].values]
    dark_paths = [str(p) for p in darks["path"].values]

    if "bias_stability" in got:
        g = got["bias_stability"]
        res["bias_stability"] = {"n_frames": len(g["frame_mean"]), "clip_sigma": config.bias_clip_sigma,
                                 **item(g["summary"]), "frame_mean_adu": g["frame_mean"],
                                 "time_utc": [str(t)[:23] for t in bias["time"].values]}
        figure(1, "bias_stability", D.plot_bias_stability(g["frame_mean"], item(g["summary"]),
                                                          f"{tel}: bias stability (Fig. 1)"), bias_paths)
    if "combined_bias" in got:
        g = got["combined_bias"]
        fname = product("combined_bias", f"combined_bias_{tel}.fits", g["mean"], bias_paths,
                        f"mean of {bias.sizes['frame']} bias frames", {"BUNIT": "adu"})
        res["combined_bias"] = {"path": fname, "n_frames": bias.sizes["frame"],
                                "mean_adu_central_region": float(g["level"]),
                                "fixed_pattern": item(g["summary"])}
        title = f"{tel}: combined bias of {bias.sizes['frame']} frames (Fig. 2)"
        figure(2, "combined_bias", D.plot_combined_bias(g["mean"], title), bias_paths)
    if "anomalous_pixels" in got and "combined_bias" in got:
        g, cb = got["anomalous_pixels"], got["combined_bias"]
        k = config.anomalous_nsigma
        f_flags = product("anomalous_flags", f"anomalous_flags_{tel}.fits", g["flags"], bias_paths,
                          f"per-pixel mean/std of bias beyond {k:g} sigma",
                          {"FLAGLOW": (1, "mean below centre - n sigma"),
                           "FLAGHIGH": (2, "mean above centre + n sigma"),
                           "FLAGSTD": (4, "std above centre + n sigma")}, params=["anomalous_nsigma"])
        f_dens = product("anomalous_density", f"anomalous_density_{tel}.fits", g["density"], bias_paths,
                         f"anomalous pixels per {config.subarea_px}x{config.subarea_px} px",
                         {"SUBAREA": (config.subarea_px, "[px] sub-area edge")}, params=["subarea_px"])
        sc = {key: float(g[key]) for key in wanted["anomalous_pixels"] if key not in ("flags", "density")}
        res["anomalous_pixels"] = {
            "nsigma": k, "clip_sigma": config.anomalous_clip_sigma, "n_frames": bias.sizes["frame"],
            "per_pixel_mean": {"mean_adu": sc["mean_centre"], "std_adu": sc["mean_spread"],
                               "low_threshold_adu": sc["low_threshold"], "high_threshold_adu": sc["high_threshold"]},
            "per_pixel_std": {"mean_adu": sc["std_centre"], "std_adu": sc["std_spread"],
                              "threshold_adu": sc["std_threshold"]},
            "fraction_below": sc["fraction_below"], "fraction_above": sc["fraction_above"],
            "fraction_std_above": sc["fraction_std_above"], "fraction_any": sc["fraction_any"],
            "subarea_px": config.subarea_px, "density_max": int(g["density"].max()),
            "flags_path": f_flags, "density_path": f_dens}
        figure(3, "bias_mean_histogram", D.plot_pixel_histogram(
            cb["mean"], sc["mean_centre"], sc["mean_spread"], k, "per-pixel mean over bias frames [ADU]",
            f"{tel}: {sc['fraction_below']:.3%} below, {sc['fraction_above']:.3%} above mean ±{k:g}σ (Fig. 3)"),
            bias_paths)
        figure(4, "bias_std_histogram", D.plot_pixel_histogram(
            cb["std"], sc["std_centre"], sc["std_spread"], k, "per-pixel std over bias frames [ADU]",
            f"{tel}: {sc['fraction_std_above']:.3%} above the {k:g}σ threshold (Fig. 4)", two_sided=False),
            bias_paths)
        figure(5, "anomalous_density", D.plot_anomalous_density(
            g["density"], config.subarea_px, f"{tel}: anomalous pixels per {config.subarea_px}×"
                                              f"{config.subarea_px} px (Fig. 5)"), bias_paths)
        figure(6, "bias_mean_vs_std",
               D.plot_mean_vs_std(cb["mean"], cb["std"], f"{tel}: per-pixel mean vs std (Fig. 6)"), bias_paths)

    gain_source = None
    if "photon_transfer" in got:
        s = item(got["photon_transfer"]["summary"])
        res["gain_e_per_adu"], res["read_noise_e"] = s["gain_e_per_adu"], s["read_noise_e"]
        res["photon_transfer"] = {"region": res["region"], "min_adu": config.ptc_min_adu,
                                  "max_adu": config.ptc_max_adu, **s}
        gain_source = ("photon transfer (Eq. 1)", s["gain_e_per_adu"])
        figure(11, "photon_transfer", D.plot_photon_transfer(s, f"{tel}: photon transfer (Eq. 1)"),
               flat_paths + bias_paths)
    if "linearity" in got:
        s = item(got["linearity"]["summary"])
        res["linearity"] = s
        if s["saturated_exptime_s"]:
            report.notes.append(f"linearity: flats at {', '.join(f'{t:g}' for t in s['saturated_exptime_s'])} s are "
                                f"saturated (>= {config.saturation_adu:.0f} ADU) and left out of the fit")
        figure(9, "linearity", D.plot_linearity(s, f"{tel}: linearity (Fig. 9)"), flat_paths)
    if "pixel_gain" in got:
        g = got["pixel_gain"]
        s = item(g["summary"])
        attrs = lazy["pixel_gain"]["gain"].attrs
        inputs = list(attrs["inputs"])
        method = f"Eqs. 2-3: {attrs['nflats']} flats at {attrs['exptime']:g} s, {attrs['nbias']} bias"
        f_gain = product("pixel_gain_map", f"pixel_gain_{tel}.fits", g["gain"], inputs, method,
                         {"BUNIT": "electron/adu", "EXPTIME": (attrs["exptime"], "[s] of the series of flats")})
        f_rn = product("pixel_read_noise_map", f"pixel_read_noise_{tel}.fits", g["read_noise"], inputs, method,
                       {"BUNIT": "electron"})
        res["pixel_gain_median_e_per_adu"] = s["gain_median"]
        res["pixel_read_noise_median_e"] = s["read_noise_median"]
        res["pixel_gain"] = {"exptime_s": attrs["exptime"], "n_flats": attrs["nflats"], "n_bias": attrs["nbias"],
                             "valid_fraction": s["valid_fraction"], "gain_map_path": f_gain,
                             "read_noise_map_path": f_rn,
                             "gain_percentiles_e_per_adu": np.nanpercentile(g["gain"], [5, 25, 50, 75, 95]),
                             "read_noise_percentiles_e": np.nanpercentile(g["read_noise"], [5, 25, 50, 75, 95])}
        figure(10, "pixel_gain_read_noise",
               D.plot_pixel_gain(g["gain"], g["read_noise"], s, f"{tel}: per-pixel gain and read noise (Fig. 10)"),
               inputs)
    if "dark_current" in got:
        g = got["dark_current"]
        s = item(g["summary"])
        if gain_source is None:
            egain = np.asarray(darks["egain"].values, dtype=np.float64)
            egain = egain[np.isfinite(egain) & (egain > 0)]
            if egain.size:
                gain_source = ("EGAIN of the dark headers", float(np.median(egain)))
                report.notes.append(f"dark current: no photon-transfer gain, converted with EGAIN = "
                                    f"{gain_source[1]:g} e-/ADU from the headers")
        if gain_source is not None:
            s = {**D.dark_in_electrons(s, gain_source[1]), "gain_source": gain_source[0]}
            res["dark_current_e_per_pix_s"] = s["dark_current_e_per_pix_s"]
        else:
            skip("dark_current_e_per_pix_s", "no gain to convert the dark current to electrons (no photon-transfer "
                                             "gain and no EGAIN in the dark headers); dark_current has it in ADU/s")
        res["dark_current"] = {"region": res["region"], "clip_sigma": config.dark_clip_sigma, **s}
        figure(7, "dark_current", D.plot_dark_current(s, f"{tel}: dark current (Fig. 7)"), dark_paths + bias_paths)
        figure(8, "dark_histogram", D.plot_dark_histogram(
            g["longest"], float(np.max(darks["exptime"].values)),
            f"{tel}: longest dark minus combined bias, central region (Fig. 8)"), dark_paths + bias_paths)

    jpath = out / "characterization.json"
    tmp = out / ".characterization.json.tmp"
    with _writing(out, "characterization.json"):
        try:
            tmp.write_text(json.dumps(_json_ready(res), indent=2) + "\n")
            os.replace(tmp, jpath)
        except OSError:
            _unlink(tmp)
            raise
    wbar.update()
    wbar.close()
    report.products.append(manifest.add("characterization", jpath, telescope=tel, filter="", night=nights,
                                        inputs=bias_paths + flat_paths + dark_paths, config=cfg,
                                        skipped=dict(res["skipped"])))
    manifest.record_run(argv, products=len(report.products), skipped=len(report.skipped))
    with _writing(out, "the manifest"):
        manifest.write()
    report.results = _json_ready(res)
    report.seconds = time.perf_counter() - t0
    return report


__all__ += ["CharacterizeReport", "characterize"]


# ----------------------------------------------------------------------------- photometry (STATIC)
@dataclass
class PhotometryReport:
    """What ``photometry`` did: exposures measured now, already done, flagged, failed."""

    out_dir: str
    measured: list[str] = field(default_factory=list)
    already: int = 0
    flagged: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    exposure_seconds: list[float] = field(default_factory=list)
    sources: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no exposure failed with an error (flagged exposures are data, not errors)."""
        return not self.failed

    def summary(self) -> str:
        """Human-readable summary."""
        per = (f", median {sorted(self.exposure_seconds)[len(self.exposure_seconds) // 2]:.1f} s per exposure "
               "in its task") if self.exposure_seconds else ""
        lines = [f"photometry {self.out_dir}: {len(self.measured)} exposures measured ({self.sources} sources), "
                 f"{self.already} already done, {len(self.flagged)} flagged, {len(self.failed)} failed "
                 f"in {self.seconds:.1f} s{per}"]
        lines += [f"  FLAGGED {e}: {why}" for e, why in self.flagged]
        lines += [f"  FAILED {e}: {why}" for e, why in self.failed]
        return "\n".join(lines)


def _flag_clouds(records: list[dict], drop: float) -> list[dict]:
    """Flag exposures whose zero point is ``drop`` mag below their night's median; returns them."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("zero_point") is not None:
            groups.setdefault((r.get("night"), r.get("telescope"), r.get("filter")), []).append(r)
    flagged = []
    for rows in groups.values():
        if len(rows) < 3:
            continue
        med = float(np.median([r["zero_point"] for r in rows]))
        for r in rows:
            if r["zero_point"] < med - drop:
                r["status"] = "flagged"
                r["reason"] = (f"zero point {r['zero_point']:.3f} is {med - r['zero_point']:.2f} mag below the "
                               f"night's median {med:.3f}: clouds?")
                flagged.append(r)
    return flagged


def _write_exposure_table(path: Path, records: list[dict]) -> None:
    """The per-exposure table (:data:`mstdask.photometry.EXPOSURE_SCHEMA`), replaced atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .static.photometry import EXPOSURE_SCHEMA

    cast = {"string": str, "int64": int, "float64": float, "timestamp": int}
    cols = {}
    for name, kind in EXPOSURE_SCHEMA.items():
        vals = [None if r.get(name) is None else cast[kind](r[name]) for r in records]
        if kind == "timestamp":  # stored as ns since 1970 (the stores' convention)
            cols[name] = pa.array(vals, pa.int64()).cast(pa.timestamp("ns", tz="UTC"))
        else:
            cols[name] = pa.array(vals, pa.type_for_alias(kind))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)


def _exposure_frames(telescopes, times, reduced) -> dict[str, int]:
    """The ``exposure`` name (:func:`mstdask.photometry.exposure_id`) of every reduced frame of
    a store and its frame index; two exposures started in the same second get ``_INDEX``."""
    import numpy as np

    from .static.photometry import exposure_id

    names: dict[str, int] = {}
    for i in np.flatnonzero(reduced):
        exp = exposure_id(str(telescopes[i]), int(times[i]))
        names[f"{exp}_{i}" if exp in names else exp] = int(i)
    return names


def _ok_exposures(catdir: Path, skipped: list[tuple[str, str]]) -> list[dict]:
    """The rows of ``CATDIR/exposures.parquet`` with status ok, with ``time_ns``; the others
    are added to ``skipped`` with their status and reason."""
    import pyarrow.parquet as pq

    table_path = catdir / "exposures.parquet"
    if not table_path.exists():
        raise BadInputError(str(table_path), "no exposure table: CATDIR must be the output folder of "
                                             "`mstdask photometry`")
    out = []
    for r in pq.read_table(table_path).to_pylist():
        if r.get("status") != "ok":
            skipped.append((str(r.get("exposure")), f"status {r.get('status')}: {r.get('reason') or ''}".strip()))
            continue
        t = r.get("time")
        r["time_ns"] = int(t.timestamp() * 1e9) if hasattr(t, "timestamp") else int(t or 0)
        out.append(r)
    return out


def photometry(reduced_path: str | os.PathLike, refcat_path: str | os.PathLike, out_dir: str | os.PathLike, client,
               config=None, astro_config=None, refcat_config=None, progress: bool = True,
               argv: list[str] | None = None) -> PhotometryReport:
    """STATIC for every reduced exposure: ``OUT/sources/NIGHT/EXPOSURE.parquet`` (one
    partitioned Parquet dataset of sources) and ``OUT/exposures.parquet`` (one row per
    exposure), listed in ``OUT/manifest.json`` as ``source_catalog`` and ``exposure_table``.

    One task per exposure (:func:`mstdask.photometry.photometry_task`). An exposure that
    cannot be calibrated (no stars, no astrometric match, too few calibration stars) is
    *flagged* with its reason; an exposure whose task raises is *failed*; the others finish.
    A rerun measures only exposures without a source file.
    """
    import numpy as np

    from .config import AstrometryConfig, PhotometryConfig, RefcatConfig
    from .static.photometry import SOURCE_COLUMNS, photometry_task, read_exposure_record
    from .store import ReducedStore

    config = config or PhotometryConfig()
    astro_config = astro_config or AstrometryConfig()
    refcat_config = refcat_config or RefcatConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    report = PhotometryReport(out_dir=str(out.resolve()))
    red = ReducedStore.open(reduced_path, mode="r")
    refcat_path = Path(refcat_path)
    if not refcat_path.exists():
        raise BadInputError(str(refcat_path), "reference catalogue not found; check --refcat")
    check_writable(out, "the catalogues")
    c = {name: red.coord(name) for name in ("reduced", "time", "night", "telescope", "filter", "exptime", "ra",
                                            "dec", "egain", "path")}
    records: dict[str, dict] = {}
    futures, meta_of = [], {}
    for exp, i in _exposure_frames(c["telescope"], c["time"], c["reduced"]).items():
        night = str(c["night"][i]) or "unknown"
        fpath = out / "sources" / night / f"{exp}.parquet"
        texp = float(c["exptime"][i])
        meta = {"exposure": exp, "path": str(c["path"][i]), "night": night, "telescope": str(c["telescope"][i]),
                "filter": str(c["filter"][i]), "time": int(c["time"][i]),
                "mjd_mid": float(int(c["time"][i]) / 86400e9 + 40587.0 + (texp / 2 if np.isfinite(texp) else 0) / 86400)}
        if fpath.exists():
            try:
                records[exp] = read_exposure_record(fpath)
                report.already += 1
                continue
            except Exception:  # unreadable leftover: measure again
                fpath.unlink()
        ra0, dec0 = float(c["ra"][i]), float(c["dec"][i])
        if not (np.isfinite(ra0) and np.isfinite(dec0)):
            rec = {**meta, "status": "flagged",
                   "reason": "no RA/DEC pointing in the header: the blind solve starts from it; add RA/DEC "
                             "(degrees) or OBJCTRA/OBJCTDEC to the raw headers"}
            records[exp] = rec
            report.flagged.append((exp, rec["reason"]))
            continue
        gain = float(c["egain"][i]) if np.isfinite(c["egain"][i]) and c["egain"][i] > 0 else None
        fut = client.submit(photometry_task, str(reduced_path), int(i), str(fpath), str(refcat_path.resolve()),
                            refcat_config, meta, texp, ra0, dec0, gain, config, astro_config, pure=False,
                            retries=1, key=f"static-{i}-{os.getpid()}-{time.time_ns()}")
        futures.append(fut)
        meta_of[fut.key] = meta
    from distributed import as_completed

    try:
        with _bar(len(futures), "photometry", progress, unit="exposure") as bar:
            for fut in as_completed(futures):
                meta = meta_of[fut.key]
                try:
                    rec = fut.result()
                except Exception as exc:  # one bad exposure never ends the run ...
                    if _stops_the_run(exc, [out]):  # ... but a full disk or a read-only output does
                        raise _write_error(exc, out, "the source catalogues", "; exposures already written are "
                                           "kept: run the same command again") from None
                    reason = f"{type(exc).__name__}: {exc}"
                    report.failed.append((meta["exposure"], reason))
                    records[meta["exposure"]] = {**meta, "status": "failed", "reason": reason}
                else:
                    records[meta["exposure"]] = rec
                    if rec.get("status") == "ok":
                        report.measured.append(meta["exposure"])
                        report.sources += int(rec.get("n_sources") or 0)
                        report.exposure_seconds.append(float(rec.get("seconds") or 0.0))
                    else:
                        report.flagged.append((meta["exposure"], rec.get("reason", "")))
                bar.update()
    finally:
        client.cancel(futures)
        recs = sorted(records.values(), key=lambda r: (str(r.get("telescope")), int(r.get("time") or 0)))
        report.flagged += [(r["exposure"], r["reason"]) for r in _flag_clouds(recs, config.cloud_zp_drop_mag)]
        table_path = out / "exposures.parquet"
        with _writing(out, "the exposure table"):
            _write_exposure_table(table_path, recs)
        ok = [r for r in recs if r.get("catalog")]
        cfg = {"photometry": to_dict(config), "astrometry": to_dict(astro_config), "refcat": to_dict(refcat_config)}
        manifest = Manifest(out)
        common = dict(telescope=sorted({str(r.get("telescope")) for r in recs}),
                      filter=sorted({str(r.get("filter")) for r in recs}),
                      night=sorted({str(r.get("night")) for r in recs}), config=cfg)
        if ok:
            manifest.add("source_catalog", out / "sources", inputs=[str(Path(reduced_path).resolve()),
                                                                     str(refcat_path.resolve())],
                         exposures=len(ok), sources=int(sum(int(r.get("n_sources") or 0) for r in ok)),
                         columns=list(SOURCE_COLUMNS),
                         format="parquet dataset: sources/NIGHT/EXPOSURE.parquet", **common)
        manifest.add("exposure_table", table_path, inputs=[str(Path(reduced_path).resolve())],
                     exposures=len(recs), ok=sum(r.get("status") == "ok" for r in recs),
                     flagged=sum(r.get("status") == "flagged" for r in recs),
                     failed=sum(r.get("status") == "failed" for r in recs), **common)
        manifest.record_run(argv, measured=len(report.measured), flagged=len(report.flagged),
                            failed=len(report.failed))
        with _writing(out, "the manifest"):
            manifest.write()
    report.seconds = time.perf_counter() - t0
    return report

__all__ += ["PhotometryReport", "photometry"]


# ----------------------------------------------------------------------------- light curves
@dataclass
class LightcurveReport:
    """What ``lightcurves`` did: exposures added to the cube, already there, failed."""

    out_path: str
    added: list[str] = field(default_factory=list)
    already: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    sources: int = 0
    new_sources: int = 0
    epochs: int = 0
    rows: int = 0
    matched: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no exposure failed (exposures flagged by ``photometry`` are skipped, not failures)."""
        return not self.failed

    def summary(self) -> str:
        """Human-readable summary."""
        rate = f", {self.rows / self.seconds:,.0f} rows/s" if self.seconds > 0 and self.rows else ""
        lines = [f"lightcurves {self.out_path}: {len(self.added)} exposures added ({self.rows} detections, "
                 f"{self.matched} matched{rate}), {self.already} already in the cube, {len(self.skipped)} skipped, "
                 f"{len(self.failed)} failed; cube {self.sources} sources ({self.new_sources} new) x {self.epochs} "
                 f"epochs in {self.seconds:.1f} s"]
        lines += [f"  NOTE {n}" for n in self.notes]
        lines += [f"  SKIPPED {e}: {why}" for e, why in self.skipped]
        lines += [f"  FAILED {e}: {why}" for e, why in self.failed]
        return "\n".join(lines)


def _catalog_exposures(catdir: Path, report: LightcurveReport) -> list[dict]:
    """The ``ok`` exposures of a ``photometry`` output folder with their source files, by time."""
    out = []
    for r in _ok_exposures(catdir, report.skipped):
        exp = str(r.get("exposure"))
        path = catdir / "sources" / str(r.get("night") or "unknown") / f"{exp}.parquet"
        if not path.exists():
            report.failed.append((exp, f"{path}: source file missing; run `mstdask photometry` again"))
            continue
        r["file"] = str(path.resolve())
        out.append(r)
    return sorted(out, key=lambda r: (r["time_ns"], r["exposure"]))


def _catalog_refcat(catdir: Path, refcat_path, filt: str | None, report: LightcurveReport):
    """The reference catalogue ``photometry`` used (from CATDIR/manifest.json), or ``refcat_path``."""
    from .config import RefcatConfig
    from .static.refcat import load_refcat

    cfg: dict = {}
    if refcat_path is None:
        entry = Manifest(catdir).get("sources")
        if entry is None or len(entry.get("inputs", [])) < 2:
            report.notes.append("no reference catalogue recorded in CATDIR/manifest.json: sources are built from "
                                "detections only (give --refcat to use one)")
            return None
        refcat_path = entry["inputs"][1]
        cfg = (entry.get("config") or {}).get("refcat") or {}
    try:
        return load_refcat(refcat_path, RefcatConfig(**cfg), filt)
    except (MstdaskError, OSError, TypeError) as exc:
        report.notes.append(f"reference catalogue {refcat_path} not usable ({exc}): sources are built from "
                            "detections only")
        return None


#: Exposures per cross-match task of the first pass of ``lightcurves``.
_MATCH_GROUP = 8


def lightcurves(catdir: str | os.PathLike, out_path: str | os.PathLike, client, config=None,
                progress: bool = True, argv: list[str] | None = None, refcat_path: str | os.PathLike | None = None
                ) -> LightcurveReport:
    """Cross-match every ``ok`` exposure of CATDIR to one master source list and write the
    source x epoch cube ``out_path`` (:mod:`mstdask.lightcurves`), listed as
    ``lightcurve_cube`` in ``manifest.json`` of its parent folder.

    Master list: the cube's sources, then the reference stars ``photometry`` used that are
    detected (1", ``ref_id``), then new sources: friends-of-friends groups of the
    detections that match neither (mean position). Two passes over the catalogues, one task
    per block of ``epoch_chunk`` exposures each: which sources are seen (the driver only
    receives the unmatched positions), then match and write the block's chunk column.
    Resumable: exposures already written are skipped; a block that failed is redone by the
    next run in the same epochs; new exposures are appended (the cube grows along
    ``epoch``, and along ``source`` for new sources, without rewriting finished chunks).
    """
    import numpy as np
    from distributed import as_completed

    from .lightcurves import _lc_kernels as LK
    from .config import LightcurveConfig
    from .lightcurves.cube import CubeStore, match_task, write_task

    t0 = time.perf_counter()
    catdir, out = Path(catdir), Path(out_path)
    report = LightcurveReport(out_path=str(out.resolve()))
    exps = _catalog_exposures(catdir, report)
    check_writable(out.parent, "the light-curve cube")
    if (out / "zarr.json").exists():
        cube = CubeStore.open(out)
        stored = cube.group.attrs.get("config", {})
        config = config or LightcurveConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
        if cube.chunks != (config.source_chunk, config.epoch_chunk):
            report.notes.append(f"the cube's chunks {cube.chunks} are kept (config asks "
                                f"{(config.source_chunk, config.epoch_chunk)})")
    else:
        config = config or LightcurveConfig()
        with _writing(out.parent, "the light-curve cube"):
            cube = CubeStore.create(out, config)
    radius, magcol = config.match_radius_arcsec, config.magnitude
    sc, ec = cube.chunks

    # what is there: written epochs are skipped, unwritten ones (a killed run) redone in place
    slot_of = {str(e): i for i, e in enumerate(cube.coord("exposure"))}
    written = cube.coord("written")
    redo, new = [], []
    for r in exps:
        i = slot_of.get(str(r["exposure"]))
        if i is None:
            new.append(r)
        elif written[i]:
            report.already += 1
        else:
            redo.append((i, r))
    todo = redo + [(None, r) for r in new]
    if todo:
        # pass 1: which candidates are detected, and where the unmatched detections are
        master_ra, master_dec = cube.coord("ra"), cube.coord("dec")
        ref_known = cube.coord("ref_id")
        refcat = _catalog_refcat(catdir, refcat_path, str(todo[0][1].get("filter") or ""), report) \
            if config.use_refcat else None
        if refcat is not None and len(refcat):
            ref_rows = np.setdiff1d(np.arange(len(refcat)), ref_known[ref_known >= 0])
        else:
            ref_rows = np.empty(0, np.int64)
        cand_ra = np.concatenate([master_ra, refcat.ra[ref_rows] if len(ref_rows) else []])
        cand_dec = np.concatenate([master_dec, refcat.dec[ref_rows] if len(ref_rows) else []])
        blocks: list[list[tuple[int | None, dict]]] = []
        n_old = cube.shape[1]
        # new exposures go into slots n_old, n_old + 1, ...: group by chunk column
        planned = [(i if i is not None else n_old + k - len(redo), r) for k, (i, r) in enumerate(todo)]
        for col in sorted({s // ec for s, _ in planned}):
            blocks.append([(s, r) for s, r in planned if s // ec == col])
        cra, cdec = client.scatter([cand_ra, cand_dec], broadcast=True)
        # pass 1 writes nothing: smaller groups than a chunk column keep both workers busy on
        # short runs (one k-d tree per group)
        groups = [b[i:i + _MATCH_GROUP] for b in blocks for i in range(0, len(b), _MATCH_GROUP)]
        futs = {client.submit(match_task, [r["file"] for _, r in g], cra, cdec, radius, magcol, pure=False,
                              retries=TASK_RETRIES): g for g in groups}
        hits, ura, udec, bad = [], [], [], set()
        try:
            with _bar(len(futs), "lightcurves: match", progress, unit="block") as bar:
                for fut in as_completed(list(futs)):
                    try:
                        res = fut.result()
                    except Exception as exc:  # one bad catalogue never ends the run
                        for _, r in futs[fut]:
                            bad.add(id(r))
                            report.failed.append((r["exposure"], f"{type(exc).__name__}: {exc}"))
                    else:
                        hits.append(res["hit"])
                        ura.append(res["ra"])
                        udec.append(res["dec"])
                        for f, problem in res["bad"]:  # an unreadable catalogue: that exposure only
                            r = next(r for _, r in futs[fut] if r["file"] == f)
                            bad.add(id(r))
                            report.failed.append((r["exposure"], problem))
                    bar.update()
        finally:
            client.cancel(list(futs))
        blocks = [kept for b in blocks if (kept := [(sl, r) for sl, r in b if id(r) not in bad])]
        hit = np.unique(np.concatenate(hits)) if hits else np.empty(0, np.int64)
        ref_hit = ref_rows[hit[hit >= len(master_ra)] - len(master_ra)]
        nra, ndec, _ = LK.cluster_positions(np.concatenate(ura) if ura else np.empty(0),
                                            np.concatenate(udec) if udec else np.empty(0), radius)
        new_src = {"ra": np.concatenate([refcat.ra[ref_hit] if len(ref_hit) else [], nra]),
                   "dec": np.concatenate([refcat.dec[ref_hit] if len(ref_hit) else [], ndec]),
                   "ref_id": np.concatenate([ref_hit, np.full(len(nra), -1)]).astype(np.int64),
                   "ref_mag": np.concatenate([refcat.mag[ref_hit] if len(ref_hit) else [],
                                              np.full(len(nra), np.nan)]).astype(np.float32)}
        report.new_sources = len(nra)
        # grow the cube: sources first, then the new epochs (written=False until their block is done)
        alive = {id(r) for b in blocks for _, r in b}
        keep_new = [r for s, r in planned if s >= n_old and id(r) in alive]
        with _writing(out, "the light-curve cube"):
            cube.add_sources(new_src)
            slots = cube.add_epochs({
                "exposure": [r["exposure"] for r in keep_new], "time": [r["time_ns"] for r in keep_new],
                "mjd_mid": [r.get("mjd_mid") for r in keep_new], "night": [r.get("night") for r in keep_new],
                "telescope": [r.get("telescope") for r in keep_new], "filter": [r.get("filter") for r in keep_new],
                "zero_point": [r.get("zero_point") for r in keep_new]})
            cube.consolidate()
        # the slots of the new exposures shift down when a failed block dropped some
        slot_new = dict(zip((r["exposure"] for r in keep_new), slots))
        blocks = [[(slot_new.get(r["exposure"], s) if s >= n_old else s, r) for s, r in b] for b in blocks]
        regroup: dict[int, list] = {}
        for b in blocks:
            for s, r in b:
                regroup.setdefault(s // ec, []).append((s, r))
        # pass 2: match and write, one chunk column per task
        mra, mdec = client.scatter([cube.coord("ra"), cube.coord("dec")], broadcast=True)
        futs = {client.submit(write_task, str(out.resolve()), [r["file"] for _, r in b], [s for s, _ in b], mra,
                              mdec, radius, magcol, pure=False, retries=TASK_RETRIES): b
                for b in regroup.values()}
        try:
            with _bar(len(futs), "lightcurves: write", progress, unit="block") as bar:
                for fut in as_completed(list(futs)):
                    b = futs[fut]
                    try:
                        res = fut.result()
                    except Exception as exc:
                        if _stops_the_run(exc, [out]):
                            raise _write_error(exc, out, "the light-curve cube", "; blocks already written are "
                                               "kept: run the same command again") from None
                        for _, r in b:
                            report.failed.append((r["exposure"], f"{type(exc).__name__}: {exc}"))
                    else:
                        cube.mark_written(res["slots"])
                        report.added += [r["exposure"] for _, r in b]
                        report.rows += res["rows"]
                        report.matched += res["matched"]
                    bar.update()
        finally:
            client.cancel(list(futs))
            cube.consolidate()
    report.sources, report.epochs = cube.shape[0], int(cube.coord("written").sum())
    manifest = Manifest(out.parent)
    ok_exps = [r for r in exps]
    manifest.add("lightcurve_cube", out, telescope=sorted({str(r.get("telescope")) for r in ok_exps}),
                 filter=sorted({str(r.get("filter")) for r in ok_exps}),
                 night=sorted({str(r.get("night")) for r in ok_exps}),
                 inputs=[str((catdir / "sources").resolve()), str((catdir / "exposures.parquet").resolve())],
                 config=to_dict(config), sources=report.sources, epochs=report.epochs,
                 chunks=list(cube.chunks), format="zarr v3: mag, magerr, flags (source, epoch)")
    manifest.record_run(argv, added=len(report.added), already=report.already, failed=len(report.failed))
    with _writing(out.parent, "the manifest"):
        manifest.write()
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class PrecisionReport:
    """What ``precision`` wrote: the tables, figures and a few numbers."""

    out_dir: str
    sources: int = 0
    epochs: int = 0
    measured: int = 0
    products: list[str] = field(default_factory=list)
    top_variables: list[int] = field(default_factory=list)
    best_precision_mag: float = float("nan")
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True: a finished reduction (missing inputs raise instead)."""
        return True

    def summary(self) -> str:
        """Human-readable summary."""
        lines = [f"precision {self.out_dir}: {self.measured} of {self.sources} sources with statistics over "
                 f"{self.epochs} epochs; best binned std {self.best_precision_mag * 1000:.1f} mmag; "
                 f"{len(self.products)} products in {self.seconds:.1f} s",
                 f"  top variables (chi2/dof): {self.top_variables}"]
        lines += [f"  NOTE {n}" for n in self.notes]
        return "\n".join(lines)


def precision(lc_path: str | os.PathLike, out_dir: str | os.PathLike, client, config=None,
              progress: bool = True, argv: list[str] | None = None) -> PrecisionReport:
    """Precision vs magnitude (Fig. 12), catalogue stacks (Fig. 14), light curves and
    variability (Fig. 15) of a cube: ``DIR/precision.parquet``, ``DIR/stacking.parquet``,
    ``DIR/variability.parquet`` (one row per source, highest ``chi2_dof`` first),
    ``DIR/lightcurves.parquet`` (the drawn sources), PNG figures and ``DIR/manifest.json``.

    One parallel pass over the cube (one task per source chunk, all epochs), then the small
    per-source table is binned. A rerun recomputes everything (one pass).
    """
    import numpy as np
    import pandas as pd
    from distributed import as_completed, futures_of
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from .config import PrecisionConfig
    from .errors import InsufficientDataError
    from .lightcurves.cube import (open_cube, precision_table, select_light_curves, source_statistics, stacking_table,
                              theory_curve)

    t0 = time.perf_counter()
    config = config or PrecisionConfig()
    out = check_writable(out_dir, "the precision products")
    _clear_temporaries(out)
    ds = open_cube(lc_path)
    report = PrecisionReport(out_dir=str(out.resolve()), sources=int(ds.sizes["source"]),
                             epochs=int(ds.sizes["epoch"]))
    if report.epochs < 2:
        raise InsufficientDataError(f"{lc_path}: {report.epochs} written epochs; a scatter needs at least 2 "
                                    "(add exposures with `mstdask lightcurves`)")
    stats = client.persist(source_statistics(ds, config))
    futs = futures_of(stats)
    with _bar(len(futs), "precision", progress, unit="chunk") as bar:
        for _ in as_completed(futs):
            bar.update()
    prec_f, stack_f = client.compute([precision_table(stats, config), stacking_table(stats, config)])
    st = client.compute(stats.drop_vars("stacked")).result()
    prec, stack = prec_f.result(), stack_f.result()
    del stats, futs
    table = pd.DataFrame({"source": ds["source"].values, "ra": ds["ra"].values, "dec": ds["dec"].values,
                          "ref_id": ds["ref_id"].values,
                          **{k: st[k].values for k in st.data_vars}})
    table["n_epochs"] = table["n_epochs"].fillna(0).astype("int32")
    table["expected_std"] = theory_curve(table["mean_mag"].to_numpy(), config)["total"]
    # ratio to the empirical precision at the source's magnitude: a variable stands out
    # even where the reported errors are off
    idx = np.clip(np.digitize(table["mean_mag"], np.r_[prec["mag_lo"].to_numpy(), prec["mag_hi"].iloc[-1]]) - 1,
                  0, len(prec) - 1)
    table["std_ratio"] = table["std"].to_numpy() / prec["std_median"].to_numpy()[idx]
    table = table.sort_values("chi2_dof", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1, dtype=np.int64)
    report.measured = int(np.isfinite(table["std"]).sum())
    report.best_precision_mag = float(np.nanmin(prec["std_median"])) if prec["std_median"].notna().any() \
        else float("nan")
    pick = select_light_curves(table, config)
    report.top_variables = [int(s) for s in pick["variable"]]
    chosen = np.r_[pick["variable"], pick["constant"]].astype(np.int64)
    lc = ds[["mag", "magerr", "flags"]].isel(source=chosen)
    lc = client.compute(lc).result()
    kind = {int(s): "variable" for s in pick["variable"]} | {int(s): "constant" for s in pick["constant"]}
    curves = lc.to_dataframe()[["mag", "magerr", "flags"]].reset_index()
    curves["time"] = pd.to_datetime(curves["epoch"].map(dict(zip(ds["epoch"].values, ds["time"].values))))
    curves["mjd_mid"] = curves["epoch"].map(dict(zip(ds["epoch"].values, ds["mjd_mid"].values)))
    curves["kind"] = curves["source"].map(kind)
    curves = curves[np.isfinite(curves["mag"])]

    products = {}
    with _writing(out, "the precision tables"):
        for name, df in (("precision", prec), ("stacking", stack), ("variability", table), ("lightcurves", curves)):
            _atomic_parquet(df, out / f"{name}.parquet")
            products[name] = out / f"{name}.parquet"

        # Fig. 12: precision vs magnitude and the theory of Eqs. 1-5
        good = table[np.isfinite(table["std"])]
        grid = np.linspace(*config.mag_range, 300)
        th = theory_curve(grid, config)
        fig = Figure(figsize=(7, 5))
        ax = fig.subplots()
        ax.scatter(good["mean_mag"], good["std"], s=1, c="0.6", alpha=0.3, rasterized=True, label="sources")
        ax.plot(prec["mag_center"], prec["std_median"], "k-", lw=2, label="median std")
        ax.plot(prec["mag_center"], prec["robust_std_median"], "C1--", label="median 1.4826 MAD")
        ax.plot(grid, th["total"], "k--", label="theory (Eqs. 1-5)")
        ax.plot(grid, th["photon"], "b-", lw=0.8, label="photon")
        ax.plot(grid, th["sky"], "g--", lw=0.8, label="sky")
        ax.plot(grid, th["scintillation"], "m-", lw=0.8, label="scintillation")
        ax.axhline(0.004, color="r", ls=":", label="4 mmag")
        ax.set(yscale="log", xlabel="mean magnitude", ylabel="std of magnitudes (mag)",
               title=f"{report.measured} sources, {report.epochs} epochs")
        if len(good):
            lo, hi = np.nanpercentile(good["mean_mag"], [0.5, 99.5])
            ax.set_xlim(lo - 0.5, hi + 0.5)
            ax.set_ylim(max(1e-4, np.nanpercentile(good["std"], 0.5) / 2), min(2.0, np.nanmax(good["std"]) * 2))
        ax.legend(fontsize=7, loc="upper left")
        _write_png(fig, out / "fig12_precision.png")
        products["fig12"] = out / "fig12_precision.png"

        # Fig. 14: catalogue stacks
        fig = Figure(figsize=(7, 5))
        ax = fig.subplots()
        for j, (n, g) in enumerate(stack.groupby("n_stack")):
            c = colormaps["viridis"](j / max(1, len(config.stack_n) - 1))
            ax.plot(g["mag_center"], g["scatter_median"], "-", color=c, label=f"N={n}")
            ax.plot(g["mag_center"], g["sqrt_n_expected"], ":", color=c, lw=0.8)
        ax.set(yscale="log", xlabel="mean magnitude", ylabel="std of N-epoch means (mag)",
               title="catalogue stacks (dotted: single epoch / sqrt(N))")
        if len(good):
            ax.set_xlim(lo - 0.5, hi + 0.5)
        ax.legend(fontsize=7, ncol=2)
        _write_png(fig, out / "fig14_stacking.png")
        products["fig14"] = out / "fig14_stacking.png"

        # Fig. 15: light curves
        n = len(chosen)
        if n:
            ncol = 3
            fig = Figure(figsize=(11, 2.2 * -(-n // ncol)))
            axes = fig.subplots(-(-n // ncol), ncol, squeeze=False)
            info = table.set_index("source")
            for ax, s in zip(axes.ravel(), chosen):
                g = curves[curves["source"] == s]
                ax.errorbar(g["mjd_mid"], g["mag"], g["magerr"], fmt=".", ms=2, lw=0.5,
                            color="C3" if kind[int(s)] == "variable" else "C0")
                ax.invert_yaxis()
                row = info.loc[int(s)]
                ax.set_title(f"{kind[int(s)]} {int(s)}: {row['mean_mag']:.2f} mag, std {row['std'] * 1000:.1f} "
                             f"mmag, chi2/dof {row['chi2_dof']:.1f}", fontsize=7)
                ax.tick_params(labelsize=6)
                ax.set_xlabel("MJD", fontsize=6)
            for ax in axes.ravel()[n:]:
                ax.axis("off")
            fig.tight_layout()
            _write_png(fig, out / "fig15_lightcurves.png")
            products["fig15"] = out / "fig15_lightcurves.png"

    manifest = Manifest(out)
    common = dict(telescope=sorted({str(v) for v in ds["telescope"].values}),
                  filter=sorted({str(v) for v in ds["filter"].values}),
                  night=sorted({str(v) for v in ds["night"].values}),
                  inputs=[str(Path(lc_path).resolve())], config=to_dict(config))
    kinds = {"precision": "precision_curve", "stacking": "stacking_curve", "variability": "variability_table",
             "lightcurves": "light_curves", "fig12": "figure", "fig14": "figure", "fig15": "figure"}
    for name, path in products.items():
        manifest.add(kinds[name], path, **common, sources=report.sources, epochs=report.epochs)
    manifest.record_run(argv, sources=report.sources, epochs=report.epochs)
    with _writing(out, "the manifest"):
        manifest.write()
    report.products = [str(p) for p in products.values()]
    report.seconds = time.perf_counter() - t0
    return report

__all__ += ["LightcurveReport", "PrecisionReport", "lightcurves", "precision"]


# ----------------------------------------------------------------------------- coadd (STATIC multiple)
@dataclass
class CoaddReport:
    """What ``coadd`` did: stacks made now or already there, stacks measured, depth per N,
    exposures left out (no astrometric solution, flagged) and failures."""

    out_dir: str
    made: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    measured: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    flagged: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    depth: list[dict] = field(default_factory=list)
    frame_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no stack failed (skipped exposures and flagged stacks are data, not errors)."""
        return not self.failed

    def summary(self) -> str:
        """Human-readable summary."""
        lines = [f"coadd {self.out_dir}: {len(self.made)} stacks made, {len(self.already)} already done, "
                 f"{len(self.measured)} measured, {len(self.skipped)} exposures skipped, {len(self.flagged)} "
                 f"flagged, {len(self.failed)} failed in {self.seconds:.1f} s"
                 + (f", median {sorted(self.frame_seconds)[len(self.frame_seconds) // 2]:.1f} s per input frame"
                    if self.frame_seconds else "")]
        for d in self.depth:
            lines.append(f"  {d.get('stack', '')} N={d['n']:>3}: limiting magnitude (5 sigma) {d['limiting_mag']:.2f}"
                         + (" (extrapolated)" if d.get("extrapolated") else "") + f", {d['n_sources']} sources")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  SKIPPED {e}: {why}" for e, why in self.skipped]
        lines += [f"  FLAGGED {e}: {why}" for e, why in self.flagged]
        lines += [f"  FAILED {e}: {why}" for e, why in self.failed]
        return "\n".join(lines)


def _coadd_inputs(src: Path, catalogs) -> tuple[Path, Path, dict]:
    """(CATDIR, reduced store, source_catalog manifest entry) from CATDIR or a reduced store."""
    from .store import ReducedStore

    if (src / "exposures.parquet").exists():
        catdir = src
    elif catalogs is not None:
        catdir = Path(catalogs)
        if not (catdir / "exposures.parquet").exists():
            raise BadInputError(str(catdir), "no exposures.parquet: --catalogs must be the output folder of "
                                             "`mstdask photometry`")
    else:
        ReducedStore.open(src, mode="r")  # a clear error when it is neither
        raise BadInputError(str(src), "a reduced store holds no astrometric solutions: give the catalogue folder "
                                      "of `mstdask photometry` (CATDIR) instead, or with --catalogs CATDIR")
    man = Manifest(catdir)
    entry = man.get("sources") or man.get("exposures.parquet") or {}
    inputs = entry.get("inputs") or []
    reduced = Path(src) if catalogs is not None else (Path(inputs[0]) if inputs else None)
    if reduced is None:
        raise BadInputError(str(catdir / "manifest.json"), "does not name the reduced store the catalogues were "
                                                             "made from; give it: mstdask coadd REDUCED.zarr "
                                                             f"--catalogs {catdir}")
    ReducedStore.open(reduced, mode="r")
    return catdir, reduced, entry


def _coadd_frames(catdir: Path, reduced: Path, config, report: CoaddReport) -> list[list]:
    """The usable exposures as CoaddFrame lists, one per (telescope, filter, field), by time."""
    import math as _m

    import numpy as np

    from .stacks.coadd import CoaddFrame, wcs_from_text
    from .config import PhotometryConfig
    from .store import ReducedStore

    red = ReducedStore.open(reduced, mode="r")
    c = {name: red.coord(name) for name in ("reduced", "time", "telescope", "egain")}
    index = _exposure_frames(c["telescope"], c["time"], c["reduced"])  # the names `photometry` gave
    shape = tuple(int(v) for v in red.frame_shape)
    groups: dict[tuple, list[dict]] = {}
    for r in _ok_exposures(catdir, report.skipped):
        exp = str(r.get("exposure"))
        if not str(r.get("wcs") or "").strip():
            report.skipped.append((exp, "no astrometric solution (wcs) in exposures.parquet"))
            continue
        if exp not in index:
            report.skipped.append((exp, f"not in the reduced store {reduced}"))
            continue
        zp, bg, rms, t = (r.get(k) for k in ("zero_point", "background_adu", "background_rms_adu", "exptime"))
        if not all(v is not None and _m.isfinite(v) for v in (zp, bg, rms, t)) or t <= 0 or rms <= 0:
            report.skipped.append((exp, "zero point, sky level, sky rms or exposure time missing"))
            continue
        try:
            w = wcs_from_text(r["wcs"], exp)
        except Exception as exc:  # a header astropy cannot read: one exposure, not the run
            report.skipped.append((exp, f"unreadable WCS ({exc})"))
            continue
        ra, dec = w.all_pix2world([(shape[1] - 1) / 2], [(shape[0] - 1) / 2], 0)
        r = {**r, "index": index[exp], "ra_c": float(ra[0]), "dec_c": float(dec[0])}
        groups.setdefault((str(r.get("telescope")), str(r.get("filter"))), []).append(r)
    # fields: an exposure joins the first field whose centre is within half the short side
    half = min(shape) / 2 * config.pixel_scale_arcsec / 3600
    out = []
    for key in sorted(groups):
        fields: list[list[dict]] = []
        for r in sorted(groups[key], key=lambda r: (r["time_ns"], str(r["exposure"]))):
            for f in fields:
                d = _m.hypot((r["ra_c"] - f[0]["ra_c"]) * _m.cos(_m.radians(f[0]["dec_c"])), r["dec_c"] - f[0]["dec_c"])
                if d < half:
                    f.append(r)
                    break
            else:
                fields.append([r])
        for rows in fields:
            ref = rows[0]
            frames = []
            for r in rows:
                scale = ref["exptime"] / r["exptime"] * 10 ** (0.4 * (ref["zero_point"] - r["zero_point"]))
                noise = scale * r["background_rms_adu"]
                g = c["egain"][r["index"]]
                frames.append(CoaddFrame(
                    str(r["exposure"]), str(r["wcs"]), shape, store=str(reduced), index=r["index"],
                    weight=1.0 / noise**2 if config.weighting == "background" else 1.0, scale=float(scale),
                    background=float(r["background_adu"]) if config.subtract_background else 0.0,
                    noise=float(noise), gain=float(g) if np.isfinite(g) and g > 0 else PhotometryConfig().gain_e_per_adu,
                    exptime=float(r["exptime"]), zero_point=float(r["zero_point"]), time=r["time_ns"]))
            out.append((key, rows, frames))
    return out


def coadd(catdir_or_reduced: str | os.PathLike, out_dir: str | os.PathLike, client, config=None,
          progress: bool = True, argv: list[str] | None = None, *, catalogs: str | os.PathLike | None = None,
          phot_config=None, astro_config=None) -> CoaddReport:
    """Image stacks of N = 2, 4, ... consecutive exposures, their STATIC photometry and depth.

    For every telescope, filter and field of ``CATDIR/exposures.parquet`` (exposures with
    status ``ok`` and an astrometric solution; the others are skipped and reported), in
    time order, the first N exposures for each N of ``config.n_stack`` are resampled onto a
    TAN grid (covering the stack, at ``config.pixel_scale_arcsec``, north up) and combined
    (:func:`mstdask.coadd.coadd`). Outputs in ``out_dir`` (all in ``manifest.json``):

    - ``coadd_TEL_FILTER[_fieldK]_NNNN.zarr`` and ``.fits`` (SCI, WHT, CNT; WCS, NCOMBINE,
      GAIN, EXPTIME, MAGZERO, IMCMBnnn, provenance): kind ``coadd``;
    - ``stacks/<same name>_sources.parquet``: STATIC on each stack, kind ``coadd_catalog``;
    - ``depth.parquet``: N, 5-sigma limiting magnitude, error-versus-magnitude bins, kind
      ``coadd_depth`` (N = 1, the first exposure alone, is always made: the baseline);
    - ``depth.png``: Fig. 13 (errors versus magnitude per N, depth versus N), kind ``figure``.

    A rerun skips stacks (and their photometry) whose files exist with the same inputs and
    configuration; a stack that fails is reported and the others go on.

    Parameters
    ----------
    catdir_or_reduced : path
        The output folder of ``mstdask photometry`` (CATDIR), or a reduced store with
        ``catalogs=CATDIR``.
    out_dir : path
        COADDDIR.
    client : distributed.Client
    config : CoaddConfig, optional
    catalogs : path, optional
        CATDIR when the first argument is the reduced store.
    phot_config, astro_config : optional
        STATIC configuration of the stack photometry (default: CATDIR's).

    Raises
    ------
    InsufficientDataError
        No usable exposure in CATDIR.
    """
    import math as _m

    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from . import __version__
    from .stacks.coadd import coadd as lazy_coadd
    from .stacks.coadd import depth_figure, depth_rows, fits_header, output_grid, stack_photometry_task, write_fits
    from .config import AstrometryConfig, CoaddConfig, PhotometryConfig, RefcatConfig
    from .errors import InsufficientDataError

    config = config or CoaddConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    report = CoaddReport(out_dir=str(out.resolve()))
    catdir, reduced, entry = _coadd_inputs(Path(catdir_or_reduced), catalogs)
    check_writable(out, "the coadds")
    _clear_temporaries(out)
    cat_cfg = entry.get("config") or {}
    phot_config = phot_config or PhotometryConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in (cat_cfg.get("photometry") or {}).items()})
    astro_config = astro_config or AstrometryConfig(**(cat_cfg.get("astrometry") or {}))
    refcat_cfg = RefcatConfig(**(cat_cfg.get("refcat") or {}))
    refcat_path = (entry.get("inputs") or [None, None])[1] if len(entry.get("inputs") or []) > 1 else None
    fields = _coadd_frames(catdir, reduced, config, report)
    if not fields:
        raise InsufficientDataError(f"{catdir}: no exposure to coadd (none with status ok and an astrometric "
                                    f"solution; {len(report.skipped)} skipped); run `mstdask photometry` first")
    cfg = {"coadd": to_dict(config), "photometry": to_dict(phot_config), "astrometry": to_dict(astro_config)}
    manifest = Manifest(out)
    depth: list[dict] = []
    points: dict[int, tuple] = {}
    (out / "stacks").mkdir(parents=True, exist_ok=True)
    try:
        for k_field, ((tel, filt), rows, frames) in enumerate(fields):
            # N = 1 (the first exposure, resampled and measured the same way) is the baseline
            ns = sorted({1} | {n for n in config.n_stack if n <= len(frames)})
            too_many = [n for n in config.n_stack if n > len(frames)]
            if too_many:
                report.notes.append(f"{tel} {filt} field {k_field}: {len(frames)} exposures; N = "
                                    f"{', '.join(map(str, too_many))} not made")
            label = f"coadd_{tel}_{filt}" + (f"_field{k_field}" if k_field else "")
            nights = sorted({str(r.get("night")) for r in rows[:max(ns)]})
            for n in ns:
                stack = frames[:n]
                # each stack on the grid covering its own frames: STATIC on an image with wide
                # empty margins (a grid made for more dithers) is needlessly fragile
                grid = output_grid(stack, config.pixel_scale_arcsec)
                name = f"{label}_N{n:03d}"
                zpath, fpath = out / f"{name}.zarr", out / f"{name}.fits"
                # the tiling does not change the coadd (tested), so it is not part of what it is made of
                same = {k: v for k, v in cfg["coadd"].items() if k not in ("tile_px", "frames_per_task")}
                sig = _signature("coadd", name, [f.exposure for f in stack], {**same, "grid": grid.header})
                done = manifest.get(zpath)
                if (done is not None and done.get("signature") == sig and (zpath / "zarr.json").is_file()
                        and fpath.is_file()):
                    report.already.append(name)
                else:
                    try:
                        tc = time.perf_counter()
                        manifest.remove(zpath)
                        manifest.remove(fpath)
                        ds = lazy_coadd(stack, grid, config)
                        tmpz = out / f".{name}.zarr.tmp"
                        shutil.rmtree(tmpz, ignore_errors=True)
                        with _writing(out, f"the coadd {name}"):
                            with warnings.catch_warnings():
                                warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
                                job = ds.to_zarr(str(tmpz), mode="w", compute=False, zarr_format=3)
                            fut = client.compute(job, retries=TASK_RETRIES)
                            with _bar(1, f"coadd {name}", progress, unit="stack") as bar:
                                fut.result()
                                bar.update()
                            shutil.rmtree(zpath, ignore_errors=True)
                            os.replace(tmpz, zpath)
                            hdr = fits_header(ds.attrs, {"DATE": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())})
                            hdr["HISTORY"] = f"mstdask {__version__} coadd of {n} exposures from {catdir.resolve()}"
                            hdr["HISTORY"] = f"reduced store {Path(reduced).resolve()}"
                            for chunk in _chunks(json.dumps(cfg["coadd"], sort_keys=True), 60):
                                hdr["HISTORY"] = chunk
                            tmpf = out / f".{name}.fits.tmp"
                            client.submit(write_fits, str(zpath), str(tmpf), hdr, pure=False).result()
                            os.replace(tmpf, fpath)
                        common = dict(telescope=tel, filter=filt, night=nights, config=cfg,
                                      inputs=[f.exposure for f in stack], ncombine=n, signature=sig,
                                      catalogs=str(catdir.resolve()), reduced=str(Path(reduced).resolve()),
                                      shape=list(grid.shape), combine=config.combine)
                        manifest.add("coadd", zpath, format="zarr", **common)
                        manifest.add("coadd", fpath, format="fits", extensions=["SCI", "WHT", "CNT", "FLG"], **common)
                        with _writing(out, "the manifest"):
                            manifest.write()
                        report.made.append(name)
                        report.frame_seconds.append((time.perf_counter() - tc) / n)
                    except Exception as exc:
                        if _stops_the_run(exc, [out]) or isinstance(exc, StoreError):
                            raise
                        report.failed.append((name, f"{type(exc).__name__}: {exc}"))
                        continue
                # STATIC on the stack
                if refcat_path is None:
                    report.notes.append(f"{name}: no reference catalogue named in {catdir}/manifest.json: "
                                        "no stack photometry")
                    continue
                spath = out / "stacks" / f"{name}_sources.parquet"
                psig = _signature("coadd_catalog", name, [sig], {"photometry": cfg["photometry"],
                                                                 "astrometry": cfg["astrometry"]})
                rec = None
                if spath.exists():
                    from .static.photometry import read_exposure_record

                    try:
                        rec = read_exposure_record(spath)
                        if rec.get("signature") != psig:
                            rec = None
                    except Exception:
                        rec = None
                if rec is None:
                    cw = grid.wcs
                    ra0, dec0 = (float(v[0]) for v in cw.all_pix2world([(grid.shape[1] - 1) / 2],
                                                                        [(grid.shape[0] - 1) / 2], 0))
                    radius = _m.hypot(*grid.shape) / 2 * config.pixel_scale_arcsec / 3600 * 1.2
                    meta = {"exposure": name, "time": int(stack[0].time), "night": nights[0], "telescope": tel,
                            "filter": filt, "path": str(zpath),
                            "mjd_mid": float(np.mean([f.time for f in stack]) / 86400e9 + 40587.0)}
                    fut = client.submit(stack_photometry_task, str(zpath), str(spath), str(refcat_path), refcat_cfg,
                                        ra0=ra0, dec0=dec0, radius_deg=radius, meta=meta, signature=psig,
                                        config=phot_config, astro_config=astro_config, pure=False,
                                        retries=1)
                    try:
                        with _bar(1, f"photometry {name}", progress, unit="stack") as bar:
                            rec = fut.result()
                            bar.update()
                    except Exception as exc:
                        if _stops_the_run(exc, [out]):
                            raise _write_error(exc, out, "the stack catalogues") from None
                        report.failed.append((name, f"photometry: {type(exc).__name__}: {exc}"))
                        continue
                    if rec.get("status") != "ok":
                        report.flagged.append((name, rec.get("reason", "")))
                        continue
                    report.measured.append(name)
                manifest.add("coadd_catalog", spath, telescope=tel, filter=filt, night=nights,
                             inputs=[str(zpath.resolve())], config=cfg, ncombine=n, signature=psig,
                             sources=int(rec.get("n_sources") or 0), zero_point=rec.get("zero_point"),
                             noise_correlation=rec.get("noise_correlation"))
                s = pq.read_table(spath, columns=["mag_aper", "magerr_aper", "flags", "extract_flags"]).to_pydict()
                d = depth_rows(s, n, config.mag_bin, config.limit_snr)
                depth.append({"telescope": tel, "filter": filt, "field": k_field, "stack": name, **d,
                              "noise_correlation": rec.get("noise_correlation"), "gain_eff": rec.get("gain_eff"),
                              "seeing_arcsec": rec.get("seeing_arcsec")})
                if k_field == 0:
                    points[n] = (np.asarray(s["mag_aper"]), np.asarray(s["magerr_aper"]))
    finally:
        if depth:
            dpath = out / "depth.parquet"
            df = pd.DataFrame(depth)
            with _writing(out, "the depth table"):
                _atomic_parquet(df, dpath)
            allk = dict(telescope=sorted({d["telescope"] for d in depth}), filter=sorted({d["filter"] for d in depth}),
                        night=sorted({n for _, rows, _ in fields for n in (str(r.get("night")) for r in rows)}),
                        config=cfg)
            manifest.add("coadd_depth", dpath, inputs=sorted({str(d["stack"]) for d in depth}),
                         columns=list(df.columns), **allk)
            first_field = [d for d in depth if d["field"] == 0 and d["telescope"] == depth[0]["telescope"]
                           and d["filter"] == depth[0]["filter"]]
            fig = depth_figure(first_field, points, title=f"{depth[0]['telescope']} {depth[0]['filter']}: "
                                                        "magnitude error of N-exposure stacks (Fig. 13)")
            ppath = out / "depth.png"
            with _writing(out, "the depth figure"):
                _write_png(fig, ppath)
            manifest.add("figure", ppath, inputs=[str(dpath.resolve())], figure="Fig. 13", **allk)
            report.depth = depth
        manifest.record_run(argv, made=len(report.made), already=len(report.already), failed=len(report.failed))
        with _writing(out, "the manifest"):
            manifest.write()
    report.seconds = time.perf_counter() - t0
    return report


def _chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


__all__ += ["CoaddReport", "coadd"]
