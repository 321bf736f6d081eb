"""Detector characterisation (camera paper sections 2-3) against simulator truth and closed forms."""

from __future__ import annotations

import json
import warnings
from datetime import datetime, timedelta

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.stats import sigma_clip
from scipy.stats import chi2

from mstdask.lab import _detector_kernels as K
from mstdask.lab import detector as D
from mstdask.config import DetectorConfig
from mstdask.errors import ConfigError, InsufficientDataError
from mstdask.testing import CameraModel, fits_header, make_camera, write_fits, write_lab_set
from mstdask.testing._camera import NONLINEARITY_REF_ADU
from mstdask.testing._survey import LAB_FLAT_ROWS, _thin

from conftest import stack_frames

SHAPE = (200, 300)
N_BIAS, N_SERIES = 100, 144  # the paper's 100 bias and 144 flats at 2 s (small frames: cheap)
LEVEL = 25000.0  # ADU at 2 s (paper: 20000-40000)
DARK_T = [0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0]
CFG = DetectorConfig()


def gather(client, *objs):
    """Compute lazy results on the cluster (dask arrays or DataArrays), NumPy / dicts back."""
    return client.gather(client.compute([getattr(o, "data", o) for o in objs]))


@pytest.fixture(scope="module")
def camera():
    # a wider per-pixel gain spread than the default (0.5 %) makes the map correlation visible
    return make_camera(CameraModel(shape=SHAPE, gain_rms=0.03), seed=7)


@pytest.fixture(scope="module")
def lab(camera, client):
    """The paper's lab set on a small sensor: 100 bias, 144 flats at 2 s, darks 0.01-600 s,
    persisted on the cluster (sent once, not with every graph)."""
    rng = np.random.default_rng(3)
    bias = stack_frames([camera.bias(rng)[0] for _ in range(N_BIAS)], "bias")
    flats = stack_frames([camera.flat(LEVEL * (1 + 5e-4 * rng.standard_normal()), 0, rng, exptime=2.0,
                                      gradient=(0.003, -0.002), vignetting=False)[0] for _ in range(N_SERIES)],
                         "flat", exptime=2.0)
    darks = xr.concat([stack_frames([camera.dark(t, rng)[0]], "dark", exptime=t) for t in DARK_T], "frame")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph")  # once, on purpose
        return {"bias": bias.persist(), "flats": flats.persist(), "darks": darks.persist()}


@pytest.fixture(scope="module")
def measured(lab, client):
    """Every measurement of the lab set, computed once on the session cluster."""
    bm = D.frame_moments(lab["bias"], CFG)
    level = D.bias_level(bm, CFG)
    st = D.bias_stability(lab["bias"], CFG)
    fp = D.fixed_pattern(bm["mean"], CFG)
    an = D.anomalous_pixels(bm, CFG)
    ptc = D.photon_transfer(lab["flats"], lab["bias"], level, CFG)
    pg = D.pixel_gain(lab["flats"], bm, CFG)
    dk = D.dark_current(lab["darks"], bm, CFG, gain=0.25)
    an_keys = [k for k in an if k not in ("flags", "density")]
    out = gather(client, bm["mean"], bm["std"], bm["var"], st["frame_mean"], st["summary"], fp["summary"],
                 an["flags"], an["density"], *[an[k] for k in an_keys], ptc["summary"], pg["gain"], pg["read_noise"],
                 pg["summary"], dk["summary"])
    names = ["mean", "std", "var", "frame_mean", "stability", "fixed_pattern", "flags", "density",
             *an_keys, "ptc", "gain", "read_noise", "pixel", "dark"]
    return dict(zip(names, out))


def test_config_validates():
    assert CFG.region_px == 2000 and CFG.anomalous_nsigma == 5 and CFG.subarea_px == 20
    assert CFG.nonlinearity_floor_adu == 3000 and CFG.saturation_adu == 50000
    with pytest.raises(ConfigError, match="subarea_px"):
        DetectorConfig(subarea_px=0)
    with pytest.raises(ConfigError, match="ptc_min_adu"):
        DetectorConfig(ptc_min_adu=5e4, ptc_max_adu=1e4)


def test_central_region_is_2000_or_half():
    assert K.central_slices((6388, 9576), 2000) == (slice(2194, 4194), slice(3788, 5788))
    assert K.central_slices((600, 900), 2000) == (slice(150, 450), slice(225, 675))


