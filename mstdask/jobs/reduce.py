"""``mstdask reduce``: STIR per frame for every science frame of a raw store."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..errors import MstdaskError, StoreError
from ..manifest import Manifest
from ..store import RawStore
from ._job import (
    TASK_RETRIES,
    JobReport,
    check_writable,
    completed,
    error_text,
    median_seconds,
    task_key,
    tmp_name,
    unlink,
    writing,
)
from ._plan import Plan

#: Seconds between the driver's records of finished frames (``reduced``) in ``reduce``: a
#: killed run loses at most this much finished work, which the next run redoes.
MARK_EVERY_S = 2.0
#: Why ``reduce`` made nothing from a raw store without science frames.
NO_SCIENCE = "no science frames in this store: nothing to reduce; ingest science frames first"


@dataclass
class ReduceReport(JobReport):
    """What ``reduce`` did: frames reduced now, frames already done, frames that failed, and
    ``skipped``: ``(store, why)`` when there was nothing to reduce (not ok: nothing made)."""

    out: str
    reduced: list[str] = field(default_factory=list)
    already: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    tracks: int = 0
    frame_seconds: list[float] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    _LISTED = (("FAILED", "failed"), ("SKIPPED", "skipped"))
    _FAILS = ("failed", "skipped")

    def headline(self) -> str:
        """Frames reduced, already done and failed, tracks found, time per frame."""
        per = f", median {median_seconds(self.frame_seconds):.1f} s per frame in its task" \
            if self.frame_seconds else ""
        return (f"reduce {self.out}: {len(self.reduced)} frames reduced, {self.already} already done, "
                f"{len(self.failed)} failed, {self.tracks} tracks found in {self.seconds:.1f} s{per}")

    def note_lines(self) -> list[str]:
        """Each note once, sorted (every frame of a night repeats its calibrations' notes)."""
        return [f"  {self._NOTE} {n}" for n in sorted(set(self.notes))]


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

    from ..stir.frame import find_calibrations
    from ..store import _REDUCED_COPY

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


def _nothing_to_reduce(todo: list, new: list, report: ReduceReport) -> bool:
    """Whether the raw store has no science frame at all (none to do, done or failed)."""
    return not (todo or new or report.already or report.failed)


def _existing(out_path: Path, mode: str = "r+"):
    """The reduced store at ``out_path``; None when there is none yet (nothing there, or the
    skeleton of a killed creation, which ``ReducedStore.create`` makes anew)."""
    from ..store import ReducedStore

    if out_path.exists() and any(out_path.iterdir()) and not ReducedStore.half_made(out_path):
        return ReducedStore.open(out_path, mode=mode)
    return None


def _fits_path(fits_root: Path | None, coords: dict, i: int) -> str | None:
    """Where frame ``i`` is written as FITS (``FITS_DIR/NIGHT/NAME.fits``), None without."""
    if fits_root is None:
        return None
    return str(fits_root / str(coords["night"][i]) / (Path(str(coords["path"][i])).name.split(".")[0] + ".fits"))


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
    from ..config import CalibConfig, StirConfig, StoreLayout
    from ..store import ReducedStore

    config = config or StirConfig()
    calib_config = calib_config or CalibConfig()
    t0 = time.perf_counter()
    out_path = Path(out_path)
    report = ReduceReport(out=str(out_path.resolve()))
    raw = RawStore.open(store_path, mode="r")
    red = _existing(out_path)
    if red is not None and tuple(red.frame_shape) != tuple(raw.frame_shape):
        raise StoreError(f"{out_path}: holds {red.frame_shape} frames, {store_path} has {raw.frame_shape}; "
                         "reduce into a new --out")
    coords, todo, new = _reduce_work(raw, red, caldir, calib_config, report)
    if _nothing_to_reduce(todo, new, report):  # nothing made: said, and not ok
        report.skipped.append((str(Path(store_path).resolve()), NO_SCIENCE))
        report.seconds = time.perf_counter() - t0
        return report
    check_writable(out_path if red is not None else out_path.parent, "the reduced store")
    fits_root = check_writable(fits_dir, "the FITS frames") if fits_dir else None
    # any file-system error, the manifests' included, reads as the reduced frames not written
    with writing(out_path, "the reduced frames",
                 "; frames reduced before are kept: run the same command again to reduce the rest"):
        if red is None:
            red = ReducedStore.create(out_path, raw.frame_shape, tuple(raw.group.attrs["tile"]), StoreLayout(),
                                      {"raw_store": str(Path(store_path).resolve()),
                                       "calib_dir": str(Path(caldir).resolve()), "stir_config": to_dict(config)})
        _reduce_frames(red, raw, coords, todo, new, store_path, caldir, out_path, fits_root, client, config,
                       calib_config, progress, argv, report)
    report.seconds = time.perf_counter() - t0
    return report


def _reduce_frames(red, raw: RawStore, coords: dict, todo: list, new: list, store_path, caldir, out_path: Path,
                   fits_root: Path | None, client, config, calib_config, progress: bool, argv, report) -> None:
    """Reduce the unfinished slots ``todo`` and the ``new`` frames into ``red``, then list the
    products in the manifests (beside the store, and in ``fits_root``)."""
    todo = _reserve_slots(red, raw, coords, todo, new)
    futures, meta = _submit_frames(client, coords, todo, store_path, out_path, fits_root, config, calib_config)
    written_fits = _collect_frames(red, client, futures, meta, coords, [s for _, s, _ in todo], out_path,
                                   fits_root, progress, report)
    _write_manifests(red, coords, written_fits, caldir, out_path, fits_root, config, argv, report)


def _reserve_slots(red, raw: RawStore, coords: dict, todo: list, new: list) -> list[tuple[int, int, object]]:
    """Slots for every frame to reduce: ``(raw index, slot, CalibSet)``.

    The unfinished slots of an earlier run get the calibrations used this time, the new
    frames new slots (with their raw coordinates); partial shards a killed worker left in
    these slots are removed."""
    import numpy as np

    from ..store import _REDUCED_COPY

    if todo:
        red.set_coords([s for _, s, _ in todo], calib_bias=[c.bias for *_, c in todo],
                       calib_flat=[c.flat for *_, c in todo], calib_ps=[c.ps for *_, c in todo],
                       calib_bad=[c.bad for *_, c in todo])
    fields: dict = {}
    if new:
        idx = np.array([i for i, _ in new])
        fields = {name: coords[name][idx] for name in _REDUCED_COPY}
        fields.update(raw_index=idx, calib_bias=[c.bias for _, c in new], calib_flat=[c.flat for _, c in new],
                      calib_ps=[c.ps for _, c in new], calib_bad=[c.bad for _, c in new])
    # also with no new frame: the slots of a reservation a killed run cut short are removed
    slots = red.reserve(fields)
    todo = todo + [(i, s, c) for (i, c), s in zip(new, slots)]
    red.clear_partial([s for _, s, _ in todo])  # left by workers killed while writing
    return todo


def _submit_frames(client, coords: dict, todo: list, store_path, out_path: Path, fits_root: Path | None,
                   config, calib_config) -> tuple[list, dict]:
    """One :func:`~mstdask.stir.frame.process_frame` task per frame; returns the futures and
    ``key -> (raw index, slot, CalibSet, FITS path)``."""
    import numpy as np

    from ..stir.frame import process_frame  # looked up now: tests replace it

    egain = coords["egain"]
    futures, meta = [], {}
    for i, s, cs in todo:
        gain = float(egain[i]) if np.isfinite(egain[i]) and egain[i] > 0 else config.gain_e_per_adu
        fpath = _fits_path(fits_root, coords, i)
        if fpath:
            unlink(tmp_name(fpath))
        fut = client.submit(process_frame, str(store_path), i, str(coords["path"][i]), str(out_path), s, cs, config,
                            gain, calib_config.saturation_adu, fpath, pure=False, retries=TASK_RETRIES,
                            key=task_key("stir", s))
        futures.append(fut)
        meta[fut.key] = (i, s, cs, fpath)
    return futures, meta


class _Marks:
    """The finished frames not yet marked ``reduced`` in the store; marked every
    :data:`MARK_EVERY_S` seconds, so that a killed run loses little finished work."""

    def __init__(self, red) -> None:
        self.red = red
        self.finished: list[dict] = []
        self.last = time.monotonic()

    def add(self, res: dict) -> None:
        """A finished frame (the result of its task); marked when it is time."""
        self.finished.append(res)

    def when_due(self) -> None:
        """Mark the finished frames when :data:`MARK_EVERY_S` seconds have passed."""
        if time.monotonic() - self.last > MARK_EVERY_S:  # read now: tests change it
            self.flush()
            self.last = time.monotonic()

    def flush(self) -> None:
        """Mark the finished frames now, with what their tasks found."""
        done = self.finished
        if not done:
            return
        self.red.set_coords([f["out_index"] for f in done], reduced=[True] * len(done),
                            n_tracks=[f["n_tracks"] for f in done], track_pixels=[f["track_pixels"] for f in done],
                            cosmic_ray_pixels=[f["cosmic_ray_pixels"] for f in done],
                            masked_fraction=[f["masked_fraction"] for f in done],
                            tracks=[json.dumps(f["lines"]) for f in done])
        done.clear()


def _collect_frames(red, client, futures: list, meta: dict, coords: dict, slots: list[int], out_path: Path,
                    fits_root: Path | None, progress: bool, report: ReduceReport) -> list[tuple]:
    """The frames' results as they finish, into ``report``, marked in ``red`` as they come.

    Returns ``(raw index, slot, CalibSet, FITS path, result)`` of the frames written as FITS.
    """
    marks = _Marks(red)
    written_fits: list[tuple[int, int, object, str, dict]] = []
    all_done = False
    try:
        # a full disk or a read-only output ends the run (every frame would fail): completed raises
        with closing(completed(client, futures, "reduce frames", progress,
                               outputs=[out_path, fits_root])) as results:
            for fut, res, err in results:
                i, s, cs, fpath = meta[fut.key]
                if err is not None:  # one bad frame never ends the run
                    report.failed.append((str(coords["path"][i]), error_text(err)))
                else:
                    marks.add(res)
                    report.reduced.append(res["path"])
                    report.tracks += res["n_tracks"]
                    report.frame_seconds.append(res["seconds"])
                    if fpath:
                        written_fits.append((i, s, cs, fpath, res))
                marks.when_due()
        all_done = True
    finally:
        # Also on Ctrl-C or a full disk (the frames still running are cancelled first): what
        # is written is recorded, the rest is done next time (when recording fails too, those
        # frames are simply reduced again).
        try:
            marks.flush()
            red.consolidate()
        except OSError:
            if all_done:
                raise
        red.clear_partial(slots)
        done_fits = {w[3] for w in written_fits}
        unlink(*(tmp_name(m[3]) for m in meta.values() if m[3] and m[3] not in done_fits))
    return written_fits


def _write_manifests(red, coords: dict, written_fits: list[tuple], caldir, out_path: Path, fits_root: Path | None,
                     config, argv, report: ReduceReport) -> None:
    """The reduced store in ``manifest.json`` beside it; the FITS frames written now in the one
    of ``fits_root``. (Not :func:`save_manifest`: a manifest that cannot be written reads as
    the reduced frames not written, like every other write of this job.)"""
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


def plan_reduce(store_path: str | os.PathLike, caldir: str | os.PathLike, out_path: str | os.PathLike,
                config=None, calib_config=None, fits_dir: str | os.PathLike | None = None) -> Plan:
    """What ``reduce`` would do: frames to reduce, already reduced, without calibrations (the
    stores' metadata and the calibration manifest are read, nothing is computed or written)."""
    import numpy as np

    from ..config import CalibConfig

    raw = RawStore.open(store_path, mode="r")
    out_path = Path(out_path)
    red = _existing(out_path, mode="r")
    report = ReduceReport(out=str(out_path))
    coords, todo, new = _reduce_work(raw, red, caldir, calib_config or CalibConfig(), report)
    if _nothing_to_reduce(todo, new, report):
        report.notes.append(f"{store_path}: {NO_SCIENCE}")
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

