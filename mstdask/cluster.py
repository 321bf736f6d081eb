"""The one place that owns the Dask client.

``connect(None)`` starts an embedded :class:`~distributed.LocalCluster` sized to the machine
(one single-threaded worker per core, a memory limit per worker); ``connect("tls://host:8786")``
joins a running scheduler; ``connect("cluster/NAME.yaml")`` starts or joins the cluster a
configuration file describes. Only the jobs and the command line call this module.

Configuration files (YAML, checked by :func:`load_cluster_file`; ``cluster/README.md``)::

    kind: local            # local | address | jobqueue
    n_workers: 2           # local: LocalCluster arguments
    threads_per_worker: 1
    memory_limit: 4GiB
    # kind: address  -> address: tls://scheduler:8786, tls: {ca_file, cert, key}
    # kind: jobqueue -> class: SLURMCluster, jobs: 2, options: {cores: 16, memory: 96GiB, ...},
    #                   tls: {ca_file, cert, key, node_cert, node_key}

TLS file paths are relative to the configuration file (or absolute); :func:`make_certificates`
(``mstdask certs DIR``) makes them: a CA, one certificate for the scheduler and the workers
and one for clients.

Logs: ``connect(..., log_file=PATH)`` sends the cluster's own log records (``distributed``,
``tornado``, ``asyncio``, ``bokeh``: worker errors, heartbeat failures at shutdown, tasks never
retrieved after Ctrl-C) to PATH instead of the terminal. The embedded cluster's worker processes
send everything they print there too (:func:`dask_setup`, their preload), so a failing task
reaches the user once, as the job's one line per frame, and in full in the log file.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from .config import ClusterConfig
from .errors import ConfigError

__all__ = ["connect", "load_cluster_file", "default_memory_limit", "make_certificates", "CERTIFICATE_FILES",
           "dask_setup"]

# Allowed keys per kind: a typo ('adress', 'ca:') is an error, not a silently ignored line.
_KEYS = {
    "local": {"kind", "n_workers", "threads_per_worker", "memory_limit", "dashboard_address"},
    "address": {"kind", "address", "tls"},
    "jobqueue": {"kind", "class", "jobs", "options", "tls"},
}
_TLS_KEYS = ("ca_file", "cert", "key", "node_cert", "node_key")

#: File names :func:`make_certificates` writes, by the ``tls:`` key that takes them.
CERTIFICATE_FILES = {
    "ca_file": "ca.pem",          # everyone: the CA that signed the two below
    "ca_key": "ca-key.pem",       # nobody at run time: keep it private, it signs new certificates
    "node_cert": "node.pem",      # scheduler and workers
    "node_key": "node-key.pem",
    "cert": "client.pem",         # clients (mstdask commands)
    "key": "client-key.pem",
}

# The scheduler dashboard of a cluster this process starts: localhost only (reach it over
# `ssh -L 8787:localhost:8787`); `scheduler_options: {dashboard_address: ...}` overrides it.
_DASHBOARD = "127.0.0.1:8787"

# The cluster's own loggers: with a log file, their records go there, not to the terminal.
_CLUSTER_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh")
# Which process wrote a line matters in a file that the driver and every worker append to.
_LOG_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"
# Tells the embedded cluster's worker processes (their preload, :func:`dask_setup`) the log file.
_WORKER_LOG_ENV = "MSTDASK_WORKER_LOG"


def default_memory_limit(n_workers: int) -> int:
    """Bytes per worker: 80 % of the machine's memory shared between the workers."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(0.8 * total / max(1, n_workers))


