"""Ingest: header normalisation, pixel exactness, idempotence, resume, bad input, layout."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

import mstdask
from mstdask.config import IngestConfig, SiteConfig, StoreLayout
from mstdask.io import normalise_imagetyp, observing_night, scan_frame
from mstdask.jobs import ingest
from mstdask.store import RawStore, open_store, tile_edge

from conftest import SHEFFIELD, need_shared, write_frame


@pytest.mark.parametrize("value, kind", [
    ("Light Frame", "science"), ("LIGHT", "science"), ("object", "science"), ("Object", "science"),
    ("Bias Frame", "bias"), ("BIAS", "bias"), ("zero", "bias"), ("Dark Frame", "dark"), ("DARK", "dark"),
    ("Flat Field", "flat"), ("FLAT", "flat"), ("Flat Frame", "flat"), ("sky flat", "flat"),
    ("twilight flat", "flat"), ("science", "science"), ("focus", None), ("", None), (None, None),
])
def test_normalise_imagetyp(value, kind):
    assert normalise_imagetyp(value) == kind


def test_observing_night_xinglong_and_override():
    site = SiteConfig()
    # 23:00 local on the 18th and 04:00 local on the 19th are both the night of the 18th
    assert observing_night(datetime(2023, 1, 18, 15, 0), site) == "2023-01-18"
    assert observing_night(datetime(2023, 1, 18, 20, 0), site) == "2023-01-18"
    # 13:00 local on the 19th starts the next night
    assert observing_night(datetime(2023, 1, 19, 5, 0), site) == "2023-01-19"
    # the same UTC instant is another night at a site 8 h further west
    assert observing_night(datetime(2023, 1, 19, 5, 0), SiteConfig(name="UT", utc_offset_hours=0)) == "2023-01-18"


def test_date_obs_spellings_and_what_the_message_shows(tmp_path):
    from mstdask.errors import BadInputError

    data = np.zeros((8, 12), np.uint16)
    site = SiteConfig()
    for written, utc in (("2023-01-18 13:34:00", datetime(2023, 1, 18, 13, 34)),  # a space, as some drivers write
                         ("2023-01-18T13:34:00.250Z", datetime(2023, 1, 18, 13, 34, 0, 250000)),
                         ("2023-01-18", datetime(2023, 1, 18, 13, 34, 5))):    # date only, time in TIME-OBS
        f = write_frame(tmp_path / "d.fits", data, **{"DATE-OBS": written, "TIME-OBS": "13:34:05"})
        assert scan_frame(str(f), site).time == utc, written
    f = write_frame(tmp_path / "bad.fits", data, **{"DATE-OBS": "2023-01-18 25:34:00"})
    with pytest.raises(BadInputError) as err:
        scan_frame(str(f), site)
    message = str(err.value)
    assert "DATE-OBS='2023-01-18 25:34:00'" in message and "T00:00:00" not in message and str(f) in message


def test_a_named_pipe_is_not_called_missing(tmp_path):
    from mstdask.io import discover

    fifo = tmp_path / "frames.fits"
    os.mkfifo(fifo)
    files, missing = discover([fifo, tmp_path / "nowhere.fits"])
    assert files == []
    assert dict(missing) == {str(fifo): "not a regular file (a named pipe): FITS frames are read from files; "
                                        "copy the data into a .fits file",
                             str(tmp_path / "nowhere.fits"): "no such file or folder"}


def test_tile_edges_divide_mst_frames():
    assert tile_edge(6388, 1536) == 1597 and 6388 % 1597 == 0
    assert tile_edge(9576, 1536) == 1596 and 9576 % 1596 == 0
    assert tile_edge(300, 1536) == 300
    assert tile_edge(7919, 1024) == 1024  # a prime: no divisor, partial last tile


def test_ingest_real_night_pixel_exact(client, tmp_path):
    src = need_shared(SHEFFIELD)
    store = tmp_path / "night.zarr"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    report = ingest([src], store, client, progress=False)
    # dark1.fit is float32: not raw camera pixels
    assert [Path(p).name for p, _ in report.rejected] == ["dark1.fit"]
    assert "non-integer" in report.rejected[0][1]
    assert len(report.written) == 26
    ds = xr.open_zarr(store)
    assert ds.raw.dtype == np.uint16 and ds.raw.dims == ("frame", "y", "x")
    assert ds.raw.shape == (26, 736, 1092)
    ds = open_store(store)
    counts = {t: int((ds.imagetyp == t).sum()) for t in ("bias", "dark", "flat", "science")}
    assert counts == {"bias": 3, "dark": 2, "flat": 3, "science": 18}
    assert set(ds.night.values.tolist()) == {"2012-02-18", "2012-02-24"}  # flats from another night
    assert np.all(np.diff(ds.time.values) >= np.timedelta64(0))
    for i in range(ds.sizes["frame"]):
        assert np.array_equal(ds.raw[i].values, fits.getdata(str(ds.path.values[i]))), ds.path.values[i]
    sci = ds.sel(frame=ds.imagetyp == "science")
    assert np.all(sci.exptime.values == 200.0) and set(sci["filter"].values.tolist()) == {"I"}
    # raw inputs are never modified
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}


def test_ingest_is_idempotent_and_appends(client, tmp_path, frames):
    folder, truth = frames
    store = tmp_path / "s.zarr"
    files = sorted(truth)
    r1 = ingest(files[:5], store, client, progress=False)
    assert len(r1.written) == 5 and r1.ok
    shard0 = store / "raw" / "c" / "0" / "0" / "0"
    stamp = shard0.stat().st_mtime_ns
    # same files again, from another path too: nothing is added
    copy = tmp_path / "copy.fits"
    shutil.copy(files[0], copy)
    r2 = ingest([*files[:5], copy], store, client, progress=False)
    assert r2.written == [] and len(r2.already) == 6 and r2.ok
    assert len(RawStore.open(store)) == 5
    # a later batch appends without rewriting the earlier frames
    r3 = ingest([folder], store, client, progress=False)
    assert len(r3.written) == 3 and len(r3.already) == 5
    assert shard0.stat().st_mtime_ns == stamp
    ds = open_store(store)
    assert ds.sizes["frame"] == 8
    for i in range(8):
        assert np.array_equal(ds.raw[i].values, truth[str(ds.path.values[i])])


def test_one_shard_file_per_frame(client, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        data = rng.integers(0, 65536, size=(300, 500), dtype=np.uint16)
        paths.append(write_frame(tmp_path / f"f{i}.fits", data, **{"DATE-OBS": f"2023-01-18T13:00:0{i}"}))
    store = tmp_path / "s.zarr"
    # small tiles: 3 x 5 = 15 tiles per frame, still one file per frame
    ingest(paths, store, client, IngestConfig(layout=StoreLayout(tile=100)), progress=False)
    chunk_files = [p for p in (store / "raw" / "c").rglob("*") if p.is_file()]
    assert len(chunk_files) == 3
    ds = open_store(store)
    assert ds.raw.data.chunksize == (1, 100, 100)
    assert isinstance(ds.raw.data, __import__("dask").array.Array)  # lazy
    for i, p in enumerate(paths):
        assert np.array_equal(ds.raw[i].values, fits.getdata(p))


def test_bad_inputs_are_reported_and_good_ones_ingested(client, tmp_path, frames):
    folder, truth = frames
    bad = tmp_path / "bad"
    bad.mkdir()
    rng = np.random.default_rng(1)
    good = rng.integers(0, 65535, size=(64, 96), dtype=np.uint16)
    # truncated: a good file cut in the middle of its pixels
    full = write_frame(bad / "truncated.fits", good, **{"DATE-OBS": "2023-01-18T20:00:00"})
    blob = full.read_bytes()
    full.write_bytes(blob[: len(blob) - 4000])
    (bad / "notfits.fits").write_text("SIMPLE = this is a text file pretending\n" * 10)
    (bad / "empty.fits").write_bytes(b"")
    write_frame(bad / "wrongshape.fits", good[:32], **{"DATE-OBS": "2023-01-18T20:01:00"})
    write_frame(bad / "nodate.fits", good, **{"DATE-OBS": None})
    write_frame(bad / "noexptime.fits", good, EXPTIME=None, **{"DATE-OBS": "2023-01-18T20:02:00"})
    write_frame(bad / "float.fits", good.astype(np.float32), **{"DATE-OBS": "2023-01-18T20:03:00"})
    write_frame(bad / "focus.fits", good, IMAGETYP="Focus", **{"DATE-OBS": "2023-01-18T20:04:00"})
    store = tmp_path / "s.zarr"
    report = ingest([folder, bad, tmp_path / "missing_dir"], store, client, progress=False)
    reasons = {Path(p).name: r for p, r in report.rejected}
    assert set(reasons) == {"truncated.fits", "notfits.fits", "empty.fits", "wrongshape.fits", "nodate.fits",
                            "noexptime.fits", "float.fits", "focus.fits", "missing_dir"}
    assert "truncated" in reasons["truncated.fits"]
    assert "not a readable FITS" in reasons["notfits.fits"]
    assert "empty" in reasons["empty.fits"]
    assert "96x32" in reasons["wrongshape.fits"] and "store holds 96x64" in reasons["wrongshape.fits"]
    assert "DATE-OBS" in reasons["nodate.fits"]
    assert "EXPTIME" in reasons["noexptime.fits"]
    assert "non-integer" in reasons["float.fits"]
    assert "--as" in reasons["focus.fits"]
    assert "no such file" in reasons["missing_dir"]
    assert len(report.written) == 8 and not report.ok
    assert "REJECTED" in report.summary() and str(bad / "truncated.fits") in report.summary()
    # --as rescues a frame with an unknown IMAGETYP
    r2 = ingest([bad / "focus.fits"], store, client, IngestConfig(force_imagetyp="flat"), progress=False)
    assert r2.ok and len(r2.written) == 1
    assert open_store(store).imagetyp.values[-1] == "flat"


def test_compressed_inputs(client, tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(300, 50000, size=(80, 120), dtype=np.uint16)
    plain = write_frame(tmp_path / "a.fits", data, **{"DATE-OBS": "2023-01-18T14:00:00"})
    gz = tmp_path / "b.fits.gz"
    data_b = rng.integers(300, 50000, size=(80, 120), dtype=np.uint16)
    tmp_b = write_frame(tmp_path / "b_tmp.fits", data_b, **{"DATE-OBS": "2023-01-18T14:05:00"})
    gz.write_bytes(gzip.compress(tmp_b.read_bytes()))
    tmp_b.unlink()
    data_c = rng.integers(300, 50000, size=(80, 120), dtype=np.uint16)
    fz = tmp_path / "c.fits.fz"
    hdr = fits.Header({"IMAGETYP": "Light Frame", "DATE-OBS": "2023-01-18T14:10:00", "EXPTIME": 300.0})
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data_c, header=hdr, compression_type="RICE_1")]).writeto(fz)
    store = tmp_path / "s.zarr"
    report = ingest([plain, gz, fz], store, client, progress=False)
    assert report.ok and len(report.written) == 3, report.summary()
    ds = open_store(store)
    for i, ref in enumerate([data, data_b, data_c]):
        assert np.array_equal(ds.raw[i].values, ref)


def test_resume_finishes_reserved_slots(client, tmp_path, frames):
    """An ingest killed after reserving its slots is finished by the next one."""
    folder, truth = frames
    store_path = tmp_path / "s.zarr"
    site = SiteConfig()
    infos = sorted((scan_frame(p, site) for p in truth), key=lambda i: i.time)
    store = RawStore.create(store_path, infos[0].shape, StoreLayout(), site)
    idx = store.reserve(infos)  # as if killed right after the reservation
    from mstdask.store import write_frame as write_pixels

    for i, info in zip(idx[:3], infos[:3]):  # three frames got written and marked
        write_pixels(str(store_path), i, info)
    store.mark_ingested(idx[:3])
    write_pixels(str(store_path), idx[3], infos[3])  # a fourth was written but never marked
    assert open_store(store_path).sizes["frame"] == 3
    assert open_store(store_path, include_pending=True).sizes["frame"] == 8
    report = ingest([folder], store_path, client, progress=False)
    assert len(report.already) == 3 and len(report.written) == 5 and len(report.resumed) == 5
    ds = open_store(store_path)
    assert ds.sizes["frame"] == 8 and bool(ds.ingested.all())
    for i in range(8):
        assert np.array_equal(ds.raw[i].values, truth[str(ds.path.values[i])])


def test_killed_ingest_process_resumes(tmp_path):
    """SIGKILL a real `mstdask ingest` mid-way; running it again completes the store exactly."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "raw"
    folder.mkdir()
    truth = {}
    for i in range(24):
        data = rng.integers(0, 65535, size=(1200, 1600), dtype=np.uint16)
        p = write_frame(folder / f"f{i:02d}.fits", data, **{"DATE-OBS": f"2023-01-18T14:{i:02d}:00"})
        truth[str(p)] = data
    store = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "mstdask.cli", "ingest", str(folder), "--store", str(store),
           "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        shard_dir = store / "raw" / "c"
        if shard_dir.exists() and len(list(shard_dir.iterdir())) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    if not killed:
        pytest.skip("the ingest finished before it could be killed (machine too fast for this check)")
    done_before = int(RawStore.open(store, mode="r").coord("ingested").sum())
    assert done_before < 24
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    assert f"{done_before} already present" in rerun.stdout
    ds = open_store(store)
    assert ds.sizes["frame"] == 24
    for i in range(24):
        assert np.array_equal(ds.raw[i].values, truth[str(ds.path.values[i])])


