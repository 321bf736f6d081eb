"""Master flats: small-scale flats recover the injected pixel response; the 11-night window."""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

from mstdask.stir import calib
from mstdask.config import CalibConfig
from mstdask.testing import CameraModel, make_camera

from conftest import stack_frames

SHAPE = (90, 140)


def test_flat_window_nights():
    nights = [f"2023-01-{d:02d}" for d in range(1, 31)]
    assert calib.flat_window_nights("2023-01-15", nights) == [f"2023-01-{d:02d}" for d in range(10, 21)]
    assert calib.flat_window_nights("2023-01-02", nights) == [f"2023-01-{d:02d}" for d in range(1, 8)]
    # a night without flats still gets 5 before and 5 after
    assert len(calib.flat_window_nights("2023-01-15", [n for n in nights if n != "2023-01-15"])) == 10
    # never more than two months away
    far = ["2022-10-01", "2023-01-10", "2023-05-01"]
    assert calib.flat_window_nights("2023-01-12", far) == ["2023-01-10"]


def test_small_scale_flat_matches_definition():
    rng = np.random.default_rng(0)
    img = (20000 * (1 + 0.01 * rng.standard_normal(SHAPE))).astype(np.float32)
    out = calib.small_scale_flat(img, 51)
    np.testing.assert_array_equal(out, img / ndi.median_filter(img, size=51, mode="reflect"))


def test_eleven_night_master_flat_recovers_pixel_response():
    cam = make_camera(CameraModel(shape=SHAPE), seed=4)
    rng = np.random.default_rng(1)
    config = CalibConfig()
    bias_frames = [cam.bias(rng)[0] for _ in range(10)]
    nightly = []
    for k in range(11):
        night = f"2023-01-{13 + k:02d}"
        bias = calib.master_bias(stack_frames(bias_frames, "bias", night), config)
        flats = [cam.flat(40000.0, night_index=k, rng=rng)[0] for _ in range(20)]
        nightly.append(calib.nightly_small_scale_flat(stack_frames(flats, "flat", night), bias, config))
    master = calib.stack_nightly_flats(nightly).compute().values
    resp = cam.flat_response(night_index=5)
    truth = resp / ndi.median_filter(resp, size=51, mode="reflect")
    good = ~cam.bad_pixel_map & ~cam.ps_map & np.isfinite(master)
    err = master[good] / truth[good] - 1
    # photon noise floor: 1/sqrt(40000 ADU * 0.25 e-/ADU * 20 flats * 11 nights) = 0.067 %
    assert np.std(err) < 1e-3, np.std(err)
    # no overall offset beyond a few 1e-4 (nonlinearity and the nightly drift of the response
    # shift the normalisation of a single night's truth slightly)
    assert abs(np.median(err)) < 5e-4
    # one night alone is ~sqrt(11) noisier: stacking nights is what reaches 0.1 %
    one = nightly[5].compute().values
    assert np.std(one[good] / truth[good] - 1) > 2 * np.std(err)


def test_fig4_scatter_falls_to_the_pixel_response():
    cam = make_camera(CameraModel(shape=SHAPE), seed=8)
    rng = np.random.default_rng(2)
    config = CalibConfig()
    bias = calib.master_bias(stack_frames([cam.bias(rng)[0] for _ in range(5)], "bias", "2023-01-13"), config)
    nightly = []
    for k in range(12):
        night = f"2023-01-{13 + k:02d}"
        flats = [cam.flat(20000.0, night_index=k, rng=rng)[0] for _ in range(5)]
        nightly.append(calib.nightly_small_scale_flat(stack_frames(flats, "flat", night), bias, config))
    curve = calib.flat_scatter_vs_nights(nightly).compute()
    assert curve.n_nights.values.tolist() == list(range(1, 13))
    s = curve.values
    assert np.all(np.diff(s) < 1e-5) and s[-1] < s[0]  # falls as the flats' noise averages down
    resp = cam.flat_response(night_index=0)
    prnu = np.std((resp / ndi.median_filter(resp, size=51, mode="reflect"))[~cam.bad_pixel_map])
    # scatter^2 = prnu^2 + noise^2 / N (Fig. 4): the fitted floor is the injected pixel response
    n = curve.n_nights.values
    (floor, noise2), *_ = np.linalg.lstsq(np.c_[np.ones_like(n), 1.0 / n], s ** 2, rcond=None)
    assert abs(np.sqrt(floor) / prnu - 1) < 0.03
    # the photon noise of 5 flats of 20000 ADU (5000 e-): 1/sqrt(5 * 5000) = 0.63 %
    assert abs(np.sqrt(noise2) / (1 / np.sqrt(5 * 5000)) - 1) < 0.25


def test_tiled_small_scale_flat_equals_whole_frame_definition():
    """Per-tile running medians with a 25-px halo give exactly the whole-frame small-scale
    flats, borders included, whatever the tiling (here tiles of 34-85 px, 3 frames)."""
    rng = np.random.default_rng(3)
    shape = (130, 170)
    bias = (500 + rng.normal(0, 3, shape)).astype(np.float32)
    flats = [(20000 * (1 + 0.02 * rng.standard_normal(shape)) + bias).astype(np.uint16) for _ in range(3)]
    config = CalibConfig(min_frames=3)
    import xarray as xr
    import dask.array as da

    b = xr.DataArray(da.from_array(bias), dims=("y", "x"))
    whole = np.stack([calib.small_scale_flat(f.astype(np.float32) - bias, 51) for f in flats])
    from mstdask.stir import _calib_kernels as K

    expected = K.clipped_mean(whole, config.clip_sigma, config.clip_maxiters)
    for chunks in ({"y": 65, "x": 85}, {"y": 65, "x": 34}, {"y": 40, "x": 60}, {"y": -1, "x": -1}):
        stack = stack_frames(flats, "flat").chunk(chunks)
        cfg = CalibConfig(min_frames=3, stack_bytes=2**20 if chunks["x"] == 34 else 768 * 2**20)
        got = calib.nightly_small_scale_flat(stack, b, cfg)
        if chunks["x"] == 34:
            assert got.data.npartitions > 1
        np.testing.assert_array_equal(got.compute().values, expected)
