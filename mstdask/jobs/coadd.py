"""``mstdask coadd``: image stacks of N exposures, their STATIC photometry and depth."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..errors import BadInputError, StoreError
from ..manifest import Manifest
from ._job import (
    TASK_RETRIES,
    atomic_parquet,
    check_writable,
    clear_temporaries,
    progress_bar,
    signature,
    stops_the_run,
    write_error,
    write_png,
    writing,
)
from .photometry import _exposure_frames, _ok_exposures


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
    from ..store import ReducedStore

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

    from ..config import PhotometryConfig
    from ..stacks.coadd import CoaddFrame, wcs_from_text
    from ..store import ReducedStore

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

    from .. import __version__
    from ..config import AstrometryConfig, CoaddConfig, PhotometryConfig, RefcatConfig
    from ..errors import InsufficientDataError
    from ..stacks.coadd import coadd as lazy_coadd
    from ..stacks.coadd import (
        depth_figure,
        depth_rows,
        fits_header,
        output_grid,
        stack_photometry_task,
        write_fits,
    )

    config = config or CoaddConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    report = CoaddReport(out_dir=str(out.resolve()))
    catdir, reduced, entry = _coadd_inputs(Path(catdir_or_reduced), catalogs)
    check_writable(out, "the coadds")
    clear_temporaries(out)
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
                sig = signature("coadd", name, [f.exposure for f in stack], {**same, "grid": grid.header})
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
                        with writing(out, f"the coadd {name}"):
                            with warnings.catch_warnings():
                                warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
                                job = ds.to_zarr(str(tmpz), mode="w", compute=False, zarr_format=3)
                            fut = client.compute(job, retries=TASK_RETRIES)
                            with progress_bar(1, f"coadd {name}", progress, unit="stack") as bar:
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
                        with writing(out, "the manifest"):
                            manifest.write()
                        report.made.append(name)
                        report.frame_seconds.append((time.perf_counter() - tc) / n)
                    except Exception as exc:
                        if stops_the_run(exc, [out]) or isinstance(exc, StoreError):
                            raise
                        report.failed.append((name, f"{type(exc).__name__}: {exc}"))
                        continue
                # STATIC on the stack
                if refcat_path is None:
                    report.notes.append(f"{name}: no reference catalogue named in {catdir}/manifest.json: "
                                        "no stack photometry")
                    continue
                spath = out / "stacks" / f"{name}_sources.parquet"
                psig = signature("coadd_catalog", name, [sig], {"photometry": cfg["photometry"],
                                                                 "astrometry": cfg["astrometry"]})
                rec = None
                if spath.exists():
                    from ..static.photometry import read_exposure_record

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
                        with progress_bar(1, f"photometry {name}", progress, unit="stack") as bar:
                            rec = fut.result()
                            bar.update()
                    except Exception as exc:
                        if stops_the_run(exc, [out]):
                            raise write_error(exc, out, "the stack catalogues") from None
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
            with writing(out, "the depth table"):
                atomic_parquet(df, dpath)
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
            with writing(out, "the depth figure"):
                write_png(fig, ppath)
            manifest.add("figure", ppath, inputs=[str(dpath.resolve())], figure="Fig. 13", **allk)
            report.depth = depth
        manifest.record_run(argv, made=len(report.made), already=len(report.already), failed=len(report.failed))
        with writing(out, "the manifest"):
            manifest.write()
    report.seconds = time.perf_counter() - t0
    return report


def _chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