def load_cluster_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a cluster configuration file.

    Parameters
    ----------
    path : path-like
        A ``cluster/NAME.yaml`` file.

    Returns
    -------
    dict
        The parsed file. The structure is checked here (kind, keys, tls section); that the
        TLS files exist is checked when connecting.

    Raises
    ------
    ConfigError
        The file is missing, not YAML, or not a valid configuration; the message says what
        to change.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: cluster configuration file not found (see cluster/README.md)")
    try:
        spec = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in _KEYS:
        raise ConfigError(f"{p}: needs 'kind: local', 'kind: address' or 'kind: jobqueue', not {kind!r} "
                          "(see cluster/README.md)")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {', '.join(map(str, unknown))} for 'kind: {kind}'; "
                          f"allowed: {', '.join(sorted(_KEYS[kind]))}")

    tls = spec.get("tls")
    if tls is not None:
        if not isinstance(tls, dict):
            raise ConfigError(f"{p}: 'tls' must be a mapping of ca_file, cert, key (files made by `mstdask certs DIR`)")
        bad = sorted(set(tls) - set(_TLS_KEYS))
        if bad:
            raise ConfigError(f"{p}: unknown tls key(s) {', '.join(map(str, bad))}; allowed: {', '.join(_TLS_KEYS)}")
        # A jobqueue cluster starts its own scheduler and workers: they need the node certificate.
        need = ("ca_file", "cert", "key") + (("node_cert", "node_key") if kind == "jobqueue" else ())
        missing = [k for k in need if not tls.get(k)]
        if missing:
            raise ConfigError(f"{p}: the tls section needs {', '.join(missing)} "
                              f"(`mstdask certs DIR` makes {', '.join(CERTIFICATE_FILES[k] for k in missing)})")

    if kind == "address":
        address = spec.get("address")
        if not isinstance(address, str) or not address:
            raise ConfigError(f"{p}: 'kind: address' needs 'address: tls://host:8786'")
        if tls and not address.startswith("tls://"):
            raise ConfigError(f"{p}: a tls section needs a tls:// address, not {address}; change the scheme to tls://")
        if address.startswith("tls://") and not tls and not _dask_tls_configured():
            raise ConfigError(f"{p}: {address} is a TLS scheduler; add a tls section with ca_file, cert and key "
                              "(`mstdask certs DIR` makes them; see cluster/README.md)")
    elif kind == "jobqueue":
        if not isinstance(spec.get("class", "SLURMCluster"), str):
            raise ConfigError(f"{p}: 'class' must be a dask-jobqueue class name such as SLURMCluster or PBSCluster")
        jobs = spec.get("jobs", 1)
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise ConfigError(f"{p}: 'jobs' must be a whole number >= 1 (batch jobs to submit), not {jobs!r}")
        options = spec.get("options", {})
        if not isinstance(options, dict):
            raise ConfigError(f"{p}: 'options' must be a mapping of {spec.get('class', 'SLURMCluster')} arguments")
        if "security" in options or ("protocol" in options and tls):
            raise ConfigError(f"{p}: give TLS files in the tls section, not options.security/options.protocol")
        if not isinstance(options.get("scheduler_options", {}), dict):
            raise ConfigError(f"{p}: 'options.scheduler_options' must be a mapping (e.g. dashboard_address: ...)")
    return spec


def _dask_tls_configured() -> bool:
    """Whether dask's own configuration gives a client certificate (distributed.comm.tls)."""
    import dask

    return bool(dask.config.get("distributed.comm.tls.client.cert", None))


def _security(tls: dict[str, str] | None, base: Path, nodes: bool = False, where: str = "tls"):
    """The :class:`distributed.security.Security` of a ``tls:`` section, or None without one.

    Parameters
    ----------
    tls : dict or None
        ``ca_file``, ``cert``, ``key`` (this process as a client) and, with ``nodes``,
        ``node_cert``, ``node_key`` (the scheduler and workers this process starts).
    base : Path
        Folder that relative paths are relative to (the configuration file's).
    nodes : bool
        Also set the scheduler and worker certificate.
    where : str
        Named in error messages (the configuration file).
    """
    if not tls:
        return None
    from distributed.security import Security

    def resolve(key: str) -> str:
        value = tls.get(key)
        if not value:
            raise ConfigError(f"{where}: the tls section needs '{key}' (`mstdask certs DIR` makes it)")
        f = Path(os.path.expandvars(str(value))).expanduser()
        f = f if f.is_absolute() else base / f
        if not f.is_file():
            raise ConfigError(f"{where}: TLS file {f} not found; make the certificates with `mstdask certs DIR` "
                              "or fix the path (relative paths are relative to the configuration file)")
        return str(f)

    kwargs = {"tls_ca_file": resolve("ca_file"), "tls_client_cert": resolve("cert"), "tls_client_key": resolve("key")}
    if nodes:
        cert, key = resolve("node_cert"), resolve("node_key")
        kwargs.update(tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert, tls_worker_key=key)
    return Security(require_encryption=True, **kwargs)


