"""``mstdask lightcurves``: every exposure's sources into the source x epoch cube."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..config import to_dict
from ..errors import MstdaskError
from ..manifest import Manifest
from ._job import (
    TASK_RETRIES,
    JobReport,
    check_writable,
    completed,
    error_text,
    save_manifest,
    writing,
)
from .photometry import _ok_exposures


@dataclass
class LightcurveReport(JobReport):
    """What ``lightcurves`` did: exposures added to the cube, already there, failed.

    ``ok`` is True when no exposure was skipped (flagged by ``photometry``) or failed: else
    the exit status is 1, with the list.
    """

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

    _LISTED: ClassVar[tuple[tuple[str, str], ...]] = (("SKIPPED", "skipped"), ("FAILED", "failed"))
    _FAILS: ClassVar[tuple[str, ...]] = ("skipped", "failed")
    _NOTE: ClassVar[str] = "NOTE"

    def headline(self) -> str:
        """Exposures added, already there, skipped and failed; the cube's size."""
        rate = f", {self.rows / self.seconds:,.0f} rows/s" if self.seconds > 0 and self.rows else ""
        return (f"lightcurves {self.out_path}: {len(self.added)} exposures added ({self.rows} detections, "
                f"{self.matched} matched{rate}), {self.already} already in the cube, {len(self.skipped)} skipped, "
                f"{len(self.failed)} failed; cube {self.sources} sources ({self.new_sources} new) x {self.epochs} "
                f"epochs in {self.seconds:.1f} s")


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
    from ..config import RefcatConfig
    from ..static.refcat import load_refcat

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

#: A block: the exposures of one chunk column, as ``(epoch slot, exposure record)``.
_Block = list[tuple[int, dict]]


@dataclass
class _Run:
    """What the steps of one ``lightcurves`` run share."""

    client: object
    cube: object  # CubeStore
    out: Path
    config: object  # LightcurveConfig
    report: LightcurveReport
    progress: bool


def _open_cube(out: Path, config, report: LightcurveReport):
    """The cube ``out`` and its configuration (the stored one unless ``config`` is given),
    created when it is not there yet."""
    from ..config import LightcurveConfig
    from ..lightcurves.cube import CubeStore

    if (out / "zarr.json").exists():
        cube = CubeStore.open(out)
        stored = cube.group.attrs.get("config", {})
        config = config or LightcurveConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
        if cube.chunks != (config.source_chunk, config.epoch_chunk):
            report.notes.append(f"the cube's chunks {cube.chunks} are kept (config asks "
                                f"{(config.source_chunk, config.epoch_chunk)})")
    else:
        config = config or LightcurveConfig()
        with writing(out.parent, "the light-curve cube"):
            cube = CubeStore.create(out, config)
    return cube, config


def _todo(cube, exps: list[dict], report: LightcurveReport) -> list[tuple[int, dict]]:
    """Each exposure to write and its epoch slot: written epochs are skipped, unwritten ones
    (a killed run) redone in place, new exposures go into slots after the cube's last."""
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
    n_old = cube.shape[1]
    return redo + [(n_old + k, r) for k, r in enumerate(new)]


def _candidates(run: _Run, catdir: Path, refcat_path, filt: str):
    """The sources pass 1 matches to: the cube's, then the reference stars not in it yet.

    Returns ``(refcat, ref_rows, ra, dec)``: ``ref_rows`` are the reference rows appended.
    """
    import numpy as np

    ref_known = run.cube.coord("ref_id")
    refcat = _catalog_refcat(catdir, refcat_path, filt, run.report) if run.config.use_refcat else None
    if refcat is not None and len(refcat):
        ref_rows = np.setdiff1d(np.arange(len(refcat)), ref_known[ref_known >= 0])
    else:
        ref_rows = np.empty(0, np.int64)
    ra = np.concatenate([run.cube.coord("ra"), refcat.ra[ref_rows] if len(ref_rows) else []])
    dec = np.concatenate([run.cube.coord("dec"), refcat.dec[ref_rows] if len(ref_rows) else []])
    return refcat, ref_rows, ra, dec


