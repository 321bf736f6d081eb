"""Cluster logs go to a log file, not the terminal (``connect(..., log_file=...)``).

The embedded cluster's workers are separate processes that print to the terminal they inherit,
so the end-to-end checks run a small driver in a subprocess and read its stderr.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mstdask.cluster import _LogFile, _logs_to_file, connect
from mstdask.errors import ConfigError

# A driver: one failing task, one writing where it cannot, caught as a job would; then closed.
_DRIVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mstdask.cluster import connect
    from mstdask.config import ClusterConfig

    def boom(i):
        raise ValueError(f"boom in frame {i}")

    def write(path):
        with open(path, "w") as f:
            f.write("pixels")

    def slow(i):
        time.sleep(60)

    if __name__ == "__main__":
        log, quiet, target, mode = sys.argv[1], sys.argv[2] == "quiet", sys.argv[3], sys.argv[4]
        with connect(None, ClusterConfig(n_workers=2, memory_limit="1GiB"), quiet=quiet, log_file=log) as client:
            if mode == "errors":
                for fut in (client.submit(boom, 7), client.submit(write, target)):
                    try:
                        fut.result()
                    except (ValueError, OSError) as exc:
                        print("caught", type(exc).__name__, flush=True)
            else:
                futures = [client.submit(slow, i) for i in range(2)]
                try:  # "ready" inside the try: the test's Ctrl-C may come as soon as it is read
                    print("ready", flush=True)
                    client.gather(futures)
                except KeyboardInterrupt:
                    print("interrupted", flush=True)
""")


def _driver(tmp_path: Path) -> Path:
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    return script


def _read_only_target(tmp_path: Path) -> Path:
    """A path no task can write: in a read-only folder, or (root ignores modes) under a file."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        (tmp_path / "a_file").write_text("")
        return tmp_path / "a_file" / "frame.fits"
    return ro / "frame.fits"


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "distributed." in line or "Traceback" in line or "ERROR" in line or "never retrieved" in line]


def test_quiet_run_prints_no_worker_errors_and_the_log_file_has_them(tmp_path):
    log = tmp_path / "out" / "mstdask.log"  # the folder does not exist yet: connect makes it
    run = subprocess.run([sys.executable, str(_driver(tmp_path)), str(log), "quiet", str(_read_only_target(tmp_path)),
                          "errors"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    first, second = run.stdout.splitlines()
    written = second.removeprefix("caught ")
    assert first == "caught ValueError" and written in {"PermissionError", "NotADirectoryError"}
    assert run.stderr == "", run.stderr  # quiet: nothing at all, shutdown included
    text = log.read_text()
    # The workers' own records, from processes other than the driver's, with the two failures.
    assert text.count("distributed.worker ERROR: Compute Failed") == 2
    assert "boom in frame 7" in text and written in text
    pids = {line.split()[2] for line in text.splitlines() if " distributed." in line}
    assert len(pids) == 3  # the driver (scheduler, nannies) and two workers
    assert "distributed.scheduler INFO" in text


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to stand for a full disk")
def test_full_disk_log_prints_one_line_naming_it_and_nothing_else(tmp_path):
    # Every write to /dev/full fails with ENOSPC: worker errors must not come back as tracebacks.
    run = subprocess.run([sys.executable, str(_driver(tmp_path)), "/dev/full", "loud", str(_read_only_target(tmp_path)),
                          "errors"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("caught") == 2
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Dask dashboard: http"), run.stderr
    assert lines[0].endswith("; cluster logs: /dev/full")


def test_ctrl_c_prints_no_worker_or_client_tracebacks(tmp_path):
    log = tmp_path / "mstdask.log"
    proc = subprocess.Popen([sys.executable, str(_driver(tmp_path)), str(log), "quiet", "-", "slow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True,  # a process group of its own, as a terminal's job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == "ready\n"
        # Ctrl-C: SIGINT to the driver and its worker processes alike.
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out == "interrupted\n", (out, err)
    assert proc.returncode == 0 and err == "", err


def test_driver_records_go_to_the_file_and_handlers_come_back(tmp_path, capfd):
    import distributed  # noqa: F401  (its stderr handlers are the ones replaced)

    log = tmp_path / "mstdask.log"
    client_logger = logging.getLogger("distributed.client")  # distributed gives it a handler of its own
    before = {name: list(logging.getLogger(name).handlers) for name in ("distributed", "distributed.client")}
    with _logs_to_file(log):
        logging.getLogger("distributed.worker").error("heartbeat failed")
        client_logger.error("client lost")
        logging.getLogger("asyncio").error("Task exception was never retrieved")
    assert _noise(capfd.readouterr().err) == []
    text = log.read_text()
    assert "distributed.worker ERROR: heartbeat failed" in text and "client lost" in text
    assert "asyncio ERROR: Task exception was never retrieved" in text
    assert {name: list(logging.getLogger(name).handlers) for name in before} == before


def test_log_file_that_cannot_be_written_is_a_config_error_and_a_full_one_is_silent(tmp_path, capfd):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="cannot write the Dask log file"):
        with connect(None, quiet=True, log_file=tmp_path / "a_file" / "mstdask.log"):
            pass
    if Path("/dev/full").exists():
        handler = _LogFile(Path("/dev/full"))
        handler.emit(logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, "x" * 10_000, None, None))
        handler.close()
        assert capfd.readouterr().err == ""
