"""A real Dask cluster: `dask scheduler` and two `dask worker` processes on loopback, TLS on.

The command line runs ingest -> calibrate (-> reduce, once that command exists) against the
scheduler through a ``kind: address`` configuration file, then the same on the embedded
LocalCluster; the products must be identical pixel for pixel. A client without the
cluster's certificates must be refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

import mstdask
from mstdask.cli import build_parser, main
from mstdask.cluster import make_certificates
from mstdask.testing import write_survey

from conftest import REPO, start_process, stop_processes

START_TIMEOUT = 60.0  # seconds for the scheduler and both workers to come up (a cold, busy CI box)


@dataclass
class TLSCluster:
    """A running scheduler and its workers, and how to reach them."""

    address: str
    certs: dict[str, Path]
    config: Path
    logs: list[Path]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def security(self, certs: dict[str, Path] | None = None):
        """A client Security with this cluster's client certificate (or ``certs``)."""
        from distributed.security import Security

        c = certs or self.certs
        return Security(tls_ca_file=str(c["ca_file"]), tls_client_cert=str(c["cert"]),
                        tls_client_key=str(c["key"]), require_encryption=True)

    def log_tail(self, n: int = 3000) -> str:
        """The end of every process's log, for failure messages."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs if p.exists())


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, request):
    """`dask scheduler` + 2 `dask worker` (1 thread, 2 GiB each) on 127.0.0.1 with TLS certificates
    made by :func:`mstdask.cluster.make_certificates`, and a ``kind: address`` file for them."""
    from distributed import Client

    root = tmp_path_factory.mktemp("tls_cluster")
    certs = make_certificates(root / "certs")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    tls = ["--tls-ca-file", str(certs["ca_file"]), "--tls-cert", str(certs["node_cert"]),
           "--tls-key", str(certs["node_key"])]
    sched_file = root / "scheduler.json"
    cluster = TLSCluster(address="", certs=certs, config=root / "tls.yaml",
                         logs=[root / "scheduler.log", root / "worker0.log", root / "worker1.log"])
    # Registered first, so that the processes are stopped whatever fails below.
    request.addfinalizer(lambda: stop_processes(cluster.procs))

    # The `dask` entry point may not be on PATH (CI runs `python -m pytest` in a fresh venv).
    # --idle-timeout / --death-timeout: nothing outlives a test run that was killed outright.
    cluster.procs.append(start_process(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--protocol", "tls", "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file), "--idle-timeout", "600", *tls],
        cluster.logs[0], env))
    deadline = time.monotonic() + START_TIMEOUT
    while not cluster.address:
        if cluster.procs[0].poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"dask scheduler did not start\n{cluster.log_tail()}")
        with contextlib.suppress(OSError, ValueError):
            cluster.address = json.loads(sched_file.read_text())["address"]
        time.sleep(0.1)
    assert cluster.address.startswith("tls://127.0.0.1:"), cluster.address
    for i in range(2):
        cluster.procs.append(start_process(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.address, "--name", f"w{i}",
             "--nthreads", "1", "--memory-limit", "2GiB", "--host", "127.0.0.1", "--no-dashboard",
             "--local-directory", str(root / f"worker{i}"), "--death-timeout", "60", *tls],
            cluster.logs[1 + i], env))
    try:
        with Client(cluster.address, security=cluster.security(), timeout="30s") as c:
            c.wait_for_workers(2, timeout=max(1.0, deadline - time.monotonic()))
    except Exception as exc:
        pytest.fail(f"the TLS cluster did not come up ({exc!r})\n{cluster.log_tail()}")

    # Certificate paths relative to the file, as in cluster/*.yaml.
    cluster.config.write_text(f"kind: address\naddress: {cluster.address}\ntls:\n" + "".join(
        f"  {key}: {certs[key].relative_to(root)}\n" for key in ("ca_file", "cert", "key")))
    return cluster


def _has_command(name: str) -> bool:
    """Whether ``mstdask NAME --help`` works (``reduce`` is being added by another step)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            build_parser().parse_args([name, "--help"])
        except SystemExit as exc:
            return exc.code == 0
    return False


def _pipeline(raw: Path, out: Path, cluster_opts: list[str], reduce: bool) -> None:
    """ingest -> calibrate (-> reduce) through the command line into ``out``."""
    store, cal = out / "raw.zarr", out / "cal"
    steps = [["ingest", str(raw), "--store", str(store)],
             ["calibrate", str(store), "--out", str(cal)]]
    if reduce:
        steps.append(["reduce", str(store), "--calib", str(cal), "--out", str(out / "reduced.zarr")])
    for argv in steps:
        rc = main([*argv, "--quiet", *cluster_opts])
        assert rc == 0, f"mstdask {' '.join(argv)} {' '.join(cluster_opts)} exited with {rc}"


