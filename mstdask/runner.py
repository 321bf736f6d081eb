"""Runs jobs on a Dask client: the only code that submits, waits and catches errors.

Library modules build pure functions and lazy graphs; this module sends them to the
cluster, shows progress, turns one frame's failure into a line of the summary instead of
the end of the run, and records what was done.
"""

from __future__ import annotations

import json
import os
import sys
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

__all__ = ["CalibReport", "IngestReport", "ReduceReport", "calibrate", "ingest", "reduce", "run_pipeline"]


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

    @property
    def ok(self) -> bool:
        """True when nothing was rejected."""
        return not self.rejected

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


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="frame", disable=None if enabled else True,
                file=sys.stderr, dynamic_ncols=True)


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
        futures = client.map(_scan_task, files, site=config.site, force=config.force_imagetyp, pure=False)
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
    if not Path(store_path, "zarr.json").exists():
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

    # 4. Pixels, one frame per task; the driver records finished frames every few seconds.
    futures = [client.submit(_write_task, store_path, idx, info, pure=False) for idx, info, _ in jobs]
    resumed_by_index = {idx: was_pending for idx, _, was_pending in jobs}
    done: list[int] = []
    last_mark = time.monotonic()
    try:
        with _bar(len(futures), "ingest frames", progress) as bar:
            for fut in as_completed(futures):
                res = fut.result()
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
    finally:
        # Also on Ctrl-C: what is written is recorded, the rest is finished next time.
        store.mark_ingested(done)
        store.consolidate()
        client.cancel(futures)


def _flats(tds, tel: str, biases: dict, config, gather, save, report: "CalibReport", zpath: Path) -> None:
    """Master flats of one telescope: nightly small-scale flats, then the 11-night stacks."""
    import numpy as np
    import xarray as xr

    from . import calib

    is_flat = tds.imagetyp == "flat"
    for filt in sorted(set(map(str, tds["filter"].values[is_flat.values]))):
        nightly: dict[str, list[str]] = {}
        for night in sorted(set(map(str, tds.night.values[(is_flat & (tds["filter"] == filt)).values]))):
            key = f"{tel}_{filt}_{night}"
            flats = tds.raw.sel(frame=(is_flat & (tds["filter"] == filt) & (tds.night == night)).values)
            try:
                bias_night = calib.nearest_night(night, sorted(biases))
                bias = biases[bias_night]
                if bias_night != night:
                    report.notes.append(f"flats {key}: no master bias that night, used the one of {bias_night}")
                levels = gather(calib.flat_levels(flats, bias).data)
                ok = (levels >= config.flat_min_adu) & (levels <= config.flat_max_adu)
                for path, level in zip(flats["path"].values[~ok], levels[~ok]):
                    report.notes.append(f"flat {path} left out: level {level:.0f} ADU outside "
                                        f"{config.flat_min_adu:.0f}-{config.flat_max_adu:.0f} ADU")
                ssf = calib.nightly_small_scale_flat(flats.isel(frame=np.flatnonzero(ok)), bias, config)
                data = gather(ssf.data)
            except MstdaskError as exc:
                report.skipped.append((f"small_scale_flat {key}", str(exc)))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                xr.Dataset({"small_scale_flat": (("y", "x"), data)},
                           attrs={"telescope": tel, "filter": filt, "night": night, "bias_night": bias_night,
                                  "inputs": ssf.attrs["inputs"]}).to_zarr(
                    zpath, group=f"small_scale_flat/{key}", mode="w", zarr_format=3, consolidated=True)
            nightly[night] = ssf.attrs["inputs"]
        # master flat of every night with flats or science frames of this filter
        targets = sorted(set(map(str, tds.night.values[((tds.imagetyp == "science") | is_flat).values
                                                      & (tds["filter"] == filt).values])))
        for night in targets:
            key = f"{tel}_{filt}_{night}"
            use = calib.flat_window_nights(night, sorted(nightly), config)
            if not use:
                report.skipped.append((f"master_flat {key}", f"no nightly flat within {config.flat_max_days:.0f} days"))
                continue
            parts = [xr.open_zarr(zpath, group=f"small_scale_flat/{tel}_{filt}_{n}")["small_scale_flat"] for n in use]
            data = gather(calib.stack_nightly_flats(parts).data)
            inputs = [p for n in use for p in nightly[n]]
            save("master_flat", key, data, {}, telescope=tel, filter=filt, night=night, inputs=inputs,
                 method=f"mean of {len(use)} nightly small-scale flats ({config.flat_window_px}-px median)",
                 params={"window_px": config.flat_window_px, "half_window_nights": config.flat_half_window_nights},
                 extra_hdr={"NNIGHTS": (len(use), "nights stacked"),
                            **{f"FLATN{i:03d}": n for i, n in enumerate(use, start=1)}},
                 entry_extra={"nights": use})


