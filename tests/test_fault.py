"""Fault tolerance, progress and dry runs (issue 9, items 3 and 5).

* a worker process killed in the middle of ingest and of reduce (a real `dask scheduler` and
  `dask worker` processes on loopback): the run finishes and the products equal a run on the
  session's LocalCluster;
* the whole run killed (SIGKILL of its process group) while it writes a calibration product,
  then while it reduces: each rerun does only the missing work, and the products equal an
  uninterrupted run;
* a read-only output folder, a file in the way, a full disk: one clear line naming the path
  and the fix, and nothing half-written left looking complete;
* ``--dry-run`` prints the plan and writes nothing; long commands show progress.

Small simulated nights (200 x 300 pixels), so the whole file runs in about a minute.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

from mstdask.cli import main
from mstdask.errors import StoreError
from mstdask.jobs import (calibrate, characterize, ingest, plan_calibrate, plan_ingest, plan_reduce, plan_run,
                            reduce, run_pipeline)
from mstdask.store import open_reduced, open_store
from mstdask.testing import write_survey

from conftest import REPO, start_process, stop_processes

SHAPE = (200, 300)
N_FILES, N_SCIENCE = 55, 12  # 5 + 30 bias, 3 darks, 5 flats, 12 science frames
CAL_KINDS = ("master_bias", "ps_mask", "bad_pixel_mask", "master_flat")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


# ----------------------------------------------------------------------------- fixtures, helpers
@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """One simulated night of raw FITS files."""
    folder = tmp_path_factory.mktemp("fault") / "raw"
    write_survey(folder, nights=1, shape=SHAPE, n_bias=5, n_flat=5, n_dark=3, n_science=N_SCIENCE, n_ps_bias=30,
                 track_probability=0.5, seed=21)
    assert len(list(folder.rglob("*.fits"))) == N_FILES
    return folder


@pytest.fixture(scope="module")
def ref(raw, client, tmp_path_factory) -> Path:
    """The uninterrupted main job on the session's LocalCluster: the products to compare with."""
    out = tmp_path_factory.mktemp("fault_ref") / "out"
    report, manifest = run_pipeline([raw], out, client, progress=False)
    assert report.ok and len(report.written) == N_FILES
    assert sorted(p["kind"] for p in manifest.products if p["kind"] in CAL_KINDS) == sorted(CAL_KINDS)
    assert open_reduced(out / "reduced.zarr").sizes["frame"] == N_SCIENCE
    return out


def _listed(out: Path) -> dict[str, dict]:
    """Manifest entries of the calibration products, by file name."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {p["path"]: p for p in manifest["products"] if p["kind"] in CAL_KINDS}


def _by_key(ds: xr.Dataset) -> xr.Dataset:
    return ds.isel(frame=np.argsort(ds.frame_key.values))


def assert_same_raw(store: Path, ref: Path) -> None:
    a, b = _by_key(open_store(store)), _by_key(open_store(ref / "raw.zarr"))
    assert list(a.frame_key.values) == list(b.frame_key.values) and a.sizes["frame"] == N_FILES
    np.testing.assert_array_equal(a.raw.values, b.raw.values)


def assert_same_calibrations(out: Path, ref: Path) -> None:
    mine, theirs = _listed(out), _listed(ref)
    assert sorted(mine) == sorted(theirs) and len(mine) == len(CAL_KINDS)
    for name in theirs:
        assert mine[name]["signature"] == theirs[name]["signature"], name
        np.testing.assert_array_equal(fits.getdata(out / name), fits.getdata(ref / name), err_msg=name)
        group = theirs[name]["zarr_group"].split("/", 1)[1]
        kind = theirs[name]["kind"]
        np.testing.assert_array_equal(xr.open_zarr(out / "calib.zarr", group=group)[kind].values,
                                      xr.open_zarr(ref / "calib.zarr", group=group)[kind].values, err_msg=name)
    # no product file the manifest does not list
    assert sorted(p.name for p in out.glob("*.fits")) == sorted(mine)


def assert_same_reduced(store: Path, ref: Path, n: int = N_SCIENCE) -> None:
    a, b = _by_key(open_reduced(store)), _by_key(open_reduced(ref / "reduced.zarr"))
    assert a.sizes["frame"] == n
    b = b.isel(frame=np.flatnonzero(np.isin(b.frame_key.values, a.frame_key.values)))
    assert list(a.frame_key.values) == list(b.frame_key.values)
    for var in ("data", "mask"):
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)
    for coord in ("n_tracks", "track_pixels", "cosmic_ray_pixels", "tracks", "calib_flat", "raw_index"):
        assert list(a[coord].values) == list(b[coord].values), coord


def leftovers(folder: Path) -> list[str]:
    """Temporary files anywhere under ``folder`` (FITS/manifest temporaries, Zarr partial shards)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and (p.name.endswith((".tmp", ".partial")) or p.name.startswith(".manifest.")))