def test_result_does_not_depend_on_worker_count(tmp_path, frames):
    from distributed import Client, LocalCluster

    folder, _ = frames
    stores = []
    for n in (1, 2):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
                Client(cl) as c:
            path = tmp_path / f"w{n}.zarr"
            assert ingest([folder], path, c, progress=False).ok
            stores.append(open_store(path))
    a, b = stores
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    assert np.array_equal(a.raw.values, b.raw.values)


def test_store_errors(tmp_path):
    with pytest.raises(mstdask.StoreError, match="no Zarr store"):
        open_store(tmp_path / "nothing.zarr")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(mstdask.StoreError, match="not an mstdask store"):
        RawStore.create(tmp_path / "other", (10, 10), StoreLayout(), SiteConfig())


def test_connect_by_address_and_yaml(tmp_path, frames):
    from distributed import LocalCluster

    from mstdask.cluster import connect
    from mstdask.errors import ConfigError

    folder, _ = frames
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cl:
        with connect(cl.scheduler_address, quiet=True) as c:
            assert ingest([folder], tmp_path / "a.zarr", c, progress=False).ok
    cfg = tmp_path / "one.yaml"
    cfg.write_text("kind: local\nn_workers: 1\nmemory_limit: 1GiB\ndashboard_address: ':0'\n")
    with connect(str(cfg), quiet=True) as c:
        assert len(c.scheduler_info()["workers"]) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: spaceship\n")
    with pytest.raises(ConfigError, match="kind"):
        with connect(str(bad), quiet=True):
            pass


