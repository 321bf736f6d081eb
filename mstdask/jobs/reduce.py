"""``mstdask reduce``: STIR per frame for every science frame of a raw store."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..errors import MstdaskError, StoreError
from ..manifest import Manifest
from ..store import RawStore
from ._job import (
    TASK_RETRIES,
    check_writable,
    is_fs_error,
    progress_bar,
    stops_the_run,
    unlink,
    write_error,
)
from ._plan import Plan

#: Seconds between the driver's records of finished frames (``reduced``) in ``reduce``: a
#: killed run loses at most this much finished work, which the next run redoes.
MARK_EVERY_S = 2.0


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
    from ..config import CalibConfig, StirConfig, StoreLayout
    from ..store import ReducedStore

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
        if not is_fs_error(exc):
            raise
        raise write_error(exc, out_path, "the reduced frames", then) from None
    report.seconds = time.perf_counter() - t0
    return report


def _reduce_frames(red, raw: RawStore, coords: dict, todo: list, new: list, store_path, caldir, out_path: Path,
                   fits_root: Path | None, client, config, calib_config, progress: bool, argv, report) -> None:
    import numpy as np
    from distributed import as_completed

    from ..stir.frame import process_frame
    from ..store import _REDUCED_COPY

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
            unlink(_fits_tmp(fpath))
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
        with progress_bar(len(futures), "reduce frames", progress) as bar:
            for fut in as_completed(futures):
                i, s, cs, fpath = meta[fut.key]
                try:
                    res = fut.result()
                except Exception as exc:  # one bad frame never ends the run ...
                    if stops_the_run(exc, [out_path, fits_root]):
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
        unlink(*(_fits_tmp(m[3]) for m in meta.values() if m[3] and m[3] not in done_fits))

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
    from ..store import ReducedStore

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