def _wait_for(condition, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# ----------------------------------------------------------------------------- a. a worker dies
# Worker preload: the worker started with MSTDASK_VICTIM=write_frame (or process_frame) leaves
# a half-written temporary in the shard folder of its second frame to ingest (its first frame
# to reduce: of 12 frames on 4 workers, a worker is sure to get one, not two), as a worker
# killed while writing does, says so in MSTDASK_MARKER_DIR, and hangs there until the test
# kills it.
PRELOAD = '''
import os, time
from pathlib import Path

import importlib

# the module, not the function mstdask.jobs re-exports under the same name
ingest_job = importlib.import_module("mstdask.jobs.ingest")
import mstdask.stir.frame as stir
import mstdask.store as store

VICTIM = os.environ.get("MSTDASK_VICTIM", "")
calls = {"write_frame": 0, "process_frame": 0}
# dask may run a preload file twice in one namespace: wrap the originals, never a wrapper
_write_frame, _process_frame = stir.__dict__.setdefault("_test_fault_originals",
                                                        (store.write_frame, stir.process_frame))


def _hang(name, shard_folder):
    calls[name] += 1
    if VICTIM != name or calls[name] != (2 if name == "write_frame" else 1):
        return
    shard_folder.mkdir(parents=True, exist_ok=True)
    (shard_folder / "0.killed-while-writing.partial").write_bytes(b"half a shard")
    Path(os.environ["MSTDASK_MARKER_DIR"], name).write_text(str(os.getpid()))
    time.sleep(600)


def write_frame(store_path, index, info):
    _hang("write_frame", Path(store_path, "raw", "c", str(index), "0"))
    return _write_frame(store_path, index, info)


def process_frame(raw_store, raw_index, path, out_store, out_index, *args, **kwargs):
    _hang("process_frame", Path(out_store, "data", "c", str(out_index), "0"))
    return _process_frame(raw_store, raw_index, path, out_store, out_index, *args, **kwargs)


store.write_frame = ingest_job.write_frame = write_frame
stir.process_frame = process_frame
'''


def test_killed_worker_tasks_are_rescheduled_and_products_identical(raw, ref, tmp_path):
    from distributed import Client

    root = tmp_path
    preload = root / "hang_preload.py"
    preload.write_text(PRELOAD)
    markers = root / "markers"
    markers.mkdir()
    sched_file = root / "scheduler.json"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start_process([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                             "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file),
                             "--idle-timeout", "600"], root / "scheduler.log", ENV))
        _wait_for(lambda: sched_file.exists() and "address" in sched_file.read_text(), 60, "the scheduler")
        address = json.loads(sched_file.read_text())["address"]
        victims = {"write_frame": 0, "process_frame": 1}  # worker w0 hangs in ingest, w1 in reduce
        for i in range(4):
            env = dict(ENV, MSTDASK_MARKER_DIR=str(markers),
                       MSTDASK_VICTIM=next((k for k, v in victims.items() if v == i), ""))
            # --no-nanny: the worker is this very process, and a killed worker stays dead
            procs.append(start_process([sys.executable, "-m", "distributed.cli.dask_worker", address, "--name", f"w{i}",
                                 "--nthreads", "1", "--no-nanny", "--memory-limit", "1GiB", "--host", "127.0.0.1",
                                 "--no-dashboard", "--local-directory", str(root / f"w{i}"),
                                 "--death-timeout", "60", "--preload", str(preload)], root / f"w{i}.log", env))
        out = root / "out"
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(4, timeout=60)

            def pipeline():
                ing = ingest([raw], out / "raw.zarr", c, progress=False)
                cal = calibrate(out / "raw.zarr", out, c, progress=False)
                red = reduce(out / "raw.zarr", out, out / "reduced.zarr", c, progress=False)
                return ing, cal, red

            pool = ThreadPoolExecutor(1)
            try:
                job = pool.submit(pipeline)
                for name, worker, shards in (("write_frame", 1, out / "raw.zarr" / "raw" / "c"),
                                             ("process_frame", 2, out / "reduced.zarr" / "data" / "c")):
                    marker = markers / name
                    _wait_for(lambda: marker.exists() or job.done(), 120, f"worker w{worker - 1} to hang in {name}")
                    assert marker.exists(), f"the run ended before w{worker - 1} hung in a {name} task"
                    assert int(marker.read_text()) == procs[worker].pid
                    # the other workers go on meanwhile; the run cannot end without the hung task
                    _wait_for(lambda: len(list(shards.glob("*/0/0"))) >= 3, 60, f"{name} tasks on other workers")
                    assert not job.done(), job.exception()
                    procs[worker].send_signal(signal.SIGKILL)
                    assert procs[worker].wait(timeout=10) == -signal.SIGKILL
                ing, cal, red = job.result(timeout=300)
            finally:
                if not job.done():  # a failure above: stop the cluster, so the pipeline thread ends
                    stop_processes(procs, grace_s=0)
                pool.shutdown(wait=False)
            assert len(c.scheduler_info()["workers"]) == 2  # both victims are gone for good
        logs = "\n".join((root / f"w{i}.log").read_text(errors="replace")[-2000:] for i in range(4))
        assert ing.ok and len(ing.written) == N_FILES and not ing.rejected, ing.summary() + logs
        assert cal.ok and len(cal.products) == len(CAL_KINDS), cal.summary()
        # the frame that was on the killed worker was run again elsewhere, not reported as failed
        assert red.ok and len(red.reduced) == N_SCIENCE and not red.failed, red.summary() + logs
        assert_same_raw(out / "raw.zarr", ref)
        assert_same_calibrations(out, ref)
        assert_same_reduced(out / "reduced.zarr", ref)
        assert leftovers(out) == []  # the killed writers' temporaries are cleaned up
    finally:
        stop_processes(procs, grace_s=0)