def _jobqueue_cluster(spec: dict[str, Any], base: Path, where: str):
    """The dask-jobqueue cluster a ``kind: jobqueue`` file describes, not yet scaled.

    Its scheduler starts in this process; workers start when jobs are submitted (``scale``).
    """
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError(f"{where}: 'kind: jobqueue' needs dask-jobqueue "
                          "(pip install 'mstdask[cluster]' or pip install dask-jobqueue)") from None
    cls_name = spec.get("class", "SLURMCluster")
    cls = getattr(dask_jobqueue, cls_name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"{where}: dask_jobqueue has no {cls_name}; use SLURMCluster, PBSCluster, SGECluster, "
                          "LSFCluster, HTCondorCluster or OARCluster")
    options = dict(spec.get("options") or {})
    scheduler_options = dict(options.get("scheduler_options") or {})
    scheduler_options.setdefault("dashboard_address", _DASHBOARD)
    options["scheduler_options"] = scheduler_options
    security = _security(spec.get("tls"), base, nodes=True, where=where)
    if security is not None:
        options["security"] = security  # jobqueue passes it to the workers as --tls-* options
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {cls_name} rejected the options: {exc}; fix the options section "
                          "(see cluster/README.md)") from None


class _LogFile(logging.Handler):
    """Appends records to a file, dropping those it cannot write: on a full disk the log file is
    the first casualty, and the terminal must not get a traceback per record instead.

    Not a :class:`logging.StreamHandler`, so distributed's ``silence_logs`` (which lowers the
    terminal handlers to errors only) leaves it alone.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._stream: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._stream is None:
                self._stream = self.path.open("a", encoding="utf-8")
            self._stream.write(self.format(record) + "\n")
            self._stream.flush()
        except Exception:
            pass

    def close(self) -> None:
        with self.lock or contextlib.nullcontext():
            if self._stream is not None:
                with contextlib.suppress(OSError):
                    self._stream.close()
                self._stream = None
        super().close()


def _is_terminal_handler(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes to a stream (the terminal) rather than a file."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


@contextlib.contextmanager
def _logs_to_file(path: Path | None) -> Iterator[None]:
    """Within the block, records of this process's cluster loggers go to ``path``, not the terminal.

    distributed gives several of its loggers their own stderr handler (and ``propagate=False``),
    so every logger of the hierarchy is visited; the handlers are put back on exit.
    """
    if path is None:
        yield
        return
    import distributed  # noqa: F401  (its import adds the stderr handlers replaced here)

    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    known = [lg for lg in list(logging.root.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    affected = {name: logging.getLogger(name) for name in _CLUSTER_LOGGERS}
    affected.update({lg.name: lg for lg in known if lg.name.startswith(tuple(n + "." for n in _CLUSTER_LOGGERS))})
    saved = [(lg, list(lg.handlers), lg.propagate) for lg in affected.values()]
    for lg in affected.values():
        for h in [h for h in lg.handlers if _is_terminal_handler(h)]:
            lg.removeHandler(h)
        if lg.name in _CLUSTER_LOGGERS:
            lg.propagate = False
        if not lg.propagate:  # a top of the hierarchy, or a logger distributed detached from it
            lg.addHandler(handler)
    # The file is appended to by every run: say where this one begins.
    handler.handle(logging.LogRecord("mstdask", logging.INFO, __file__, 0, "---- %s ----",
                                     (" ".join(sys.argv) or "python",), None))
    try:
        yield
    finally:
        for lg, handlers, propagate in saved:
            lg.removeHandler(handler)
            for h in handlers:
                if h not in lg.handlers:
                    lg.addHandler(h)
            lg.propagate = propagate
        handler.close()


def _open_log_file(log_file: str | os.PathLike) -> Path:
    """The absolute path of the log file, its folder made and the file openable for appending.

    Raises
    ------
    ConfigError
        The folder cannot be made or the file cannot be written.
    """
    path = Path(log_file).expanduser().absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the Dask log file ({exc.strerror or exc}); "
                          "choose an output folder you can write to") from None
    return path


def dask_setup(worker: Any) -> None:
    """Preload of the embedded cluster's worker processes (``preload=["mstdask.cluster"]``).

    The driver owns the workers: Ctrl-C reaches the whole process group, but only the driver
    should act on it (it closes the cluster), so the workers ignore SIGINT rather than print a
    traceback each. With a log file (``MSTDASK_WORKER_LOG``), everything the worker process
    prints, log records, tracebacks and warnings alike, goes there instead of the terminal.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    path = os.environ.get(_WORKER_LOG_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return  # the terminal then, rather than a worker that cannot start
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    # File descriptors, not sys.stderr: distributed's handlers and C code hold the descriptor.
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # The handlers now write to the file: all records (the worker silenced them to errors while
    # they went to the terminal), each with the process id.
    formatter = logging.Formatter(_LOG_FORMAT)
    for lg in [logging.root, *logging.root.manager.loggerDict.values()]:
        for h in getattr(lg, "handlers", ()):
            if _is_terminal_handler(h):
                h.setFormatter(formatter)
                h.setLevel(logging.NOTSET)


def _local_cluster(config: ClusterConfig, log_file: Path | None):
    """The embedded LocalCluster: one process per worker, preloaded with :func:`dask_setup`."""
    import dask
    from distributed import LocalCluster

    n = config.resolved_workers()
    options: dict[str, Any] = dict(
        n_workers=n,
        threads_per_worker=config.threads_per_worker,
        memory_limit=config.memory_limit or default_memory_limit(n),
        dashboard_address=config.dashboard_address,
        processes=True,
        preload=[*(dask.config.get("distributed.worker.preload", None) or []), __name__],
        # Only errors on the terminal; a log file gets everything (this process's handler and,
        # once :func:`dask_setup` has moved them there, the workers' are not silenced).
        silence_logs=logging.ERROR,
    )
    if log_file is None:
        return LocalCluster(**options)
    options.update(env={_WORKER_LOG_ENV: str(log_file)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        cluster = LocalCluster(**options)
    # distributed also speaks through warnings (a dashboard port in use): into the log file too.
    for w in caught:
        logging.getLogger("distributed.deploy").warning("%s: %s", w.category.__name__, w.message)
    return cluster


@contextlib.contextmanager
def connect(cluster: str | None = None, config: ClusterConfig | None = None,
            quiet: bool = False, log_file: str | os.PathLike | None = None) -> Iterator["distributed.Client"]:  # noqa: F821
    """Context manager yielding a connected :class:`distributed.Client`.

    Parameters
    ----------
    cluster : str or None
        None for the embedded LocalCluster, a scheduler address (``tcp://``, ``tls://`` or
        ``host:port``), or a ``.yaml`` cluster configuration file.
    config : ClusterConfig, optional
        Sizing of the embedded cluster.
    quiet : bool
        Do not print the dashboard link and the log file.
    log_file : path-like, optional
        Append the cluster's log records here instead of printing them: those of this process
        (the client and, for a cluster it starts, the scheduler) and, for the embedded
        cluster, all that its worker processes print. Its folder is made if missing. Workers of
        a remote or batch cluster keep their own logs.

    Raises
    ------
    ConfigError
        The cluster cannot be reached or configured, or ``log_file`` cannot be written.
    """
    log_path = _open_log_file(log_file) if log_file is not None else None
    with _logs_to_file(log_path):
        with _connect(cluster, config or ClusterConfig(), log_path) as client:
            if not quiet:
                where = f"; cluster logs: {log_path}" if log_path is not None else ""
                print(f"Dask dashboard: {client.dashboard_link}{where}", file=sys.stderr)
            yield client


@contextlib.contextmanager
def _connect(cluster: str | None, config: ClusterConfig, log_file: Path | None) -> Iterator[Any]:
    """:func:`connect` without the logging set-up: start or join the cluster, close what it started."""
    from distributed import Client

    owned = None
    if cluster is None or cluster == "local":
        owned = _local_cluster(config, log_file)
        try:
            client = Client(owned)
        except BaseException:
            owned.close()
            raise
    elif cluster.endswith((".yaml", ".yml")):
        spec = load_cluster_file(cluster)
        base = Path(cluster).resolve().parent
        kind = spec["kind"]
        if kind == "local":
            cfg = ClusterConfig(**{k: spec[k] for k in ("n_workers", "threads_per_worker", "memory_limit",
                                                          "dashboard_address") if k in spec})
            with _connect(None, cfg, log_file) as client:
                yield client
            return
        if kind == "address":
            security = _security(spec.get("tls"), base, where=cluster)
            try:
                client = Client(spec["address"], security=security, timeout="30s")
            except OSError as exc:
                raise ConfigError(
                    f"{cluster}: cannot reach the Dask scheduler at {spec['address']} ({exc}); check that it runs "
                    "(`dask scheduler`), the address and, with TLS, that scheduler and client certificates come "
                    "from the same CA") from None
        else:
            owned = _jobqueue_cluster(spec, base, cluster)
            try:
                owned.scale(jobs=int(spec.get("jobs", 1)))
                client = Client(owned)
            except BaseException:
                owned.close()
                raise
    else:
        try:
            client = Client(cluster, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {cluster} ({exc}); "
                              "start it with `dask scheduler` or drop --cluster for a local one") from None
    try:
        yield client
    finally:
        client.close()
        if owned is not None:
            owned.close()


def _san_entries(hostnames: Iterable[str]) -> list:
    """SubjectAlternativeName entries: localhost, 127.0.0.1 and ::1, then ``hostnames``."""
    from cryptography import x509

    entries: list = []
    for name in ("localhost", "127.0.0.1", "::1", *hostnames):
        name = str(name).strip()
        if not name or "://" in name or "/" in name or " " in name:
            raise ConfigError(f"certificate host {name!r}: give a host name or IP address "
                              "(scheduler.example.org, 10.0.0.5, *.svc.cluster.local), not a URL")
        try:
            entry = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name)
        if entry not in entries:
            entries.append(entry)
    return entries


def make_certificates(directory: str | os.PathLike, hostnames: Iterable[str] = (), *, days: int = 365,
                      overwrite: bool = False) -> dict[str, Path]:
    """Make the TLS certificates of a Dask cluster: a CA, a scheduler/worker and a client certificate.

    Every certificate is signed by the new CA and names localhost, 127.0.0.1, ::1 and
    ``hostnames`` as subject alternative names (Dask itself checks the CA, not host names, so
    a certificate works on any node; the names help other TLS tools). Keys are ECDSA P-256,
    written readable by the owner only.

    Parameters
    ----------
    directory : path-like
        Created if missing. Put it where scheduler, workers and clients can all read it (a
        shared file system, a Kubernetes secret); only ``ca-key.pem`` should stay private.
    hostnames : iterable of str
        Extra host names or IP addresses of the scheduler and workers.
    days : int
        Validity in days (from five minutes ago, for clock skew between nodes).
    overwrite : bool
        Replace certificates already in ``directory``.

    Returns
    -------
    dict of str to Path
        The files by the ``tls:`` key that takes them (:data:`CERTIFICATE_FILES`): ``ca_file``,
        ``cert``, ``key`` (client), ``node_cert``, ``node_key`` (scheduler and workers), and
        ``ca_key``.

    Raises
    ------
    ConfigError
        ``cryptography`` is missing, a host name is not one, ``days`` < 1, or certificates
        exist and ``overwrite`` is False.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigError("making certificates needs the cryptography package (pip install cryptography)") from None
    if int(days) < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, not {days}")
    out = Path(directory).expanduser()
    files = {key: out / name for key, name in CERTIFICATE_FILES.items()}
    present = [f.name for f in files.values() if f.exists()]
    if present and not overwrite:
        raise ConfigError(f"{out} already holds {', '.join(present)}; use another folder or --force "
                          "(overwrite=True) to replace them (every worker and client then needs the new files)")
    sans = x509.SubjectAlternativeName(_san_entries(hostnames))
    out.mkdir(parents=True, exist_ok=True, mode=0o700)

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=int(days))

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mstdask"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def usage(**on: bool) -> x509.KeyUsage:
        flags = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                     encipher_only=False, decipher_only=False)
        return x509.KeyUsage(**{**flags, **on})

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("mstdask cluster CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    def leaf(common: str, purposes: list) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(usage(digital_signature=True), critical=True)
                .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
                .add_extension(sans, critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert, key

    # Workers both serve (to the scheduler and to each other) and connect: server and client auth.
    node, node_key = leaf("mstdask scheduler and workers",
                          [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client, client_key = leaf("mstdask client", [ExtendedKeyUsageOID.CLIENT_AUTH])

    def write(path: Path, data: bytes, private: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if private:
            os.chmod(path, 0o600)  # also when an older, wider-open file was overwritten

    pem = serialization.Encoding.PEM
    pairs = {("ca_file", "ca_key"): (ca, ca_key), ("node_cert", "node_key"): (node, node_key),
             ("cert", "key"): (client, client_key)}
    for (cert_key, key_key), (cert, key) in pairs.items():
        write(files[cert_key], cert.public_bytes(pem), private=False)
        write(files[key_key], key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), private=True)
    return files
