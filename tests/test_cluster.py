"""Cluster configuration files (cluster/*.yaml), their checks, and the TLS certificates."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import stat

import pytest
import yaml

from mstdask.cli import main
from mstdask.cluster import _jobqueue_cluster, connect, load_cluster_file, make_certificates
from mstdask.errors import ConfigError

from conftest import REPO

CLUSTER = REPO / "cluster"


def test_shipped_cluster_files_are_valid_and_use_tls():
    kinds = {p.name: load_cluster_file(p)["kind"] for p in sorted(CLUSTER.glob("*.yaml"))}
    assert kinds == {"address.yaml": "address", "kubernetes.yaml": "address", "local.yaml": "local",
                     "pbs.yaml": "jobqueue", "slurm.yaml": "jobqueue"}
    for name, kind in kinds.items():
        spec = load_cluster_file(CLUSTER / name)
        if kind == "address":
            assert spec["address"].startswith("tls://") and spec["tls"]["ca_file"] == "certs/ca.pem", name
        if kind == "jobqueue":
            opts = spec["options"]
            # One single-threaded worker process per core, spilling to node-local scratch.
            assert opts["processes"] == opts["cores"] >= 1, name
            assert opts["local_directory"] and opts["interface"] and opts["walltime"], name
            assert opts["scheduler_options"]["dashboard_address"].startswith("127.0.0.1:"), name
            assert {"node_cert", "node_key", "ca_file", "cert", "key"} <= set(spec["tls"]), name
    assert load_cluster_file(CLUSTER / "local.yaml")["dashboard_address"].startswith("127.0.0.1:")
    # The DaskCluster manifest: TLS scheduler with a localhost dashboard, TLS single-threaded workers.
    (dc,) = yaml.safe_load_all((CLUSTER / "kubernetes" / "daskcluster.yaml").read_text())
    assert dc["apiVersion"] == "kubernetes.dask.org/v1" and dc["kind"] == "DaskCluster"
    sched = dc["spec"]["scheduler"]["spec"]["containers"][0]["args"]
    worker = dc["spec"]["worker"]["spec"]["containers"][0]["args"]
    assert sched[sched.index("--dashboard-address") + 1].startswith("127.0.0.1:") and "--tls-cert" in sched
    assert worker[2].startswith("tls://" + dc["metadata"]["name"] + "-scheduler:")
    assert worker[worker.index("--nthreads") + 1] == "1" and "--tls-cert" in worker
    assert load_cluster_file(CLUSTER / "kubernetes.yaml")["address"] == worker[2]
    assert "pip install ." in (CLUSTER / "Dockerfile").read_text()


@pytest.mark.parametrize("text, message", [
    ("kind: nonsense\n", "needs 'kind: local'"),
    ("- a list\n", "needs 'kind: local'"),
    ("kind: address\nadress: tls://h:8786\n", "unknown key(s) adress"),
    ("kind: address\n", "needs 'address: tls://host:8786'"),
    ("kind: address\naddress: tls://h:8786\n", "add a tls section"),
    ("kind: address\naddress: tcp://h:8786\ntls: {ca_file: a, cert: b, key: c}\n", "change the scheme to tls://"),
    ("kind: address\naddress: tls://h:8786\ntls: {ca: a, cert: b, key: c}\n", "unknown tls key(s) ca"),
    ("kind: address\naddress: tls://h:8786\ntls: {ca_file: a, cert: b}\n",
     "needs key (`mstdask certs DIR` makes client-key.pem)"),
    ("kind: jobqueue\njobs: 0\n", "'jobs' must be a whole number >= 1"),
    ("kind: jobqueue\noptions: {security: true}\n", "in the tls section"),
    ("kind: jobqueue\ntls: {ca_file: a, cert: b, key: c}\n", "needs node_cert, node_key"),
])
def test_bad_cluster_files_say_how_to_fix_them(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_cluster_file(f)
    assert message in str(err.value) and str(f) in str(err.value)


def test_missing_tls_files_and_jobqueue_are_config_errors(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("kind: address\naddress: tls://127.0.0.1:1\ntls: {ca_file: certs/ca.pem, cert: c.pem, key: k.pem}\n")
    with pytest.raises(ConfigError, match="ca.pem not found; make the certificates with `mstdask certs DIR`"):
        with connect(str(f), quiet=True):
            pass
    # No dask-jobqueue: a message that says what to install, not an ImportError.
    monkeypatch.setitem(__import__("sys").modules, "dask_jobqueue", None)
    with pytest.raises(ConfigError, match=r"pip install 'mstdask\[cluster\]'"):
        with connect(str(CLUSTER / "slurm.yaml"), quiet=True):
            pass


def test_make_certificates(tmp_path, capsys):
    from cryptography import x509

    files = make_certificates(tmp_path / "c", ["sched.example.org", "10.1.2.3"], days=30)
    assert {k: p.name for k, p in files.items()} == {
        "ca_file": "ca.pem", "ca_key": "ca-key.pem", "node_cert": "node.pem", "node_key": "node-key.pem",
        "cert": "client.pem", "key": "client-key.pem"}
    for k in ("ca_key", "node_key", "key"):
        assert stat.S_IMODE(files[k].stat().st_mode) == 0o600, k
    ca = x509.load_pem_x509_certificate(files["ca_file"].read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.timezone.utc)
    for k in ("node_cert", "cert"):
        cert = x509.load_pem_x509_certificate(files[k].read_bytes())
        cert.verify_directly_issued_by(ca)  # raises when another key signed it
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"localhost", "sched.example.org"} <= set(san.get_values_for_type(x509.DNSName))
        assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")} <= set(
            san.get_values_for_type(x509.IPAddress))
        assert cert.not_valid_before_utc < now < cert.not_valid_after_utc < now + datetime.timedelta(days=31)
    usage = x509.load_pem_x509_certificate(files["node_cert"].read_bytes()).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert {u.dotted_string for u in usage} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}  # server + client auth

    # Never silently replaced: the cluster's workers hold the old ones.
    old = files["ca_file"].read_bytes()
    with pytest.raises(ConfigError, match="--force"):
        make_certificates(tmp_path / "c")
    assert make_certificates(tmp_path / "c", overwrite=True)["ca_file"].read_bytes() != old
    with pytest.raises(ConfigError, match="not a URL"):
        make_certificates(tmp_path / "d", ["tls://sched:8786"])

    # The command prints a tls section to paste into cluster/NAME.yaml.
    assert main(["certs", str(tmp_path / "e"), "--host", "node7"]) == 0
    section = yaml.safe_load(capsys.readouterr().out)["tls"]
    assert section["ca_file"] == str(tmp_path / "e" / "ca.pem") and section["node_key"].endswith("node-key.pem")
    assert main(["certs", str(tmp_path / "e")]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["slurm.yaml", "pbs.yaml"])
def test_jobqueue_files_make_tls_job_scripts(tmp_path, monkeypatch, name):
    pytest.importorskip("dask_jobqueue", reason="the cluster extra (pip install 'mstdask[cluster]')")
    shutil.copy(CLUSTER / name, tmp_path / name)
    make_certificates(tmp_path / "certs")
    monkeypatch.chdir(tmp_path)  # log_directory is relative to where mstdask runs
    spec = load_cluster_file(tmp_path / name)
    spec["options"]["interface"] = "lo"  # this machine has no ib0
    spec["options"]["scheduler_options"]["dashboard_address"] = "127.0.0.1:0"  # 8787 may be taken here
    cluster = _jobqueue_cluster(spec, tmp_path, name)
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        # The dashboard listens on localhost only (tornado's sockets: the bound addresses).
        assert {s.getsockname()[0] for s in cluster.scheduler.http_server._sockets.values()} == {"127.0.0.1"}
    finally:
        cluster.close()
    cores = spec["options"]["cores"]
    for piece in ("--nthreads 1", f"--nworkers {cores}", "--local-directory ${TMPDIR:-/tmp}", "--protocol tls://",
                  f"--tls-ca-file {tmp_path / 'certs' / 'ca.pem'}", f"--tls-cert {tmp_path / 'certs' / 'node.pem'}",
                  f"--tls-key {tmp_path / 'certs' / 'node-key.pem'}", "--no-dashboard", "04:00:00"):
        assert piece in script, (piece, script)