# ----------------------------------------------------------------------------- b. the run dies
# `python HOOK.py ARGS` is `mstdask ARGS` that kills its own process group (the driver and its
# local workers: `kill -9 -PGID`) at a chosen point: KILL_IN_PRODUCT=N while writing the N-th
# calibration FITS file (half of it is on disk), KILL_AFTER_FRAMES=N once N frames are recorded
# as reduced (recording after every frame).
HOOK = '''
import os, signal, sys
from pathlib import Path


def die():
    if os.getpgrp() == os.getpid():  # a session of its own: its workers go too
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def patch():
    in_product = int(os.environ.get("KILL_IN_PRODUCT", "0"))
    after_frames = int(os.environ.get("KILL_AFTER_FRAMES", "0"))
    if in_product:
        import mstdask.io as mio

        real_write, n = mio.write_product, [0]

        def write_product(path, data, **kw):
            n[0] += 1
            if n[0] == in_product:
                half = b"SIMPLE  =                    T" + b" " * 50
                Path(path).with_name(f".{Path(path).name}.tmp").write_bytes(half)
                die()
            return real_write(path, data, **kw)

        mio.write_product = write_product
    if after_frames:
        import importlib

        reduce_job = importlib.import_module("mstdask.jobs.reduce")  # the module, not the function
        from mstdask.store import ReducedStore

        reduce_job.MARK_EVERY_S = 0.0
        real_set, marked = ReducedStore.set_coords, [0]

        def set_coords(self, index, **values):
            real_set(self, index, **values)
            if "reduced" in values:
                marked[0] += len(values["reduced"])
                if marked[0] >= after_frames:
                    die()

        ReducedStore.set_coords = set_coords


if __name__ == "__main__":  # the local cluster's worker processes import this file too
    patch()
    from mstdask.cli import main

    sys.exit(main(sys.argv[1:]))
'''