def run_pipeline(raw_inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, client,
                 config: IngestConfig | None = None, progress: bool = True,
                 argv: list[str] | None = None) -> tuple[IngestReport, Manifest]:
    """The main job: ingest raw frames into ``OUT/raw.zarr``, calibrate into ``OUT``, reduce
    the science frames into ``OUT/reduced.zarr``, then every later pipeline step.

    Writes ``OUT/manifest.json`` listing every product.

    Returns
    -------
    (IngestReport, Manifest)
    """
    config = config or IngestConfig()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{out}: cannot create the output folder ({exc.strerror})") from None
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
    manifest.write()
    if info is not None and info["frames"]:
        calib_report = calibrate(store_path, out, client, progress=progress, argv=argv)
        print(calib_report.summary(), file=sys.stderr)
        if info.get("imagetyp_counts", {}).get("science"):
            red_report = reduce(store_path, out, out / "reduced.zarr", client, progress=progress, argv=argv)
            print(red_report.summary(), file=sys.stderr)
        manifest = Manifest(out)
    return report, manifest


@dataclass
class CalibReport:
    """What ``calibrate`` made, and what it could not make (with the reason)."""

    out_dir: str
    products: list[dict] = field(default_factory=list)
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
        lines = [f"calibrate {self.out_dir}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                 + f" in {self.seconds:.1f} s"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  SKIPPED {what}: {why}" for what, why in self.skipped]
        return "\n".join(lines)


