"""``mstdask characterize``: the detector lab set of one camera (Zhang et al. 2025)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..errors import BadInputError, MstdaskError
from ..manifest import Manifest
from ._job import (
    TASK_RETRIES,
    check_writable,
    is_fs_error,
    progress_bar,
    unlink,
    write_error,
    write_png,
    writing,
)


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
    import numpy as np
    from distributed import as_completed

    from .. import __version__
    from ..config import DetectorConfig
    from ..errors import InsufficientDataError
    from ..io import write_product
    from ..lab import detector as D
    from ..store import open_store

    config = config or DetectorConfig()
    t0 = time.perf_counter()
    ds = open_store(store_path)  # a missing store is an error before anything is written
    out = check_writable(out_dir, "the characterization")
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
    futures = client.compute([obj for _, _, obj in items], retries=TASK_RETRIES) if items else []
    with progress_bar(len(futures), f"characterize {tel}: compute", progress, unit="result") as bar:
        for _ in as_completed(futures):
            bar.update()
    got: dict[str, dict] = {}
    for name in lazy:
        try:
            got[name] = {key: fut.result() for (n, key, _), fut in zip(items, futures) if n == name}
        except MstdaskError as exc:
            skip(name, str(exc))
    client.cancel(futures)

    # 3. Products: FITS maps and figures, each under a temporary name and renamed.
    n_files = {"bias_stability": 1, "combined_bias": 2, "anomalous_pixels": 6 if "combined_bias" in got else 0,
               "photon_transfer": 1, "linearity": 1, "pixel_gain": 3, "dark_current": 2}
    wbar = progress_bar(sum(n_files[name] for name in got) + 1, f"characterize {tel}: write", progress, unit="file")

    def product(kind: str, fname: str, data, inputs: list[str], method: str, extra: dict | None = None,
                **entry) -> str:
        path = out / fname
        with writing(out, f"the {kind} map"):
            write_product(path, data, kind=kind, telescope=tel, night=night_label, inputs=inputs, method=method,
                          params={k: cfg[k] for k in entry.pop("params", [])}, extra=extra)
        report.products.append(manifest.add(kind, path, telescope=tel, filter="", night=nights, inputs=inputs,
                                            config=cfg, **entry))
        wbar.update()
        return fname

    def figure(number: int, what: str, fig, inputs: list[str]) -> None:
        # a bare matplotlib Figure (no pyplot): PNG through Agg whatever the session's backend
        fname = f"fig{number:02d}_{what}_{tel}.png"
        try:
            write_png(fig, out / fname)
        except OSError as exc:
            if not is_fs_error(exc):
                raise
            raise write_error(exc, out, f"figure {fname}") from None
        res["figures"][f"fig{number:02d}_{what}"] = fname
        report.products.append(manifest.add("figure", out / fname, telescope=tel, filter="", night=nights,
                                            inputs=inputs, config=cfg, figure=number, what=what))
        wbar.update()

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
    with writing(out, "characterization.json"):
        try:
            tmp.write_text(json.dumps(_json_ready(res), indent=2) + "\n")
            os.replace(tmp, jpath)
        except OSError:
            unlink(tmp)
            raise
    wbar.update()
    wbar.close()
    report.products.append(manifest.add("characterization", jpath, telescope=tel, filter="", night=nights,
                                        inputs=bias_paths + flat_paths + dark_paths, config=cfg,
                                        skipped=dict(res["skipped"])))
    manifest.record_run(argv, products=len(report.products), skipped=len(report.skipped))
    with writing(out, "the manifest"):
        manifest.write()
    report.results = _json_ready(res)
    report.seconds = time.perf_counter() - t0
    return report


