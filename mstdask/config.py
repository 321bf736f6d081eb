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

__all__ = ["SiteConfig", "XINGLONG", "StoreLayout", "IngestConfig", "ClusterConfig", "CalibConfig", "to_dict"]


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


@dataclass(frozen=True)
class CalibConfig:
    """Night calibrations (STIR, Xiao et al. 2025 section 3.1; Zhang et al. 2025 section 3).

    Parameters
    ----------
    bias_combine : str
        ``"clipped-mean"`` (sigma-clipped mean, the default) or ``"median"``.
    clip_sigma, clip_maxiters : float, int
        Sigma clipping of the combines.
    bias_max_frames : int
        A master bias combines at most this many bias frames of the night, the first in
        time (MST takes 10 at the start of each night); a longer sequence, such as the
        100-frame PS sequence, adds little to the master and costs 10x the time.
    min_frames : int
        Fewest frames a master is made from; fewer raise InsufficientDataError.
    ps_threshold_adu : float
        A pixel is pepper-and-salt when its std over bias frames exceeds this (8 ADU).
    ps_frames : int
        Bias frames of one night used for the PS map (100 in MST).
    ps_min_frames : int
        Fewest bias frames of one night accepted for a PS map (each of the 3 groups needs
        enough frames for a meaningful std).
    ps_groups : int
        Non-overlapping groups in time whose PS maps are intersected (3).
    bad_pixel_nsigma : float
        Bad pixels lie outside this many robust sigmas of the bias-subtracted dark (3).
    saturation_adu : float
        Saturated pixels: raw value above this (50000 ADU).
    flat_window_px : int
        Median-smoothing window of the large-scale flat (51 px).
    flat_half_window_nights : int
        Nightly small-scale flats of nights d-5 .. d+5 are stacked (5).
    flat_max_days : float
        Never use flats further than this from the night (two months, 62 days).
    flat_min_adu, flat_max_adu : float
        Flats whose median (bias-subtracted) lies outside this range are left out.
    tile_bytes : int
        Working memory of a stack kernel: a ``frame=-1`` tile is combined in row strips of
        at most this many bytes (frames x strip pixels x 8).
    stack_bytes : int
        Largest raw stack one task reads (frames x tile pixels x raw itemsize). Stack
        reductions read whole stored tiles (each tile decoded once) unless that exceeds
        this, and then split them.
    stream_frames : int
        Streaming reductions (the PS moments) read this many frames per task and sum the
        partial moments, so their memory does not grow with the number of frames.
    """

    bias_combine: str = "clipped-mean"
    clip_sigma: float = 3.0
    clip_maxiters: int = 5
    bias_max_frames: int = 20
    min_frames: int = 3
    ps_threshold_adu: float = 8.0
    ps_frames: int = 100
    ps_min_frames: int = 30
    ps_groups: int = 3
    bad_pixel_nsigma: float = 3.0
    saturation_adu: float = 50000.0
    flat_window_px: int = 51
    flat_half_window_nights: int = 5
    flat_max_days: float = 62.0
    flat_min_adu: float = 5000.0
    flat_max_adu: float = 45000.0
    tile_bytes: int = 64 * 2**20
    stack_bytes: int = 768 * 2**20
    stream_frames: int = 10

    def __post_init__(self) -> None:
        _check(self.bias_combine in ("clipped-mean", "median"),
               f"bias_combine={self.bias_combine!r}; choose 'clipped-mean' or 'median'")
        _check(self.clip_sigma > 0 and self.clip_maxiters >= 1, "clip_sigma must be > 0 and clip_maxiters >= 1")
        _check(self.min_frames >= 1, "min_frames must be >= 1")
        _check(self.bias_max_frames >= self.min_frames, "bias_max_frames must be >= min_frames")
        _check(self.ps_threshold_adu > 0, "ps_threshold_adu must be positive")
        _check(self.ps_groups >= 1 and self.ps_min_frames >= 2 * self.ps_groups,
               "ps_min_frames must give every PS group at least 2 frames")
        _check(self.ps_frames >= self.ps_min_frames, "ps_frames must be >= ps_min_frames")
        _check(self.flat_window_px >= 3 and self.flat_window_px % 2 == 1, "flat_window_px must be odd and >= 3")
        _check(self.flat_half_window_nights >= 0 and self.flat_max_days > 0, "flat night window must be >= 0")
        _check(0 <= self.flat_min_adu < self.flat_max_adu, "flat_min_adu must be below flat_max_adu")
        _check(self.tile_bytes >= 2**20, "tile_bytes must be at least 1 MiB")
        _check(self.stack_bytes >= 2**20, "stack_bytes must be at least 1 MiB")
        _check(self.stream_frames >= 1, "stream_frames must be >= 1")