def _run_cli(hook: Path, argv: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, str(hook), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(ENV, **env), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        stop_processes([proc], grace_s=0)  # local workers of a killed driver
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.fits")}


def test_killed_run_reruns_only_the_missing_work(raw, ref, tmp_path):
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    out = tmp_path / "out"
    argv = ["run", str(raw), "--out", str(out), "--workers", "2", "--quiet"]

    # 1. killed while writing the third calibration product (the master bias comes first; the
    #    PS mask, computed beside the next steps, is written whenever it is ready)
    first = _run_cli(hook, argv, KILL_IN_PRODUCT="3")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert open_store(out / "raw.zarr").sizes["frame"] == N_FILES  # ingest had finished
    listed = _listed(out)
    kinds = sorted(e["kind"] for e in listed.values())
    assert len(kinds) == 2 and "master_bias" in kinds, kinds
    assert sorted(p.name for p in out.glob("*.fits")) == sorted(listed)  # nothing unlisted looks complete
    assert len(list(out.glob(".*.fits.tmp"))) == 1  # the half-written file (hidden)
    before = _mtimes(out)

    # 2. rerun, killed in reduce once 4 frames are recorded
    second = _run_cli(hook, argv, KILL_AFTER_FRAMES="4")
    assert second.returncode == -signal.SIGKILL, second.stderr
    missing = sorted({"master_bias", "ps_mask", "bad_pixel_mask", "master_flat"} - set(kinds))
    assert f"1 {missing[0]}, 1 {missing[1]} made, 2 already done" in second.stderr, second.stderr
    after = _mtimes(out)
    assert {k: after[k] for k in before} == before  # the products already made were not rewritten
    assert_same_calibrations(out, ref)  # complete now, and the half-written file is gone
    assert not list(out.glob(".*.tmp"))
    k = open_reduced(out / "reduced.zarr").sizes["frame"]
    assert 4 <= k < N_SCIENCE
    assert_same_reduced(out / "reduced.zarr", ref, n=k)  # the frames recorded are complete

    # 3. rerun to the end: nothing is ingested or calibrated again, only the missing frames reduced
    third = _run_cli(hook, argv)
    assert third.returncode == 0, third.stderr
    assert "0 frames written (0 resumed), 55 already present" in third.stdout
    assert "nothing made, 4 already done" in third.stderr, third.stderr
    assert f"{N_SCIENCE - k} frames reduced, {k} already done, 0 failed" in third.stderr, third.stderr
    assert _mtimes(out) == after
    assert_same_raw(out / "raw.zarr", ref)
    assert_same_calibrations(out, ref)
    assert_same_reduced(out / "reduced.zarr", ref)
    assert leftovers(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = [p for p in manifest["products"] if p["kind"] == "reduced_store"]
    assert entry["frames"] == N_SCIENCE


def test_calibrate_rerun_redoes_only_what_changed(ref, client, tmp_path):
    out = tmp_path / "cal"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("raw.zarr", "reduced.zarr"))
    again = calibrate(ref / "raw.zarr", out, client, progress=False)
    assert not again.products and len(again.already) == len(CAL_KINDS) and again.ok
    # a product listed in the manifest whose file is gone is made again, and only that one
    (victim,) = out.glob("master_flat_*.fits")
    victim.unlink()
    redo = calibrate(ref / "raw.zarr", out, client, progress=False)
    assert [p["kind"] for p in redo.products] == ["master_flat"] and len(redo.already) == 3
    assert_same_calibrations(out, ref)
    # another configuration is another product: everything is made again
    from mstdask.config import CalibConfig

    median = calibrate(ref / "raw.zarr", out, client, CalibConfig(bias_combine="median"), progress=False)
    assert len(median.products) == len(CAL_KINDS) and not median.already


# ----------------------------------------------------------------------------- c. cannot write
@pytest.fixture(params=["read-only folder", "file in the way"])
def unwritable(request, tmp_path):
    """A path that cannot be written, and the words of the error: a read-only folder (chmod;
    as root, which writes through permission bits, a read-only tmpfs where mounting is allowed)
    or a file where the output folder should be."""
    if request.param == "file in the way":
        path = tmp_path / "a_file"
        path.write_text("not a folder\n")
        yield path, ("Not a directory", "File exists")
        return
    path = tmp_path / "ro"
    path.mkdir()
    mounted = False
    if os.geteuid() != 0:
        path.chmod(0o555)
    elif shutil.which("mount") and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                                                  capture_output=True).returncode == 0:
        mounted = True
    else:
        pytest.skip("running as root where tmpfs cannot be mounted: no way to make a folder read-only")
    try:
        yield path, ("Permission denied", "Read-only file system")
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], capture_output=True)
        else:
            path.chmod(0o755)