def _blocks(planned: list[tuple[int, dict]], ec: int) -> list[_Block]:
    """The exposures grouped by chunk column (``ec`` epochs each), in column order."""
    return [[(s, r) for s, r in planned if s // ec == col] for col in sorted({s // ec for s, _ in planned})]


def _match_pass(run: _Run, blocks: list[_Block], cand_ra, cand_dec) -> tuple[list, list, list, set]:
    """Pass 1: which candidates are detected, and where the unmatched detections are.

    Writes nothing, so its groups are smaller than a chunk column: that keeps both workers
    busy on short runs (one k-d tree per group). A failed group or an unreadable catalogue
    fails its exposures only. Returns ``(hits, unmatched ra, unmatched dec, ids of the failed
    exposure records)``.
    """
    from ..lightcurves.cube import match_task

    client, config, report = run.client, run.config, run.report
    cra, cdec = client.scatter([cand_ra, cand_dec], broadcast=True)
    groups = [b[i:i + _MATCH_GROUP] for b in blocks for i in range(0, len(b), _MATCH_GROUP)]
    futs = {client.submit(match_task, [r["file"] for _, r in g], cra, cdec, config.match_radius_arcsec,
                          config.magnitude, pure=False, retries=TASK_RETRIES): g for g in groups}
    hits, ura, udec, bad = [], [], [], set()
    results = completed(client, list(futs), "lightcurves: match", run.progress, unit="block")
    with contextlib.closing(results):
        for fut, res, exc in results:
            if exc is not None:
                for _, r in futs[fut]:
                    bad.add(id(r))
                    report.failed.append((r["exposure"], error_text(exc)))
                continue
            hits.append(res["hit"])
            ura.append(res["ra"])
            udec.append(res["dec"])
            for f, problem in res["bad"]:  # an unreadable catalogue: that exposure only
                r = next(r for _, r in futs[fut] if r["file"] == f)
                bad.add(id(r))
                report.failed.append((r["exposure"], problem))
    return hits, ura, udec, bad


def _new_sources(run: _Run, matched: tuple[list, list, list], refcat, ref_rows, n_cube: int) -> dict:
    """The sources to append: the reference stars detected, then friends-of-friends groups
    of the detections that match nothing (mean position)."""
    import numpy as np

    from ..lightcurves import _lc_kernels as LK

    hits, ura, udec = matched
    hit = np.unique(np.concatenate(hits)) if hits else np.empty(0, np.int64)
    ref_hit = ref_rows[hit[hit >= n_cube] - n_cube]
    nra, ndec, _ = LK.cluster_positions(np.concatenate(ura) if ura else np.empty(0),
                                        np.concatenate(udec) if udec else np.empty(0),
                                        run.config.match_radius_arcsec)
    run.report.new_sources = len(nra)
    return {"ra": np.concatenate([refcat.ra[ref_hit] if len(ref_hit) else [], nra]),
            "dec": np.concatenate([refcat.dec[ref_hit] if len(ref_hit) else [], ndec]),
            "ref_id": np.concatenate([ref_hit, np.full(len(nra), -1)]).astype(np.int64),
            "ref_mag": np.concatenate([refcat.mag[ref_hit] if len(ref_hit) else [],
                                       np.full(len(nra), np.nan)]).astype(np.float32)}


def _grow_cube(run: _Run, new_src: dict, planned: list[tuple[int, dict]], blocks: list[_Block],
               n_old: int) -> list[_Block]:
    """Append the new sources, then the new epochs (``written`` False until their block is
    done); returns the blocks regrouped by chunk column with the new exposures' final slots
    (they shift down when a failed group dropped some)."""
    cube = run.cube
    alive = {id(r) for b in blocks for _, r in b}
    keep_new = [r for s, r in planned if s >= n_old and id(r) in alive]
    with writing(run.out, "the light-curve cube"):
        cube.add_sources(new_src)
        slots = cube.add_epochs({
            "exposure": [r["exposure"] for r in keep_new], "time": [r["time_ns"] for r in keep_new],
            "mjd_mid": [r.get("mjd_mid") for r in keep_new], "night": [r.get("night") for r in keep_new],
            "telescope": [r.get("telescope") for r in keep_new], "filter": [r.get("filter") for r in keep_new],
            "zero_point": [r.get("zero_point") for r in keep_new]})
        cube.consolidate()
    slot_new = dict(zip((r["exposure"] for r in keep_new), slots))
    ec = cube.chunks[1]
    regroup: dict[int, _Block] = {}
    for b in blocks:
        for s, r in b:
            s = slot_new.get(r["exposure"], s) if s >= n_old else s
            regroup.setdefault(s // ec, []).append((s, r))
    return list(regroup.values())


def _write_pass(run: _Run, blocks: list[_Block]) -> None:
    """Pass 2: match and write, one chunk column per task; each finished block is marked
    written at once (a killed run keeps it). A full disk or a read-only cube stops the run."""
    from ..lightcurves.cube import write_task

    client, cube, out, config, report = run.client, run.cube, run.out, run.config, run.report
    mra, mdec = client.scatter([cube.coord("ra"), cube.coord("dec")], broadcast=True)
    futs = {client.submit(write_task, str(out.resolve()), [r["file"] for _, r in b], [s for s, _ in b], mra, mdec,
                          config.match_radius_arcsec, config.magnitude, pure=False, retries=TASK_RETRIES): b
            for b in blocks}
    results = _stopping(completed(client, list(futs), "lightcurves: write", run.progress, unit="block",
                                  outputs=[out]), out)
    try:
        with contextlib.closing(results):
            for fut, res, exc in results:
                b = futs[fut]
                if exc is not None:
                    report.failed += [(r["exposure"], error_text(exc)) for _, r in b]
                    continue
                cube.mark_written(res["slots"])
                report.added += [r["exposure"] for _, r in b]
                report.rows += res["rows"]
                report.matched += res["matched"]
    finally:
        cube.consolidate()


def _stopping(results, out: Path):
    """``results`` with the error that stops the run (the cube cannot be written) turned into
    one clear :class:`~mstdask.errors.StoreError` (errors of the loop's body are left as they are)."""
    with contextlib.closing(results), writing(out, "the light-curve cube", "; blocks already written are kept: "
                                              "run the same command again"):
        yield from results


def _record(run: _Run, catdir: Path, exps: list[dict], argv: list[str] | None) -> None:
    """List the cube as ``lightcurve_cube`` in the manifest of its folder, with this run."""
    report, cube = run.report, run.cube
    manifest = Manifest(run.out.parent)
    manifest.add("lightcurve_cube", run.out, telescope=sorted({str(r.get("telescope")) for r in exps}),
                 filter=sorted({str(r.get("filter")) for r in exps}),
                 night=sorted({str(r.get("night")) for r in exps}),
                 inputs=[str((catdir / "sources").resolve()), str((catdir / "exposures.parquet").resolve())],
                 config=to_dict(run.config), sources=report.sources, epochs=report.epochs,
                 chunks=list(cube.chunks), format="zarr v3: mag, magerr, flags (source, epoch)")
    save_manifest(manifest, run.out.parent, argv, added=len(report.added), already=report.already,
                  failed=len(report.failed))


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
    t0 = time.perf_counter()
    catdir, out = Path(catdir), Path(out_path)
    report = LightcurveReport(out_path=str(out.resolve()))
    exps = _catalog_exposures(catdir, report)
    check_writable(out.parent, "the light-curve cube")
    cube, config = _open_cube(out, config, report)
    run = _Run(client, cube, out, config, report, progress)
    planned = _todo(cube, exps, report)
    if planned:
        n_old = cube.shape[1]
        refcat, ref_rows, cand_ra, cand_dec = _candidates(run, catdir, refcat_path,
                                                          str(planned[0][1].get("filter") or ""))
        blocks = _blocks(planned, cube.chunks[1])
        hits, ura, udec, bad = _match_pass(run, blocks, cand_ra, cand_dec)
        new_src = _new_sources(run, (hits, ura, udec), refcat, ref_rows, len(cand_ra) - len(ref_rows))
        blocks = [kept for b in blocks if (kept := [(s, r) for s, r in b if id(r) not in bad])]
        _write_pass(run, _grow_cube(run, new_src, planned, blocks, n_old))
    report.sources, report.epochs = cube.shape[0], int(cube.coord("written").sum())
    _record(run, catdir, exps, argv)
    report.seconds = time.perf_counter() - t0
    return report
