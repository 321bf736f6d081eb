"""``mstdask ingest``: the Zarr layout of the raw stack, the ingest options and the
embedded Dask cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ._base import _check
from .site import SiteConfig

__all__ = ["StoreLayout", "IngestConfig", "ClusterConfig"]


@dataclass(frozen=True)
class StoreLayout:
    """How the raw stack is laid out in Zarr.

    One shard per frame (one file per frame on disk, written in one piece by one task, so a
    3000-exposure field is ~3000 files, not frames x tiles). Inside the shard the frame is cut
    into spatial tiles (the Zarr chunks), so stack reductions read ``frame=-1`` columns of
    tiles without touching the rest of each frame.

    Parameters
    ----------
    tile : int
        Target tile edge in pixels. The actual tile edge is the divisor of the frame edge
        closest to this target (9576 x 6388 gives 1368 x 1597 tiles), so no tile is ragged.
    compressor : str
        Blosc codec for the tiles: ``"lz4"`` (default, fast), ``"zstd"`` (smaller) or ``"none"``.
    clevel : int
        Compression level (1..9).
    """

    tile: int = 1536
    compressor: str = "lz4"
    clevel: int = 1

    def __post_init__(self) -> None:
        _check(64 <= self.tile <= 16384, f"tile={self.tile} must be within 64..16384 pixels")
        _check(self.compressor in ("lz4", "zstd", "none"),
               f"compressor={self.compressor!r}; choose 'lz4', 'zstd' or 'none'")
        _check(1 <= self.clevel <= 9, f"clevel={self.clevel} must be within 1..9")


@dataclass(frozen=True)
class IngestConfig:
    """Options of ``mstdask ingest``.

    Parameters
    ----------
    site : SiteConfig
        Where the frames were taken (defines ``night``).
    layout : StoreLayout
        Zarr layout used when the store is created (ignored when appending).
    force_imagetyp : str or None
        Treat every file of this ingest as this image type (bias, dark, flat, science),
        for cameras that write a wrong IMAGETYP (e.g. flats saved as 'Light Frame').
    mark_every_s : float
        How often the driver records finished frames in the store while ingesting; a killed
        ingest redoes at most this much work.
    """

    site: SiteConfig = field(default_factory=SiteConfig)
    layout: StoreLayout = field(default_factory=StoreLayout)
    force_imagetyp: str | None = None
    mark_every_s: float = 2.0

    def __post_init__(self) -> None:
        _check(self.force_imagetyp in (None, "bias", "dark", "flat", "science"),
               f"force_imagetyp={self.force_imagetyp!r}; choose bias, dark, flat or science")
        _check(self.mark_every_s > 0, "mark_every_s must be positive")


@dataclass(frozen=True)
class ClusterConfig:
    """The embedded Dask cluster (used when no scheduler address or config file is given).

    Parameters
    ----------
    n_workers : int or None
        Worker processes; default one per core.
    threads_per_worker : int
        Threads per worker. One keeps per-worker memory to one frame's working set.
    memory_limit : str or None
        Per-worker memory limit (Dask syntax, e.g. ``"4GiB"``); default: 80 % of the
        machine's memory shared between the workers.
    dashboard_address : str
        Where the dashboard listens; localhost only unless asked otherwise.
    """

    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = None
    dashboard_address: str = "127.0.0.1:0"

    def __post_init__(self) -> None:
        _check(self.n_workers is None or self.n_workers >= 1, "n_workers must be >= 1")
        _check(self.threads_per_worker >= 1, "threads_per_worker must be >= 1")

    def resolved_workers(self) -> int:
        """Number of workers that will be started."""
        return self.n_workers or max(1, os.cpu_count() or 1)