def _snapshot(path: Path):
    return sorted(p.relative_to(path) for p in path.rglob("*")) if path.is_dir() else path.read_text()


def test_unwritable_output_is_one_clear_line(unwritable, raw, ref, client, capsys, monkeypatch):
    path, problems = unwritable
    before = _snapshot(path)

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a command that cannot write its output")

    monkeypatch.setattr("mstdask.cluster.connect", no_cluster)
    commands = [["ingest", str(raw), "--store", str(path / "raw.zarr")],
                ["calibrate", str(ref / "raw.zarr"), "--out", str(path / "cal")],
                ["calibrate", str(ref / "raw.zarr"), "--out", str(path)],
                ["reduce", str(ref / "raw.zarr"), "--calib", str(ref), "--out", str(path / "red.zarr")],
                ["reduce", str(ref / "raw.zarr"), "--calib", str(ref), "--out", str(ref / "reduced.zarr"),
                 "--fits", str(path / "fits")],
                ["run", str(raw), "--out", str(path / "run")]]
    for argv in commands:
        assert main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"mstdask {argv[0]}: error: {path}"), err
        assert any(p in err for p in problems), err
        assert "writable" in err or "a file is in the way" in err, err
    # the library functions say the same, before computing anything
    with pytest.raises(StoreError, match="cannot write"):
        calibrate(ref / "raw.zarr", path / "cal", client, progress=False)
    with pytest.raises(StoreError, match="cannot write"):
        reduce(ref / "raw.zarr", ref, path / "red.zarr", client, progress=False)
    with pytest.raises(StoreError, match="cannot write"):
        ingest([raw], path / "raw.zarr", client, progress=False)
    assert _snapshot(path) == before  # nothing was written there


