"""Night calibrations against simulator truth: master bias, PS map, bad pixels, flags."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr

from mstdask.stir import calib
from mstdask.stir._calib_kernels import clipped_mean
from mstdask.config import CalibConfig
from mstdask.errors import BadInputError, InsufficientDataError
from mstdask.masks import Flag, describe_flags, saturated
from mstdask.testing import CameraModel, make_camera

from conftest import stack_frames

SHAPE = (120, 180)


@pytest.fixture(scope="module")
def camera():
    return make_camera(CameraModel(shape=SHAPE), seed=11)


@pytest.fixture(scope="module")
def bias100(camera):
    rng = np.random.default_rng(5)
    return stack_frames([camera.bias(rng)[0] for _ in range(100)], "bias")


def test_flags_are_table1():
    assert [(f.name, f.value) for f in Flag] == [("BAD_PIXEL", 1), ("SATURATED", 2), ("PEPPER_SALT", 4),
                                                  ("SATELLITE_TRACK", 8), ("COSMIC_RAY", 16)]
    assert describe_flags(25) == ["BAD_PIXEL", "SATELLITE_TRACK", "COSMIC_RAY"]
    raw = np.array([[49999, 50000, 50001, 65535]], dtype=np.uint16)
    assert saturated(raw).tolist() == [[0, 0, 2, 2]]


def test_clipped_mean_rejects_outliers_and_matches_mean_otherwise():
    rng = np.random.default_rng(0)
    stack = rng.normal(100, 3, size=(15, 8, 9))
    plain = clipped_mean(stack, sigma=10)
    np.testing.assert_allclose(plain, stack.mean(0), rtol=1e-6)
    stack[4, 2, 3] = 1e4  # a cosmic ray
    out = clipped_mean(stack)
    assert abs(out[2, 3] - np.delete(stack[:, 2, 3], 4).mean()) < 1e-3


def test_master_bias_noise_is_read_noise_over_sqrt_n(camera, bias100):
    bias = bias100.isel(frame=slice(0, 10))
    mb = calib.master_bias(bias).compute()
    assert mb.dtype == np.float32 and mb.attrs["ncombine"] == 10
    clean = ~camera.ps_map & ~camera.bad_pixel_map
    resid = (mb.values - camera.expected_bias_map) / (camera.bias_std_map / np.sqrt(10))
    # the clipped mean of 10 Gaussian values is ~5 % noisier than the plain mean
    assert 0.95 < np.std(resid[clean]) < 1.15
    assert abs(np.mean(resid[clean])) < 0.05
    med = calib.master_bias(bias, CalibConfig(bias_combine="median")).compute()
    assert 1.1 < np.std(((med.values - camera.expected_bias_map) / (camera.bias_std_map / np.sqrt(10)))[clean]) < 1.4


def test_master_bias_identical_under_chunkings(bias100):
    bias = bias100.isel(frame=slice(0, 40))  # 1.7 MB: several tiles at a 1 MiB stack budget
    small = CalibConfig(stack_bytes=2**20, tile_bytes=2**20)  # and row strips inside each tile
    a = calib.master_bias(bias, small).compute()
    b = calib.master_bias(bias.chunk({"frame": 3, "y": 50, "x": 70}), CalibConfig()).compute()
    c = calib.master_bias(bias, CalibConfig()).compute()  # one tile, one strip
    assert calib.master_bias(bias, small).data.npartitions > 1
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.values, c.values)


def test_ps_map_recovers_telegraph_pixels(camera, bias100):
    ps = calib.ps_map(bias100)
    assert isinstance(ps["ps"].data, dask.array.Array)  # lazy
    ps = ps.compute()
    truth = camera.ps_map
    found = ps["ps"].values
    recall = (found & truth).sum() / truth.sum()
    false_pos = (found & ~truth).sum() / (~truth).sum()
    assert recall > 0.9, recall
    assert false_pos < 1e-3, false_pos
    summary = {k: v.compute() for k, v in calib.ps_summary(ps).items()}
    assert abs(float(summary["fraction"]) - truth.mean()) < 0.01
    assert float(summary["agreement"].min()) > 0.85
    assert ps.group_frames.values.tolist() == [34, 33, 33]
    # per-pixel std over 100 frames follows the injected per-pixel noise on clean pixels
    clean = ~truth & ~camera.bad_pixel_map
    ratio = ps["std"].values[clean] / camera.bias_std_map[clean]
    assert abs(np.median(ratio) - 1) < 0.03
    # neither tiles nor row strips change a bit: each pixel's sums run over its frames in order
    small = CalibConfig(stack_bytes=2**20, tile_bytes=2**20)
    assert calib.ps_map(bias100, small)["std"].data.npartitions > 1
    other = calib.ps_map(bias100.chunk({"y": 40, "x": 60}), small).compute()
    xr.testing.assert_identical(other, ps)


def test_bad_pixels_from_darks(camera, bias100):
    rng = np.random.default_rng(9)
    darks = stack_frames([camera.dark(300.0, rng)[0] for _ in range(3)], "dark", exptime=300.0)
    mb = calib.master_bias(bias100.isel(frame=slice(0, 10)))
    res = calib.bad_pixel_map(darks, mb).compute()
    hot = camera.hot_map
    bad = res["bad"].values
    assert (bad & hot).sum() / hot.sum() > 0.9
    # telegraph pixels sit away from the bias mean in a 3-dark combine and are caught too (they
    # carry their own flag); of the remaining pixels a 3-sigma cut catches the tail of the
    # skewed, multi-modal dark-current distribution (camera paper Fig. 8): ~2 %, not 0.27 %
    normal = ~hot & ~camera.ps_map & ~camera.bad_pixel_map
    assert (bad & normal).sum() / normal.sum() < 0.03
    assert float(res["sigma"]) > 0


def test_wrong_types_and_too_few_frames_are_refused(bias100):
    mixed = xr.concat([bias100.isel(frame=slice(0, 4)),
                       stack_frames([np.zeros(SHAPE, np.uint16)], "flat")], dim="frame")
    with pytest.raises(BadInputError, match="flat frame in a group of bias"):
        calib.master_bias(mixed)
    with pytest.raises(InsufficientDataError, match="at least 3"):
        calib.master_bias(bias100.isel(frame=slice(0, 2)))
    with pytest.raises(InsufficientDataError, match="pepper-and-salt"):
        calib.ps_map(bias100.isel(frame=slice(0, 10)))


def test_nearest_night():
    assert calib.nearest_night("2023-01-20", ["2023-01-18", "2023-01-23"]) == "2023-01-18"
    assert calib.nearest_night("2023-01-20", ["2023-01-19", "2023-01-21"]) == "2023-01-19"
    with pytest.raises(InsufficientDataError):
        calib.nearest_night("2023-01-20", [])


def test_store_frames_read_per_task_give_identical_calibrations(client, tmp_path):
    """``open_store(chunks=None)`` (what ``mstdask calibrate`` uses: every stack task reads its
    own tile of all its frames, no rechunk, nothing moves between workers) and
    ``open_store()`` (one frame per Dask chunk, rechunked to stacks) give bit-identical master
    bias, PS map, bad pixels, flat levels and small-scale flat; the lazy reads return the
    stored pixels for any selection."""
    from mstdask.config import IngestConfig, StoreLayout
    from mstdask.jobs import ingest
    from mstdask.store import open_store, rechunk_for_stack
    from mstdask.testing import write_survey

    write_survey(tmp_path / "fits", nights=1, shape=(130, 170), n_bias=5, n_ps_bias=30, n_dark=3, n_flat=5,
                 n_science=0, seed=4)
    store = tmp_path / "s.zarr"
    assert ingest([tmp_path / "fits"], store, client, IngestConfig(layout=StoreLayout(tile=64)),
                  progress=False).ok
    lazy, dsk = open_store(store, chunks=None), open_store(store)
    assert lazy.raw.chunks is None and dsk.raw.chunks[1][0] == 65 and dsk.raw.chunks[2][0] == 85
    sel = dict(frame=[7, 0, 3], y=slice(None, None, 4), x=slice(5, 100))
    np.testing.assert_array_equal(lazy.raw.isel(**sel).values, dsk.raw.isel(**sel).values)
    assert lazy.raw[2, 60:70, 80:90].values.tolist() == dsk.raw[2, 60:70, 80:90].values.tolist()
    assert lazy.raw.isel(frame=[]).values.shape == (0, 130, 170)

    # the lazy stacks read the store in the stack tasks themselves: no rechunk in the graph
    stack = rechunk_for_stack(lazy.raw, 2**30).data
    assert stack.chunks[1][0] == 65 and not any("rechunk" in name for name in stack.__dask_graph__().layers)
    assert any("rechunk" in name for name in rechunk_for_stack(dsk.raw, 2**30).data.__dask_graph__().layers)

    config = CalibConfig()
    results = []
    for ds in (lazy, dsk):
        typ = ds.imagetyp.values
        bias = ds.raw.isel(frame=np.flatnonzero(typ == "bias"))
        flats = ds.raw.isel(frame=np.flatnonzero(typ == "flat"))
        mb = calib.master_bias(bias.isel(frame=slice(0, 5)), config)
        ps = calib.ps_map(bias, config)
        bad = calib.bad_pixel_map(ds.raw.isel(frame=np.flatnonzero(typ == "dark")), mb, config)
        results.append(dask.compute(mb.data, ps["ps"].data, ps["std"].data, bad["bad"].data,
                                    calib.flat_levels(flats, mb).data,
                                    calib.nightly_small_scale_flat(flats, mb, config).data))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    assert results[0][1].any() and results[0][3].any()  # the simulated PS and bad pixels are found
