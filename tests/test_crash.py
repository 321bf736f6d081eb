"""Crash-safe stores (issue 20): a kill at any instant of store creation or slot reservation.

* ``ingest`` and ``reduce`` stopped at many instants of creating their store and reserving
  its first slots (every Zarr write of the driver is an instant): the rerun gives the store
  an uninterrupted run gives (same frame keys, no duplicate slots, same pixels), and
  ``xarray.open_zarr`` opens it. In-process, the patched write raises where the process
  would die (the driver's writes run in this process, the pixels in the workers'); two
  instants are also a real ``kill -9`` of the command's process group.
* a store half-made by a version that built it in place is made anew, never a traceback;
* ``reduce`` on a store without science frames is not ok and says why;
* frames rejected while their pixels are read (values above 65535, negative values, a
  truncated ``.fz``) are marked rejected with their reason, not advertised as work left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from astropy.io import fits

from mstdask.errors import StoreError
from mstdask.jobs import calibrate, ingest, reduce
from mstdask.store import COORDS, RawStore, ReducedStore, describe, open_reduced, open_store
from mstdask.testing import write_survey

from conftest import REPO, stop_processes, write_frame

SHAPE = (96, 144)
N_SCIENCE = 4
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


class Killed(Exception):
    """Where the driver dies (an Exception, not a BaseException: Zarr's event loop must live on)."""


@contextlib.contextmanager
def writes_of(name: str, die_at: int = 0):
    """Record this process's Zarr writes to files whose path contains ``name`` (a store and
    its temporary); with ``die_at``, the ``die_at``-th and every later one raises Killed, as
    nothing more is written by a dead process."""
    import zarr.storage._local as local

    real_put, seen = local._put, []

    def put(path, value, exclusive=False):
        if name in str(path):
            seen.append(str(path))
            if die_at and len(seen) >= die_at:
                raise Killed(f"write {len(seen)}: {path}")
        return real_put(path, value, exclusive=exclusive)

    local._put = put
    try:
        yield seen
    finally:
        local._put = real_put


def instants(writes: list[str], name: str, spread: int) -> list[int]:
    """The write numbers (1-based) to die at: ``spread`` of them evenly over ``writes``, and
    the critical ones: the first, the last in the temporary skeleton and the first in place,
    the commits of a reservation (``frame_key`` resized, then written) and what follows."""
    picks = {1, len(writes)}
    picks |= {int(round(x)) for x in np.linspace(1, len(writes), spread)}
    tmp = [i for i, w in enumerate(writes, 1) if f".{name}.creating-" in w]
    picks |= {tmp[-1], tmp[-1] + 1}
    keys = [i for i, w in enumerate(writes, 1) if "/frame_key/" in w and i > tmp[-1]]
    picks |= {k for i in keys for k in (i, i + 1)}
    return sorted(p for p in picks if 1 <= p <= len(writes))


def no_temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".creating-" in p.name)


def by_key(ds: xr.Dataset) -> xr.Dataset:
    return ds.isel(frame=np.argsort(ds.frame_key.values))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def night(client, tmp_path_factory):
    """One small simulated night: its raw FITS folder, its raw store and calibrations, and
    an uninterrupted reduced store (``root/raw``, ``raw.zarr``, ``cal``, ``ref_red.zarr``)."""
    root = tmp_path_factory.mktemp("crash")
    write_survey(root / "raw", nights=1, shape=SHAPE, n_bias=5, n_flat=5, n_dark=0, n_science=N_SCIENCE,
                 n_ps_bias=30, track_probability=0.0, seed=3)
    assert ingest([root / "raw"], root / "raw.zarr", client, progress=False).ok
    assert calibrate(root / "raw.zarr", root / "cal", client, progress=False).ok
    rep = reduce(root / "raw.zarr", root / "cal", root / "ref_red.zarr", client, progress=False)
    assert rep.ok and len(rep.reduced) == N_SCIENCE, rep.summary()
    return root


def in_process(func):
    """Run an assertion helper with Dask's synchronous scheduler: its few small reads need
    no trip to the cluster."""
    def run(*args):
        with dask.config.set(scheduler="synchronous"):
            return func(*args)
    return run