def _no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_while_calibrating(ref, tmp_path, capsys, monkeypatch):
    """The disk fills up while the third FITS product is written (half of it is on disk)."""
    out = tmp_path / "cal"
    real_writeto, calls = fits.PrimaryHDU.writeto, []

    def writeto(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            Path(name).write_bytes(b"SIMPLE  =                    T" + b" " * 100)
            raise _no_space(name)
        return real_writeto(self, name, *args, **kwargs)

    monkeypatch.setattr(fits.PrimaryHDU, "writeto", writeto)
    rc = main(["calibrate", str(ref / "raw.zarr"), "--out", str(out), "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    # the third product written: the bad-pixel mask or the PS mask (computed beside the next
    # steps, written whenever it is ready), never the master bias (written first)
    failed = Path(calls[2]).name.lstrip(".").removesuffix(".tmp")
    kind = next(k for k in ("bad_pixel_mask", "ps_mask", "master_flat") if failed.startswith(f"{k}_"))
    assert f"error: {out / failed}: cannot write {kind}" in err, err
    assert "No space left on device" in err and "free space" in err and "run the same command again" in err, err
    # the products before are complete and listed; the failed one left nothing behind
    listed = _listed(out)
    kinds = sorted(e["kind"] for e in listed.values())
    assert len(kinds) == 2 and "master_bias" in kinds and kind not in kinds, kinds
    assert sorted(p.name for p in out.glob("*.fits")) == sorted(listed)
    assert not (out / "calib.zarr" / kind / failed[len(kind) + 1:-5]).exists()
    assert leftovers(out) == []
    monkeypatch.undo()
    # space freed: the rerun makes the rest
    rc = main(["calibrate", str(ref / "raw.zarr"), "--out", str(out), "--workers", "1", "--quiet"])
    assert rc == 0 and "2 already done" in capsys.readouterr().out
    assert_same_calibrations(out, ref)


@pytest.fixture(scope="module")
def threads_client():
    """An in-process cluster (threads): a monkeypatched write fails inside the tasks too."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


def _fill_disk_after(monkeypatch, below: Path, allowed: int) -> list:
    """Zarr writes of shards under ``below`` fail with ENOSPC after ``allowed`` of them."""
    import zarr.storage._local as local

    real_put, written = local._put, []

    def put(path, value, exclusive=False):
        if str(path).startswith(str(below)):
            if len(written) >= allowed:
                raise _no_space(path)
            written.append(path)
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", put)
    return written


def test_full_disk_while_ingesting_and_reducing(raw, ref, threads_client, tmp_path, monkeypatch):
    store = tmp_path / "raw.zarr"
    _fill_disk_after(monkeypatch, store / "raw" / "c", 10)
    with pytest.raises(StoreError) as info:
        ingest([raw], store, threads_client, progress=False)
    msg = str(info.value)
    assert msg.startswith(str(store / "raw" / "c")) and "No space left on device" in msg and "free space" in msg, msg
    done = open_store(store)  # the frames recorded as ingested are whole and right
    assert 0 < done.sizes["frame"] <= 10
    whole = _by_key(open_store(ref / "raw.zarr"))
    whole = whole.isel(frame=np.flatnonzero(np.isin(whole.frame_key.values, done.frame_key.values)))
    np.testing.assert_array_equal(_by_key(done).raw.values, whole.raw.values)
    monkeypatch.undo()
    again = ingest([raw], store, threads_client, progress=False)
    assert again.ok and len(again.written) == N_FILES - done.sizes["frame"]
    assert_same_raw(store, ref)

    red, fits_dir = tmp_path / "red.zarr", tmp_path / "fits"
    _fill_disk_after(monkeypatch, red / "data" / "c", 4)
    with pytest.raises(StoreError, match="No space left on device.*run the same command again"):
        reduce(store, ref, red, threads_client, fits_dir=fits_dir, progress=False)
    assert_same_reduced(red, ref, n=4)  # the four frames written are recorded, the failed one is not
    assert len(list(fits_dir.rglob("*.fits"))) == 4 and leftovers(tmp_path) == []
    monkeypatch.undo()
    rep = reduce(store, ref, red, threads_client, fits_dir=fits_dir, progress=False)
    assert rep.ok and rep.already == 4 and len(rep.reduced) == N_SCIENCE - 4
    assert_same_reduced(red, ref)
    assert len(list(fits_dir.rglob("*.fits"))) == N_SCIENCE and leftovers(tmp_path) == []


def test_full_disk_for_real_on_a_small_tmpfs(raw, ref, client, tmp_path):
    """A real full disk (1 MB tmpfs; root and mount needed, else skipped): the error comes from
    a worker process; after the disk is enlarged, the same ingest finishes."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        with pytest.raises(StoreError, match=f"^{small}.*No space left on device.*free space"):
            ingest([raw], small / "raw.zarr", client, progress=False)
        n = open_store(small / "raw.zarr").sizes["frame"]
        assert n < N_FILES
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        rep = ingest([raw], small / "raw.zarr", client, progress=False)
        assert rep.ok and len(rep.written) == N_FILES - n
        assert_same_raw(small / "raw.zarr", ref)
        assert leftovers(small) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


# ----------------------------------------------------------------------------- d. dry runs
def test_dry_run_prints_the_plan_and_writes_nothing(raw, ref, tmp_path, capsys, monkeypatch):
    def no_cluster(*args, **kwargs):
        raise AssertionError("--dry-run started a cluster")

    monkeypatch.setattr("mstdask.cluster.connect", no_cluster)
    npix = SHAPE[0] * SHAPE[1]
    new = tmp_path / "new"

    assert main(["run", str(raw), "--out", str(new), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "55 frames to write (0 resumed), 0 already in the store, 0 rejected" in text, text
    assert "products: 5 to make, 0 already done" in text and "12 frames to reduce" in text, text
    assert "2023-01-18  MST2" in text and "bias 35, dark 3, flat 5, science 12" in text, text
    assert "total: tasks: ~" in text and "MB read" in text and "MB written" in text, text
    assert main(["ingest", str(raw), "--store", str(new / "raw.zarr"), "--dry-run"]) == 0
    assert "tasks: 110" in capsys.readouterr().out
    assert main(["calibrate", str(ref / "raw.zarr"), "--out", str(new), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "products: 5 to make, 0 already done, 0 would be skipped" in text and "master_flat" in text, text
    assert main(["reduce", str(ref / "raw.zarr"), "--calib", str(ref), "--out", str(new / "red.zarr"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "12 frames to reduce (0 left unfinished by an earlier run), 0 already done" in text and "tasks: 12" in text
    assert not new.exists()  # nothing created

    # what is done already is planned as done
    assert main(["run", str(raw), "--out", str(ref), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "0 frames to write (0 resumed), 55 already in the store" in text, text
    assert "products: 0 to make, 5 already done" in text and "0 frames to reduce, 12 already done" in text, text
    assert "total: tasks: 55\n" in text, text  # the header scans only

    # the numbers, from the library
    p = plan_ingest([raw], new / "raw.zarr")
    assert p.tasks == 2 * N_FILES and p.bytes_written == N_FILES * npix * 2
    assert p.bytes_read == sum(f.stat().st_size for f in raw.rglob("*.fits"))
    assert dict(p.frames) == {("2023-01-18", "MST2", "bias"): 35, ("2023-01-18", "MST2", "dark"): 3,
                              ("2023-01-18", "MST2", "flat"): 5, ("2023-01-18", "MST2", "science"): 12}
    p = plan_reduce(ref / "raw.zarr", ref, new / "red.zarr", fits_dir=new / "fits")
    assert p.tasks == N_SCIENCE and p.bytes_written == N_SCIENCE * npix * 5 * 2
    p = plan_calibrate(ref / "raw.zarr", new)
    assert p.tasks > 35 and p.frames[("2023-01-18", "MST2", "bias")] == 35 and p.bytes_written > 0
    assert plan_run([raw], new).tasks == plan_ingest([raw], new / "raw.zarr").tasks + p.tasks + N_SCIENCE
    assert not new.exists()


# ----------------------------------------------------------------------------- e. progress
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_long_commands_show_progress(raw, ref, client, tmp_path, monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    ingest([raw], tmp_path / "raw.zarr", client)
    calibrate(tmp_path / "raw.zarr", tmp_path, client)
    reduce(tmp_path / "raw.zarr", tmp_path, tmp_path / "red.zarr", client)
    characterize(tmp_path / "raw.zarr", tmp_path / "char", client)
    text = term.getvalue()
    for bar in ("scan headers: 100%", "55/55", "ingest frames: 100%", "calibrate: 100%", "5/5 [",
                "master_flat MST2_g_2023-01-18", "reduce frames: 100%", "12/12",
                "characterize MST2: compute: 100%", "characterize MST2: write: 100%"):
        assert bar in text, (bar, text[-3000:])
    monkeypatch.undo()
    assert_same_calibrations(tmp_path, ref)
