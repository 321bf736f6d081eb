"""``mstdask characterize``: the detector lab set of one camera (Zhang et al. 2025).

The job is a short sequence of steps: choose the camera's bias, flat and dark frames
(:func:`_select_frames`), build the lazy graph of each measurement (:func:`_lazy_measurements`),
compute them all at once (:func:`_compute`), then write each measurement's products (one
``_write_*`` function per group, sharing a :class:`_Writer`) and ``characterization.json``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from ..errors import BadInputError, MstdaskError
from ..manifest import Manifest
from ._job import (
    TASK_RETRIES,
    JobReport,
    atomic_json,
    check_writable,
    completed,
    progress_bar,
    save_manifest,
    write_png,
    writing,
)

#: The measurements, with the kinds of frames each needs.
_REQUIRES = {"bias_stability": ["bias"], "combined_bias": ["bias"], "anomalous_pixels": ["bias"],
             "linearity": ["bias", "flat"], "photon_transfer": ["bias", "flat"], "pixel_gain": ["bias", "flat"],
             "dark_current": ["bias", "dark"]}

#: What is computed of each measurement's lazy results.
_WANTED = {"bias_stability": ("frame_mean", "summary"), "combined_bias": ("mean", "std", "level", "summary"),
           "anomalous_pixels": ("flags", "density", "mean_centre", "mean_spread", "std_centre", "std_spread",
                                "low_threshold", "high_threshold", "std_threshold", "fraction_below",
                                "fraction_above", "fraction_std_above", "fraction_any"),
           "linearity": ("summary",), "photon_transfer": ("summary",),
           "pixel_gain": ("gain", "read_noise", "summary"), "dark_current": ("summary", "longest")}


@dataclass
class CharacterizeReport(JobReport):
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
    results: dict = field(default_factory=dict)

    # ok: every measurement could be made
    _LISTED = (("SKIPPED", "skipped"),)
    _FAILS = ("skipped",)

    def headline(self) -> str:
        """The headline numbers: gain, read noise, dark current, linearity, bias, anomalous pixels."""
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


def _item(x):
    """A computed summary dict (a 0-d object array) as the dict itself."""
    import numpy as np

    return x.item() if isinstance(x, np.ndarray) and x.dtype == object else x


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
    from ..config import DetectorConfig

    config = config or DetectorConfig()
    t0 = time.perf_counter()
    fr = _select_frames(store_path, out_dir, telescope)
    w = _Writer(fr, store_path, config)
    lazy = _lazy_measurements(fr, config, w.skip)
    got = _compute(client, lazy, fr.tel, progress, w.skip)

    w.open_bar(got, progress)
    _write_bias_stability(w, got)
    _write_combined_bias(w, got)
    _write_anomalous_pixels(w, got)
    gain_source = _write_photon_transfer(w, got)
    _write_linearity(w, got)
    _write_pixel_gain(w, got, lazy)
    _write_dark_current(w, got, gain_source)
    w.finish(argv)
    w.report.seconds = time.perf_counter() - t0
    return w.report


# ----------------------------------------------------------------------------- frames
@dataclass
class _Frames:
    """The lab set of one camera: its bias, flat and dark frames in time order."""

    out: Path
    tel: str
    bias: object
    flats: object
    darks: object
    nights: list[str]
    instrument: str
    shape: tuple[int, int]

    @property
    def night_label(self) -> str:
        """The night, or the first and last nights, for the FITS headers."""
        return self.nights[0] if len(self.nights) == 1 else f"{self.nights[0]}..{self.nights[-1]}"

    def paths(self, kind: str) -> list[str]:
        """The raw files of the ``bias``, ``flats`` or ``darks``."""
        return [str(p) for p in getattr(self, kind)["path"].values]


def _select_frames(store_path, out_dir, telescope: str | None) -> _Frames:
    """Open the store, check the output folder and choose the camera's frames.

    Raises
    ------
    BadInputError
        Several telescopes and none chosen, or not the one chosen.
    InsufficientDataError
        The store holds no frames.
    """
    import numpy as np

    from ..errors import InsufficientDataError
    from ..store import open_store

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
    tds = ds.isel(frame=np.flatnonzero(ds.telescope.values == telescope))

    def frames_of(kind: str):
        f = tds.raw.isel(frame=np.flatnonzero(tds.imagetyp.values == kind))
        return f.isel(frame=np.argsort(f["time"].values, kind="stable"))

    return _Frames(out=out, tel=telescope, bias=frames_of("bias"), flats=frames_of("flat"),
                   darks=frames_of("dark"), nights=sorted(set(map(str, tds.night.values))),
                   instrument=next((str(v) for v in tds.instrument.values if str(v)), ""),
                   shape=(ds.sizes["y"], ds.sizes["x"]))


# ----------------------------------------------------------------------------- lazy graphs and compute
def _lazy_measurements(fr: _Frames, config, skip) -> dict[str, dict]:
    """The lazy results of each measurement the frames allow; what the frame list already
    rules out (too few frames of a kind, a measurement that raises) is ``skip``-ped."""
    import numpy as np

    from ..lab import detector as D

    bias, flats, darks, tel = fr.bias, fr.flats, fr.darks, fr.tel
    need = {"bias": (bias, config.min_bias_frames), "flat": (flats, 1), "dark": (darks, 1)}
    missing = {k: f"{f.sizes['frame']} {k} frame(s) of {tel} in the store, at least {n} needed"
               for k, (f, n) in need.items() if f.sizes["frame"] < n}
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
    lazy: dict[str, dict] = {}
    for name, kinds in _REQUIRES.items():
        lacking = [missing[k] for k in kinds if k in missing]
        if lacking:
            skip(name, "; ".join(lacking))
            continue
        try:
            lazy[name] = makers[name]()
        except MstdaskError as exc:
            skip(name, str(exc))
    return lazy


def _compute(client, lazy: dict[str, dict], tel: str, progress: bool, skip) -> dict[str, dict]:
    """Compute every measurement in one ``client.compute`` (shared reads and moments are done
    once). Each measurement is gathered on its own: one that fails with an
    :class:`MstdaskError` is ``skip``-ped and leaves the others standing."""
    # plain Dask arrays only: dask 2026.8 mixes up results of Delayed and arrays computed together
    items = [(name, key, getattr(lazy[name][key], "data", lazy[name][key])) for name in lazy for key in _WANTED[name]]
    futures = client.compute([obj for _, _, obj in items], retries=TASK_RETRIES) if items else []
    done = {fut: (res, err) for fut, res, err in
            completed(client, futures, f"characterize {tel}: compute", progress, unit="result")}
    got: dict[str, dict] = {}
    for name in lazy:
        outcomes = [(key, *done[fut]) for (n, key, _), fut in zip(items, futures) if n == name]
        err = next((e for _, _, e in outcomes if e is not None), None)
        if err is None:
            got[name] = {key: res for key, res, _ in outcomes}
        elif isinstance(err, MstdaskError):
            skip(name, str(err))
        else:
            raise err
    return got


# ----------------------------------------------------------------------------- products
class _Writer:
    """What the products of one run share: the output folder, the manifest, the report, the
    content of ``characterization.json`` (``res``) and the write progress bar."""

    #: Files each measurement writes (the anomalous pixels' need the combined bias).
    _FILES = {"bias_stability": 1, "combined_bias": 2, "anomalous_pixels": 6, "photon_transfer": 1,
              "linearity": 1, "pixel_gain": 3, "dark_current": 2}

    def __init__(self, fr: _Frames, store_path, config) -> None:
        from .. import __version__
        from ..lab import detector as D

        self.fr, self.config, self.out, self.tel = fr, config, fr.out, fr.tel
        self.report = CharacterizeReport(out_dir=str(fr.out.resolve()), telescope=fr.tel)
        self.manifest = Manifest(fr.out)
        self.cfg = to_dict(config)
        self.bar = None
        ys, xs = D.central_region(fr.shape, config)
        self.res: dict = {
            "telescope": fr.tel, "instrument": fr.instrument, "store": str(Path(store_path).resolve()),
            "nights": fr.nights, "mstdask_version": __version__, "config": self.cfg,
            "frames": {"bias": fr.bias.sizes["frame"], "flat": fr.flats.sizes["frame"],
                       "dark": fr.darks.sizes["frame"]},
            "region": {"y": [ys.start, ys.stop], "x": [xs.start, xs.stop]},
            "bias_stability": None, "combined_bias": None, "anomalous_pixels": None,
            "dark_current_e_per_pix_s": None, "dark_current": None, "linearity": None,
            "gain_e_per_adu": None, "read_noise_e": None, "photon_transfer": None,
            "pixel_gain_median_e_per_adu": None, "pixel_read_noise_median_e": None, "pixel_gain": None,
            "figures": {}, "skipped": {}, "notes": self.report.notes,  # the same list: notes added later show
        }

    def skip(self, what: str, why: str) -> None:
        """A measurement that could not be made, and why (report and JSON)."""
        self.report.skipped.append((what, why))
        self.res["skipped"][what] = why

    def open_bar(self, got: dict, progress: bool) -> None:
        """The write progress bar: the files of the measurements computed, and the JSON."""
        n = sum(0 if name == "anomalous_pixels" and "combined_bias" not in got else self._FILES[name]
                for name in got)
        self.bar = progress_bar(n + 1, f"characterize {self.tel}: write", progress, unit="file")

    def _add(self, kind: str, path: Path, inputs: list[str], **entry) -> None:
        fr = self.fr
        self.report.products.append(self.manifest.add(kind, path, telescope=fr.tel, filter="", night=fr.nights,
                                                      inputs=inputs, config=self.cfg, **entry))
        self.bar.update()

    def product(self, kind: str, fname: str, data, inputs: list[str], method: str, extra: dict | None = None,
                **entry) -> str:
        """A FITS map with provenance headers (``params``: the configuration keys to record),
        and its manifest entry; returns the file name."""
        from ..io import write_product

        path = self.out / fname
        with writing(self.out, f"the {kind} map"):
            write_product(path, data, kind=kind, telescope=self.tel, night=self.fr.night_label, inputs=inputs,
                          method=method, params={k: self.cfg[k] for k in entry.pop("params", [])}, extra=extra)
        self._add(kind, path, inputs, **entry)
        return fname

    def figure(self, number: int, what: str, fig, inputs: list[str]) -> None:
        """A figure as ``figNN_WHAT_TEL.png`` (a bare matplotlib Figure, no pyplot: PNG through
        Agg whatever the session's backend), listed in the JSON and the manifest."""
        fname = f"fig{number:02d}_{what}_{self.tel}.png"
        with writing(self.out, f"figure {fname}"):
            write_png(fig, self.out / fname)
        self.res["figures"][f"fig{number:02d}_{what}"] = fname
        self._add("figure", self.out / fname, inputs, figure=number, what=what)

    def finish(self, argv: list[str] | None) -> None:
        """Write ``characterization.json`` and the manifest; the report gets the results."""
        fr, report = self.fr, self.report
        jpath = self.out / "characterization.json"
        with writing(self.out, "characterization.json"):
            atomic_json(_json_ready(self.res), jpath)
        self._add("characterization", jpath, fr.paths("bias") + fr.paths("flats") + fr.paths("darks"),
                  skipped=dict(self.res["skipped"]))
        self.bar.close()
        save_manifest(self.manifest, self.out, argv, products=len(report.products), skipped=len(report.skipped))
        report.results = _json_ready(self.res)


def _write_bias_stability(w: _Writer, got: dict) -> None:
    """Bias stability: the frame means in time order (Fig. 1)."""
    from ..lab import detector as D

    if "bias_stability" not in got:
        return
    g, bias = got["bias_stability"], w.fr.bias
    w.res["bias_stability"] = {"n_frames": len(g["frame_mean"]), "clip_sigma": w.config.bias_clip_sigma,
                               **_item(g["summary"]), "frame_mean_adu": g["frame_mean"],
                               "time_utc": [str(t)[:23] for t in bias["time"].values]}
    w.figure(1, "bias_stability", D.plot_bias_stability(g["frame_mean"], _item(g["summary"]),
                                                        f"{w.tel}: bias stability (Fig. 1)"), w.fr.paths("bias"))


def _write_combined_bias(w: _Writer, got: dict) -> None:
    """The combined bias map and its fixed pattern (Fig. 2)."""
    from ..lab import detector as D

    if "combined_bias" not in got:
        return
    g, n, bias_paths = got["combined_bias"], w.fr.bias.sizes["frame"], w.fr.paths("bias")
    fname = w.product("combined_bias", f"combined_bias_{w.tel}.fits", g["mean"], bias_paths,
                      f"mean of {n} bias frames", {"BUNIT": "adu"})
    w.res["combined_bias"] = {"path": fname, "n_frames": n, "mean_adu_central_region": float(g["level"]),
                              "fixed_pattern": _item(g["summary"])}
    w.figure(2, "combined_bias", D.plot_combined_bias(g["mean"], f"{w.tel}: combined bias of {n} frames (Fig. 2)"),
             bias_paths)


def _write_anomalous_pixels(w: _Writer, got: dict) -> None:
    """Anomalous pixels: flag and density maps, the thresholds and fractions (Figs. 3-6)."""
    from ..lab import detector as D

    if "anomalous_pixels" not in got or "combined_bias" not in got:
        return
    g, cb, config, tel = got["anomalous_pixels"], got["combined_bias"], w.config, w.tel
    k, sub, bias_paths = config.anomalous_nsigma, config.subarea_px, w.fr.paths("bias")
    f_flags = w.product("anomalous_flags", f"anomalous_flags_{tel}.fits", g["flags"], bias_paths,
                        f"per-pixel mean/std of bias beyond {k:g} sigma",
                        {"FLAGLOW": (1, "mean below centre - n sigma"),
                         "FLAGHIGH": (2, "mean above centre + n sigma"),
                         "FLAGSTD": (4, "std above centre + n sigma")}, params=["anomalous_nsigma"])
    f_dens = w.product("anomalous_density", f"anomalous_density_{tel}.fits", g["density"], bias_paths,
                       f"anomalous pixels per {sub}x{sub} px",
                       {"SUBAREA": (sub, "[px] sub-area edge")}, params=["subarea_px"])
    sc = {key: float(g[key]) for key in _WANTED["anomalous_pixels"] if key not in ("flags", "density")}
    w.res["anomalous_pixels"] = {
        "nsigma": k, "clip_sigma": config.anomalous_clip_sigma, "n_frames": w.fr.bias.sizes["frame"],
        "per_pixel_mean": {"mean_adu": sc["mean_centre"], "std_adu": sc["mean_spread"],
                           "low_threshold_adu": sc["low_threshold"], "high_threshold_adu": sc["high_threshold"]},
        "per_pixel_std": {"mean_adu": sc["std_centre"], "std_adu": sc["std_spread"],
                          "threshold_adu": sc["std_threshold"]},
        "fraction_below": sc["fraction_below"], "fraction_above": sc["fraction_above"],
        "fraction_std_above": sc["fraction_std_above"], "fraction_any": sc["fraction_any"],
        "subarea_px": sub, "density_max": int(g["density"].max()),
        "flags_path": f_flags, "density_path": f_dens}
    w.figure(3, "bias_mean_histogram", D.plot_pixel_histogram(
        cb["mean"], sc["mean_centre"], sc["mean_spread"], k, "per-pixel mean over bias frames [ADU]",
        f"{tel}: {sc['fraction_below']:.3%} below, {sc['fraction_above']:.3%} above mean ±{k:g}σ (Fig. 3)"),
        bias_paths)
    w.figure(4, "bias_std_histogram", D.plot_pixel_histogram(
        cb["std"], sc["std_centre"], sc["std_spread"], k, "per-pixel std over bias frames [ADU]",
        f"{tel}: {sc['fraction_std_above']:.3%} above the {k:g}σ threshold (Fig. 4)", two_sided=False),
        bias_paths)
    w.figure(5, "anomalous_density", D.plot_anomalous_density(
        g["density"], sub, f"{tel}: anomalous pixels per {sub}×{sub} px (Fig. 5)"), bias_paths)
    w.figure(6, "bias_mean_vs_std",
             D.plot_mean_vs_std(cb["mean"], cb["std"], f"{tel}: per-pixel mean vs std (Fig. 6)"), bias_paths)


def _write_photon_transfer(w: _Writer, got: dict) -> tuple[str, float] | None:
    """Gain and read noise by photon transfer (Eq. 1); returns the gain's source and value
    for the dark current (None without a photon-transfer gain)."""
    from ..lab import detector as D

    if "photon_transfer" not in got:
        return None
    s, res, config = _item(got["photon_transfer"]["summary"]), w.res, w.config
    res["gain_e_per_adu"], res["read_noise_e"] = s["gain_e_per_adu"], s["read_noise_e"]
    res["photon_transfer"] = {"region": res["region"], "min_adu": config.ptc_min_adu,
                              "max_adu": config.ptc_max_adu, **s}
    w.figure(11, "photon_transfer", D.plot_photon_transfer(s, f"{w.tel}: photon transfer (Eq. 1)"),
             w.fr.paths("flats") + w.fr.paths("bias"))
    return ("photon transfer (Eq. 1)", s["gain_e_per_adu"])


def _write_linearity(w: _Writer, got: dict) -> None:
    """Linearity of the flats' level with exposure time (Fig. 9); saturated flats are a note."""
    from ..lab import detector as D

    if "linearity" not in got:
        return
    s = _item(got["linearity"]["summary"])
    w.res["linearity"] = s
    if s["saturated_exptime_s"]:
        w.report.notes.append(f"linearity: flats at {', '.join(f'{t:g}' for t in s['saturated_exptime_s'])} s are "
                              f"saturated (>= {w.config.saturation_adu:.0f} ADU) and left out of the fit")
    w.figure(9, "linearity", D.plot_linearity(s, f"{w.tel}: linearity (Fig. 9)"), w.fr.paths("flats"))


def _write_pixel_gain(w: _Writer, got: dict, lazy: dict[str, dict]) -> None:
    """Per-pixel gain and read noise maps (Eqs. 2-3, Fig. 10)."""
    import numpy as np

    from ..lab import detector as D

    if "pixel_gain" not in got:
        return
    g, tel = got["pixel_gain"], w.tel
    s = _item(g["summary"])
    attrs = lazy["pixel_gain"]["gain"].attrs  # the flats and bias used: on the lazy map only
    inputs = list(attrs["inputs"])
    method = f"Eqs. 2-3: {attrs['nflats']} flats at {attrs['exptime']:g} s, {attrs['nbias']} bias"
    f_gain = w.product("pixel_gain_map", f"pixel_gain_{tel}.fits", g["gain"], inputs, method,
                       {"BUNIT": "electron/adu", "EXPTIME": (attrs["exptime"], "[s] of the series of flats")})
    f_rn = w.product("pixel_read_noise_map", f"pixel_read_noise_{tel}.fits", g["read_noise"], inputs, method,
                     {"BUNIT": "electron"})
    w.res["pixel_gain_median_e_per_adu"] = s["gain_median"]
    w.res["pixel_read_noise_median_e"] = s["read_noise_median"]
    w.res["pixel_gain"] = {"exptime_s": attrs["exptime"], "n_flats": attrs["nflats"], "n_bias": attrs["nbias"],
                           "valid_fraction": s["valid_fraction"], "gain_map_path": f_gain,
                           "read_noise_map_path": f_rn,
                           "gain_percentiles_e_per_adu": np.nanpercentile(g["gain"], [5, 25, 50, 75, 95]),
                           "read_noise_percentiles_e": np.nanpercentile(g["read_noise"], [5, 25, 50, 75, 95])}
    w.figure(10, "pixel_gain_read_noise",
             D.plot_pixel_gain(g["gain"], g["read_noise"], s, f"{tel}: per-pixel gain and read noise (Fig. 10)"),
             inputs)


def _write_dark_current(w: _Writer, got: dict, gain_source: tuple[str, float] | None) -> None:
    """Dark current (Figs. 7-8), in electrons with the photon-transfer gain, else the darks'
    EGAIN (a note), else in ADU/s only (``dark_current_e_per_pix_s`` skipped)."""
    import numpy as np

    from ..lab import detector as D

    if "dark_current" not in got:
        return
    g, darks, tel = got["dark_current"], w.fr.darks, w.tel
    s = _item(g["summary"])
    if gain_source is None:
        egain = np.asarray(darks["egain"].values, dtype=np.float64)
        egain = egain[np.isfinite(egain) & (egain > 0)]
        if egain.size:
            gain_source = ("EGAIN of the dark headers", float(np.median(egain)))
            w.report.notes.append(f"dark current: no photon-transfer gain, converted with EGAIN = "
                                  f"{gain_source[1]:g} e-/ADU from the headers")
    if gain_source is not None:
        s = {**D.dark_in_electrons(s, gain_source[1]), "gain_source": gain_source[0]}
        w.res["dark_current_e_per_pix_s"] = s["dark_current_e_per_pix_s"]
    else:
        w.skip("dark_current_e_per_pix_s", "no gain to convert the dark current to electrons (no photon-transfer "
                                           "gain and no EGAIN in the dark headers); dark_current has it in ADU/s")
    w.res["dark_current"] = {"region": w.res["region"], "clip_sigma": w.config.dark_clip_sigma, **s}
    inputs = w.fr.paths("darks") + w.fr.paths("bias")
    w.figure(7, "dark_current", D.plot_dark_current(s, f"{tel}: dark current (Fig. 7)"), inputs)
    w.figure(8, "dark_histogram", D.plot_dark_histogram(
        g["longest"], float(np.max(darks["exptime"].values)),
        f"{tel}: longest dark minus combined bias, central region (Fig. 8)"), inputs)
