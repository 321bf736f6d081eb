"""The observing site, which assigns frames to their local observing night."""

from __future__ import annotations

from dataclasses import dataclass

from ._base import _check

__all__ = ["SiteConfig", "XINGLONG"]


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