def _fits_products(caldir: Path) -> dict[str, list[np.ndarray]]:
    """Every FITS file under ``caldir`` (relative path) -> the data of each of its HDUs."""
    products = {}
    for path in sorted(caldir.rglob("*.fits")):
        with fits.open(path, memmap=False) as hdul:
            products[str(path.relative_to(caldir))] = [np.asarray(h.data) for h in hdul if h.data is not None]
    return products


def test_tls_cluster_products_equal_local_cluster(tls_cluster, tmp_path):
    from distributed import Client

    raw = tmp_path / "raw_fits"
    write_survey(raw, nights=1, shape=(120, 180), n_bias=5, n_flat=5, n_dark=3, n_science=2, n_ps_bias=30, seed=9)
    reduce = _has_command("reduce")
    _pipeline(raw, tmp_path / "tls", ["--cluster", str(tls_cluster.config)], reduce)
    _pipeline(raw, tmp_path / "local", ["--workers", "2", "--memory-limit", "2GiB"], reduce)

    # The TLS run really ran there: its scheduler saw ingest and calibrate tasks, and both
    # workers executed some of them.
    with Client(tls_cluster.address, security=tls_cluster.security(), timeout="10s") as c:
        prefixes = c.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        executed = c.run(lambda dask_worker: dask_worker.state.executed_count)
    assert {"scan_task", "write_task"} <= set(prefixes), prefixes  # dask drops the leading _
    assert len(prefixes) > 2, prefixes  # calibrate's tasks too
    assert len(executed) == 2 and min(executed.values()) > 0, executed

    tls, local = tmp_path / "tls", tmp_path / "local"
    a, b = mstdask.open_store(tls / "raw.zarr"), mstdask.open_store(local / "raw.zarr")
    n_files = len(list(raw.rglob("*.fits")))
    assert a.sizes["frame"] == b.sizes["frame"] == n_files
    assert list(a.frame_key.values) == list(b.frame_key.values)
    assert np.array_equal(a.raw.values, b.raw.values)

    pa, pb = _fits_products(tls / "cal"), _fits_products(local / "cal")
    assert sorted(pa) == sorted(pb)
    kinds = {name.split("_MST")[0] for name in pa}
    assert {"master_bias", "master_flat", "ps_mask", "bad_pixel_mask"} <= kinds, sorted(pa)
    for name in pa:
        assert len(pa[name]) == len(pb[name]) >= 1, name
        for x, y in zip(pa[name], pb[name]):
            assert x.dtype == y.dtype and x.shape == y.shape == (120, 180), name
            np.testing.assert_array_equal(x, y, err_msg=name)
    bias = pa[next(n for n in pa if n.startswith("master_bias"))][0]
    assert np.isfinite(bias).all() and bias.std() > 0  # a real product, not two identical blanks

    if reduce:
        ra, rb = xr.open_zarr(tls / "reduced.zarr"), xr.open_zarr(local / "reduced.zarr")
        ra, rb = (r.isel(frame=np.argsort(r.frame_key.values)) for r in (ra, rb))
        assert list(ra.frame_key.values) == list(rb.frame_key.values)
        assert ra.sizes["frame"] == 2 and bool(ra.reduced.all()) and bool(rb.reduced.all())
        for var in ("data", "mask"):
            np.testing.assert_array_equal(ra[var].values, rb[var].values, err_msg=var)


def test_tls_scheduler_refuses_clients_without_its_certificates(tls_cluster, tmp_path):
    from distributed import Client

    port = tls_cluster.address.rsplit(":", 1)[1]
    log = tls_cluster.logs[0]
    before = log.read_text(errors="replace").count("TLS handshake failed")
    with pytest.raises(OSError):  # CommClosedError (and TimeoutError) are OSErrors
        Client(f"tcp://127.0.0.1:{port}", timeout="2s")
    # TLS, but a certificate of another CA.
    stranger = make_certificates(tmp_path / "other_ca")
    with pytest.raises(OSError):
        Client(tls_cluster.address, security=tls_cluster.security(stranger), timeout="2s")
    # The scheduler turned both away at the TLS handshake ...
    deadline = time.monotonic() + 5
    while log.read_text(errors="replace").count("TLS handshake failed") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.read_text(errors="replace").count("TLS handshake failed") >= before + 2, tls_cluster.log_tail()
    # ... and is alive: the refusals were the certificates, not a dead server.
    with Client(tls_cluster.address, security=tls_cluster.security(), timeout="10s") as c:
        assert len(c.scheduler_info()["workers"]) == 2