@in_process
def assert_same_raw(store: Path, ref: Path, n: int) -> None:
    a, b = by_key(open_store(store)), by_key(open_store(ref))
    assert len(RawStore.open(store, mode="r")) == n == a.sizes["frame"]  # no duplicate slot
    for name in COORDS:  # every slot's coordinates written, whatever the instant
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    np.testing.assert_array_equal(a.raw.values, b.raw.values)
    assert list(a.header.values) == list(b.header.values)
    plain = xr.open_zarr(store, zarr_format=3)  # what the README tells users to do
    assert plain.sizes["frame"] == n and bool(plain.ingested.all())
    assert sorted(map(str, plain.frame_key.values)) == sorted(map(str, b.frame_key.values))


@in_process
def assert_same_reduced(store: Path, ref: Path) -> None:
    a, b = by_key(open_reduced(store)), by_key(open_reduced(ref))
    assert len(ReducedStore.open(store, mode="r")) == N_SCIENCE == a.sizes["frame"]
    assert list(a.frame_key.values) == list(b.frame_key.values)
    for var in ("data", "mask"):
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)
    for coord in ("raw_index", "calib_flat", "n_tracks", "cosmic_ray_pixels"):
        assert list(a[coord].values) == list(b[coord].values), coord
    plain = xr.open_zarr(store, zarr_format=3)
    assert plain.sizes["frame"] == N_SCIENCE and bool(plain.reduced.all())
    assert not np.isnan(plain.data.values).all(axis=(1, 2)).any()  # no slot full of NaN


# ----------------------------------------------------------------------------- kills in-process
def test_ingest_killed_while_creating_or_reserving(frames, client, tmp_path):
    folder, truth = frames
    ref, n_files = tmp_path / "clean" / "s.zarr", len(truth)
    real_reserve, reserved_at = RawStore.reserve, []

    def reserve(self, infos):
        out = real_reserve(self, infos)
        reserved_at.append(len(seen))
        return out

    with writes_of("s.zarr") as seen, pytest.MonkeyPatch.context() as mp:
        mp.setattr(RawStore, "reserve", reserve)
        assert ingest([folder], ref, client, progress=False).ok
    writes = seen[:reserved_at[0]]  # creation and the first reservation
    picks = instants(writes, "s.zarr", 8)
    assert len(picks) >= 12 and any(".creating-" in writes[p - 1] for p in picks)
    for n in picks:
        out = tmp_path / f"k{n}"
        store = out / "s.zarr"
        with writes_of("s.zarr", die_at=n), pytest.raises(Killed):
            ingest([folder], store, client, progress=False)
        rep = ingest([folder], store, client, progress=False)
        where = f"killed at write {n} ({writes[n - 1]}): {rep.summary()}"
        assert rep.ok and len(rep.written) == n_files and not rep.already, where
        assert_same_raw(store, ref, n_files)
        assert no_temporaries(out) == [], where
        assert describe(store)["pending_slots"] == 0


def test_reduce_killed_while_creating_or_reserving(night, client, tmp_path):
    raw, cal, ref = night / "raw.zarr", night / "cal", night / "ref_red.zarr"
    real_reserve, reserved_at = ReducedStore.reserve, []

    def reserve(self, coords):
        out = real_reserve(self, coords)
        reserved_at.append(len(seen))
        return out

    with writes_of("r.zarr") as seen, pytest.MonkeyPatch.context() as mp:
        mp.setattr(ReducedStore, "reserve", reserve)
        assert reduce(raw, cal, tmp_path / "clean" / "r.zarr", client, progress=False).ok
    writes = seen[:reserved_at[0]]
    picks = instants(writes, "r.zarr", 6)
    for n in picks:
        out = tmp_path / f"k{n}"
        store = out / "r.zarr"
        with writes_of("r.zarr", die_at=n), pytest.raises(Killed):
            reduce(raw, cal, store, client, progress=False)
        rep = reduce(raw, cal, store, client, progress=False)
        where = f"killed at write {n} ({writes[n - 1]}): {rep.summary()}"
        assert rep.ok and len(rep.reduced) == N_SCIENCE and rep.already == 0, where
        assert_same_reduced(store, ref)
        assert no_temporaries(out) == [], where


