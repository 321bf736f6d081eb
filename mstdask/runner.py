"""Runs jobs on a Dask client: the only code that submits, waits and catches errors.

Library modules build pure functions and lazy graphs; this module sends them to the
cluster, shows progress, turns one frame's failure into a line of the summary instead of
the end of the run, and records what was done.
"""

from __future__ import annotations

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

__all__ = ["CalibReport", "IngestReport", "calibrate", "ingest", "run_pipeline"]


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
    """The main job: ingest raw frames into ``OUT/raw.zarr``, then every pipeline step.

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
    from .masks import MASK_DTYPE, Flag
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
                    mask = (ps_np.astype(MASK_DTYPE) * MASK_DTYPE(Flag.PEPPER_SALT))
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
                    mask = bad.astype(MASK_DTYPE) * MASK_DTYPE(Flag.BAD_PIXEL)
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
