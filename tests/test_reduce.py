"""STIR per frame (``mstdask reduce``): reduced frames, Table 1 mask bits, tracks, cosmic rays,
resumability, one bad frame, FITS output, the lazy API and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

from mstdask import stir
from mstdask.cli import main
from mstdask.config import StirConfig
from mstdask.errors import InsufficientDataError, StoreError
from mstdask.masks import Flag
from mstdask.jobs import calibrate, ingest, reduce
from mstdask.store import ReducedStore, open_reduced, open_store
from mstdask.testing import write_survey

SHAPE = (300, 450)


@pytest.fixture(scope="module")
def night(client, tmp_path_factory):
    """One simulated night ingested, calibrated and reduced (with FITS output)."""
    root = tmp_path_factory.mktemp("reduce")
    truth = write_survey(root / "raw", nights=1, shape=SHAPE, n_bias=5, n_flat=6, n_dark=3, n_science=4,
                         n_ps_bias=30, track_probability=0.6, seed=11)
    assert ingest([root / "raw"], root / "raw.zarr", client, progress=False).ok
    assert calibrate(root / "raw.zarr", root / "cal", client, progress=False).ok
    report = reduce(root / "raw.zarr", root / "cal", root / "red" / "reduced.zarr", client,
                    fits_dir=root / "fits", progress=False)
    assert report.ok, report.summary()
    by_path = {str(Path(f.path).resolve()): f for f in truth.select(kind="science")}
    return root, truth, by_path, report


def _product(root: Path, kind: str) -> np.ndarray:
    (path,) = sorted((root / "cal").glob(f"{kind}_*.fits"))
    return fits.getdata(path)


def test_reduced_frames_equal_definition(night):
    root, truth, by_path, report = night
    assert len(report.reduced) == 4 and report.already == 0
    ds = open_reduced(root / "red" / "reduced.zarr")
    raw = open_store(root / "raw.zarr")
    bias, flat = _product(root, "master_bias"), _product(root, "master_flat")
    assert ds.sizes["frame"] == 4
    for k in range(4):
        r = raw.raw[int(ds.raw_index.values[k])].values
        expected = (r.astype(np.float32) - bias.astype(np.float32)) / flat.astype(np.float32)
        got = ds["data"][k].values
        ok = np.isfinite(expected)
        np.testing.assert_allclose(got[ok], expected[ok], rtol=2e-7, atol=1e-6)
        assert np.isnan(got[~ok]).all()
        assert str(ds.path.values[k]) == str(raw.path.values[int(ds.raw_index.values[k])])


def test_mask_bits_follow_table_1(night):
    root, truth, by_path, _ = night
    ds = open_reduced(root / "red" / "reduced.zarr")
    raw = open_store(root / "raw.zarr")
    bad = _product(root, "bad_pixel_mask") != 0
    ps = _product(root, "ps_mask") != 0
    found_tr = true_tr = found_cr = true_cr = cores_hit = cores = 0
    for k in range(ds.sizes["frame"]):
        mask = ds["mask"][k].values
        data = ds["data"][k].values
        r = raw.raw[int(ds.raw_index.values[k])].values
        np.testing.assert_array_equal((mask & Flag.BAD_PIXEL) != 0, bad | ~np.isfinite(data))
        np.testing.assert_array_equal((mask & Flag.PEPPER_SALT) != 0, ps)
        np.testing.assert_array_equal((mask & Flag.SATURATED) != 0, r > 50000)
        t = by_path[str(ds.path.values[k])]
        track_bit = (mask & Flag.SATELLITE_TRACK) != 0
        assert int(ds.track_pixels.values[k]) == track_bit.sum()
        if t.tracks:
            found_tr += (track_bit & t.track_mask).sum()
            true_tr += t.track_mask.sum()
        else:
            assert track_bit.mean() < 1e-4  # no track, (almost) no track pixel
            assert int(ds.n_tracks.values[k]) == 0
        cr_bit = (mask & Flag.COSMIC_RAY) != 0
        free = ~bad & ~ps  # masked pixels are never flagged as cosmic rays
        found_cr += (cr_bit & t.cosmic_ray_mask & free).sum()
        true_cr += (t.cosmic_ray_mask & free).sum()
        # star cores: the central pixel of bright, unsaturated stars well inside the frame
        stars = t.stars
        inside = ((stars["x"] > 5) & (stars["x"] < SHAPE[1] - 6) & (stars["y"] > 5) & (stars["y"] < SHAPE[0] - 6)
                  & ~stars["saturated"] & (stars["peak_adu"] > 300))
        yy, xx = np.round(stars["y"][inside]).astype(int), np.round(stars["x"][inside]).astype(int)
        clean = ~t.cosmic_ray_mask[yy, xx]
        cores += clean.sum()
        cores_hit += (cr_bit[yy, xx] & clean).sum()
    assert true_tr > 0, "the simulated night should hold at least one track"
    assert found_tr / true_tr > 0.9, found_tr / true_tr
    assert found_cr / true_cr > 0.8, found_cr / true_cr
    assert cores_hit / cores < 0.01, (cores_hit, cores)


def test_store_opens_with_xarray(night):
    root = night[0]
    ds = xr.open_zarr(root / "red" / "reduced.zarr")
    assert ds["data"].dims == ("frame", "y", "x") and ds["mask"].dims == ("frame", "y", "x")
    assert ds["data"].dtype == np.float32 and ds["mask"].dtype == np.uint8
    for name in ("time", "night", "filter", "telescope", "exptime", "path", "frame_key", "n_tracks", "calib_flat"):
        assert name in ds.variables, name
    assert ds["data"].chunks[0] == (1,) * ds.sizes["frame"]  # one frame per chunk
    assert ds.attrs["mstdask_store"] == "mstdask.reduced"
    manifest = json.loads((root / "red" / "manifest.json").read_text())
    (entry,) = [p for p in manifest["products"] if p["kind"] == "reduced_store"]
    assert entry["frames"] == 4 and entry["night"] == ["2023-01-18"] and entry["filter"] == ["g"]


def test_rerun_reduces_only_what_is_missing(night, client):
    root = night[0]
    out = root / "red" / "reduced.zarr"
    before = open_reduced(out)["data"].values
    again = reduce(root / "raw.zarr", root / "cal", out, client, progress=False)
    assert again.already == 4 and not again.reduced
    ReducedStore.open(out).set_coords([2], reduced=[False])  # as if the run had died on frame 2
    assert open_reduced(out).sizes["frame"] == 3
    third = reduce(root / "raw.zarr", root / "cal", out, client, progress=False)
    assert third.already == 3 and len(third.reduced) == 1
    np.testing.assert_array_equal(open_reduced(out)["data"].values, before)


def test_one_bad_frame_is_reported_and_the_others_finish(night, client, tmp_path):
    root = night[0]
    store = tmp_path / "raw.zarr"
    shutil.copytree(root / "raw.zarr", store)
    raw = open_store(store)
    sci = np.flatnonzero(raw.imagetyp.values == "science")
    victim = int(sci[1])
    shard = store / "raw" / "c" / str(victim) / "0" / "0"
    assert shard.is_file()
    shard.write_bytes(b"not a zarr shard" * 10)
    rep = reduce(store, root / "cal", tmp_path / "red.zarr", client, progress=False)
    assert len(rep.failed) == 1 and len(rep.reduced) == 3
    assert rep.failed[0][0] == str(raw.path.values[victim])
    assert "FAILED" in rep.summary()
    assert open_reduced(tmp_path / "red.zarr").sizes["frame"] == 3


def test_fits_output_carries_provenance(night):
    root = night[0]
    manifest = json.loads((root / "fits" / "manifest.json").read_text())
    entries = [p for p in manifest["products"] if p["kind"] == "reduced_frame"]
    assert len(entries) == 4
    ds = open_reduced(root / "red" / "reduced.zarr")
    for e in entries:
        with fits.open(root / "fits" / e["path"]) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "SCI", "MASK"]
            hdr = hdul[0].header
            assert hdr["BIASFILE"].startswith("master_bias_") and hdr["FLATFILE"].startswith("master_flat_")
            assert hdr["PSFILE"].startswith("ps_mask_") and hdr["BPMFILE"].startswith("bad_pixel_mask_")
            assert "DATE-OBS" in hdr and hdr["IMAGETYP"]  # the raw header travels with the frame
            k = e["store_index"]
            np.testing.assert_array_equal(hdul["SCI"].data, ds["data"].sel(frame=k).values)
            np.testing.assert_array_equal(hdul["MASK"].data, ds["mask"].sel(frame=k).values)
            assert hdr["NTRACKS"] == int(ds.n_tracks.sel(frame=k))
        assert e["inputs"][0] == str(ds.path.sel(frame=k).values)


def test_lazy_api_matches_the_per_frame_step(night):
    root = night[0]
    red = open_reduced(root / "red" / "reduced.zarr")
    raw = open_store(root / "raw.zarr").raw.isel(frame=red.raw_index.values)
    cal = root / "cal" / "calib.zarr"
    group = red.calib_bias.values[0]
    bias = xr.open_zarr(cal, group=group)["master_bias"]
    flat = xr.open_zarr(cal, group=red.calib_flat.values[0])["master_flat"]
    bad = xr.open_zarr(cal, group=red.calib_bad.values[0])["bad_pixel_mask"]
    ps = xr.open_zarr(cal, group=red.calib_ps.values[0])["ps_mask"]
    data = stir.reduce_frames(raw, bias, flat)
    static = stir.static_mask(raw, bad, ps)
    tracks = stir.track_mask(data, static | (~np.isfinite(data)).astype(np.uint8))
    for lazy in (data, static, tracks):
        assert lazy.chunks is not None  # nothing computed yet
    np.testing.assert_array_equal(data.values, red["data"].values)
    m = red["mask"].values
    expected_static = m & (Flag.BAD_PIXEL | Flag.SATURATED | Flag.PEPPER_SALT)
    nonfinite = ~np.isfinite(red["data"].values)
    np.testing.assert_array_equal(static.values | np.where(nonfinite, 1, 0).astype(np.uint8), expected_static)
    np.testing.assert_array_equal(tracks.values, m & Flag.SATELLITE_TRACK)


def test_find_calibrations_nearest_night_and_missing(tmp_path):
    entries = [{"kind": "master_bias", "telescope": "MST2", "filter": "", "night": "2023-01-10",
                "zarr_group": "calib.zarr/master_bias/MST2_2023-01-10"},
               {"kind": "master_flat", "telescope": "MST2", "filter": "g", "night": "2023-01-12",
                "zarr_group": "calib.zarr/master_flat/MST2_g_2023-01-12"}]
    (tmp_path / "manifest.json").write_text(json.dumps({"products": entries}))
    cs = stir.find_calibrations(tmp_path, "MST2", "g", "2023-01-12")
    assert cs.bias == "master_bias/MST2_2023-01-10" and cs.flat == "master_flat/MST2_g_2023-01-12"
    assert any("master_bias of 2023-01-10" in n for n in cs.notes)
    assert any("no PS mask" in n for n in cs.notes)
    with pytest.raises(InsufficientDataError, match="no master flat .* filter r"):
        stir.find_calibrations(tmp_path, "MST2", "r", "2023-01-12")
    with pytest.raises(InsufficientDataError, match="within 62 days"):
        stir.find_calibrations(tmp_path, "MST2", "g", "2023-05-12")
    with pytest.raises(StoreError, match="mstdask calibrate"):
        stir.find_calibrations(tmp_path / "nowhere", "MST2", "g", "2023-01-12")


def test_cli_reduce(night, tmp_path, capsys):
    root = night[0]
    out = tmp_path / "cli_red.zarr"
    rc = main(["reduce", str(root / "raw.zarr"), "--calib", str(root / "cal"), "--out", str(out),
               "--no-cosmics", "--workers", "2", "--quiet"])
    assert rc == 0, capsys.readouterr()
    assert "4 frames reduced" in capsys.readouterr().out
    a, b = open_reduced(out), open_reduced(root / "red" / "reduced.zarr")
    np.testing.assert_array_equal(a["data"].values, b["data"].values)
    # without the cosmic-ray search, bit 16 is never set and every other bit is the same
    np.testing.assert_array_equal(a["mask"].values, b["mask"].values & ~np.uint8(Flag.COSMIC_RAY))
    rc = main(["reduce", str(root / "raw.zarr"), "--calib", str(tmp_path / "none"), "--out",
               str(tmp_path / "x.zarr"), "--workers", "1", "--quiet"])
    assert rc == 2 and "mstdask calibrate" in capsys.readouterr().err


def test_stir_config_is_validated():
    from mstdask.errors import ConfigError

    with pytest.raises(ConfigError):
        StirConfig(track_band_px=0)


def test_track_centrelines_are_stored(night):
    root, truth, by_path, _ = night
    ds = open_reduced(root / "red" / "reduced.zarr")
    for k in range(ds.sizes["frame"]):
        lines = json.loads(str(ds.tracks.values[k]))
        assert len(lines) == int(ds.n_tracks.values[k])
        t = by_path[str(ds.path.values[k])]
        for ln in lines:  # each stored centreline lies on an injected track
            xm, ym = (ln["x0"] + ln["x1"]) / 2, (ln["y0"] + ln["y1"]) / 2
            yy, xx = np.nonzero(t.track_mask)
            assert np.hypot(xx - xm, yy - ym).min() < 5
