"""Image coaddition (``mstdask coadd``, STATIC multiple): flux conservation through the
distorted astrometric solution, noise falling as 1/sqrt(N), masked pixels excluded, the same
coadd for any tiling, laziness, the combine kernels against closed forms, and the command
line on a simulated night."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.io import fits
from scipy.special import erf

from mstdask.stacks import _coadd_kernels as K
from mstdask.stacks.coadd import CoaddFrame, coadd, noise_correlation, output_grid
from mstdask.config import CoaddConfig
from mstdask.errors import BadInputError, ConfigError
from mstdask.testing import CameraModel, make_camera, make_wcs

RA0, DEC0 = 150.0, 30.0
SHAPE = (240, 320)


def _camera():
    # a small sensor with the MST's 4th-order SIP distortion (4 px at the corners)
    return make_camera(CameraModel(shape=SHAPE, sip_corner_px=4.0), seed=3)


def _header(w) -> str:
    return w.to_header(relax=True).tostring(sep="\n")


def _stars(cam, ra, dec, wcs, sigma=1.3):
    """Pixel-integrated Gaussian stars at known sky positions: (image, ra, dec, flux)."""
    ny, nx = SHAPE
    rng = np.random.default_rng(11)
    n = 40
    x, y = rng.uniform(25, nx - 25, n), rng.uniform(25, ny - 25, n)
    keep = np.ones(n, bool)
    for i in range(n):  # isolated: apertures of 6 sigma never overlap
        d = np.hypot(x - x[i], y - y[i])
        d[i] = np.inf
        keep[i] = d.min() > 25
    x, y = x[keep], y[keep]
    flux = rng.uniform(2e3, 5e4, x.size)
    sra, sdec = wcs.all_pix2world(x, y, 0)
    return sra, sdec, flux


def _render(wcs, sra, sdec, flux, sigma=1.3):
    ny, nx = SHAPE
    x, y = wcs.all_world2pix(sra, sdec, 0)
    img = np.zeros(SHAPE)

    def pix(c, n):
        e = (np.arange(n + 1) - 0.5 - c) / (math.sqrt(2) * sigma)
        return 0.5 * np.diff(erf(e))

    for xi, yi, f in zip(x, y, flux):
        img += f * np.outer(pix(yi, ny), pix(xi, nx))
    return img.astype(np.float32)


def _dithered(n, noise=0.0, seed=0, stars=None, mask_every=0):
    cam = _camera()
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        dra, ddec = rng.uniform(-0.004, 0.004, 2)
        w = cam.wcs(RA0 + dra, DEC0 + ddec)
        data = np.zeros(SHAPE, np.float32)
        if stars is not None:
            data += _render(w, *stars)
        if noise:
            data += rng.normal(0, noise, SHAPE).astype(np.float32)
        mask = np.zeros(SHAPE, np.uint8)
        if mask_every:
            mask.ravel()[rng.choice(mask.size, mask.size // mask_every, replace=False)] = 1
        frames.append(CoaddFrame(f"e{i}", _header(w), SHAPE, data=data, mask=mask, noise=noise or 1.0,
                                 weight=1.0 / (noise or 1.0) ** 2, exptime=60.0, zero_point=25.0))
    return cam, frames


def _aperture_sums(img, wcs, ra, dec, r):
    x, y = wcs.all_world2pix(ra, dec, 0)
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    out = []
    for a, b in zip(x, y):
        sel = (xx - a) ** 2 + (yy - b) ** 2 < r * r
        out.append(np.sum(img[sel]) if np.isfinite(img[sel]).all() and sel.sum() > 3.0 * r * r else np.nan)
    return np.array(out)


@pytest.mark.parametrize("scale", [0.862, 1.25])
def test_flux_of_injected_stars_conserved(client, scale):
    cam = _camera()
    w0 = cam.wcs(RA0, DEC0)
    stars = _stars(cam, RA0, DEC0, w0)
    _, frames = _dithered(3, stars=stars)
    cfg = CoaddConfig(pixel_scale_arcsec=scale)
    grid = output_grid(frames, scale)
    ds = coadd(frames, grid, cfg).compute()
    # aperture of 6 sigma of the star (1.3 input px) in output pixels
    sums = _aperture_sums(ds.image.values, grid.wcs, stars[0], stars[1], 6 * 1.3 * 0.862 / scale)
    full = np.isfinite(sums)
    assert full.sum() >= 8
    rel = sums[full] / stars[2][full] - 1
    assert np.abs(rel).max() < 0.005, rel
    # the exposure count is 3 where every frame covers
    assert ds["count"].values.max() == 3


def test_noise_falls_as_one_over_sqrt_n(client):
    box = 8
    ratios, kfac = [], []
    _, frames = _dithered(8, noise=10.0, seed=5)
    grid = output_grid(frames[:1], 0.862)
    ny, nx = grid.shape
    for n in (1, 2, 4, 8):
        ds = coadd(frames[:n], grid, CoaddConfig()).compute()
        img = ds.image.values[16:ny - 16, 16:nx - 16]
        cnt = ds["count"].values[16:ny - 16, 16:nx - 16]
        my, mx = img.shape[0] // box, img.shape[1] // box
        blocks = img[:my * box, :mx * box].reshape(my, box, mx, box).swapaxes(1, 2).reshape(my, mx, -1)
        full = (cnt[:my * box, :mx * box].reshape(my, box, mx, box).swapaxes(1, 2).reshape(my, mx, -1) == n).all(-1)
        sums = blocks[full].sum(axis=1)
        # aperture-like sums keep the input variance per area: box * 10 / sqrt(n)
        ratios.append(np.std(sums) / (box * 10.0 / math.sqrt(n)))
        # the geometric correlation factor predicts block variance / (box^2 pixel variance)
        pix = blocks[full].ravel()
        kfac.append((np.var(sums) / (box * box * np.var(pix)), noise_correlation(frames[:n], grid)))
    ratios = np.array(ratios)
    assert np.all(np.abs(ratios - 1) < 0.1), ratios
    for measured, predicted in kfac:
        assert measured == pytest.approx(predicted, rel=0.12), kfac


def test_masked_pixels_never_contribute(client):
    _, frames = _dithered(3, noise=5.0, seed=2, mask_every=50)
    grid = output_grid(frames, 0.862)
    a = coadd(frames, grid).compute()
    spoiled = []
    for f in frames:  # masked pixels to absurd values, and some NaN: nothing may change
        d = f.data.copy()
        bad = f.mask != 0
        d[bad] = np.where(np.arange(bad.sum()) % 2, 1e7, np.nan)
        spoiled.append(CoaddFrame(f.exposure, f.wcs, f.shape, data=d, mask=f.mask, noise=f.noise, weight=f.weight))
    b = coadd(spoiled, grid).compute()
    np.testing.assert_array_equal(a.image.values, b.image.values)
    np.testing.assert_array_equal(a["count"].values, b["count"].values)
    assert np.nanmax(np.abs(b.image.values)) < 100
    # the masked pixels lower the count near them (2 % masked: a few % of output pixels)
    frac = np.mean(a["count"].values[20:-20, 20:-20] < 3)
    assert 0.01 < frac < 0.15


@pytest.mark.parametrize("combine", ["mean", "clipped-mean", "median"])
def test_same_coadd_for_different_tilings(client, combine):
    _, frames = _dithered(5, noise=5.0, seed=9, mask_every=200)
    grid = output_grid(frames, 0.862)
    cfg = CoaddConfig(combine=combine, frames_per_task=2)  # the mean: three chains of running sums per tile
    a = coadd(frames, grid, cfg, tile=64).compute()
    b = coadd(frames, grid, cfg, tile=250).compute()
    assert a.image.data.shape == b.image.data.shape
    for name in ("image", "weight", "count", "flags"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_coadd_is_lazy():
    cam = _camera()
    frames = [CoaddFrame(f"e{i}", _header(cam.wcs(RA0 + 0.001 * i, DEC0)), SHAPE, store="/nonexistent/red.zarr",
                         index=i) for i in range(3)]
    ds = coadd(frames, config=CoaddConfig(tile_px=128))  # nothing is read to build the graph
    import dask.array as da

    assert isinstance(ds.image.data, da.Array) and ds.image.data.numblocks[0] >= 2
    assert ds.attrs["ncombine"] == 3 and ds.attrs["gain"] == pytest.approx(3 * 0.25)
    with pytest.raises(BadInputError, match="nonexistent"):
        ds.image.compute(scheduler="sync")


def test_compiled_kernel_matches_scipy_reference():
    """The fused compiled resampler equals the SciPy path (mapping + map_coordinates) to
    float32 rounding, with masks, carried flags and sub-pixel offsets."""
    cam = _camera()
    wi = cam.wcs(RA0, DEC0)
    wo = make_wcs((260, 340), RA0 + 0.001, DEC0 + 0.0007, 0.862, 0.7)
    rng = np.random.default_rng(0)
    d = rng.normal(100, 10, SHAPE).astype(np.float32)
    bad = rng.random(SHAPE) < 0.02
    fl = ((rng.random(SHAPE) < 0.002) * 2).astype(np.uint8)
    box = (10, 250, 7, 333)
    nodes = K.mapping_nodes(wo, wi, box)
    for off in ((0.0, 0.0), (0.25, -0.25)):
        ref = K.resample_bilinear(d, bad, *K.mapping(wo, wi, box, 16, off), (0, 0), SHAPE, fl)
        new = K.resample_nodes(d, bad, nodes, box, 16, (0, 0), SHAPE, fl, offset=off)
        np.testing.assert_array_equal(ref[1], new[1])
        np.testing.assert_array_equal(ref[2], new[2])
        np.testing.assert_allclose(ref[0], new[0], rtol=1e-6, atol=1e-4)
        assert 0.02 < 1 - new[1].mean() < 0.3  # masked pixels and the frame edge


def test_combine_stack_closed_forms():
    rng = np.random.default_rng(1)
    v = rng.normal(100, 1, (6, 5, 7))
    valid = np.ones(v.shape, bool)
    valid[0, 0, 0] = False
    w = np.array([1.0, 2, 3, 1, 2, 1])
    img, wsum, cnt, _ = K.combine_stack(v, valid, w, "mean")
    ww = np.where(valid, w[:, None, None], 0)
    np.testing.assert_allclose(img, (ww * v).sum(0) / ww.sum(0), rtol=1e-6)
    assert cnt[0, 0] == 5 and wsum[0, 0] == pytest.approx(w[1:].sum())
    med, _, _, _ = K.combine_stack(v, valid, w, "median")
    np.testing.assert_allclose(med[1:], np.median(v[:, 1:], axis=0), rtol=1e-6)
    v2 = v.copy()
    v2[2, 3, 3] = 1e4  # a cosmic ray missed by the masks
    cm, _, cnt2, _ = K.combine_stack(v2, np.ones(v.shape, bool), w, "clipped-mean", noise=np.ones(6))
    keep = np.arange(6) != 2
    assert cnt2[3, 3] == 5
    assert cm[3, 3] == pytest.approx(np.sum(w[keep] * v[keep, 3, 3]) / w[keep].sum(), rel=1e-6)
    with pytest.raises(ValueError, match="combine"):
        K.combine_stack(v, valid, w, "sum")


def test_limiting_magnitude():
    m = np.arange(14.0, 21.0, 0.5)
    err = 2.5 / math.log(10) / 5 * 10 ** (0.4 * (m - 19.3))  # background-limited: 5 sigma at 19.3
    lim, ex = K.limiting_magnitude(m, err)
    assert lim == pytest.approx(19.3, abs=0.01) and not ex
    lim, ex = K.limiting_magnitude(m[m < 18], err[m < 18])
    assert lim == pytest.approx(19.3, abs=0.01) and ex


def test_config_validation():
    with pytest.raises(ConfigError, match="combine"):
        CoaddConfig(combine="sum")
    with pytest.raises(ConfigError, match="n_stack"):
        CoaddConfig(n_stack=(0, 2))
    assert CoaddConfig(n_stack=(8, 2, 2)).n_stack == (2, 8)


def test_cli_coadd_end_to_end(static_night, tmp_path, client):
    from mstdask.cli import main

    root, truth, rc = static_night
    assert rc == 0
    out = tmp_path / "co"
    args = ["coadd", str(root / "cat"), "--out", str(out), "--n", "2,4,64", "--quiet",
            "--cluster", client.scheduler.address]
    assert main(args) == 0
    man = json.loads((out / "manifest.json").read_text())
    kinds = {}
    for p in man["products"]:
        kinds.setdefault(p["kind"], []).append(p)
    assert {p["ncombine"] for p in kinds["coadd"]} == {1, 2, 4}
    assert len(kinds["coadd_catalog"]) == 3 and len(kinds["coadd_depth"]) == 1 and len(kinds["figure"]) == 1
    with fits.open(out / "coadd_MST2_g_N004.fits") as hdul:
        assert [h.name for h in hdul] == ["SCI", "WHT", "CNT", "FLG"]
        assert hdul[0].header["NCOMBINE"] == 4 and hdul[0].header["CTYPE1"].startswith("RA---TAN")
        assert hdul["CNT"].data.max() == 4
    import pandas as pd

    depth = pd.read_parquet(out / "depth.parquet").set_index("n")
    assert list(depth.index) == [1, 2, 4]
    # stacking 4 exposures goes deeper (1.25 log10 4 = 0.75 mag expected; seeing varies)
    assert depth.loc[4, "limiting_mag"] - depth.loc[1, "limiting_mag"] > 0.3
    # a rerun does nothing again
    assert main(args) == 0
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert runs[-1]["made"] == 0 and runs[-1]["already"] == 3
    # a folder without catalogues is one clear error
    assert main(["coadd", str(tmp_path), "--out", str(tmp_path / "x"), "--quiet"]) == 2
