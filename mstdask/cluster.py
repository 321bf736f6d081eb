"""The one place that owns the Dask client.

``connect(None)`` starts an embedded :class:`~distributed.LocalCluster` sized to the machine
(one single-threaded worker per core, a memory limit per worker); ``connect("tls://host:8786")``
joins a running scheduler; ``connect("cluster/NAME.yaml")`` starts or joins the cluster a
configuration file describes. Only the runner and the command line call this module.

Configuration files (YAML)::

    kind: local            # local | address | jobqueue
    n_workers: 2           # local: LocalCluster arguments
    threads_per_worker: 1
    memory_limit: 4GiB
    # kind: address -> address: tls://scheduler:8786, tls: {ca_file, cert, key}
    # kind: jobqueue -> class: SLURMCluster, jobs: 10, options: {cores: 8, memory: 32GiB, ...}
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from .config import ClusterConfig
from .errors import ConfigError

__all__ = ["connect", "load_cluster_file", "default_memory_limit"]


def default_memory_limit(n_workers: int) -> int:
    """Bytes per worker: 80 % of the machine's memory shared between the workers."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(0.8 * total / max(1, n_workers))


def load_cluster_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a cluster configuration file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: cluster configuration file not found (see cluster/README.md)")
    try:
        spec = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if not isinstance(spec, dict) or spec.get("kind") not in ("local", "address", "jobqueue"):
        raise ConfigError(f"{p}: needs 'kind: local', 'kind: address' or 'kind: jobqueue'")
    return spec


def _security(tls: dict[str, str] | None, base: Path):
    if not tls:
        return None
    from distributed.security import Security

    def resolve(key: str) -> str:
        value = tls.get(key)
        if not value:
            raise ConfigError(f"tls section needs '{key}'")
        f = (base / value).expanduser() if not os.path.isabs(value) else Path(value)
        if not f.is_file():
            raise ConfigError(f"TLS file {f} not found")
        return str(f)

    ca, cert, key = resolve("ca_file"), resolve("cert"), resolve("key")
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


@contextlib.contextmanager
def connect(cluster: str | None = None, config: ClusterConfig | None = None,
            quiet: bool = False) -> Iterator["distributed.Client"]:  # noqa: F821
    """Context manager yielding a connected :class:`distributed.Client`.

    Parameters
    ----------
    cluster : str or None
        None for the embedded LocalCluster, a scheduler address (``tcp://``, ``tls://`` or
        ``host:port``), or a ``.yaml`` cluster configuration file.
    config : ClusterConfig, optional
        Sizing of the embedded cluster.
    quiet : bool
        Do not print the dashboard link.
    """
    from distributed import Client, LocalCluster

    config = config or ClusterConfig()
    owned = None
    if cluster is None or cluster == "local":
        n = config.resolved_workers()
        owned = LocalCluster(
            n_workers=n,
            threads_per_worker=config.threads_per_worker,
            memory_limit=config.memory_limit or default_memory_limit(n),
            dashboard_address=config.dashboard_address,
            processes=True,
            silence_logs=logging.ERROR,
        )
        client = Client(owned)
    elif cluster.endswith((".yaml", ".yml")):
        spec = load_cluster_file(cluster)
        base = Path(cluster).resolve().parent
        kind = spec["kind"]
        if kind == "local":
            cfg = ClusterConfig(**{k: spec[k] for k in ("n_workers", "threads_per_worker", "memory_limit",
                                                          "dashboard_address") if k in spec})
            with connect(None, cfg, quiet=quiet) as client:
                yield client
            return
        if kind == "address":
            if "address" not in spec:
                raise ConfigError(f"{cluster}: 'kind: address' needs 'address: tls://host:8786'")
            client = Client(spec["address"], security=_security(spec.get("tls"), base), timeout="30s")
        else:
            try:
                import dask_jobqueue
            except ImportError:
                raise ConfigError(f"{cluster}: 'kind: jobqueue' needs dask-jobqueue (pip install dask-jobqueue)") from None
            cls_name = spec.get("class", "SLURMCluster")
            cls = getattr(dask_jobqueue, cls_name, None)
            if cls is None:
                raise ConfigError(f"{cluster}: dask_jobqueue has no {cls_name}")
            owned = cls(**spec.get("options", {}))
            owned.scale(jobs=int(spec.get("jobs", 1)))
            client = Client(owned)
    else:
        try:
            client = Client(cluster, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {cluster} ({exc}); "
                              "start it with `dask scheduler` or drop --cluster for a local one") from None
    try:
        if not quiet:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        yield client
    finally:
        client.close()
        if owned is not None:
            owned.close()
