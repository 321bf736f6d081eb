"""``mstdask photometry``: STATIC for every reduced exposure."""

from __future__ import annotations

import os
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..errors import BadInputError
from ..manifest import Manifest
from ..static.refcat import check_coverage, check_refcat
from ._job import JobReport, check_writable, completed, error_text, median_seconds, save_manifest, task_key, \
    tmp_name, writing


@dataclass
class PhotometryReport(JobReport):
    """What ``photometry`` did: exposures measured now, already done, flagged, failed.

    Flagged exposures (no pointing, no astrometric match, too few calibration stars, clouds)
    and failed ones make the run not ``ok`` (exit status 1): not everything asked was made."""

    out_dir: str
    measured: list[str] = field(default_factory=list)
    already: int = 0
    flagged: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    exposure_seconds: list[float] = field(default_factory=list)
    sources: int = 0

    _LISTED = (("FLAGGED", "flagged"), ("FAILED", "failed"))
    _FAILS = ("flagged", "failed")

    def headline(self) -> str:
        """Exposures measured (sources), already done, flagged and failed; time per exposure."""
        per = (f", median {median_seconds(self.exposure_seconds):.1f} s per exposure "
               "in its task") if self.exposure_seconds else ""
        return (f"photometry {self.out_dir}: {len(self.measured)} exposures measured ({self.sources} sources), "
                f"{self.already} already done, {len(self.flagged)} flagged, {len(self.failed)} failed "
                f"in {self.seconds:.1f} s{per}")


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

    from ..static.photometry import EXPOSURE_SCHEMA

    cast = {"string": str, "int64": int, "float64": float, "timestamp": int}
    cols = {}
    for name, kind in EXPOSURE_SCHEMA.items():
        vals = [None if r.get(name) is None else cast[kind](r[name]) for r in records]
        if kind == "timestamp":  # stored as ns since 1970 (the stores' convention)
            cols[name] = pa.array(vals, pa.int64()).cast(pa.timestamp("ns", tz="UTC"))
        else:
            cols[name] = pa.array(vals, pa.type_for_alias(kind))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)


def _exposure_frames(telescopes, times, reduced) -> dict[str, int]:
    """The ``exposure`` name (:func:`mstdask.photometry.exposure_id`) of every reduced frame of
    a store and its frame index; two exposures started in the same second get ``_INDEX``."""
    import numpy as np

    from ..static.photometry import exposure_id

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
    from ..config import AstrometryConfig, PhotometryConfig, RefcatConfig
    from ..store import ReducedStore

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
    # a missing column is one error up front, not one failure per exposure
    check_refcat(refcat_path, refcat_config, {str(f) for f in c["filter"][c["reduced"]]})
    # ... and so is a catalogue of another field (every exposure would be flagged)
    check_refcat_coverage(red, refcat_path, refcat_config, astro_config)
    records: dict[str, dict] = {}  # exposure -> its row of the exposure table
    futures, meta_of = _submit_exposures(client, c, reduced_path, refcat_path, out, config, astro_config,
                                         refcat_config, records, report)
    try:
        _collect_exposures(client, futures, meta_of, out, progress, records, report)
    finally:
        # also when the run stops (full disk, Ctrl-C): the table lists what is measured
        recs = sorted(records.values(), key=lambda r: (str(r.get("telescope")), int(r.get("time") or 0)))
        report.flagged += [(r["exposure"], r["reason"]) for r in _flag_clouds(recs, config.cloud_zp_drop_mag)]
        cfg = {"photometry": to_dict(config), "astrometry": to_dict(astro_config), "refcat": to_dict(refcat_config)}
        _write_products(out, recs, reduced_path, refcat_path, cfg, argv, report)
    report.seconds = time.perf_counter() - t0
    return report


