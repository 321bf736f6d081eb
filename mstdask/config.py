"""Typed, frozen, validated configuration objects.

Defaults come from the MST papers (Xiao et al. 2025, imaging pipeline; Zhang et al. 2025,
camera evaluation). Every object validates itself on construction and raises
:class:`~mstdask.errors.ConfigError` with a message that says which value is wrong.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["SiteConfig", "XINGLONG", "StoreLayout", "IngestConfig", "ClusterConfig", "to_dict"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class SiteConfig:
    """An observing site, used to assign frames to their local observing night.

    Parameters
    ----------
    name : str
        Site name, recorded in the store.
    utc_offset_hours : float
        Local civil time minus UTC (Xinglong: +8, China Standard Time, no daylight saving).
    latitude_deg, longitude_deg, elevation_m : float
        Geodetic position (Xinglong Observatory by default).
    night_boundary_hour : float
        Local hour at which one observing night hands over to the next (noon): a frame taken
        at 02:00 local on the 19th belongs to the night of the 18th.
    """

    name: str = "Xinglong"
    utc_offset_hours: float = 8.0
    latitude_deg: float = 40.3936
    longitude_deg: float = 117.5750
    elevation_m: float = 960.0
    night_boundary_hour: float = 12.0

    def __post_init__(self) -> None:
        _check(-12.0 <= self.utc_offset_hours <= 14.0,
               f"utc_offset_hours={self.utc_offset_hours} is not a real time zone (-12..+14)")
        _check(-90.0 <= self.latitude_deg <= 90.0, f"latitude_deg={self.latitude_deg} outside -90..90")
        _check(0.0 <= self.night_boundary_hour < 24.0,
               f"night_boundary_hour={self.night_boundary_hour} must be in 0..24")
        _check(bool(self.name.strip()), "site name must not be empty")


XINGLONG = SiteConfig()


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


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dictionary of a config object (for manifests and FITS provenance)."""
    return dataclasses.asdict(cfg)
