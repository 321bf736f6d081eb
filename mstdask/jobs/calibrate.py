"""``mstdask calibrate``: the night calibrations of STIR (master bias, PS and bad-pixel
masks, nightly small-scale flats and master flats)."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import to_dict
from ..errors import MstdaskError
from ..manifest import Manifest
from ..store import RawStore
from ._job import (
    TASK_RETRIES,
    JobReport,
    check_writable,
    clear_temporaries,
    gather,
    is_fs_error,
    progress_bar,
    save_manifest,
    signature,
    tmp_name,
    unlink,
    write_error,
)
from ._plan import Plan, _store_table, _tiles


@dataclass
class CalibReport(JobReport):
    """What ``calibrate`` made, what an earlier run had already made, and what it could not
    make (with the reason)."""

    out_dir: str
    products: list[dict] = field(default_factory=list)
    already: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    _LISTED = (("SKIPPED", "skipped"),)
    _FAILS = ("skipped",)  # ok: every product that was asked for could be made

    def headline(self) -> str:
        """Products made per kind, and how many were already done."""
        kinds = Counter(p["kind"] for p in self.products)
        return (f"calibrate {self.out_dir}: " + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing")
                + f" made, {len(self.already)} already done in {self.seconds:.1f} s")


@dataclass
class _CalStep:
    """One calibration product (or nightly small-scale flat) to make, and the frames it reads."""

    kind: str  # master_bias | ps_mask | bad_pixel_mask | small_scale_flat | master_flat
    telescope: str
    night: str
    filter: str = ""
    frames: tuple = ()  # indices into the frame table
    window: tuple = ()  # master_flat: the nights whose small-scale flats it stacks (as planned)

    @property
    def key(self) -> str:
        if self.kind in ("small_scale_flat", "master_flat"):
            return f"{self.telescope}_{self.filter}_{self.night}"
        return f"{self.telescope}_{self.night}"


def _strs(values):
    """Any 1-D array of strings (object, ``<U``, NumPy's StringDType from Zarr) as ``<U``."""
    import numpy as np

    return np.array([str(v) for v in values], dtype=str)


def _calib_steps(cols: dict, config) -> list[_CalStep]:
    """Every step of ``calibrate`` in order, from the per-frame table of a store (``telescope``,
    ``imagetyp``, ``night``, ``filter``, ``time``): per telescope the master bias of each night,
    the PS mask of the night with the longest bias sequence, the bad-pixel mask of each night
    with darks, then per filter the nightly small-scale flats and the master flats."""
    import numpy as np

    from ..stir import calib

    tel_all, typ, night, filt = (_strs(cols[k]) for k in ("telescope", "imagetyp", "night", "filter"))
    times = np.asarray(cols["time"])

    def by_time(idx):
        return idx[np.argsort(times[idx], kind="stable")]

    steps: list[_CalStep] = []
    for tel in sorted(set(tel_all)):
        t = tel_all == tel
        bias = t & (typ == "bias")
        bias_nights = sorted(set(night[bias]))
        for n in bias_nights:
            idx = by_time(np.flatnonzero(bias & (night == n)))[: config.bias_max_frames]
            steps.append(_CalStep("master_bias", tel, n, frames=tuple(int(i) for i in idx)))
        if bias_nights:
            counts = {n: int((bias & (night == n)).sum()) for n in bias_nights}
            ps_night = max(bias_nights, key=lambda n: (counts[n], n))
            idx = by_time(np.flatnonzero(bias & (night == ps_night)))[: config.ps_frames]
            steps.append(_CalStep("ps_mask", tel, ps_night, frames=tuple(int(i) for i in idx)))
        dark = t & (typ == "dark")
        for n in sorted(set(night[dark])):
            steps.append(_CalStep("bad_pixel_mask", tel, n,
                                  frames=tuple(int(i) for i in np.flatnonzero(dark & (night == n)))))
        flat = t & (typ == "flat")
        for f in sorted(set(filt[flat])):
            ff = flat & (filt == f)
            flat_nights = sorted(set(night[ff]))
            for n in flat_nights:
                steps.append(_CalStep("small_scale_flat", tel, n, f,
                                      frames=tuple(int(i) for i in np.flatnonzero(ff & (night == n)))))
            # a master flat for every night with flats or science frames of this filter
            for n in sorted(set(night[t & ((typ == "science") | (typ == "flat")) & (filt == f)])):
                steps.append(_CalStep("master_flat", tel, n, f,
                                      window=tuple(calib.flat_window_nights(n, flat_nights, config))))
    return steps


def _done_product(manifest: Manifest, out: Path, kind: str, key: str, signature: str) -> dict | None:
    """The manifest entry of a complete product with this signature (FITS and Zarr group there)."""
    if kind == "small_scale_flat":
        rec = manifest.data.get("intermediates", {}).get(f"{kind}/{key}")
        ok = rec is not None and rec.get("signature") == signature
    else:
        rec = manifest.get(f"{kind}_{key}.fits")
        ok = rec is not None and rec.get("signature") == signature and (out / rec["path"]).is_file()
    return rec if ok and (out / "calib.zarr" / kind / key / "zarr.json").is_file() else None


def calibrate(store_path: str | os.PathLike, out_dir: str | os.PathLike, client, config=None,
              progress: bool = True, argv: list[str] | None = None) -> CalibReport:
    """Night calibrations of a raw store: master biases, PS masks, bad-pixel masks, master flats.

    Writes FITS products with provenance headers into ``out_dir``, the same products into
    ``out_dir/calib.zarr`` (one group per product, ``xarray.open_zarr(..., group=KIND/KEY)``)
    and entries in ``out_dir/manifest.json`` (kinds ``master_bias``, ``master_flat``,
    ``ps_mask``, ``bad_pixel_mask``). Nightly small-scale flats are kept in
    ``calib.zarr/small_scale_flat/TEL_FILTER_NIGHT`` for the 11-night stacks and Fig. 4. A
    product that cannot be made (too few frames...) is reported and skipped; the others are
    still made.

    Resumable: each product is written (Zarr group, then FITS under a temporary name, renamed)
    before it is listed in the manifest, and the manifest is rewritten atomically after each
    one, so the manifest lists only complete products. A rerun skips every product listed
    with the same signature (same frames, configuration, inputs and software version).

    Raises
    ------
    StoreError
        The store is missing, or the output cannot be written (read-only folder, full disk):
        the product being written is removed, the ones before it are kept.
    """
    from ..config import CalibConfig
    from ..store import open_store

    config = config or CalibConfig()
    t0 = time.perf_counter()
    # lazy, not in Dask: each stack task reads its tile of all its frames itself (no transfers
    # between workers); a missing store is an error before anything is written
    ds = open_store(store_path, chunks=None)
    out = check_writable(out_dir, "the calibrations")
    clear_temporaries(out)  # FITS and manifest temporaries of a killed run
    steps = _calib_steps({k: ds[k].values for k in ("telescope", "imagetyp", "night", "filter", "time")}, config)
    run = _Calibration(client, ds, out, config)
    _no_calibration_frames(ds, store_path, run.report)
    run.make(steps, progress)
    report = run.report
    save_manifest(run.manifest, out, argv, products=len(report.products), already=len(report.already),
                  skipped=len(report.skipped))
    report.seconds = time.perf_counter() - t0
    return report


def _no_calibration_frames(ds, store_path, report: CalibReport) -> None:
    """A store without bias, flat or dark frames gives no calibration: said once, as the first
    line of the summary, so that "nothing made" is not a success (exit status 1)."""
    if {"bias", "flat", "dark"} & set(_strs(ds["imagetyp"].values)):
        return
    report.skipped.append(("calibrations", f"no bias, flat or dark frames in the store {store_path}: nothing to "
                                           "calibrate with; ingest the nights' calibration frames into it (with "
                                           "--as bias|flat|dark for a camera that writes a wrong IMAGETYP)"))


class _Calibration:
    """One ``calibrate`` run: its output, manifest and report, the products made so far that
    later steps use, and the products computing while the next steps are submitted.

    Master biases and PS masks need nothing made before them: each is submitted as soon as
    its step comes and written once computed, while the workers go on with the next steps
    (no idle workers while the driver writes, no idle worker at the end of each step).
    Products are still written one at a time by the driver; a PS mask may be written after
    products of later steps, the master biases always before the steps that use them.
    """

    def __init__(self, client, ds, out: Path, config) -> None:
        self.client, self.ds, self.out, self.config = client, ds, out, config
        self.cfg = to_dict(config)
        self.zpath = out / "calib.zarr"
        self.report = CalibReport(out_dir=str(out.resolve()))
        self.manifest = Manifest(out)
        self.intermediates = self.manifest.data.setdefault("intermediates", {})
        self.frame_keys = _strs(ds["frame_key"].values)
        #: (telescope, night) -> (the written master bias, read back lazily; its signature)
        self.biases: dict[tuple[str, str], tuple[object, str]] = {}
        #: (telescope, filter) -> night -> (inputs, signature) of the nightly small-scale flats
        self.nightly: dict[tuple[str, str], dict[str, tuple[list[str], str]]] = {}
        #: (kind, futures, write(results)) submitted and not yet written, in step order
        self.pending: list[tuple[str, list, Callable]] = []
        self.bar = None

    # ------------------------------------------------------------------------- the sequence
    def make(self, steps: list[_CalStep], progress: bool) -> None:
        """Every step in order; each product is written (and listed) once computed."""
        with progress_bar(len(steps), "calibrate", progress, unit="step") as self.bar:
            for step in steps:
                self.bar.set_postfix_str(f"{step.kind} {step.key}", refresh=False)
                if step.kind in ("bad_pixel_mask", "small_scale_flat"):
                    self.finish(biases_only=True)  # these read the master biases written before them
                submitted = getattr(self, step.kind)(step)
                self.finish(ready_only=True)
                if not submitted:  # a submitted step counts when it is written
                    self.bar.update()
            self.finish()

    def submit(self, kind: str, objs: list, write: Callable) -> None:
        """Compute ``objs`` beside the next steps; ``write(results)`` once they are done."""
        self.pending.append((kind, self.client.compute(objs, retries=TASK_RETRIES), write))

    def finish(self, ready_only: bool = False, biases_only: bool = False) -> None:
        """Write submitted products: all of them, those computed already, or as many as
        needed for every master bias to be written."""
        while self.pending:
            if ready_only and not all(f.done() for f in self.pending[0][1]):
                return
            if biases_only and all(kind != "master_bias" for kind, _, _ in self.pending):
                return
            _, futures, write = self.pending.pop(0)
            write(self.client.gather(futures))
            self.bar.update()

    # ------------------------------------------------------------------------- helpers
    def frames(self, step: _CalStep):
        """The step's frames (lazy) and their exposure identities."""
        return self.ds.raw.isel(frame=list(step.frames)), self.frame_keys[list(step.frames)]

    def done(self, kind: str, key: str, sig: str) -> dict | None:
        """The manifest entry of this product when an earlier run made it the same way."""
        return _done_product(self.manifest, self.out, kind, key, sig)

    def bias_for(self, tel: str, night: str, what: str, notes: list[str]) -> tuple[str, object, str]:
        """``(night, master bias, signature)`` of the master bias nearest ``night``."""
        from ..stir import calib

        available = sorted(n for t, n in self.biases if t == tel)
        bias_night = calib.nearest_night(night, available)
        if bias_night != night:
            notes.append(f"{what}: no master bias that night, used the one of {bias_night}")
        data, sig = self.biases[(tel, bias_night)]
        return bias_night, data, sig

    def bias_written(self, tel: str, night: str, key: str, sig: str) -> None:
        """Later steps read the written master bias back (lazily) instead of recomputing its graph."""
        import xarray as xr

        self.biases[(tel, night)] = (xr.open_zarr(self.zpath, group=f"master_bias/{key}")["master_bias"], sig)

    # ------------------------------------------------------------------------- writing
    def commit(self, kind: str, key: str, write: Callable[[], None], record: Callable[[], None]) -> None:
        """Write one product, then list it: the manifest only ever lists complete products."""
        manifest, group = self.manifest, f"{kind}/{key}"
        fpath = None if kind == "small_scale_flat" else self.out / f"{kind}_{key}.fits"
        try:
            # being made again (other frames or configuration): unlisted before it is overwritten
            if self.intermediates.pop(group, None) is not None or (fpath is not None and manifest.remove(fpath.name)):
                manifest.write()
            write()
            record()
            manifest.write()
        except OSError as exc:
            shutil.rmtree(self.zpath / kind / key, ignore_errors=True)
            if fpath is not None:
                unlink(tmp_name(fpath), fpath)  # io.write_product's temporary
                manifest.remove(fpath.name)
            self.intermediates.pop(group, None)
            if not is_fs_error(exc):
                raise
            made = len(self.report.products) + len(self.report.already)
            raise write_error(exc, self.out, f"{kind} {key}", f"; the {made} products made before are kept: run "
                                                               "the same command again to make the rest",
                              shown=fpath or self.zpath / kind / key) from None

    def write_zarr(self, group: str, zds) -> None:
        """One product's group of ``calib.zarr``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr v3 notes on string attributes
            zds.to_zarr(self.zpath, group=group, mode="w", zarr_format=3, consolidated=True)

    def save(self, kind: str, key: str, data, ds_extra: dict, *, telescope: str, night: str,
             inputs: list[str], method: str, params: dict, signature: str, filter: str = "",
             extra_hdr: dict | None = None, entry_extra: dict | None = None) -> None:
        """One product as a Zarr group and a FITS file with provenance, then its manifest entry."""
        import xarray as xr

        from ..io import write_product

        path = self.out / f"{kind}_{key}.fits"

        def write() -> None:
            self.write_zarr(f"{kind}/{key}", xr.Dataset(
                {kind: (("y", "x"), data), **ds_extra},
                attrs={"telescope": telescope, "night": night, "filter": filter, "method": method}))
            write_product(path, data, kind=kind, telescope=telescope, filter=filter, night=night, inputs=inputs,
                          method=method, params=params, extra=extra_hdr)

        def record() -> None:
            self.report.products.append(self.manifest.add(
                kind, path, telescope=telescope, filter=filter, night=night, inputs=inputs, config=self.cfg,
                zarr_group=f"calib.zarr/{kind}/{key}", signature=signature, **(entry_extra or {})))

        self.commit(kind, key, write, record)

    # ------------------------------------------------------------------------- the products
    # Each returns True when it submitted its product (written later by :meth:`finish`).
    def master_bias(self, step: _CalStep) -> bool:
        """The master bias of one night, submitted to be written once computed."""
        from ..stir import calib

        config, tel, night, key = self.config, step.telescope, step.night, step.key
        frames, keys = self.frames(step)
        sig = signature(step.kind, key, keys, self.cfg)
        if (done := self.done(step.kind, key, sig)) is not None:
            self.report.already.append(done)
            self.bias_written(tel, night, key, sig)
            return False
        try:
            mb = calib.master_bias(frames, config)
        except MstdaskError as exc:
            self.report.skipped.append((f"master_bias {key}", str(exc)))
            return False

        def write(res) -> None:
            self.save("master_bias", key, res[0], {}, telescope=tel, night=night,
                      inputs=mb.attrs["inputs"], method=f"{config.bias_combine} of bias frames",
                      params={"clip_sigma": config.clip_sigma}, extra_hdr={"BUNIT": "adu"}, signature=sig)
            self.bias_written(tel, night, key, sig)

        self.submit("master_bias", [mb.data], write)
        return True

    def ps_mask(self, step: _CalStep) -> bool:
        """The pepper-and-salt mask of a telescope, submitted to be written once computed."""
        import numpy as np

        from ..masks import Flag, flag
        from ..stir import calib

        config, tel, night, key = self.config, step.telescope, step.night, step.key
        frames, keys = self.frames(step)
        sig = signature(step.kind, key, keys, self.cfg)
        if (done := self.done(step.kind, key, sig)) is not None:
            self.report.already.append(done)
            return False
        try:
            ps = calib.ps_map(frames, config)
            summ = calib.ps_summary(ps)
        except MstdaskError as exc:
            self.report.skipped.append((f"ps_mask {tel}", str(exc)))
            return False

        def write(res) -> None:
            ps_np, frac, agree, std = res
            self.save("ps_mask", key, flag(ps_np, Flag.PEPPER_SALT), {"std": (("y", "x"), std)},
                      telescope=tel, night=night, inputs=ps.attrs["inputs"], signature=sig,
                      method=f"std over {ps.attrs['nframes']} bias > {config.ps_threshold_adu} ADU in "
                             f"all {config.ps_groups} groups",
                      params={"ps_threshold": config.ps_threshold_adu},
                      extra_hdr={"PSFRAC": (float(frac), "fraction of PS pixels"),
                                 "PSAGREE": (float(np.nanmin(agree)), "min agreement between groups")},
                      entry_extra={"ps_fraction": float(frac), "group_agreement": [float(a) for a in agree]})

        self.submit("ps_mask", [ps["ps"].data, summ["fraction"].data, summ["agreement"].data, ps["std"].data],
                    write)
        return True

    def bad_pixel_mask(self, step: _CalStep) -> bool:
        """The bad-pixel mask of one night: its darks less the nearest master bias."""
        from ..masks import Flag, flag
        from ..stir import calib

        config, tel, night, key = self.config, step.telescope, step.night, step.key
        frames, keys = self.frames(step)
        try:
            bias_night, bias, bias_sig = self.bias_for(tel, night, f"bad_pixel_mask {key}", self.report.notes)
            sig = signature(step.kind, key, keys, self.cfg, [bias_sig])
            if (done := self.done(step.kind, key, sig)) is not None:
                self.report.already.append(done)
                return False
            res = calib.bad_pixel_map(frames, bias, config)
            bad, centre, sigma = gather(self.client, [res["bad"].data, res["centre"].data, res["sigma"].data])
        except MstdaskError as exc:
            self.report.skipped.append((f"bad_pixel_mask {key}", str(exc)))
            return False
        self.save("bad_pixel_mask", key, flag(bad, Flag.BAD_PIXEL), {}, telescope=tel, night=night,
                  inputs=res.attrs["inputs"], signature=sig,
                  method=f"median dark - master bias outside {config.bad_pixel_nsigma} robust sigma",
                  params={"nsigma": config.bad_pixel_nsigma},
                  extra_hdr={"DARKMED": (float(centre), "[adu] median of bias-subtracted dark"),
                             "DARKSIG": (float(sigma), "[adu] robust sigma"), "BIASNGHT": bias_night},
                  entry_extra={"bias_night": bias_night, "bad_fraction": float(bad.mean())})
        return False

    def small_scale_flat(self, step: _CalStep) -> bool:
        """One night's small-scale flat of one filter: flats outside the level limits left out."""
        import numpy as np
        import xarray as xr

        from ..stir import calib

        config, tel, filt, night, key = self.config, step.telescope, step.filter, step.night, step.key
        flats, keys = self.frames(step)
        nightly = self.nightly.setdefault((tel, filt), {})
        notes: list[str] = []
        try:
            bias_night, bias, bias_sig = self.bias_for(tel, night, f"flats {key}", notes)
            sig = signature(step.kind, key, keys, self.cfg, [bias_sig])
            if (done := self.done(step.kind, key, sig)) is not None:
                self.report.notes.extend(done.get("notes", []))
                nightly[night] = (done["inputs"], sig)
                return False
            levels = gather(self.client, calib.flat_levels(flats, bias).data)
            ok = (levels >= config.flat_min_adu) & (levels <= config.flat_max_adu)
            for path, level in zip(flats["path"].values[~ok], levels[~ok]):
                notes.append(f"flat {path} left out: level {level:.0f} ADU outside "
                             f"{config.flat_min_adu:.0f}-{config.flat_max_adu:.0f} ADU")
            ssf = calib.nightly_small_scale_flat(flats.isel(frame=np.flatnonzero(ok)), bias, config)
            data = gather(self.client, ssf.data)
        except MstdaskError as exc:
            self.report.notes.extend(notes)
            self.report.skipped.append((f"small_scale_flat {key}", str(exc)))
            return False
        self.report.notes.extend(notes)
        inputs = list(ssf.attrs["inputs"])
        zds = xr.Dataset({"small_scale_flat": (("y", "x"), data)},
                         attrs={"telescope": tel, "filter": filt, "night": night, "bias_night": bias_night,
                                "inputs": inputs})

        def record() -> None:  # an intermediate: listed in the manifest, no FITS file
            self.intermediates[f"small_scale_flat/{key}"] = {
                "signature": sig, "inputs": inputs, "notes": notes, "bias_night": bias_night}

        self.commit("small_scale_flat", key, lambda: self.write_zarr(f"small_scale_flat/{key}", zds), record)
        nightly[night] = (inputs, sig)
        return False

    def master_flat(self, step: _CalStep) -> bool:
        """The master flat of one night: the nightly small-scale flats of the nights around it."""
        import xarray as xr

        from ..stir import calib

        config, tel, filt, night, key = self.config, step.telescope, step.filter, step.night, step.key
        nightly = self.nightly.setdefault((tel, filt), {})
        use = calib.flat_window_nights(night, sorted(nightly), config)
        if not use:
            self.report.skipped.append((f"master_flat {key}",
                                        f"no nightly flat within {config.flat_max_days:.0f} days"))
            return False
        sig = signature(step.kind, key, [], self.cfg, [nightly[n][1] for n in use])
        if (done := self.done(step.kind, key, sig)) is not None:
            self.report.already.append(done)
            return False
        parts = [xr.open_zarr(self.zpath, group=f"small_scale_flat/{tel}_{filt}_{n}")["small_scale_flat"]
                 for n in use]
        data = gather(self.client, calib.stack_nightly_flats(parts).data)
        inputs = [p for n in use for p in nightly[n][0]]
        self.save("master_flat", key, data, {}, telescope=tel, filter=filt, night=night, inputs=inputs,
                  signature=sig,
                  method=f"mean of {len(use)} nightly small-scale flats ({config.flat_window_px}-px median)",
                  params={"window_px": config.flat_window_px, "half_window_nights": config.flat_half_window_nights},
                  extra_hdr={"NNIGHTS": (len(use), "nights stacked"),
                             **{f"FLATN{i:03d}": n for i, n in enumerate(use, start=1)}},
                  entry_extra={"nights": use})
        return False


# ----------------------------------------------------------------------------- the dry run
#: Bytes per pixel each product writes (``--dry-run`` estimate).
_BYTES_WRITTEN = {"master_bias": 8, "master_flat": 8, "ps_mask": 6, "bad_pixel_mask": 2, "small_scale_flat": 4}


def _plan_step(step: _CalStep, keys, config, cfg: dict, biases: dict, nightly: dict) -> tuple[int, str | None, str | None]:
    """``(frames or nights read, signature, why it would be skipped)`` of one step, from the
    frame table only; records the master biases and nightly flats later steps would use."""
    from ..stir import calib

    tel, night, kind, key, n = step.telescope, step.night, step.kind, step.key, len(step.frames)
    if kind in ("master_bias", "ps_mask"):
        least = config.min_frames if kind == "master_bias" else config.ps_min_frames
        sig = signature(kind, key, keys, cfg)
        if n < least:
            return n, sig, f"{n} bias frames, at least {least} needed"
        if kind == "master_bias":
            biases[(tel, night)] = sig
        return n, sig, None
    if kind in ("bad_pixel_mask", "small_scale_flat"):
        available = sorted(b for t, b in biases if t == tel)
        if not available:
            return n, None, "no master bias"
        if n < config.min_frames:
            return n, None, f"{n} frames, at least {config.min_frames} needed"
        sig = signature(kind, key, keys, cfg, [biases[(tel, calib.nearest_night(night, available))]])
        if kind == "small_scale_flat":
            nightly.setdefault((tel, step.filter), {})[night] = sig
        return n, sig, None
    flats = nightly.get((tel, step.filter), {})  # master_flat
    use = calib.flat_window_nights(night, sorted(flats), config)
    if not use:
        return n, None, f"no nightly flat within {config.flat_max_days:.0f} days"
    return len(use), signature(kind, key, [], cfg, [flats[u] for u in use]), None


def _calib_plan(table: dict, shape, tile, out: Path, config) -> Plan:
    """The dry run of ``calibrate`` from a store's frame table (``_store_table``), the frame
    shape and tile, and the manifest in ``out`` (read when there is one)."""
    import numpy as np

    cfg = to_dict(config)
    manifest = Manifest(out)  # reads manifest.json when there is one, creates nothing
    keys = _strs(table["frame_key"])
    npix, ntiles = int(np.prod(shape)), _tiles(shape, tile)
    plan = Plan("calibrate", str(out))
    biases: dict[tuple[str, str], str] = {}
    nightly: dict[tuple[str, str], dict[str, str]] = {}
    read: set[int] = set()
    todo = done = skipped = 0
    for step in _calib_steps(table, config):
        kind, key = step.kind, step.key
        n, sig, why = _plan_step(step, keys[list(step.frames)], config, cfg, biases, nightly)
        if why is not None:
            status = f"would be skipped: {why}"
            skipped += 1
        elif _done_product(manifest, out, kind, key, sig) is not None:
            status = "already done"
            done += 1
        else:
            status = "to make"
            todo += 1
            read.update(step.frames)
            per_frame = 4 if kind == "master_flat" else 2
            bias_read = npix * 4 if kind in ("bad_pixel_mask", "small_scale_flat") else 0
            plan.bytes_read += n * npix * per_frame + bias_read
            plan.bytes_written += npix * _BYTES_WRITTEN[kind]
            plan.tasks += (n + 1) * ntiles
        plan.steps.append(f"  {kind:<17}{key:<28}{n:>5} {'nights' if kind == 'master_flat' else 'frames'}  {status}")
    idx = sorted(read)
    plan.frames = Counter(zip(_strs(table["night"])[idx], _strs(table["telescope"])[idx], _strs(table["imagetyp"])[idx]))
    plan.steps.insert(0, f"products: {todo} to make, {done} already done, {skipped} would be skipped")
    plan.skipped = skipped
    if not {"bias", "flat", "dark"} & set(_strs(table["imagetyp"])):  # as calibrate would say
        plan.skipped += 1
        plan.notes.append("no bias, flat or dark frames in the store: nothing to calibrate with")
    plan.tasks_estimated = True
    return plan


def plan_calibrate(store_path: str | os.PathLike, out_dir: str | os.PathLike, config=None) -> Plan:
    """What ``calibrate`` would do: products to make and already made (the store's frame
    table and ``out_dir/manifest.json`` are read, nothing is computed or written)."""
    from ..config import CalibConfig

    store = RawStore.open(store_path, mode="r")
    return _calib_plan(_store_table(store), store.frame_shape, tuple(store.group.attrs["tile"]), Path(out_dir),
                       config or CalibConfig())
