"""``mstdask lightcurves``: every exposure's sources into the source x epoch cube."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..errors import MstdaskError
from ..manifest import Manifest
from ._job import (
    TASK_RETRIES,
    check_writable,
    progress_bar,
    stops_the_run,
    write_error,
    writing,
)
from .photometry import _ok_exposures


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

    from ..config import LightcurveConfig
    from ..lightcurves import _lc_kernels as LK
    from ..lightcurves.cube import CubeStore, match_task, write_task

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
        with writing(out.parent, "the light-curve cube"):
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
            with progress_bar(len(futs), "lightcurves: match", progress, unit="block") as bar:
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
        with writing(out, "the light-curve cube"):
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
            with progress_bar(len(futs), "lightcurves: write", progress, unit="block") as bar:
                for fut in as_completed(list(futs)):
                    b = futs[fut]
                    try:
                        res = fut.result()
                    except Exception as exc:
                        if stops_the_run(exc, [out]):
                            raise write_error(exc, out, "the light-curve cube", "; blocks already written are "
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
    with writing(out.parent, "the manifest"):
        manifest.write()
    report.seconds = time.perf_counter() - t0
    return report