def calibrate(store_path: str | os.PathLike, out_dir: str | os.PathLike, client, config=None,
              progress: bool = True, argv: list[str] | None = None) -> CalibReport:
    """Night calibrations of a raw store: master biases, PS masks, bad-pixel masks, master flats.

    Writes FITS products with provenance headers into ``out_dir``, the same products into
    ``out_dir/calib.zarr`` (one group per product, ``xarray.open_zarr(..., group=KIND/KEY)``)
    and entries in ``out_dir/manifest.json`` (kinds ``master_bias``, ``master_flat``,
    ``ps_mask``, ``bad_pixel_mask``). Nightly small-scale flats are kept in
    ``calib.zarr/small_scale_flat/TEL_FILTER_NIGHT`` for the 11-night stacks and Fig. 4. A product that cannot be made (too few frames...) is reported and
    skipped; the others are still made.
    """
    import numpy as np
    import xarray as xr

    from . import calib
    from .config import CalibConfig
    from .io import write_product
    from .masks import Flag, flag
    from .store import open_store

    config = config or CalibConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = CalibReport(out_dir=str(out.resolve()))
    manifest = Manifest(out)
    ds = open_store(store_path)
    zpath = out / "calib.zarr"
    cfg = to_dict(config)

    def gather(obj):
        if isinstance(obj, list):
            return client.gather(client.compute(obj))
        return client.compute(obj).result()

    def save(kind: str, key: str, data: np.ndarray, ds_extra: dict, *, telescope: str, night: str,
             inputs: list[str], method: str, params: dict, filter: str = "", extra_hdr: dict | None = None,
             entry_extra: dict | None = None) -> None:
        path = out / f"{kind}_{key}.fits"
        write_product(path, data, kind=kind, telescope=telescope, filter=filter, night=night, inputs=inputs,
                      method=method, params=params, extra=extra_hdr)
        zds = xr.Dataset({kind: (("y", "x"), data), **ds_extra},
                         attrs={"telescope": telescope, "night": night, "filter": filter, "method": method})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr v3 notes on string attributes
            zds.to_zarr(zpath, group=f"{kind}/{key}", mode="w", zarr_format=3, consolidated=True)
        entry = manifest.add(kind, path, telescope=telescope, filter=filter, night=night, inputs=inputs,
                             config=cfg, zarr_group=f"calib.zarr/{kind}/{key}", **(entry_extra or {}))
        report.products.append(entry)

    telescopes = sorted(set(map(str, ds.telescope.values)))
    with _bar(len(telescopes), "calibrate telescopes", progress) as bar:
        for tel in telescopes:
            tds = ds.sel(frame=ds.telescope == tel)
            is_bias = tds.imagetyp == "bias"
            bias_nights = sorted(set(map(str, tds.night.values[is_bias.values])))
            biases: dict[str, xr.DataArray] = {}
            for night in bias_nights:
                frames = tds.raw.sel(frame=(is_bias & (tds.night == night)).values)
                frames = frames.isel(frame=np.argsort(frames["time"].values, kind="stable")[: config.bias_max_frames])
                key = f"{tel}_{night}"
                try:
                    mb = calib.master_bias(frames, config)
                except MstdaskError as exc:
                    report.skipped.append((f"master_bias {key}", str(exc)))
                    continue
                data = gather(mb.data)
                save("master_bias", key, data, {}, telescope=tel, night=night, inputs=mb.attrs["inputs"],
                     method=f"{config.bias_combine} of bias frames", params={"clip_sigma": config.clip_sigma},
                     extra_hdr={"BUNIT": "adu"})
                # later steps read the written master back (lazily) instead of recomputing its graph
                biases[night] = xr.open_zarr(zpath, group=f"master_bias/{key}")["master_bias"]
            # PS map from the night with the longest bias sequence
            if bias_nights:
                counts = {n: int(((tds.night == n) & is_bias).sum()) for n in bias_nights}
                ps_night = max(bias_nights, key=lambda n: (counts[n], n))
                frames = tds.raw.sel(frame=(is_bias & (tds.night == ps_night)).values)
                try:
                    ps = calib.ps_map(frames, config)
                    summ = calib.ps_summary(ps)
                    ps_np, frac, agree, std = gather([ps["ps"].data, summ["fraction"].data,
                                                      summ["agreement"].data, ps["std"].data])
                    mask = flag(ps_np, Flag.PEPPER_SALT)
                    save("ps_mask", f"{tel}_{ps_night}", mask, {"std": (("y", "x"), std)}, telescope=tel,
                         night=ps_night, inputs=ps.attrs["inputs"],
                         method=f"std over {ps.attrs['nframes']} bias > {config.ps_threshold_adu} ADU in all "
                                f"{config.ps_groups} groups", params={"ps_threshold": config.ps_threshold_adu},
                         extra_hdr={"PSFRAC": (float(frac), "fraction of PS pixels"),
                                    "PSAGREE": (float(np.nanmin(agree)), "min agreement between groups")},
                         entry_extra={"ps_fraction": float(frac), "group_agreement": [float(a) for a in agree]})
                except MstdaskError as exc:
                    report.skipped.append((f"ps_mask {tel}", str(exc)))
            # bad pixels from each night's darks
            is_dark = tds.imagetyp == "dark"
            for night in sorted(set(map(str, tds.night.values[is_dark.values]))):
                key = f"{tel}_{night}"
                frames = tds.raw.sel(frame=(is_dark & (tds.night == night)).values)
                try:
                    bias_night = calib.nearest_night(night, sorted(biases))
                    if bias_night != night:
                        report.notes.append(f"bad_pixel_mask {key}: no master bias that night, "
                                            f"used the one of {bias_night}")
                    res = calib.bad_pixel_map(frames, biases[bias_night], config)
                    bad, centre, sigma = gather([res["bad"].data, res["centre"].data, res["sigma"].data])
                    mask = flag(bad, Flag.BAD_PIXEL)
                    save("bad_pixel_mask", key, mask, {}, telescope=tel, night=night, inputs=res.attrs["inputs"],
                         method=f"median dark - master bias outside {config.bad_pixel_nsigma} robust sigma",
                         params={"nsigma": config.bad_pixel_nsigma},
                         extra_hdr={"DARKMED": (float(centre), "[adu] median of bias-subtracted dark"),
                                    "DARKSIG": (float(sigma), "[adu] robust sigma"), "BIASNGHT": bias_night},
                         entry_extra={"bias_night": bias_night, "bad_fraction": float(bad.mean())})
                except MstdaskError as exc:
                    report.skipped.append((f"bad_pixel_mask {key}", str(exc)))
            _flats(tds, tel, biases, config, gather, save, report, zpath)
            bar.update()
    manifest.record_run(argv, products=len(report.products), skipped=len(report.skipped))
    manifest.write()
    report.seconds = time.perf_counter() - t0
    return report


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