def check_refcat_coverage(red, refcat_path: str | os.PathLike, refcat_config=None, astro_config=None) -> None:
    """Check that the reference catalogue has stars where the reduced frames of ``red`` (a
    :class:`~mstdask.store.ReducedStore`) point: some pointing has a catalogue star within
    the radius each exposure's task searches (half the frame diagonal, widened by the scale
    and pointing tolerances of ``astro_config``). Frames without a pointing are not
    checked (they are flagged one by one). Reads the catalogue's RA/Dec columns only.

    Raises
    ------
    BadInputError
        No pointing is covered: names the catalogue, its extent, the pointings and the fix.
    """
    import math

    import numpy as np

    from ..config import AstrometryConfig

    astro_config = astro_config or AstrometryConfig()
    done = np.asarray(red.coord("reduced"), dtype=bool)
    if not done.any():
        return
    ny, nx = red.frame_shape
    # the same radius as the exposure's task (mstdask.static.photometry.photometry_task)
    half_diag = math.hypot(nx, ny) / 2 * astro_config.pixel_scale_arcsec / 3600
    radius = astro_config.search_radius_deg or half_diag * (1 + astro_config.scale_tolerance
                                                            + astro_config.pointing_error_fraction)
    ra = np.asarray(red.coord("ra"), dtype=np.float64)[done]
    dec = np.asarray(red.coord("dec"), dtype=np.float64)[done]
    check_coverage(refcat_path, np.column_stack([ra, dec]), radius, refcat_config)


def _exposure_meta(c: dict, exp: str, i: int, night: str) -> dict:
    """What the exposure table says of frame ``i`` whatever its photometry: names and times
    (``mjd_mid``: the middle of the exposure)."""
    import numpy as np

    texp = float(c["exptime"][i])
    return {"exposure": exp, "path": str(c["path"][i]), "night": night, "telescope": str(c["telescope"][i]),
            "filter": str(c["filter"][i]), "time": int(c["time"][i]),
            "mjd_mid": float(int(c["time"][i]) / 86400e9 + 40587.0 + (texp / 2 if np.isfinite(texp) else 0) / 86400)}


def _submit_exposures(client, c: dict, reduced_path, refcat_path: Path, out: Path, config, astro_config,
                      refcat_config, records: dict[str, dict], report: PhotometryReport) -> tuple[list, dict]:
    """One :func:`~mstdask.static.photometry.photometry_task` per reduced exposure without a
    source file; returns the futures and ``key -> exposure metadata``.

    Exposures measured by an earlier run (a readable source file) and those without a
    pointing (flagged) go straight into ``records`` and ``report``."""
    import numpy as np

    from ..static.photometry import photometry_task, read_exposure_record

    futures, meta_of = [], {}
    for exp, i in _exposure_frames(c["telescope"], c["time"], c["reduced"]).items():
        night = str(c["night"][i]) or "unknown"
        fpath = out / "sources" / night / f"{exp}.parquet"
        meta = _exposure_meta(c, exp, i, night)
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
                            refcat_config, meta, float(c["exptime"][i]), ra0, dec0, gain, config, astro_config,
                            pure=False, retries=1, key=task_key("static", i))
        futures.append(fut)
        meta_of[fut.key] = meta
    return futures, meta_of


def _collect_exposures(client, futures: list, meta_of: dict, out: Path, progress: bool, records: dict[str, dict],
                       report: PhotometryReport) -> None:
    """The exposures' records as their tasks finish, into ``records`` and ``report``.

    Raises
    ------
    StoreError
        The catalogues cannot be written (full disk, read-only output): every exposure
        would fail the same way, so the run stops.
    """
    with writing(out, "the source catalogues", "; exposures already written are kept: run the same command again"), \
            closing(completed(client, futures, "photometry", progress, unit="exposure", outputs=[out])) as results:
        for fut, rec, err in results:
            meta = meta_of[fut.key]
            if err is not None:  # one bad exposure never ends the run
                reason = error_text(err)
                report.failed.append((meta["exposure"], reason))
                records[meta["exposure"]] = {**meta, "status": "failed", "reason": reason}
                continue
            records[meta["exposure"]] = rec
            if rec.get("status") == "ok":
                report.measured.append(meta["exposure"])
                report.sources += int(rec.get("n_sources") or 0)
                report.exposure_seconds.append(float(rec.get("seconds") or 0.0))
            else:
                report.flagged.append((meta["exposure"], rec.get("reason", "")))


def _write_products(out: Path, recs: list[dict], reduced_path, refcat_path: Path, cfg: dict, argv,
                    report: PhotometryReport) -> None:
    """The exposure table ``OUT/exposures.parquet`` and the manifest: the source catalogue
    (when an exposure has one) and the exposure table."""
    from ..static.photometry import SOURCE_COLUMNS

    table_path = out / "exposures.parquet"
    with writing(out, "the exposure table"):
        _write_exposure_table(table_path, recs)
    ok = [r for r in recs if r.get("catalog")]
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
    save_manifest(manifest, out, argv, measured=len(report.measured), flagged=len(report.flagged),
                  failed=len(report.failed))
