"""The ``mstdask`` command line.

Exit status (the same rule for every command): 0 only when everything asked was made; 1
when some inputs, frames or exposures were rejected, skipped or flagged (each listed with
its reason in the summary); 2 the command could not run (bad option, unreachable scheduler,
unusable store, a reference catalogue without the columns it needs, an output that cannot
be written: a read-only folder, a full disk), found up front where it can be; 130
interrupted. Every command that writes is resumable: run it again to finish. ``--dry-run``
prints the plan and exits with the status the run would have as far as the headers tell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .config import ClusterConfig, IngestConfig, SiteConfig, StoreLayout
from .errors import BadInputError, MstdaskError

__all__ = ["main", "build_parser"]


def _dry_run_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (frames by night, telescope and type, tasks, estimated data read and "
                        "written, what is already done) and exit: nothing is computed or written, no cluster started")


def _cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", metavar="ADDRESS|FILE.yaml", default=None,
                   help="scheduler address (tcp://host:8786, tls://...) or a cluster/NAME.yaml config; "
                        "default: an embedded local cluster")
    g.add_argument("--workers", type=int, default=None, help="local cluster: worker processes (default: cores)")
    g.add_argument("--memory-limit", default=None, help="local cluster: memory per worker, e.g. 4GiB")
    g.add_argument("--quiet", action="store_true", help="no progress bars or dashboard link")


def _ingest_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ingest")
    g.add_argument("--utc-offset", type=float, default=SiteConfig().utc_offset_hours,
                   help="site's local time minus UTC in hours, defines the observing night (default: +8, Xinglong)")
    g.add_argument("--site", default=SiteConfig().name, help="site name recorded in the store")
    g.add_argument("--as", dest="force_imagetyp", choices=("bias", "dark", "flat", "science"), default=None,
                   help="treat every file as this image type (for cameras that write a wrong IMAGETYP)")
    g.add_argument("--tile", type=int, default=StoreLayout().tile, help="target spatial tile edge in pixels")
    g.add_argument("--compressor", choices=("lz4", "zstd", "none"), default=StoreLayout().compressor,
                   help="tile compression in a new store")


def _ingest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="PATH", help="FITS files (.fits .fit .fz .gz), folders or globs")
    p.add_argument("--store", required=True, metavar="STORE.zarr", help="the store (created if missing)")


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE.zarr")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE.zarr")
    p.add_argument("--out", required=True, metavar="CALDIR")
    p.add_argument("--bias-combine", choices=("clipped-mean", "median"), default="clipped-mean")
    p.add_argument("--ps-threshold", type=float, default=8.0, help="PS pixel: std over bias frames above this (ADU)")
    p.add_argument("--ps-frames", type=int, default=100, help="bias frames of one night used for the PS map")


def _reduce_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE.zarr")
    p.add_argument("--calib", required=True, metavar="CALDIR", help="output folder of `mstdask calibrate`")
    p.add_argument("--out", required=True, metavar="REDUCED.zarr")
    p.add_argument("--fits", default=None, metavar="DIR", help="also write DIR/NIGHT/NAME.fits (SCI + MASK)")
    p.add_argument("--no-tracks", action="store_true", help="skip the satellite-track search")
    p.add_argument("--no-cosmics", action="store_true", help="skip the cosmic-ray search")


def _photometry_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reduced", metavar="REDUCED.zarr", help="output of `mstdask reduce`")
    p.add_argument("--refcat", required=True, metavar="CATALOG",
                   help="reference catalogue (.csv, .fits or .parquet) for astrometry and zero points")
    p.add_argument("--refcat-columns", default=None, metavar="KEY=COL,...",
                   help="column names, e.g. 'ra=raj2000,dec=dej2000,mag={filter}_psf,mag_err=e_{filter}_psf' "
                        "(default ra, dec, mag_{filter} else mag)")
    p.add_argument("--out", required=True, metavar="CATDIR")
    p.add_argument("--pixel-scale", type=float, default=None, metavar="ARCSEC",
                   help="expected pixel scale for the blind solve (default 0.862, MST; +-10 %% is searched)")
    p.add_argument("--distortion-order", type=int, default=4, help="polynomial order of the TPV distortion (4)")


def _coadd_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="CATDIR|REDUCED.zarr",
                   help="output folder of `mstdask photometry` (or the reduced store, with --catalogs)")
    p.add_argument("--out", required=True, metavar="COADDDIR")
    p.add_argument("--catalogs", default=None, metavar="CATDIR", help="the catalogues, when INPUT is the reduced store")
    p.add_argument("--n", default="2,4,8,16,32,64", metavar="N,N,...",
                   help="stack sizes: the first N exposures of each field (default 2,4,8,16,32,64)")
    p.add_argument("--combine", choices=("mean", "median", "clipped-mean"), default="mean",
                   help="weighted mean (default), median, or weighted mean after sigma clipping")
    p.add_argument("--pixel-scale", type=float, default=0.862, metavar="ARCSEC",
                   help="output pixel scale (default 0.862, MST native)")
    p.add_argument("--resampling", choices=("bilinear", "adaptive"), default="bilinear",
                   help="bilinear (default, fast) or reproject's adaptive kernel (anti-aliased, slower)")
    p.add_argument("--tile", type=int, default=2048, metavar="PX", help="output tile edge (default 2048)")


def _lightcurves_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("catdir", metavar="CATDIR", help="output folder of `mstdask photometry`")
    p.add_argument("--out", required=True, metavar="LC.zarr")
    p.add_argument("--refcat", default=None, metavar="CATALOG",
                   help="reference catalogue of the master list (default: the one photometry used)")
    p.add_argument("--no-refcat", action="store_true", help="build the source list from detections only")
    p.add_argument("--match-radius", type=float, default=1.0, metavar="ARCSEC", help="cross-match radius (1)")
    p.add_argument("--magnitude", choices=("aper", "psf"), default="aper", help="which calibrated magnitude")
    p.add_argument("--source-chunk", type=int, default=4096, help="sources per chunk of a new cube (4096)")
    p.add_argument("--epoch-chunk", type=int, default=64,
                   help="epochs per chunk of a new cube, also exposures per writing task (64)")


def _precision_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cube", metavar="LC.zarr", help="output of `mstdask lightcurves`")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--exptime", type=float, default=300.0, help="theory: exposure time in s (300)")
    p.add_argument("--seeing", type=float, default=2.0, help="theory: seeing in arcsec (2)")
    p.add_argument("--sky-mag", type=float, default=21.0, help="theory: sky in mag/arcsec^2 (21)")
    p.add_argument("--diameter", type=float, default=30.0, help="theory: aperture in cm (30)")
    p.add_argument("--efficiency", type=float, default=0.32, help="theory: total throughput eta (0.32)")
    p.add_argument("--min-epochs", type=int, default=5, help="fewest good epochs for a source's statistics (5)")


def _characterize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE.zarr")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--telescope", default=None, help="the camera to characterise (needed when the store holds several)")
    p.add_argument("--region", type=int, default=2000, metavar="PX",
                   help="edge of the central region of the frame statistics (default 2000; half a smaller frame)")
    p.add_argument("--nsigma", type=float, default=5.0, help="anomalous pixels: beyond this many sigmas (default 5)")
    p.add_argument("--subarea", type=int, default=20, metavar="PX", help="sub-area of the anomalous-pixel density map")
    p.add_argument("--saturation", type=float, default=50000.0, metavar="ADU",
                   help="raw level at which flats count as saturated (default 50000)")
    p.add_argument("--min-flats", type=int, default=20,
                   help="fewest flats at one exposure time for the per-pixel gain (default 20; the paper has 144)")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="RAW")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--refcat", default=None, metavar="CATALOG",
                   help="reference catalogue: also run the STATIC photometry (into DIR/catalog)")
    p.add_argument("--refcat-columns", default=None, metavar="KEY=COL,...",
                   help="column names of --refcat (see `mstdask photometry --help`)")


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--shape", default="600x900", metavar="NYxNX",
                   help="frame size of the simulated camera (default 600x900; full MST is 6388x9576)")
    p.add_argument("--nights", type=int, default=2)
    p.add_argument("--science", type=int, default=4, help="science frames per night")
    p.add_argument("--seed", type=int, default=0)


def _certs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="folder for the certificates, e.g. cluster/certs (created)")
    p.add_argument("--host", dest="hosts", action="append", default=[], metavar="NAME",
                   help="host name or IP of the scheduler/workers, repeatable (localhost and 127.0.0.1 always)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--force", action="store_true", help="replace certificates already in DIR")


_DRY, _INGEST, _CLUSTER = _dry_run_option, _ingest_options, _cluster_options

#: The sub-commands in the order ``mstdask --help`` lists them: name, help, the command's own
#: arguments, then the shared option groups (in this order in the command's help).
_SUBCOMMANDS = (
    ("ingest", "FITS files, folders or globs -> a raw Zarr store", _ingest_arguments, (_DRY, _INGEST, _CLUSTER)),
    ("info", "what is in a store", _info_arguments, ()),
    ("calibrate", "night calibrations: master bias, PS and bad-pixel masks -> CALDIR", _calibrate_arguments,
     (_DRY, _CLUSTER)),
    ("reduce", "STIR per frame: bias, flat, masks, tracks, cosmic rays -> REDUCED.zarr", _reduce_arguments,
     (_DRY, _CLUSTER)),
    ("photometry", "STATIC per exposure: sources, blind astrometry with distortion, "
                   "25-aperture and PSF photometry, zero points -> CATDIR (Parquet)", _photometry_arguments,
     (_CLUSTER,)),
    ("coadd", "STATIC multiple: resample exposures onto one TAN grid and stack N = 2..64 of "
              "them, STATIC on every stack, depth versus N -> COADDDIR (Zarr + FITS)", _coadd_arguments,
     (_DRY, _CLUSTER)),
    ("lightcurves", "cross-match every exposure's catalogue to one source list -> "
                    "source x epoch cube LC.zarr (appends new exposures)", _lightcurves_arguments, (_CLUSTER,)),
    ("precision", "precision vs magnitude with the Eqs. 1-5 theory, catalogue stacks, "
                  "variability and light curves of a cube -> DIR", _precision_arguments, (_CLUSTER,)),
    ("characterize", "detector lab set: bias stability, anomalous pixels, dark current, "
                     "linearity, gain and read noise (also per pixel) -> DIR", _characterize_arguments, (_CLUSTER,)),
    ("run", "the main job: ingest, then every pipeline step, into --out", _run_arguments, (_DRY, _INGEST, _CLUSTER)),
    ("demo", "simulate a small two-night survey and run the main job on it", _demo_arguments, (_CLUSTER,)),
    ("certs", "TLS certificates of a Dask cluster (CA, scheduler/workers, client) -> DIR", _certs_arguments, ()),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="mstdask", description="Dask-parallel reduction of wide-field CMOS survey frames (Mini-SiTian).")
    parser.add_argument("--version", action="version", version=f"mstdask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, own_arguments, shared_options in _SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text)
        own_arguments(p)
        for add_options in shared_options:
            add_options(p)
    return parser


def _cluster_config(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(n_workers=args.workers, memory_limit=args.memory_limit)


def _ingest_config(args: argparse.Namespace) -> IngestConfig:
    return IngestConfig(site=SiteConfig(name=args.site, utc_offset_hours=args.utc_offset),
                        layout=StoreLayout(tile=args.tile, compressor=args.compressor),
                        force_imagetyp=args.force_imagetyp)


def _print_info(store: str, as_json: bool) -> None:
    from .store import describe, dumps

    info = describe(store)
    if as_json:
        print(dumps(info))
        return
    ny, nx = info["frame_shape"]
    print(f"{info['store']}")
    print(f"  frames: {info['frames']} of {nx}x{ny} uint16 "
          f"({info['raw_bytes'] / 1e9:.2f} GB raw, {info['size_on_disk_bytes'] / 1e9:.2f} GB on disk)"
          + (f"; {info['pending_slots']} unfinished slots (re-run the ingest)" if info["pending_slots"] else "")
          + (f"; {info.get('rejected_slots', 0)} rejected (unreadable files)" if info.get("rejected_slots") else ""))
    for r in info.get("rejected", []):
        print(f"  REJECTED {r['path']}: {r['reason']}")
    if not info["frames"]:
        return
    print(f"  site: {info['site']}   telescopes: {', '.join(info['telescopes']) or '-'}   "
          f"filters: {', '.join(info['filters']) or '-'}")
    counts = info["imagetyp_counts"]
    print("  " + "   ".join(f"{k}: {v}" for k, v in counts.items()))
    print(f"  {'night':<12}{'bias':>6}{'dark':>6}{'flat':>6}{'sci':>6}  {'first UTC':<20}{'last UTC':<20}telescopes/filters")
    for night, e in info["nights"].items():
        print(f"  {night:<12}{e['bias']:>6}{e['dark']:>6}{e['flat']:>6}{e['science']:>6}  "
              f"{e['first_utc']:<20}{e['last_utc']:<20}{','.join(e['telescopes'])}/{','.join(e['filters'])}")


def _preflight(args: argparse.Namespace) -> None:
    """Errors a command would meet at its start (no input store, a reference catalogue
    without the columns it needs, an output folder that cannot be written), found before a
    cluster is started: exit status 2."""
    from .jobs import check_writable
    from .static.refcat import check_refcat, parse_columns
    from .store import RawStore

    if args.command == "ingest":
        if not Path(args.store, "zarr.json").exists():
            check_writable(Path(args.store).parent, "the store")
    elif args.command in ("calibrate", "characterize"):
        RawStore.open(args.store, mode="r")
        check_writable(args.out, "the output folder")
    elif args.command == "reduce":
        RawStore.open(args.store, mode="r")
        out = Path(args.out)
        check_writable(out if out.exists() else out.parent, "the reduced store")
        if args.fits:
            check_writable(args.fits, "the FITS frames")
    elif args.command == "photometry":
        from .store import ReducedStore

        from .jobs.photometry import check_refcat_coverage

        red = ReducedStore.open(args.reduced, mode="r")
        rcfg = parse_columns(args.refcat_columns)
        check_refcat(args.refcat, rcfg, {str(f) for f in red.coord("filter")[red.coord("reduced")]})
        check_refcat_coverage(red, args.refcat, rcfg, _astro_config(args))
        check_writable(args.out, "the catalogues")
    elif args.command == "coadd":
        from .jobs.coadd import _coadd_inputs

        _coadd_inputs(Path(args.input), args.catalogs)
        check_writable(args.out, "the coadds")
    elif args.command == "lightcurves":
        if not Path(args.catdir, "exposures.parquet").exists():
            raise BadInputError(str(Path(args.catdir, "exposures.parquet")),
                                "no exposure table: CATDIR must be the output folder of `mstdask photometry`")
        if args.refcat and not Path(args.refcat).exists():
            raise BadInputError(args.refcat, "reference catalogue not found; check --refcat")
        check_writable(Path(args.out).parent, "the light-curve cube")
    elif args.command == "precision":
        from .lightcurves.cube import CubeStore

        CubeStore.open(args.cube, mode="r")
        check_writable(args.out, "the precision products")
    elif args.command in ("run", "demo"):
        if getattr(args, "refcat", None):  # the filters are not known yet: a magnitude for some filter
            check_refcat(args.refcat, parse_columns(args.refcat_columns), None)
        check_writable(args.out, "the output folder")
    _check_free_space(args)


def _astro_config(args: argparse.Namespace):
    """The astrometry settings of ``photometry`` (its preflight and its run use the same)."""
    from .config import AstrometryConfig

    return AstrometryConfig(distortion_order=args.distortion_order,
                            **({"pixel_scale_arcsec": args.pixel_scale} if args.pixel_scale else {}))


def _check_free_space(args: argparse.Namespace) -> None:
    """Before ``ingest``, ``calibrate``, ``reduce`` and ``run`` write: room on the output
    disk for what their dry-run plan says they write (headers and store metadata only; for
    ``ingest`` and ``run`` every input header, about 1.5 ms a file). Nothing to check when
    the plan cannot be made: the command itself then says why."""
    from . import jobs
    from .config import CalibConfig
    from .jobs._job import check_free_space

    try:
        if args.command == "ingest":
            places = [(args.store, jobs.plan_ingest(args.inputs, args.store, _ingest_config(args)).bytes_written,
                       "the store")]
        elif args.command == "calibrate":
            places = [(args.out, jobs.plan_calibrate(args.store, args.out, _calib_config(args)).bytes_written,
                       "the calibrations")]
        elif args.command == "reduce":
            need = jobs.plan_reduce(args.store, args.calib, args.out, _stir_config(args), CalibConfig(),
                                    fits_dir=args.fits).bytes_written
            # with --fits half of it goes to the FITS folder, which may be on another disk
            places = [(args.out, need // 2, "the reduced store"), (args.fits, need // 2, "the FITS frames")] \
                if args.fits else [(args.out, need, "the reduced store")]
        elif args.command == "run":
            places = [(args.out, jobs.plan_run(args.inputs, args.out, _ingest_config(args)).bytes_written,
                       "the products")]
        else:
            return
    except (MstdaskError, OSError):
        return
    if len(places) == 2 and _same_disk(places[0][0], places[1][0]):
        places = [(places[0][0], places[0][1] + places[1][1], "the reduced store and the FITS frames")]
    for folder, need, what in places:
        check_free_space(folder, need, what)


def _same_disk(a, b) -> bool:
    """Whether two paths (or their nearest existing parents) are on one file system."""
    import os

    def dev(p) -> int:
        p = Path(p).absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        return os.stat(p).st_dev

    return dev(a) == dev(b)


def _dry_run(args: argparse.Namespace) -> int:
    """Print what the command would do; nothing is computed or written."""
    from . import jobs
    from .config import CalibConfig

    if args.command == "coadd":
        text, skipped = _coadd_plan(args)
        print(text)
        return 1 if skipped else 0
    if args.command == "ingest":
        plan = jobs.plan_ingest(args.inputs, args.store, _ingest_config(args))
    elif args.command == "calibrate":
        plan = jobs.plan_calibrate(args.store, args.out, _calib_config(args))
    elif args.command == "reduce":
        plan = jobs.plan_reduce(args.store, args.calib, args.out, _stir_config(args), CalibConfig(),
                                  fits_dir=args.fits)
    else:
        plan = jobs.plan_run(args.inputs, args.out, _ingest_config(args))
    print(plan.text())
    return plan.exit_status  # the run's, as far as the headers tell: 1 when inputs would be rejected


def _coadd_config(args: argparse.Namespace):
    from .config import CoaddConfig
    from .errors import ConfigError

    try:
        ns = tuple(int(v) for v in str(args.n).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--n {args.n!r}: give stack sizes as integers separated by commas, e.g. 2,4,8") from None
    return CoaddConfig(n_stack=ns, combine=args.combine, pixel_scale_arcsec=args.pixel_scale,
                       resampling=args.resampling, tile_px=args.tile)


def _coadd_plan(args: argparse.Namespace) -> tuple[str, int]:
    """What ``coadd`` would stack (fields, exposures, N), without a cluster, and how many
    exposures it would skip."""
    from .jobs.coadd import CoaddReport, _coadd_frames, _coadd_inputs

    cfg = _coadd_config(args)
    catdir, reduced, _ = _coadd_inputs(Path(args.input), args.catalogs)
    rep = CoaddReport(out_dir=str(args.out))
    lines = [f"coadd {catdir} (reduced {reduced}) -> {args.out}: {cfg.combine}, {cfg.resampling}, "
             f"{cfg.pixel_scale_arcsec}\"/px"]
    for k, ((tel, filt), rows, frames) in enumerate(_coadd_frames(catdir, reduced, cfg, rep)):
        ns = sorted({1} | {n for n in cfg.n_stack if n <= len(frames)})  # N = 1: the baseline
        lines.append(f"  {tel} {filt} field {k}: {len(frames)} exposures -> stacks N = {', '.join(map(str, ns))}")
    lines += [f"  SKIPPED {e}: {why}" for e, why in rep.skipped]
    if rep.skipped:
        lines.append(f"  {len(rep.skipped)} exposures would be skipped: the run would exit with status 1")
    return "\n".join(lines), len(rep.skipped)


def _calib_config(args: argparse.Namespace):
    from .config import CalibConfig

    return CalibConfig(bias_combine=args.bias_combine, ps_threshold_adu=args.ps_threshold,
                       ps_frames=args.ps_frames, ps_min_frames=min(30, args.ps_frames))


def _stir_config(args: argparse.Namespace):
    from .config import StirConfig

    return StirConfig(tracks=not args.no_tracks, cosmic_rays=not args.no_cosmics)


def _run(inputs: list, out, args: argparse.Namespace, config: IngestConfig, argv: list[str],
         refcat=None, refcat_columns: str | None = None) -> int:
    """The main job (``run`` and ``demo``) on the cluster the options ask for."""
    from .cluster import connect
    from .static.refcat import parse_columns
    from .jobs import run_pipeline

    rcfg = parse_columns(refcat_columns) if refcat is not None else None
    log = _log_file(args)
    with connect(args.cluster, _cluster_config(args), quiet=args.quiet, log_file=log) as client:
        report, manifest = run_pipeline(inputs, out, client, config, progress=not args.quiet,
                                        argv=["mstdask", *argv], refcat=refcat, refcat_config=rcfg)
    print(report.summary())
    print(f"cluster logs: {log}")
    print(f"products: {len(manifest.products)} listed in {manifest.path}")
    print(json.dumps([{k: p[k] for k in ("kind", "path", "n_inputs")} for p in manifest.products]))
    if not report.ok:  # the lists are in the steps' summaries above
        steps = (["ingest"] if report.rejected else []) + [s.headline().split()[0] for s in report.steps if not s.ok]
        print(f"exit status 1: not everything was made; see the REJECTED/SKIPPED/FLAGGED/FAILED lines of "
              f"{', '.join(steps)} above")
    return report.exit_status


# ----------------------------------------------------------------------------- commands
# Each command builds its configuration (bad values fail before a cluster starts), then runs
# its job on the cluster; ``argv`` is the command line recorded in the manifest.
def _on_cluster(args: argparse.Namespace, job: Callable[[Any], Any]) -> int:
    """Run ``job(client)`` on the cluster the options ask for and print its summary; the
    exit status is 0 when the job is ok, 1 when it rejected, skipped or flagged inputs,
    frames or exposures (``JobReport._FAILS``)."""
    from .cluster import connect

    log = _log_file(args)
    with connect(args.cluster, _cluster_config(args), quiet=args.quiet, log_file=log) as client:
        report = job(client)
    print(report.summary())
    print(f"cluster logs: {log}")
    return report.exit_status


def _log_file(args: argparse.Namespace) -> Path:
    """Where the cluster's log records go (worker errors, heartbeats: not the terminal):
    ``mstdask.log`` in the output folder, or beside the store or cube a command writes."""
    if args.command == "ingest":
        return Path(args.store).parent / "mstdask.log"
    if args.command in ("reduce", "lightcurves"):  # --out is REDUCED.zarr / LC.zarr
        return Path(args.out).parent / "mstdask.log"
    return Path(args.out) / "mstdask.log"


def _ingest(args: argparse.Namespace, argv: list[str]) -> int:
    from .jobs import ingest

    # the configuration is made on the cluster, as it always was (a bad value fails after the start)
    return _on_cluster(args, lambda client: ingest(args.inputs, args.store, client, _ingest_config(args),
                                                   progress=not args.quiet))


def _calibrate(args: argparse.Namespace, argv: list[str]) -> int:
    from .jobs import calibrate

    cfg = _calib_config(args)
    return _on_cluster(args, lambda client: calibrate(args.store, args.out, client, cfg, progress=not args.quiet,
                                                      argv=argv))


def _reduce(args: argparse.Namespace, argv: list[str]) -> int:
    from .jobs import reduce

    cfg = _stir_config(args)
    return _on_cluster(args, lambda client: reduce(args.store, args.calib, args.out, client, cfg, fits_dir=args.fits,
                                                   progress=not args.quiet, argv=argv))


def _photometry(args: argparse.Namespace, argv: list[str]) -> int:
    from .jobs import photometry
    from .static.refcat import parse_columns

    acfg = _astro_config(args)
    rcfg = parse_columns(args.refcat_columns)
    return _on_cluster(args, lambda client: photometry(args.reduced, args.refcat, args.out, client, astro_config=acfg,
                                                       refcat_config=rcfg, progress=not args.quiet, argv=argv))


def _coadd(args: argparse.Namespace, argv: list[str]) -> int:
    from .jobs import coadd

    cfg = _coadd_config(args)
    return _on_cluster(args, lambda client: coadd(args.input, args.out, client, cfg, progress=not args.quiet,
                                                  argv=argv, catalogs=args.catalogs))


def _lightcurves(args: argparse.Namespace, argv: list[str]) -> int:
    from .config import LightcurveConfig
    from .jobs import lightcurves

    cfg = LightcurveConfig(match_radius_arcsec=args.match_radius, magnitude=args.magnitude,
                           source_chunk=args.source_chunk, epoch_chunk=args.epoch_chunk,
                           use_refcat=not args.no_refcat)
    return _on_cluster(args, lambda client: lightcurves(args.catdir, args.out, client, cfg, progress=not args.quiet,
                                                        argv=argv, refcat_path=args.refcat))


def _precision(args: argparse.Namespace, argv: list[str]) -> int:
    from .config import PrecisionConfig
    from .jobs import precision

    cfg = PrecisionConfig(exptime_s=args.exptime, seeing_arcsec=args.seeing, sky_mag=args.sky_mag,
                          diameter_cm=args.diameter, efficiency=args.efficiency, min_epochs=args.min_epochs)
    return _on_cluster(args, lambda client: precision(args.cube, args.out, client, cfg, progress=not args.quiet,
                                                      argv=argv))


def _characterize(args: argparse.Namespace, argv: list[str]) -> int:
    from .config import DetectorConfig
    from .jobs import characterize

    cfg = DetectorConfig(region_px=args.region, anomalous_nsigma=args.nsigma, subarea_px=args.subarea,
                         saturation_adu=args.saturation, pixel_min_flats=args.min_flats)
    return _on_cluster(args, lambda client: characterize(args.store, args.out, client, cfg, progress=not args.quiet,
                                                         argv=argv, telescope=args.telescope))


def _run_command(args: argparse.Namespace, argv: list[str]) -> int:
    return _run(args.inputs, args.out, args, _ingest_config(args), argv, refcat=args.refcat,
                refcat_columns=args.refcat_columns)


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    """Simulate a survey into OUT/raw_fits, then run the main job on it."""
    from .testing import write_survey

    try:
        ny, nx = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        raise SystemExit(f"mstdask demo: --shape must look like 600x900, not {args.shape!r}") from None
    out = Path(args.out)
    raw_dir = out / "raw_fits"
    t0 = time.perf_counter()
    print(f"simulating {args.nights} nights of {nx}x{ny} frames into {raw_dir} ...", file=sys.stderr)
    sim = write_survey(raw_dir, nights=args.nights, shape=(ny, nx), n_science=args.science, seed=args.seed)
    print(f"  done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    # the simulator's reference catalogue (the stars it drew the sky from) calibrates the photometry
    return _run([raw_dir], out, args, IngestConfig(), argv, refcat=sim.refcat_path)


def _info(args: argparse.Namespace, argv: list[str]) -> int:
    _print_info(args.store, args.json)
    return 0


def _certs(args: argparse.Namespace, argv: list[str]) -> int:
    from .cluster import make_certificates

    files = make_certificates(args.dir, args.hosts, days=args.days, overwrite=args.force)
    print(f"certificates in {Path(args.dir)}: {files['ca_file'].name} (CA; keep {files['ca_key'].name} "
          f"private), {files['node_cert'].name} + {files['node_key'].name} (scheduler and workers), "
          f"{files['cert'].name} + {files['key'].name} (clients)", file=sys.stderr)
    # The tls section of a cluster/NAME.yaml (node_* only for kind: jobqueue).
    print("tls:\n" + "".join(f"  {k}: {files[k]}\n" for k in ("ca_file", "cert", "key", "node_cert",
                                                                "node_key")), end="")
    return 0


#: Commands that need no cluster: no dry run, no preflight.
_LOCAL = {"info": _info, "certs": _certs}

#: Commands on a cluster, after ``--dry-run`` and the preflight checks. ``run`` and ``demo``
#: take the bare command line (``_run`` adds the program name); the jobs take it in full.
_ON_CLUSTER = {"ingest": _ingest, "calibrate": _calibrate, "reduce": _reduce, "photometry": _photometry,
               "coadd": _coadd, "lightcurves": _lightcurves, "precision": _precision,
               "characterize": _characterize, "run": _run_command, "demo": _demo}


def _command(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the command ``args`` asks for; returns the exit status."""
    if args.command in _LOCAL:
        return _LOCAL[args.command](args, argv)
    if getattr(args, "dry_run", False):
        return _dry_run(args)
    _preflight(args)
    if args.command in ("run", "demo"):
        return _ON_CLUSTER[args.command](args, argv)
    if args.command in _ON_CLUSTER:
        return _ON_CLUSTER[args.command](args, ["mstdask", *argv])
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mstdask`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _command(args, argv)
    except MstdaskError as exc:
        print(f"mstdask {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file-system error no step turned into a clearer message
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mstdask {args.command}: error: {where}{exc.strerror or exc}; check the path and the disk, then run "
              "the same command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mstdask {args.command}: interrupted; run the same command again to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
