"""``mstdask coadd``: image stacks of N exposures, their STATIC photometry and depth."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..errors import BadInputError, StoreError
from ..manifest import Manifest
from ._job import (
    JobReport,
    atomic_parquet,
    atomic_zarr,
    check_writable,
    clear_temporaries,
    error_text,
    median_seconds,
    progress_bar,
    save_manifest,
    signature,
    stops_the_run,
    tmp_name,
    write_error,
    write_png,
    writing,
)
from .photometry import _exposure_frames, _ok_exposures


@dataclass
class CoaddReport(JobReport):
    """What ``coadd`` did: stacks made now or already there, stacks measured, depth per N,
    exposures left out (no astrometric solution, flagged) and failures.

    Skipped exposures, flagged stacks and failed stacks make the run not ``ok`` (exit
    status 1): not everything asked was made.
    """

    out_dir: str
    made: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    measured: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    flagged: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    depth: list[dict] = field(default_factory=list)
    frame_seconds: list[float] = field(default_factory=list)

    _LISTED = (("SKIPPED", "skipped"), ("FLAGGED", "flagged"), ("FAILED", "failed"))
    _FAILS = ("skipped", "flagged", "failed")

    def headline(self) -> str:
        """The counts, then one line per stack's depth (before the notes)."""
        per = (f", median {median_seconds(self.frame_seconds):.1f} s per input frame"
               if self.frame_seconds else "")
        lines = [f"coadd {self.out_dir}: {len(self.made)} stacks made, {len(self.already)} already done, "
                 f"{len(self.measured)} measured, {len(self.skipped)} exposures skipped, {len(self.flagged)} "
                 f"flagged, {len(self.failed)} failed in {self.seconds:.1f} s{per}"]
        for d in self.depth:
            lines.append(f"  {d.get('stack', '')} N={d['n']:>3}: limiting magnitude (5 sigma) {d['limiting_mag']:.2f}"
                         + (" (extrapolated)" if d.get("extrapolated") else "") + f", {d['n_sources']} sources")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- inputs
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


def _usable_exposures(catdir: Path, reduced: Path, index: dict, shape: tuple, report: CoaddReport) -> dict:
    """The exposures that can be stacked, by (telescope, filter), each with its index in the
    reduced store and its centre (``ra_c``, ``dec_c``); the others go to ``report.skipped``."""
    import math as _m

    from ..stacks.coadd import wcs_from_text

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
    return groups


def _by_field(rows: list[dict], half: float) -> list[list[dict]]:
    """Exposures in time order, in fields: an exposure joins the first field whose (first
    exposure's) centre is within ``half`` degrees."""
    import math as _m

    fields: list[list[dict]] = []
    for r in sorted(rows, key=lambda r: (r["time_ns"], str(r["exposure"]))):
        for f in fields:
            d = _m.hypot((r["ra_c"] - f[0]["ra_c"]) * _m.cos(_m.radians(f[0]["dec_c"])), r["dec_c"] - f[0]["dec_c"])
            if d < half:
                f.append(r)
                break
        else:
            fields.append([r])
    return fields


def _coadd_frames(catdir: Path, reduced: Path, config, report: CoaddReport) -> list[list]:
    """The usable exposures as CoaddFrame lists, one per (telescope, filter, field), by time."""
    import numpy as np

    from ..config import PhotometryConfig
    from ..stacks.coadd import CoaddFrame
    from ..store import ReducedStore

    red = ReducedStore.open(reduced, mode="r")
    c = {name: red.coord(name) for name in ("reduced", "time", "telescope", "egain")}
    index = _exposure_frames(c["telescope"], c["time"], c["reduced"])  # the names `photometry` gave
    shape = tuple(int(v) for v in red.frame_shape)
    groups = _usable_exposures(catdir, reduced, index, shape, report)
    # fields: an exposure joins the first field whose centre is within half the short side
    half = min(shape) / 2 * config.pixel_scale_arcsec / 3600
    out = []
    for key in sorted(groups):
        for rows in _by_field(groups[key], half):
            ref = rows[0]
            frames = []
            for r in rows:  # scaled to the first exposure's zero point and exposure time
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