def reduce(store_path: str | os.PathLike, caldir: str | os.PathLike, out_path: str | os.PathLike, client,
           config=None, calib_config=None, fits_dir: str | os.PathLike | None = None, progress: bool = True,
           argv: list[str] | None = None) -> ReduceReport:
    """STIR per frame for every science frame of a raw store: ``out_path`` (a reduced store).

    One task per frame (:func:`mstdask.stir.process_frame`); a frame that fails is reported
    and skipped while the others finish, and a rerun reduces only frames not yet done. With
    ``fits_dir`` each frame is also written as ``FITS_DIR/NIGHT/NAME.fits`` (SCI + MASK).
    ``manifest.json`` beside the store (and in ``fits_dir``) lists the products.
    """
    import numpy as np

    from .config import CalibConfig, StirConfig, StoreLayout
    from .stir import find_calibrations, process_frame
    from .store import _REDUCED_COPY, ReducedStore

    config = config or StirConfig()
    calib_config = calib_config or CalibConfig()
    t0 = time.perf_counter()
    out_path = Path(out_path)
    report = ReduceReport(out=str(out_path.resolve()))
    raw = RawStore.open(store_path, mode="r")
    imagetyp, done = raw.coord("imagetyp"), raw.coord("ingested")
    sci = np.flatnonzero((imagetyp == "science") & done)
    coords = {name: raw.coord(name) for name in _REDUCED_COPY}
    if out_path.exists() and any(out_path.iterdir()):
        red = ReducedStore.open(out_path)
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        red = ReducedStore.create(out_path, raw.frame_shape, tuple(raw.group.attrs["tile"]), StoreLayout(),
                                  {"raw_store": str(Path(store_path).resolve()),
                                   "calib_dir": str(Path(caldir).resolve()), "stir_config": to_dict(config)})
    if tuple(red.frame_shape) != tuple(raw.frame_shape):
        raise StoreError(f"{out_path}: holds {red.frame_shape} frames, {store_path} has {raw.frame_shape}; "
                         "reduce into a new --out")
    known = {str(k): (i, bool(r)) for i, (k, r) in enumerate(zip(red.coord("frame_key"), red.coord("reduced")))}
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
        todo += [(i, s, c) for (i, c), s in zip(new, slots)]
    egain = coords["egain"]
    fits_root = Path(fits_dir) if fits_dir else None
    futures, meta = [], {}
    for i, s, cs in todo:
        gain = float(egain[i]) if np.isfinite(egain[i]) and egain[i] > 0 else config.gain_e_per_adu
        fpath = None
        if fits_root is not None:
            fpath = str(fits_root / str(coords["night"][i]) / (Path(str(coords["path"][i])).name.split(".")[0] + ".fits"))
        fut = client.submit(process_frame, str(store_path), i, str(coords["path"][i]), str(out_path), s, cs, config,
                            gain, calib_config.saturation_adu, fpath, pure=False,
                            key=f"stir-{s}-{os.getpid()}-{time.time_ns()}")
        futures.append(fut)
        meta[fut.key] = (i, s, cs, fpath)
    from distributed import as_completed

    finished: list[dict] = []
    last = time.monotonic()
    written_fits: list[tuple[int, int, object, str, dict]] = []

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
                except Exception as exc:  # one bad frame never ends the run
                    report.failed.append((str(coords["path"][i]), f"{type(exc).__name__}: {exc}"))
                else:
                    finished.append(res)
                    report.reduced.append(res["path"])
                    report.tracks += res["n_tracks"]
                    report.frame_seconds.append(res["seconds"])
                    if fpath:
                        written_fits.append((i, s, cs, fpath, res))
                bar.update()
                if time.monotonic() - last > 2.0:
                    flush()
                    last = time.monotonic()
    finally:
        flush()  # also on Ctrl-C: what is written is recorded, the rest is done next time
        red.consolidate()
        client.cancel(futures)

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
    manifest.record_run(argv, reduced=len(report.reduced), failed=len(report.failed))
    manifest.write()
    if fits_root is not None and written_fits:
        fman = Manifest(fits_root)
        for i, s, cs, fpath, res in written_fits:
            fman.add("reduced_frame", fpath, telescope=str(coords["telescope"][i]), filter=str(coords["filter"][i]),
                     night=str(coords["night"][i]), inputs=[str(coords["path"][i]), *cs.files().values()],
                     config=cfg, n_tracks=res["n_tracks"], store=str(out_path.resolve()), store_index=s)
        fman.record_run(argv, written=len(written_fits))
        fman.write()
    report.seconds = time.perf_counter() - t0
    return report


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
    from . import detector as D
    from .config import DetectorConfig
    from .errors import InsufficientDataError
    from .io import write_product
    from .store import open_store

    config = config or DetectorConfig()
    t0 = time.perf_counter()
    ds = open_store(store_path)  # a missing store is an error before anything is written
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{out}: cannot create the output folder ({exc.strerror})") from None
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
    futures = client.compute([obj for _, _, obj in items]) if items else []
    with _bar(len(futures), f"characterize {tel}", progress) as bar:
        for _ in as_completed(futures):
            bar.update()
    got: dict[str, dict] = {}
    for name in lazy:
        try:
            got[name] = {key: fut.result() for (n, key, _), fut in zip(items, futures) if n == name}
        except MstdaskError as exc:
            skip(name, str(exc))
    client.cancel(futures)

    # 3. Products.
    def product(kind: str, fname: str, data, inputs: list[str], method: str, extra: dict | None = None,
                **entry) -> str:
        path = out / fname
        write_product(path, data, kind=kind, telescope=tel, night=night_label, inputs=inputs, method=method,
                      params={k: cfg[k] for k in entry.pop("params", [])}, extra=extra)
        report.products.append(manifest.add(kind, path, telescope=tel, filter="", night=nights, inputs=inputs,
                                            config=cfg, **entry))
        return fname

    def figure(number: int, what: str, fig, inputs: list[str]) -> None:
        # a bare matplotlib Figure (no pyplot): PNG through Agg whatever the session's backend
        fname = f"fig{number:02d}_{what}_{tel}.png"
        fig.savefig(out / fname, dpi=110)
        res["figures"][f"fig{number:02d}_{what}"] = fname
        report.products.append(manifest.add("figure", out / fname, telescope=tel, filter="", night=nights,
                                            inputs=inputs, config=cfg, figure=number, what=what))

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
    tmp.write_text(json.dumps(_json_ready(res), indent=2) + "\n")
    os.replace(tmp, jpath)
    report.products.append(manifest.add("characterization", jpath, telescope=tel, filter="", night=nights,
                                        inputs=bias_paths + flat_paths + dark_paths, config=cfg,
                                        skipped=dict(res["skipped"])))
    manifest.record_run(argv, products=len(report.products), skipped=len(report.skipped))
    manifest.write()
    report.results = _json_ready(res)
    report.seconds = time.perf_counter() - t0
    return report


__all__ += ["CharacterizeReport", "characterize"]