def test_functions_are_lazy(lab):
    def refuse(*args, **kwargs):
        raise AssertionError("a library function computed")

    with dask.config.set(scheduler=refuse):
        bm = D.frame_moments(lab["bias"], CFG)
        level = D.bias_level(bm, CFG)
        results = [bm, D.bias_stability(lab["bias"], CFG), D.fixed_pattern(bm["mean"], CFG),
                   D.anomalous_pixels(bm, CFG), D.linearity(lab["flats"], level, CFG),
                   D.photon_transfer(lab["flats"], lab["bias"], level, CFG), D.pixel_gain(lab["flats"], bm, CFG),
                   D.dark_current(lab["darks"], bm, CFG)]
    for res in results:
        values = res.data_vars.values() if isinstance(res, xr.Dataset) else res.values()
        for v in values:
            if isinstance(v, xr.Dataset):
                continue
            assert isinstance(getattr(v, "data", v), da.Array), v


def test_streaming_moments_equal_numpy_and_any_chunking(lab, client):
    stack = lab["bias"].values
    bm = D.frame_moments(lab["bias"], CFG)
    mean, var, nsat = gather(client, bm["mean"], bm["var"], bm["nsat"])
    np.testing.assert_allclose(mean, stack.mean(0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(var, stack.var(0, ddof=1, dtype=np.float64), rtol=1e-9, atol=1e-9)
    assert nsat.sum() == 0
    # several blocks of frames, several tiles: partial sums in a tree
    other = DetectorConfig(block_frames=7, split_every=2)
    bm2 = D.frame_moments(lab["bias"].chunk({"frame": 3, "y": 64, "x": 100}), other)
    assert bm2["mean"].data.npartitions > 1 and len(bm2["mean"].data.dask) > len(bm["mean"].data.dask)
    m2, v2 = gather(client, bm2["mean"], bm2["var"])
    np.testing.assert_array_equal(m2, mean)  # exact integer sums: identical bits
    np.testing.assert_array_equal(v2, var)
    g1, r1 = gather(client, *[D.pixel_gain(lab["flats"], bm, CFG)[k] for k in ("gain", "read_noise")])
    p2 = D.pixel_gain(lab["flats"].chunk({"frame": 9, "y": 100, "x": 75}), bm2, other)
    g2, r2 = gather(client, p2["gain"], p2["read_noise"])
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(r1, r2)


def test_gain_and_read_noise_eq1_against_truth(camera, measured):
    ptc = measured["ptc"]
    assert ptc["n_pairs_used"] == N_SERIES // 2
    assert abs(ptc["gain_e_per_adu"] / camera.model.gain - 1) < 0.01, ptc["gain_e_per_adu"]
    # Eq. 1 read noise is the rms temporal noise of the bias (telegraph pixels included)
    ys, xs = D.central_region(SHAPE, CFG)
    truth = camera.model.gain * np.sqrt(np.mean(camera.bias_std_map[ys, xs].astype(np.float64) ** 2))
    assert abs(ptc["read_noise_e"] / truth - 1) < 0.05, (ptc["read_noise_e"], truth)


def test_pixel_gain_and_read_noise_against_truth(camera, measured):
    gain, rn, s = measured["gain"], measured["read_noise"], measured["pixel"]
    assert s["valid_fraction"] > 0.99
    # median of Eq. 2: the injected median gain times the median bias of 1 / (sample variance)
    k = N_SERIES - 1
    expected = camera.model.gain * k / chi2.median(k)
    assert abs(s["gain_median"] / expected - 1) < 0.01, (s["gain_median"], expected)
    # Eq. 3 against the injected per-pixel noise (read noise, row noise, telegraph) in electrons
    truth_rn = np.median(camera.bias_std_map * camera.gain_map)
    assert abs(s["read_noise_median"] / truth_rn - 1) < 0.05, (s["read_noise_median"], truth_rn)
    # the map follows the injected one, as much as sample-variance noise allows (closed form)
    ok = np.isfinite(gain)
    r = np.corrcoef(gain[ok], camera.gain_map[ok])[0, 1]
    sd_true = camera.gain_map.std() / camera.model.gain
    expected_r = sd_true / np.hypot(sd_true, np.sqrt(2 / k))
    assert abs(r - expected_r) < 0.05, (r, expected_r)
    assert np.corrcoef(rn[ok], (camera.bias_std_map * camera.gain_map)[ok])[0, 1] > 0.8


def test_bias_stability_and_fixed_pattern(camera, lab, measured):
    ys, xs = D.central_region(SHAPE, CFG)
    frame_means = lab["bias"].values[:, ys, xs].mean(axis=(1, 2))
    np.testing.assert_allclose(measured["frame_mean"], frame_means, rtol=1e-12)
    kept = sigma_clip(frame_means, sigma=3, maxiters=None).compressed()
    st = measured["stability"]
    assert st["clipped_mean_adu"] == pytest.approx(kept.mean(), abs=1e-9)
    assert st["peak_to_peak_adu"] == pytest.approx(np.ptp(frame_means), abs=1e-9)
    assert abs(st["clipped_mean_adu"] - camera.expected_bias_map[ys, xs].mean()) < 0.05
    # fixed pattern: the same summary of the injected (noise-free) bias map, and the model's numbers
    fp = measured["fixed_pattern"]
    tm = camera.expected_bias_map
    truth = K.fixed_pattern_summary(np.median(tm, axis=1), np.median(tm, axis=0), *_corners(tm, CFG.corner_fraction))
    assert abs(fp["gradient_bottom_to_top_adu"] - truth["gradient_bottom_to_top_adu"]) < 0.1
    assert abs(fp["gradient_bottom_to_top_adu"] + camera.model.bias_gradient_adu) < 0.5  # counts fall upwards
    assert abs(fp["row_banding_adu"] / camera.model.row_pattern_adu - 1) < 0.15
    for name in ("bottom_left", "bottom_right", "top_left", "top_right"):
        assert abs(fp["corner_excess_adu"][name] - truth["corner_excess_adu"][name]) < 0.4, name
    assert min(fp["corner_excess_adu"]["bottom_left"], fp["corner_excess_adu"]["bottom_right"]) > 0.8
    assert max(abs(fp["corner_excess_adu"]["top_left"]), abs(fp["corner_excess_adu"]["top_right"])) < 0.4


def _corners(m, frac):
    ny, nx = m.shape
    h, w = max(1, round(frac * ny)), max(1, round(frac * nx))
    rows = np.median(m, axis=1)
    boxes = {"bottom_left": m[:h, :w], "bottom_right": m[:h, nx - w:], "top_left": m[ny - h:, :w],
             "top_right": m[ny - h:, nx - w:]}
    return boxes, {k: rows[:h] if k.startswith("bottom") else rows[ny - h:] for k in boxes}


def test_anomalous_fractions_near_injected(camera, measured):
    k = CFG.anomalous_nsigma
    # the paper's rule on the injected (noise-free) mean and std maps
    tm, ts = camera.expected_bias_map.astype(np.float64), camera.bias_std_map.astype(np.float64)
    low_t, high_t = tm < tm.mean() - k * tm.std(), tm > tm.mean() + k * tm.std()
    noisy_t = ts > ts.mean() + k * ts.std()
    m = measured
    for got, want in ((m["fraction_below"], low_t.mean()), (m["fraction_above"], high_t.mean()),
                      (m["fraction_std_above"], noisy_t.mean())):
        assert abs(float(got) / want - 1) < 0.15, (float(got), want)
    flags = m["flags"]
    # the noisy pixels are the injected telegraph pixels; the low ones are telegraph or bias outliers
    assert ((flags & 4) > 0)[~camera.ps_map].sum() == 0
    low = (flags & 1) > 0
    assert (low & ~(camera.ps_map | camera.bias_outlier_map)).sum() == 0
    # the density map counts anomalous pixels in 20 x 20 sub-areas (edges partial)
    ny, nx = SHAPE
    dens = m["density"]
    assert dens.shape == (-(-ny // 20), -(-nx // 20)) and dens.sum() == (flags > 0).sum()
    assert dens[0, 0] == (flags[:20, :20] > 0).sum()
    assert float(m["fraction_any"]) == pytest.approx((flags > 0).mean())


def test_dark_current_recovered(camera, measured):
    d = measured["dark"]
    ys, xs = D.central_region(SHAPE, CFG)
    normal = ~camera.hot_map[ys, xs]
    truth = camera.dark_map[ys, xs][normal].mean()  # e-/pix/s of the pixels that are not hot
    assert abs(d["dark_current_e_per_pix_s"] / truth - 1) < 0.05, (d["dark_current_e_per_pix_s"], truth)
    assert d["r2"] > 0.99


@pytest.mark.parametrize("nonlinearity", [-0.02, 0.0])
def test_linearity_recovered(client, nonlinearity):
    cam = make_camera(CameraModel(shape=(128, 192), nonlinearity=nonlinearity), seed=5)
    rng = np.random.default_rng(8)
    rate = 12500.0
    ladder = [t for row in LAB_FLAT_ROWS for t in _thin(row, 0.05, 1)]
    flats = xr.concat([stack_frames([cam.flat(rate * t * (1 + 5e-4 * rng.standard_normal()), 0, rng, exptime=t,
                                              gradient=(0, 0), vignetting=False)[0]], "flat", exptime=t)
                       for t in ladder for _ in range(2)], "frame")
    bias = stack_frames([cam.bias(rng)[0] for _ in range(20)], "bias")
    bm = D.frame_moments(bias, CFG)
    (s,) = gather(client, D.linearity(flats, D.bias_level(bm, CFG), CFG)["summary"])
    # closed form: the simulator's quadratic response s (1 + c s / 50000), fitted the same way
    t = np.array(s["exptime_s"])
    sig = rate * t * (1 + nonlinearity * rate * t / NONLINEARITY_REF_ADU)
    a, b, r2 = K.linear_fit(t, sig)
    expected = 100 * (sig - (a * t + b)) / (a * t + b)
    above = np.array(s["signal_adu"]) >= CFG.nonlinearity_floor_adu
    # noise: 0.05 % source stability per flat and the photon noise of the region mean, ~0.04 % per level
    np.testing.assert_allclose(np.array(s["nonlinearity_percent"])[above], expected[above], atol=0.15)
    assert abs(s["max_abs_nonlinearity_above_floor_percent"] - np.abs(expected[above]).max()) < 0.15
    assert s["r2"] > 0.9999 and abs(s["r2"] - r2) < 2e-5
    assert 4.0 in s["saturated_exptime_s"] and 8.1 in s["saturated_exptime_s"]  # above 50000 ADU: left out


def test_bad_input_no_pairs_and_saturated_flats(camera, lab, client):
    bias = lab["bias"].isel(frame=slice(0, 20))
    bm = D.frame_moments(bias, CFG)
    level = D.bias_level(bm, CFG)
    rng = np.random.default_rng(1)
    ts = [0.5, 1.0, 1.5, 2.0, 2.5]
    single = xr.concat([stack_frames([camera.flat(12500 * t, 0, rng, exptime=t)[0]], "flat", exptime=t) for t in ts],
                       "frame")
    with pytest.raises(InsufficientDataError, match="no two flats share an exposure time"):
        D.photon_transfer(single, bias, level, CFG)
    with pytest.raises(InsufficientDataError, match="at least 20 flats at one exposure time"):
        D.pixel_gain(single, bm, CFG)
    (lin,) = gather(client, D.linearity(single, level, CFG)["summary"])  # still made
    assert len(lin["exptime_s"]) == 5
    # saturated flats: the pixels say so when computed
    sat = stack_frames([camera.flat(60000, 0, rng, exptime=5.0)[0] for _ in range(24)], "flat", exptime=5.0)
    with pytest.raises(InsufficientDataError, match="saturated"):
        gather(client, D.photon_transfer(sat, bias, level, CFG)["summary"])
    with pytest.raises(InsufficientDataError, match="pixels have a gain.*saturated"):
        gather(client, D.pixel_gain(sat, bm, CFG)["summary"])


def _write_lab(folder, cam, flats, n_bias=12, darks=(1.0, 10.0, 60.0, 120.0), seed=0):
    """FITS files of a small lab set: bias, flats given as (exptime, level_adu), darks."""
    rng = np.random.default_rng(seed)
    t = datetime(2024, 3, 5, 6, 0, 0)
    frames = [("bias", 0.0, cam.bias(rng)[0]) for _ in range(n_bias)]
    frames += [("flat", e, cam.flat(lvl, 0, rng, exptime=e, vignetting=False)[0]) for e, lvl in flats]
    frames += [("dark", e, cam.dark(e, rng)[0]) for e in darks]
    folder.mkdir(parents=True)
    for i, (kind, exptime, data) in enumerate(frames):
        write_fits(folder / f"{kind}_{i:03d}.fits", data, fits_header(cam.model, kind, t, exptime))
        t += timedelta(seconds=exptime + 5)
    return folder


def test_characterize_reports_what_cannot_be_made(tmp_path, client):
    from mstdask.jobs import characterize, ingest

    cam = make_camera(CameraModel(shape=(64, 96), telescope="MST1"), seed=2)
    ladder = [(t, 12500 * t) for t in (0.2, 0.6, 1.0, 1.4, 1.8, 2.2, 2.6, 3.0)]
    cases = {
        # one flat per exposure time: no pairs for Eq. 1, no series for Eqs. 2-3
        "nopairs": ladder,
        # the series of flats is saturated (and so is its pair)
        "saturated": ladder + [(5.0, 62500)] * 24,
    }
    for name, flats in cases.items():
        raw = _write_lab(tmp_path / name, cam, flats)
        store = tmp_path / f"{name}.zarr"
        assert ingest([raw], store, client, progress=False).ok
        rep = characterize(store, tmp_path / f"out_{name}", client, CFG, progress=False)
        skipped = dict(rep.skipped)
        assert not rep.ok and set(skipped) == {"photon_transfer", "pixel_gain"}, rep.summary()
        if name == "nopairs":
            assert "no two flats share an exposure time" in skipped["photon_transfer"]
            assert "at least 20 flats at one exposure time" in skipped["pixel_gain"]
        else:
            assert "saturated" in skipped["photon_transfer"] and "saturated" in skipped["pixel_gain"]
            assert any("5 s are saturated" in n for n in rep.notes)
        res = json.loads((tmp_path / f"out_{name}" / "characterization.json").read_text())
        assert res["gain_e_per_adu"] is None and res["pixel_gain_median_e_per_adu"] is None
        assert res["skipped"] == skipped
        # the others are made: bias, anomalous pixels, linearity, dark current (gain from EGAIN)
        assert res["bias_stability"]["n_frames"] == 12 and res["anomalous_pixels"]["fraction_any"] > 0
        assert res["linearity"]["exptime_s"] == [t for t, _ in ladder]
        assert res["dark_current"]["gain_source"] == "EGAIN of the dark headers"
        assert res["dark_current_e_per_pix_s"] is not None
        manifest = json.loads((tmp_path / f"out_{name}" / "manifest.json").read_text())
        kinds = sorted(p["kind"] for p in manifest["products"])
        assert "pixel_gain_map" not in kinds and "combined_bias" in kinds and "characterization" in kinds


def test_cli_ingest_then_characterize(tmp_path):
    from mstdask.cli import main

    truth = write_lab_set(tmp_path / "lab", shape=(96, 144), scale=0.05, seed=4, min_bias=20, min_series=24)
    store, out = tmp_path / "lab.zarr", tmp_path / "char"
    assert main(["ingest", str(tmp_path / "lab"), "--store", str(store), "--workers", "2", "--quiet"]) == 0
    assert main(["characterize", str(store), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    res = json.loads((out / "characterization.json").read_text())
    for key in ("bias_stability", "combined_bias", "anomalous_pixels", "dark_current_e_per_pix_s", "linearity",
                "gain_e_per_adu", "read_noise_e", "pixel_gain_median_e_per_adu", "pixel_read_noise_median_e"):
        assert res[key] is not None, key
    assert res["skipped"] == {} and res["telescope"] == "MST3"
    assert abs(res["gain_e_per_adu"] / truth.camera.model.gain - 1) < 0.01
    assert res["combined_bias"]["fixed_pattern"]["gradient_bottom_to_top_adu"] < 0
    assert res["linearity"]["max_abs_nonlinearity_above_floor_percent"] < 0.5
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = sorted(p["kind"] for p in manifest["products"])
    assert kinds.count("figure") == 11
    for kind in ("anomalous_density", "anomalous_flags", "characterization", "combined_bias", "pixel_gain_map",
                 "pixel_read_noise_map"):
        assert kind in kinds
    for p in manifest["products"]:
        assert (out / p["path"]).exists()
        if p["path"].endswith(".fits"):
            hdr = fits.getheader(out / p["path"])
            assert hdr["PRODTYPE"] == p["kind"] and hdr["TELESCOP"] == "MST3" and hdr["NCOMBINE"] == p["n_inputs"]
    gmap = fits.getdata(out / res["pixel_gain"]["gain_map_path"])
    assert gmap.shape == (96, 144) and abs(np.nanmedian(gmap) - res["pixel_gain_median_e_per_adu"]) < 1e-6
    dens = fits.getdata(out / res["anomalous_pixels"]["density_path"])
    assert dens.shape == (5, 8)
    assert manifest["runs"][-1]["command"].startswith("mstdask characterize")