def _stack_configs(entry: dict, phot_config, astro_config) -> tuple:
    """``(phot_config, astro_config, refcat_config, refcat_path)`` of the stack photometry:
    those given, else CATDIR's (its manifest ``entry``); no ``refcat_path`` when it names none."""
    from ..config import AstrometryConfig, PhotometryConfig, RefcatConfig

    cat_cfg = entry.get("config") or {}
    phot_config = phot_config or PhotometryConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in (cat_cfg.get("photometry") or {}).items()})
    astro_config = astro_config or AstrometryConfig(**(cat_cfg.get("astrometry") or {}))
    refcat_cfg = RefcatConfig(**(cat_cfg.get("refcat") or {}))
    refcat_path = (entry.get("inputs") or [None, None])[1] if len(entry.get("inputs") or []) > 1 else None
    return phot_config, astro_config, refcat_cfg, refcat_path


# ----------------------------------------------------------------------------- the job
@dataclass
class _Stack:
    """One stack: the first N exposures of a field, on the grid covering them."""

    name: str
    tel: str
    filt: str
    k_field: int
    nights: list[str]
    frames: list
    grid: object
    sig: str
    zpath: Path
    fpath: Path

    @property
    def n(self) -> int:
        return len(self.frames)


class _CoaddJob:
    """The state of one ``coadd`` run: make each stack, measure it, then the depth table."""

    def __init__(self, client, out: Path, config, progress: bool, catdir: Path, reduced: Path,
                 stack_configs: tuple, report: CoaddReport):
        self.client, self.out, self.config, self.progress = client, out, config, progress
        self.catdir, self.reduced, self.report = catdir, reduced, report
        self.phot_config, self.astro_config, self.refcat_cfg, self.refcat_path = stack_configs
        self.cfg = {"coadd": to_dict(config), "photometry": to_dict(self.phot_config),
                    "astrometry": to_dict(self.astro_config)}
        self.manifest = Manifest(out)
        self.depth: list[dict] = []
        self.points: dict[int, tuple] = {}  # N: (mag, magerr) of the first field, for the figure

    def run(self, fields: list, argv: list[str] | None) -> None:
        """Every stack of every field; the depth table and the manifest even when one stops the run."""
        (self.out / "stacks").mkdir(parents=True, exist_ok=True)
        try:
            for k_field, ((tel, filt), rows, frames) in enumerate(fields):
                self.do_field(k_field, tel, filt, rows, frames)
        finally:
            if self.depth:
                self.write_depth(fields)
            r = self.report
            save_manifest(self.manifest, self.out, argv, made=len(r.made), already=len(r.already),
                          failed=len(r.failed))

    def do_field(self, k_field: int, tel: str, filt: str, rows: list[dict], frames: list) -> None:
        """The stacks of one field: made (unless already there), measured, their depth kept."""
        # N = 1 (the first exposure, resampled and measured the same way) is the baseline
        ns = sorted({1} | {n for n in self.config.n_stack if n <= len(frames)})
        too_many = [n for n in self.config.n_stack if n > len(frames)]
        if too_many:
            self.report.notes.append(f"{tel} {filt} field {k_field}: {len(frames)} exposures; N = "
                                     f"{', '.join(map(str, too_many))} not made")
        label = f"coadd_{tel}_{filt}" + (f"_field{k_field}" if k_field else "")
        nights = sorted({str(r.get("night")) for r in rows[:max(ns)]})
        for n in ns:
            st = self.stack(f"{label}_N{n:03d}", tel, filt, k_field, nights, frames[:n])
            if not self.make_stack(st):
                continue
            found = self.measure_stack(st)
            if found is not None:
                self.add_depth(st, *found)

    def stack(self, name: str, tel: str, filt: str, k_field: int, nights: list[str], frames: list) -> _Stack:
        """A stack of ``frames`` with its grid, paths and signature."""
        from ..stacks.coadd import output_grid

        # each stack on the grid covering its own frames: STATIC on an image with wide
        # empty margins (a grid made for more dithers) is needlessly fragile
        grid = output_grid(frames, self.config.pixel_scale_arcsec)
        # the tiling does not change the coadd (tested), so it is not part of what it is made of
        same = {k: v for k, v in self.cfg["coadd"].items() if k not in ("tile_px", "frames_per_task")}
        sig = signature("coadd", name, [f.exposure for f in frames], {**same, "grid": grid.header})
        return _Stack(name, tel, filt, k_field, nights, frames, grid, sig,
                      self.out / f"{name}.zarr", self.out / f"{name}.fits")

    def make_stack(self, st: _Stack) -> bool:
        """Resample and combine ``st`` into its Zarr store and FITS file (unless they are there
        with the same signature) and list them in the manifest; False when it failed."""
        from ..stacks.coadd import coadd as lazy_coadd

        done = self.manifest.get(st.zpath)
        if (done is not None and done.get("signature") == st.sig and (st.zpath / "zarr.json").is_file()
                and st.fpath.is_file()):
            self.report.already.append(st.name)
            return True
        try:
            tc = time.perf_counter()
            self.manifest.remove(st.zpath)
            self.manifest.remove(st.fpath)
            ds = lazy_coadd(st.frames, st.grid, self.config)
            with writing(self.out, f"the coadd {st.name}"):
                atomic_zarr(self.client, ds, st.zpath, f"coadd {st.name}", self.progress)
                self._write_fits(st, ds.attrs)
            common = dict(telescope=st.tel, filter=st.filt, night=st.nights, config=self.cfg,
                          inputs=[f.exposure for f in st.frames], ncombine=st.n, signature=st.sig,
                          catalogs=str(self.catdir.resolve()), reduced=str(Path(self.reduced).resolve()),
                          shape=list(st.grid.shape), combine=self.config.combine)
            self.manifest.add("coadd", st.zpath, format="zarr", **common)
            self.manifest.add("coadd", st.fpath, format="fits", extensions=["SCI", "WHT", "CNT", "FLG"], **common)
            with writing(self.out, "the manifest"):  # each stack recorded as soon as it is there
                self.manifest.write()
            self.report.made.append(st.name)
            self.report.frame_seconds.append((time.perf_counter() - tc) / st.n)
        except Exception as exc:
            if stops_the_run(exc, [self.out]) or isinstance(exc, StoreError):
                raise
            self.report.failed.append((st.name, error_text(exc)))
            return False
        return True

    def _write_fits(self, st: _Stack, attrs: dict) -> None:
        """The FITS file of the stack (from its Zarr store, on a worker), with provenance."""
        from .. import __version__
        from ..stacks.coadd import fits_header, write_fits

        hdr = fits_header(attrs, {"DATE": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())})
        hdr["HISTORY"] = f"mstdask {__version__} coadd of {st.n} exposures from {self.catdir.resolve()}"
        hdr["HISTORY"] = f"reduced store {Path(self.reduced).resolve()}"
        for chunk in _chunks(json.dumps(self.cfg["coadd"], sort_keys=True), 60):
            hdr["HISTORY"] = chunk
        tmpf = tmp_name(st.fpath)
        self.client.submit(write_fits, str(st.zpath), str(tmpf), hdr, pure=False).result()
        os.replace(tmpf, st.fpath)

    def measure_stack(self, st: _Stack) -> tuple[Path, dict] | None:
        """STATIC on the stack (unless its catalogue is there with the same signature), listed
        in the manifest: ``(catalogue path, record)``, or None when not measured."""
        if self.refcat_path is None:
            self.report.notes.append(f"{st.name}: no reference catalogue named in {self.catdir}/manifest.json: "
                                     "no stack photometry")
            return None
        spath = self.out / "stacks" / f"{st.name}_sources.parquet"
        psig = signature("coadd_catalog", st.name, [st.sig], {"photometry": self.cfg["photometry"],
                                                               "astrometry": self.cfg["astrometry"]})
        rec = _earlier_record(spath, psig)
        if rec is None:
            rec = self._photometry(st, spath, psig)
            if rec is None:
                return None
            if rec.get("status") != "ok":
                self.report.flagged.append((st.name, rec.get("reason", "")))
                return None
            self.report.measured.append(st.name)
        self.manifest.add("coadd_catalog", spath, telescope=st.tel, filter=st.filt, night=st.nights,
                          inputs=[str(st.zpath.resolve())], config=self.cfg, ncombine=st.n, signature=psig,
                          sources=int(rec.get("n_sources") or 0), zero_point=rec.get("zero_point"),
                          noise_correlation=rec.get("noise_correlation"))
        return spath, rec

    def _photometry(self, st: _Stack, spath: Path, psig: str) -> dict | None:
        """Run STATIC on the stack on a worker: its exposure record, or None when it failed."""
        import math as _m

        import numpy as np

        from ..stacks.coadd import stack_photometry_task

        grid = st.grid
        ra0, dec0 = (float(v[0]) for v in grid.wcs.all_pix2world([(grid.shape[1] - 1) / 2],
                                                                 [(grid.shape[0] - 1) / 2], 0))
        radius = _m.hypot(*grid.shape) / 2 * self.config.pixel_scale_arcsec / 3600 * 1.2
        meta = {"exposure": st.name, "time": int(st.frames[0].time), "night": st.nights[0], "telescope": st.tel,
                "filter": st.filt, "path": str(st.zpath),
                "mjd_mid": float(np.mean([f.time for f in st.frames]) / 86400e9 + 40587.0)}
        fut = self.client.submit(stack_photometry_task, str(st.zpath), str(spath), str(self.refcat_path),
                                 self.refcat_cfg, ra0=ra0, dec0=dec0, radius_deg=radius, meta=meta,
                                 signature=psig, config=self.phot_config, astro_config=self.astro_config,
                                 pure=False, retries=1)
        try:
            with progress_bar(1, f"photometry {st.name}", self.progress, unit="stack") as bar:
                rec = fut.result()
                bar.update()
        except Exception as exc:
            if stops_the_run(exc, [self.out]):
                raise write_error(exc, self.out, "the stack catalogues") from None
            self.report.failed.append((st.name, f"photometry: {error_text(exc)}"))
            return None
        return rec

    def add_depth(self, st: _Stack, spath: Path, rec: dict) -> None:
        """The stack's row of the depth table (and its points for the figure, first field only)."""
        import numpy as np
        import pyarrow.parquet as pq

        from ..stacks.coadd import depth_rows

        s = pq.read_table(spath, columns=["mag_aper", "magerr_aper", "flags", "extract_flags"]).to_pydict()
        d = depth_rows(s, st.n, self.config.mag_bin, self.config.limit_snr)
        self.depth.append({"telescope": st.tel, "filter": st.filt, "field": st.k_field, "stack": st.name, **d,
                           "noise_correlation": rec.get("noise_correlation"), "gain_eff": rec.get("gain_eff"),
                           "seeing_arcsec": rec.get("seeing_arcsec")})
        if st.k_field == 0:
            self.points[st.n] = (np.asarray(s["mag_aper"]), np.asarray(s["magerr_aper"]))

    def write_depth(self, fields: list) -> None:
        """``depth.parquet`` and ``depth.png`` (Fig. 13, the first field), in the manifest."""
        import pandas as pd

        from ..stacks.coadd import depth_figure

        depth, out = self.depth, self.out
        dpath = out / "depth.parquet"
        df = pd.DataFrame(depth)
        with writing(out, "the depth table"):
            atomic_parquet(df, dpath)
        allk = dict(telescope=sorted({d["telescope"] for d in depth}), filter=sorted({d["filter"] for d in depth}),
                    night=sorted({n for _, rows, _ in fields for n in (str(r.get("night")) for r in rows)}),
                    config=self.cfg)
        self.manifest.add("coadd_depth", dpath, inputs=sorted({str(d["stack"]) for d in depth}),
                          columns=list(df.columns), **allk)
        first_field = [d for d in depth if d["field"] == 0 and d["telescope"] == depth[0]["telescope"]
                       and d["filter"] == depth[0]["filter"]]
        fig = depth_figure(first_field, self.points, title=f"{depth[0]['telescope']} {depth[0]['filter']}: "
                                                           "magnitude error of N-exposure stacks (Fig. 13)")
        ppath = out / "depth.png"
        with writing(out, "the depth figure"):
            write_png(fig, ppath)
        self.manifest.add("figure", ppath, inputs=[str(dpath.resolve())], figure="Fig. 13", **allk)
        self.report.depth = depth


def _earlier_record(spath: Path, psig: str) -> dict | None:
    """The exposure record of a stack catalogue already there with signature ``psig``, else None."""
    if not spath.exists():
        return None
    from ..static.photometry import read_exposure_record

    try:
        rec = read_exposure_record(spath)
    except Exception:  # unreadable: measured again
        return None
    return rec if rec.get("signature") == psig else None


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
    from ..config import CoaddConfig
    from ..errors import InsufficientDataError

    config = config or CoaddConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    report = CoaddReport(out_dir=str(out.resolve()))
    catdir, reduced, entry = _coadd_inputs(Path(catdir_or_reduced), catalogs)
    check_writable(out, "the coadds")
    clear_temporaries(out)
    stack_configs = _stack_configs(entry, phot_config, astro_config)
    fields = _coadd_frames(catdir, reduced, config, report)
    if not fields:
        raise InsufficientDataError(f"{catdir}: no exposure to coadd (none with status ok and an astrometric "
                                    f"solution; {len(report.skipped)} skipped); run `mstdask photometry` first")
    _CoaddJob(client, out, config, progress, catdir, reduced, stack_configs, report).run(fields, argv)
    report.seconds = time.perf_counter() - t0
    return report


def _chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]