def test_ingest_lock_refuses_a_live_writer_and_takes_over_a_dead_one(client, tmp_path, frames):
    import socket

    folder, truth = frames
    store = tmp_path / "s.zarr"
    files = sorted(truth)
    assert ingest(files[:2], store, client, progress=False).ok
    lock = store / ".mstdask-ingest.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")  # a live process holds it
    with pytest.raises(mstdask.StoreError, match="another ingest"):
        ingest(files[2:4], store, client, progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}\n")  # left by a killed ingest
    report = ingest(files, store, client, progress=False)
    assert report.ok and len(report.written) == 6 and not lock.exists()


def test_signed_and_8bit_frames(client, tmp_path):
    """Integer frames that are not uint16 on disk: exact when they fit, rejected when not."""
    ok8 = np.arange(64 * 96, dtype=np.uint8).reshape(64, 96)
    fits.PrimaryHDU(ok8, header=fits.Header({"IMAGETYP": "Bias Frame", "DATE-OBS": "2023-01-18T11:00:00",
                                             "EXPTIME": 0.0})).writeto(tmp_path / "u8.fits")
    pos16 = np.full((64, 96), 1234, dtype=np.int16)
    fits.PrimaryHDU(pos16, header=fits.Header({"IMAGETYP": "Bias Frame", "DATE-OBS": "2023-01-18T11:01:00",
                                               "EXPTIME": 0.0})).writeto(tmp_path / "i16.fits")
    neg16 = np.full((64, 96), -5, dtype=np.int16)
    fits.PrimaryHDU(neg16, header=fits.Header({"IMAGETYP": "Bias Frame", "DATE-OBS": "2023-01-18T11:02:00",
                                               "EXPTIME": 0.0})).writeto(tmp_path / "neg.fits")
    report = ingest([tmp_path], tmp_path / "s.zarr", client, progress=False)
    assert [Path(p).name for p, _ in report.rejected] == ["neg.fits"]
    assert "do not fit in uint16" in report.rejected[0][1]
    ds = open_store(tmp_path / "s.zarr")
    assert ds.sizes["frame"] == 2
    assert np.array_equal(ds.raw[0].values, ok8) and np.array_equal(ds.raw[1].values, pos16)
    # the rejected frame's slot stays hidden, and is finished if a good copy appears later
    assert open_store(tmp_path / "s.zarr", include_pending=True).sizes["frame"] == 3
