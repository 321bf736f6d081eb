"""STATIC photometry (``mstdask photometry``): zero points, aperture correction, PSF
magnitudes, agreement with photutils, flagged exposures, the Parquet products and the
command line, against the simulator's truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from mstdask.static import _phot_kernels as K
from mstdask.config import PhotometryConfig
from mstdask.masks import saturated
from mstdask.static.photometry import SOURCE_COLUMNS, ExposureFlagged, measure_exposure
from mstdask.static.refcat import Refcat, load_refcat, parse_columns
from mstdask.cli import main
from mstdask.testing import CameraModel, make_camera, make_star_catalog

RA0, DEC0 = 150.0, 30.0


def _frame(psf: str, seed: int, density: float = 10000.0, mag_range=(11.0, 17.5), transparency: float = 1.0):
    """A reduced frame divided by the true flat response (so the zero point is uniform)."""
    cam = make_camera(CameraModel(shape=(1400, 2000), sip_corner_px=4.0, psf=psf), seed=7)
    ny, nx = cam.shape
    sc = cam.model.pixel_scale_arcsec / 3600
    cat = make_star_catalog(RA0, DEC0, nx * sc * 1.3, ny * sc * 1.3, density_per_deg2=density,
                            mag_range=mag_range, rng=seed)
    data, truth = cam.science(300.0, RA0, DEC0, {"ra": cat["ra"], "dec": cat["dec"], "mag": cat["mag"]},
                              rng=seed + 1, tracks=0, cosmic_rays=False, transparency=transparency)
    red = ((data.astype(np.float32) - cam.expected_bias_map) / cam.flat_response(0)).astype(np.float32)
    ref = Refcat(np.asarray(cat["ra"], float), np.asarray(cat["dec"], float), np.asarray(cat["mag"], float))
    return red, saturated(data, 50000.0), ref, truth


def _matched(sources, truth, max_err=0.01):
    st = truth.stars
    d, j = cKDTree(np.column_stack([st["x"], st["y"]])).query(np.column_stack([sources["x"], sources["y"]]))
    ok = (d < 0.5) & (sources["magerr_aper"] < max_err) & (sources["flags"] == 0) & ~np.asarray(st["saturated"])[j]
    return ok, np.asarray(st["mag"], float)[j]


@pytest.fixture(scope="module")
def gaussian():
    red, mask, ref, truth = _frame("gaussian", 2)
    res = measure_exposure(red, mask, ref, exptime=300.0, ra0=RA0 + 0.01, dec0=DEC0 + 0.01, gain=0.25)
    return red, mask, ref, truth, res


@pytest.fixture(scope="module")
def moffat():
    red, mask, ref, truth = _frame("moffat", 4)
    res = measure_exposure(red, mask, ref, exptime=300.0, ra0=RA0 - 0.02, dec0=DEC0, gain=0.25)
    return red, mask, ref, truth, res


def test_zero_point_within_1_mmag(gaussian):
    red, mask, ref, truth, res = gaussian
    rec = res.record
    assert rec["status"] == "ok" and rec["n_calib"] > 300
    # the exposure zero point (mean over the detector) and the fit at the calibration stars
    assert abs(rec["zero_point"] - truth.zero_point_adu) < 0.001, (rec["zero_point"], truth.zero_point_adu)
    zp = res.diagnostics["zero_point"]
    assert abs(np.median(zp["poly"](zp["x"], zp["y"])) - truth.zero_point_adu) < 0.001
    assert rec["zero_point_err"] < 0.001 and 0.003 < rec["zero_point_scatter"] < 0.02
    # calibrated magnitudes of bright stars equal the catalogue's
    ok, tm = _matched(res.sources, truth)
    assert abs(np.median(res.sources["mag_aper"][ok] - tm[ok])) < 0.001


def _quadrant_medians(x, y, r, shape):
    ny, nx = shape
    q = (x > nx / 2).astype(int) + 2 * (y > ny / 2).astype(int)
    return np.array([np.median(r[q == k]) for k in range(4)])


@pytest.mark.parametrize("which", ["gaussian", "moffat"])
def test_aperture_correction_unbiased_across_field(which, request):
    red, mask, ref, truth, res = request.getfixturevalue(which)
    s = res.sources
    ok, tm = _matched(s, truth)
    # instrumental aperture-corrected magnitudes against the injected ones: no trend over
    # the detector although the PSF grows by 40 % and elongates towards the corners
    r = (s["mag_aper_inst"] + truth.zero_point_adu - tm)[ok]
    quad = _quadrant_medians(s["x"][ok], s["y"][ok], r, red.shape)
    assert np.ptp(quad) < 0.004 and np.all(np.abs(quad - np.median(r)) < 0.002), quad
    # the best aperture alone (no correction) misses light, more in the corners
    best = r - K.Poly2D(*_poly_args(res.record["aperture_correction_poly"]))(s["x"][ok], s["y"][ok])
    quad_best = _quadrant_medians(s["x"][ok], s["y"][ok], best, red.shape)
    print(which, "corrected", quad, "best only", quad_best)
    if which == "moffat":
        assert np.median(best) - np.median(r) > 0.02
    # calibrated magnitudes: unbiased everywhere
    rc = (s["mag_aper"] - tm)[ok]
    assert np.all(np.abs(_quadrant_medians(s["x"][ok], s["y"][ok], rc, red.shape)) < 0.002)
    # the apertures: best ~ 1.5-2 FWHM, reference converged further out (paper: best ~ 2 FWHM)
    fw = res.record["fwhm_px"]
    assert 1.0 * fw <= res.record["best_aperture_px"] <= 2.5 * fw
    assert res.record["reference_aperture_px"] > res.record["best_aperture_px"]


def _poly_args(text):
    d = json.loads(text)
    return tuple(d["coeffs"]), d["order"], tuple(d["shape"])


def test_psf_magnitudes(moffat):
    red, mask, ref, truth, res = moffat
    s = res.sources
    ok, tm = _matched(s, truth)
    rp = (s["mag_psf"] - tm)[ok]
    ra = (s["mag_aper"] - tm)[ok]
    assert np.isfinite(rp).mean() > 0.99
    assert abs(np.median(rp)) < 0.002
    assert np.all(np.abs(_quadrant_medians(s["x"][ok], s["y"][ok], rp, red.shape)) < 0.004)
    mad = lambda a: 1.4826 * np.median(np.abs(a - np.median(a)))  # noqa: E731
    assert mad(rp) < 1.5 * mad(ra) + 0.002, (mad(rp), mad(ra))
    # the PSF model varies over the field: FWHM of the model grows towards the corners
    psf = res.diagnostics["psf"]
    assert psf.order >= 1


def test_astrometry_and_seeing(moffat):
    red, mask, ref, truth, res = moffat
    rec = res.record
    assert rec["astrometric_rms_mas"] < 0.1 * 862  # < 0.1 px
    assert rec["astrometric_rms_mas_before"] > rec["astrometric_rms_mas"]
    s = res.sources
    ok, _ = _matched(s, truth)
    ra_t, dec_t = truth.wcs.all_pix2world(s["x"][ok], s["y"][ok], 0)
    d = np.hypot((s["ra"][ok] - ra_t) * math.cos(math.radians(DEC0)), s["dec"][ok] - dec_t) * 3600
    assert np.median(d) < 0.05  # arcsec: the solved WCS reproduces the true one
    # seeing: adaptive-moment FWHM within 20 % of the injected Moffat FWHM
    assert 0.9 * truth.seeing_arcsec < rec["seeing_arcsec"] < 1.35 * truth.seeing_arcsec


def test_aperture_sums_equal_photutils(gaussian):
    from photutils.aperture import CircularAperture, aperture_photometry

    red, mask, ref, truth, res = gaussian
    cfg = PhotometryConfig()
    bad = mask != 0
    back, rms = K.background(red, bad, cfg)
    sub = (red - back).astype(np.float32)
    s = res.sources
    pick = np.flatnonzero((s["flags"] == 0) & (s["x"] > 30) & (s["x"] < red.shape[1] - 30)
                          & (s["y"] > 30) & (s["y"] < red.shape[0] - 30))[:200]
    x, y = s["x"][pick].astype(float), s["y"][pick].astype(float)
    ours, _, _ = K.aperture_photometry(sub, x, y, [3.0, 7.5], rms, 0.25)
    for k, r in enumerate((3.0, 7.5)):
        theirs = aperture_photometry(sub, CircularAperture(np.column_stack([x, y]), r), method="exact")
        np.testing.assert_allclose(ours[:, k], np.asarray(theirs["aperture_sum"]), rtol=1e-5, atol=1e-2)


def test_masked_pixels_are_filled_from_neighbours():
    """A pepper-and-salt pixel in a star: filled from its neighbours, the aperture sum loses at
    most half what scaling the sum up for the missing area (SExtractor's way) loses when the
    pixel is in the core, and both are within 1.5 % in the wing."""
    yy, xx = np.mgrid[0:41, 0:41].astype(float)
    x0, y0, r = np.array([20.2]), np.array([19.7]), np.array([8.0])
    for fwhm in (2.3, 3.0, 4.0):
        sigma = fwhm / 2.3548
        star = 1e5 / (2 * np.pi * sigma ** 2) * np.exp(-((xx - x0[0]) ** 2 + (yy - y0[0]) ** 2) / (2 * sigma ** 2))
        for pix, core in (((20, 20), True), ((18, 22), False)):
            img = star.astype(np.float32)
            bad = np.zeros(img.shape, bool)
            bad[pix] = True
            img[bad] = 40000.0  # what a PS pixel reads
            rms = np.ones_like(img)
            filled, left = K.fill_masked(img, bad, ~bad)
            assert not left.any() and np.array_equal(filled[~bad], img[~bad])
            f_fill = K.aperture_photometry(filled, x0, y0, r, rms, 1.0)[0][0, 0] / star.sum() - 1
            f_scale = K.aperture_photometry(img, x0, y0, r, rms, 1.0, bad)[0][0, 0] / star.sum() - 1
            if core:
                assert abs(f_fill) < 0.6 * abs(f_scale), (fwhm, f_fill, f_scale)
            else:
                assert abs(f_fill) < 0.015 and abs(f_scale) < 0.02, (fwhm, f_fill, f_scale)
    # a pixel with no usable neighbour stays masked
    block = np.zeros(img.shape, bool)
    block[5:8, 5:8] = True
    _, left = K.fill_masked(img, block, ~block)
    assert left.sum() == 1 and left[6, 6]


def test_source_table_columns_and_flags(gaussian):
    red, mask, ref, truth, res = gaussian
    s = res.sources
    n = len(s["x"])
    for col in SOURCE_COLUMNS:
        if col not in ("exposure", "time", "mjd_mid", "night", "telescope", "filter"):
            assert len(s[col]) == n, col
    # saturated stars carry the saturated bit (2) of the mask under their aperture
    st = truth.stars
    d, j = cKDTree(np.column_stack([s["x"], s["y"]])).query(np.column_stack([st["x"], st["y"]]))
    sat = (np.asarray(st["peak_adu"]) > 55000) & np.asarray(st["in_frame"]) & (d < 1.0)  # clearly saturated
    assert sat.sum() > 3
    assert np.all(s["flags"][j[sat]] & 2)


def test_flagged_exposures():
    rng = np.random.default_rng(1)
    sky = rng.normal(900.0, 60.0, (400, 600)).astype(np.float32)
    ref = Refcat(np.array([150.0]), np.array([30.0]), np.array([12.0]))
    with pytest.raises(ExposureFlagged, match="no sources|isolated stars"):
        measure_exposure(sky, np.zeros(sky.shape, np.uint8), ref, exptime=300.0, ra0=150.0, dec0=30.0)
    red, mask, ref, truth = _frame("moffat", 6)
    # a wrong header pointing (5 deg off): the catalogue's stars there are not the frame's
    decoy = make_star_catalog(RA0 + 5.0, DEC0 - 3.0, 1.0, 1.0, density_per_deg2=2000.0, mag_range=(10.0, 17.5),
                              rng=9)
    wide = Refcat(np.r_[ref.ra, decoy["ra"]], np.r_[ref.dec, decoy["dec"]], np.r_[ref.mag, decoy["mag"]])
    with pytest.raises(ExposureFlagged, match="astrometry failed.*pointing"):
        measure_exposure(red, mask, wide, exptime=300.0, ra0=RA0 + 5.0, dec0=DEC0 - 3.0)
    # a reference catalogue with no magnitudes in this filter: astrometry works, no zero point
    nomag = Refcat(ref.ra, ref.dec, np.full(len(ref), np.nan))
    with pytest.raises(ExposureFlagged, match="matched the reference catalogue"):
        measure_exposure(red, mask, nomag, exptime=300.0, ra0=RA0, dec0=DEC0)
    # thick clouds (10 % transparency): still measured and calibrated, the zero point is
    # 2.5 mag down, and the run flags it against its night's median
    from mstdask.jobs.photometry import _flag_clouds

    red, mask, ref, truth = _frame("moffat", 8, transparency=0.1)
    cloudy = measure_exposure(red, mask, ref, exptime=300.0, ra0=RA0, dec0=DEC0).record
    assert abs(cloudy["zero_point"] - truth.zero_point_adu) < 0.03
    night = [{"status": "ok", "night": "20230118", "telescope": "MST2", "filter": "g",
              "zero_point": truth.zero_point_adu + 2.5 + d, "exposure": f"e{k}"} for k, d in enumerate((0, .01, -.01))]
    cloudy.update(night="20230118", telescope="MST2", filter="g", exposure="cloudy")
    _flag_clouds(night + [cloudy], 0.3)
    assert cloudy["status"] == "flagged" and "clouds" in cloudy["reason"]
    assert all(r["status"] == "ok" for r in night)


def test_refcat_formats(tmp_path, gaussian):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from astropy.table import Table

    _, _, ref, _, _ = gaussian
    t = Table({"RA_ICRS": ref.ra[:50], "DE_ICRS": ref.dec[:50], "Gmag": ref.mag[:50]})
    t.write(tmp_path / "c.fits")
    pq.write_table(pa.table({"RA_ICRS": ref.ra[:50], "DE_ICRS": ref.dec[:50], "Gmag": ref.mag[:50]}),
                   tmp_path / "c.parquet")
    t.write(tmp_path / "c.csv", format="ascii.csv")
    cfg = parse_columns("ra=RA_ICRS,dec=DE_ICRS,mag=Gmag")
    for name in ("c.fits", "c.parquet", "c.csv"):
        r = load_refcat(tmp_path / name, cfg, "g")
        np.testing.assert_allclose(r.ra, ref.ra[:50])
        np.testing.assert_allclose(r.mag, ref.mag[:50])
    from mstdask.errors import BadInputError

    with pytest.raises(BadInputError, match="no RA column 'ra'.*RA_ICRS"):
        load_refcat(tmp_path / "c.csv", None, "g")
    with pytest.raises(BadInputError, match="not found"):
        load_refcat(tmp_path / "missing.csv")


def test_real_huntsman_frame(tmp_path):
    """The real ZWO ASI183MM frame with its real SkyMapper catalogue: solved, calibrated."""
    from astropy.io import fits

    from conftest import HUNTSMAN, need_shared

    folder = need_shared(HUNTSMAN)
    with fits.open(folder / "science_DoradoGroup_g_1000x1000.fits") as hdul:
        raw = hdul[0].data.astype(np.float32)
        hdr = hdul[0].header
    flat = fits.getdata(folder / "flat_FlatDither00_g_1000x1000.fits").astype(np.float32)
    data = raw / (flat / np.median(flat))  # no bias frames: the background takes the offset
    ref = load_refcat(folder / "refcat_skymapper_dorado.csv",
                      parse_columns("ra=raj2000,dec=dej2000,mag={filter}_psf,mag_err=e_{filter}_psf"), "g")
    from mstdask.config import AstrometryConfig

    from mstdask.static.astrometry import pointing_from_header

    ra0, dec0 = pointing_from_header(hdr)
    scale = 206.265 * hdr["XPIXSZ"] / 400.0  # 2.4 um pixels behind a 400 mm lens: 1.2376"/px
    cfg = PhotometryConfig(min_calib_stars=8, zero_point_order=1, aperture_correction_order=1,
                           gain_e_per_adu=float(hdr.get("EGAIN", 1.0) or 1.0))
    res = measure_exposure(data, saturated(raw, 60000.0), ref, exptime=float(hdr["EXPTIME"]),
                           ra0=ra0, dec0=dec0, config=cfg,
                           astro_config=AstrometryConfig(pixel_scale_arcsec=scale))
    rec = res.record
    assert rec["status"] == "ok" and rec["n_calib"] >= 8
    assert rec["astrometric_rms_mas"] < 500
    # the instrumental-to-SkyMapper zero point of a 300 s g exposure on a 0.4 m telescope
    print(f"\nHuntsman: {rec['n_calib']} calibration stars, zero point {rec['zero_point']:.3f} "
          f"+- {rec['zero_point_scatter']:.3f}, astrometry {rec['astrometric_rms_mas']:.0f} mas")
    assert 18 < rec["zero_point"] < 24 and rec["zero_point_scatter"] < 0.15  # colour terms: SkyMapper g is not this g


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def night(static_night):
    return static_night


def test_cli_photometry_products(night):
    import dask.dataframe as dd
    import pandas as pd
    import pyarrow.dataset as pds

    root, truth, rc = night
    assert rc == 0
    cat = root / "cat"
    man = json.loads((cat / "manifest.json").read_text())
    kinds = {p["kind"]: p for p in man["products"]}
    assert set(kinds) >= {"source_catalog", "exposure_table"}
    src = kinds["source_catalog"]
    assert src["telescope"] == ["MST2"] and src["filter"] == ["g"] and src["exposures"] == 4
    # one partitioned dataset, readable by pandas, pyarrow and dask.dataframe
    df = pd.read_parquet(cat / "sources")
    assert set(SOURCE_COLUMNS) <= set(df.columns)
    assert pds.dataset(cat / "sources", format="parquet").count_rows() == len(df)
    assert len(dd.read_parquet(str(cat / "sources")).compute()) == len(df)
    assert df["exposure"].nunique() == 4 and (df["flags"] >= 0).all()
    exp = pd.read_parquet(cat / "exposures.parquet")
    assert (exp["status"] == "ok").all(), exp[["exposure", "status", "reason"]]
    assert (exp["astrometric_rms_mas"] < 86.2).all()  # < 0.1 px
    for col in ("best_aperture_px", "reference_aperture_px", "zero_point", "zero_point_scatter", "n_stars",
                "seeing_arcsec"):
        assert exp[col].notna().all(), col
    # relative zero points follow the injected ones (airmass and transparency). On these
    # small frames the aperture correction rests on < 100 isolated stars and scatters by a
    # few per cent (the 1 mmag accuracy is tested above on a larger field).
    sci = {Path(f.path).name: f for f in truth.select(kind="science")}
    inj = np.array([sci[Path(p).name].zero_point_adu for p in exp["path"]])
    d = exp["zero_point"].to_numpy() - inj
    assert np.ptp(d) < 0.08 and np.all(np.abs(d - np.median(d)) < 0.05), d
    # the WCS column is a TPV header astropy reads
    from astropy.io import fits
    from astropy.wcs import WCS

    w = WCS(fits.Header.fromstring(exp["wcs"].iloc[0], sep="\n"))
    one = df[df["exposure"] == exp["exposure"].iloc[0]].iloc[:5]
    ra, dec = w.all_pix2world(one["x"].to_numpy(), one["y"].to_numpy(), 0)
    np.testing.assert_allclose(ra, one["ra"], atol=1e-7)


def test_cli_photometry_resumes(night, client):
    root, truth, rc = night
    before = {p: p.stat().st_mtime_ns for p in (root / "cat" / "sources").rglob("*.parquet")}
    victim = sorted(before)[0]
    victim.unlink()
    from mstdask.jobs import photometry

    rep = photometry(root / "red" / "reduced.zarr", truth.refcat_path, root / "cat", client, progress=False)
    assert rep.ok and rep.already == 3 and len(rep.measured) == 1
    after = {p: p.stat().st_mtime_ns for p in (root / "cat" / "sources").rglob("*.parquet")}
    assert set(after) == set(before)
    assert all(after[p] == before[p] for p in before if p != victim)


def test_cli_photometry_bad_refcat(night, client, tmp_path, capsys):
    root, truth, rc = night
    bad = tmp_path / "ref.csv"
    bad.write_text("RA,DEC,G\n1,2,3\n")
    code = main(["photometry", str(root / "red" / "reduced.zarr"), "--refcat", str(bad), "--out",
                 str(tmp_path / "c"), "--quiet", "--cluster", client.scheduler.address])
    out = capsys.readouterr()
    # checked up front: the command cannot run (exit 2), one message, no exposure measured
    assert code == 2
    assert "no RA column 'ra'" in out.err and "--refcat-columns" in out.err
    assert "FLAGGED" not in out.out and not (tmp_path / "c" / "exposures.parquet").exists()