# ----------------------------------------------------------------------------- real kills
# `python HOOK.py ARGS` is `mstdask ARGS` that kills its own process group (the driver and its
# local workers) at its KILL_AT-th Zarr write to a path containing KILL_STORE.
HOOK = '''
import os, signal, sys

if __name__ == "__main__":  # the local cluster's worker processes import this file too
    import zarr.storage._local as local

    real_put, n = local._put, [0]

    def put(path, value, exclusive=False):
        if os.environ["KILL_STORE"] in str(path):
            n[0] += 1
            if n[0] == int(os.environ["KILL_AT"]):
                os.killpg(os.getpgrp(), signal.SIGKILL)
        return real_put(path, value, exclusive=exclusive)

    local._put = put
    from mstdask.cli import main

    sys.exit(main(sys.argv[1:]))
'''


def _killed_cli(hook: Path, argv: list[str], store: str, at: int) -> None:
    proc = subprocess.Popen([sys.executable, str(hook), *argv, "--workers", "1", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(ENV, KILL_STORE=store, KILL_AT=str(at)))
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        stop_processes([proc], grace_s=0)  # local workers of the killed driver
    assert proc.returncode == -signal.SIGKILL, err


def test_kill_9_while_creating_then_reserving(night, client, tmp_path):
    """A real SIGKILL: ``ingest`` in the middle of creating its store (the lock and the
    temporary skeleton stay behind), ``reduce`` in the middle of its first reservation."""
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    folder = night / "raw"
    store = tmp_path / "out" / "s.zarr"
    with writes_of("s.zarr") as seen:  # the same writes as the command's, in the same order
        assert ingest([folder], tmp_path / "clean" / "s.zarr", client, progress=False).ok
    in_tmp = [i for i, w in enumerate(seen, 1) if ".s.zarr.creating-" in w]
    _killed_cli(hook, ["ingest", str(folder), "--store", str(store)], "s.zarr", in_tmp[len(in_tmp) // 2])
    assert not store.exists() and len(no_temporaries(store.parent)) == 1  # the half-built skeleton
    rep = ingest([folder], store, client, progress=False)
    n_files = len(list(folder.rglob("*.fits")))
    assert rep.ok and len(rep.written) == n_files, rep.summary()
    assert_same_raw(store, night / "raw.zarr", n_files)
    assert no_temporaries(store.parent) == []

    red = tmp_path / "out" / "r.zarr"
    with writes_of("r.zarr") as seen:
        assert reduce(store, night / "cal", tmp_path / "clean" / "r.zarr", client, progress=False).ok
    # between the reservation's resize of frame_key and the keys: every other array is grown
    key_resize = next(i for i, w in enumerate(seen, 1) if w.endswith("/r.zarr/frame_key/zarr.json"))
    _killed_cli(hook, ["reduce", str(store), "--calib", str(night / "cal"), "--out", str(red)], "r.zarr",
                key_resize + 1)
    assert len(zarr.open_array(str(red / "data"), mode="r").shape) == 3  # the store is there
    assert zarr.open_array(str(red / "data"), mode="r").shape[0] == N_SCIENCE  # and half-reserved
    rep = reduce(store, night / "cal", red, client, progress=False)
    assert rep.ok and len(rep.reduced) == N_SCIENCE and rep.already == 0, rep.summary()
    assert_same_reduced(red, night / "ref_red.zarr")


# ----------------------------------------------------------------------------- half-made, empty
def test_half_made_store_of_an_older_version_is_made_anew(night, client, tmp_path):
    """The skeleton an in-place creation killed half-way left: a clear error for readers,
    and made anew by the command that makes it."""
    store, red = tmp_path / "s.zarr", tmp_path / "r.zarr"
    for path, kind in ((store, "mstdask.raw"), (red, "mstdask.reduced")):
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        group.attrs.update({"mstdask_store": kind, "frame_shape": list(SHAPE), "tile": list(SHAPE)})
        group.create_array("time", shape=(0,), dtype="int64")
    with pytest.raises(StoreError, match="creation of this raw store was interrupted"):
        open_store(store)
    with pytest.raises(StoreError, match="creation of this reduced store was interrupted"):
        open_reduced(red)
    folder = night / "raw"
    rep = ingest([folder], store, client, progress=False)
    assert rep.ok, rep.summary()
    assert_same_raw(store, night / "raw.zarr", len(list(folder.rglob("*.fits"))))
    rep = reduce(store, night / "cal", red, client, progress=False)
    assert rep.ok and len(rep.reduced) == N_SCIENCE, rep.summary()
    assert_same_reduced(red, night / "ref_red.zarr")


def test_reduce_without_science_frames_is_not_ok(night, client, tmp_path):
    store = tmp_path / "cal_only.zarr"
    assert ingest(sorted((night / "raw").rglob("*bias*.fits")), store, client, progress=False).ok
    rep = reduce(store, night / "cal", tmp_path / "r.zarr", client, progress=False)
    assert not rep.ok and rep.exit_status == 1 and not rep.reduced
    assert f"SKIPPED {store}: no science frames in this store: nothing to reduce; ingest science frames first" \
        in rep.summary(), rep.summary()
    assert not (tmp_path / "r.zarr").exists()  # nothing made


# ----------------------------------------------------------------------------- rejected at read time
def test_frames_rejected_while_read_are_not_work_left(frames, client, tmp_path):
    folder, truth = frames
    high = np.full((64, 96), 1000, dtype=np.int32)
    high[3, 4] = 70000
    write_frame(folder / "high.fits", high, **{"DATE-OBS": "2023-01-18T15:00:00"})
    write_frame(folder / "negative.fits", np.full((64, 96), -3, dtype=np.int16), **{"DATE-OBS": "2023-01-18T15:10:00"})
    good = np.random.default_rng(1).integers(0, 65536, (64, 96)).astype(np.uint16)  # compresses little
    fz = tmp_path / "cut.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(
        good, header=fits.Header({"IMAGETYP": "Light Frame", "DATE-OBS": "2023-01-18T15:20:00", "EXPTIME": 300.0}),
        compression_type="RICE_1")]).writeto(fz)
    data = fz.read_bytes()
    fz.write_bytes(data[:len(data) // 2])  # the headers are whole, the pixels are cut
    store = tmp_path / "s.zarr"
    bad = {str(folder / "high.fits"), str(folder / "negative.fits"), str(fz)}
    for attempt in range(2):  # the rerun tries them again, and rejects them again
        rep = ingest([folder, fz], store, client, progress=False)
        assert not rep.ok and {p for p, _ in rep.rejected} == bad, rep.summary()
        assert len(rep.written) == (len(truth) if attempt == 0 else 0)
        info = describe(store)
        assert info["frames"] == len(truth) and info["pending_slots"] == 0, info
        assert info["rejected_slots"] == 3 and {r["path"] for r in info["rejected"]} == bad, info
        reasons = {r["path"]: r["reason"] for r in info["rejected"]}
        assert "65535" in reasons[str(folder / "high.fits")] or "uint16" in reasons[str(folder / "high.fits")]
        assert all(reasons.values())
        ds = open_store(store)  # still hidden
        assert ds.sizes["frame"] == len(truth) and not set(map(str, ds.path.values)) & bad
        plain = xr.open_zarr(store, zarr_format=3)
        assert sorted(str(r) for r in plain.rejected.values if r) == sorted(reasons.values())
    # the file repaired (same exposure): ingested, no longer rejected
    fz.write_bytes(data)
    rep = ingest([fz], store, client, progress=False)
    assert rep.ok and rep.resumed == [str(fz)], rep.summary()
    info = describe(store)
    assert info["rejected_slots"] == 2 and info["frames"] == len(truth) + 1
    np.testing.assert_array_equal(open_store(store).sel(frame=open_store(store).path == str(fz)).raw[0].values, good)
