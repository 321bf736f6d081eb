"""FITS headers and files as a ZWO ASI6200MM Pro under ASCOM/NINA writes them.

The MST cameras deliver uncompressed 16-bit FITS through ASCOM (Xiao et al. 2025,
papers/000 Sect. 2.3); the lab tests ran at gain setting 100 (0.25 e-/ADU) and offset 50
(Zhang et al. 2025, papers/002 Sect. 2). The keywords below are the ones such a camera
driver and acquisition software put in every frame.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from astropy.io import fits
from astropy.time import Time

from ..config import XINGLONG

if TYPE_CHECKING:  # pragma: no cover - import only for annotations
    from astropy.wcs import WCS

    from ._camera import CameraModel

__all__ = [
    "IMAGETYP_SPELLINGS",
    "SITE",
    "fits_header",
    "format_date_obs",
    "format_dec",
    "format_ra",
    "write_fits",
]

#: Xinglong Observatory (Xiao et al. 2025, Sect. 2.1), as written in SITELAT/SITELONG/SITEELEV.
# One source of truth for the site: mstdask.config.XINGLONG (what ingest assumes by default).
SITE = {"name": XINGLONG.name, "lat": XINGLONG.latitude_deg, "lon": XINGLONG.longitude_deg,
        "elev": XINGLONG.elevation_m, "utc_offset_hours": XINGLONG.utc_offset_hours}

#: IMAGETYP values per style: 'maxim' is the ASCOM/MaxIm DL/SGP convention that MST headers
#: follow, 'nina' is what N.I.N.A. writes. Both are real; pipelines must accept either.
IMAGETYP_SPELLINGS: dict[str, dict[str, str]] = {
    "maxim": {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field", "science": "Light Frame"},
    "nina": {"bias": "BIAS", "dark": "DARK", "flat": "FLAT", "science": "LIGHT"},
}


def format_date_obs(when: datetime) -> str:
    """UTC ISO-8601 timestamp with microseconds, the form NINA writes in DATE-OBS.

    Parameters
    ----------
    when : datetime
        Naive datetimes are taken as UTC; aware ones are converted.

    Returns
    -------
    str
        e.g. ``'2023-01-18T10:41:07.123456'``.
    """
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when.isoformat(timespec="microseconds")


def format_ra(ra_deg: float) -> str:
    """Right ascension as the ``'HH MM SS.ss'`` string of OBJCTRA."""
    total = (float(ra_deg) % 360.0) / 15.0 * 3600.0
    total = round(total, 2) % (24 * 3600)
    h, rem = divmod(total, 3600.0)
    m, s = divmod(rem, 60.0)
    return f"{int(h):02d} {int(m):02d} {s:05.2f}"


def format_dec(dec_deg: float) -> str:
    """Declination as the ``'+DD MM SS.s'`` string of OBJCTDEC."""
    sign = "-" if dec_deg < 0 else "+"
    total = round(abs(float(dec_deg)) * 3600.0, 1)
    d, rem = divmod(total, 3600.0)
    m, s = divmod(rem, 60.0)
    return f"{sign}{int(d):02d} {int(m):02d} {s:04.1f}"


def fits_header(
    model: CameraModel,
    kind: str,
    date_obs: datetime,
    exptime: float,
    *,
    object_name: str | None = None,
    ra: float | None = None,
    dec: float | None = None,
    ccd_temp: float | None = None,
    airmass: float | None = None,
    wcs: WCS | None = None,
    imagetyp_style: str = "maxim",
    observatory: str = SITE["name"],
    extra: Mapping[str, Any] | None = None,
) -> fits.Header:
    """The primary header a ZWO ASI6200MM Pro frame gets from ASCOM acquisition software.

    Parameters
    ----------
    model : CameraModel
        Supplies TELESCOP, INSTRUME, FILTER, EGAIN, pixel size, gain/offset settings.
    kind : {'bias', 'dark', 'flat', 'science'}
        Frame type, written as IMAGETYP in ``imagetyp_style`` spelling.
    date_obs : datetime
        UTC start of the exposure.
    exptime : float
        Exposure time in seconds (EXPTIME and EXPOSURE).
    object_name : str, optional
        OBJECT; the field name (e.g. ``'f02'``) for science frames, defaults to the kind.
    ra, dec : float, optional
        Header (commanded) pointing in degrees; RA/DEC plus OBJCTRA/OBJCTDEC strings.
    ccd_temp : float, optional
        Measured sensor temperature (CCD-TEMP); defaults to the set point.
    airmass : float, optional
        AIRMASS keyword (science frames).
    wcs : astropy.wcs.WCS, optional
        When given, its TAN-SIP keywords are added (raw camera frames have none).
    imagetyp_style : {'maxim', 'nina'}
        Spelling of IMAGETYP, see :data:`IMAGETYP_SPELLINGS`.
    observatory : str
        OBSERVAT value.
    extra : mapping, optional
        More keywords, written last (override earlier ones).

    Returns
    -------
    astropy.io.fits.Header
        Without BITPIX/NAXIS/BZERO, which astropy sets from the uint16 data when writing.
    """
    if kind not in IMAGETYP_SPELLINGS["maxim"]:
        raise ValueError(f"kind={kind!r}; expected one of {tuple(IMAGETYP_SPELLINGS['maxim'])}")
    if imagetyp_style not in IMAGETYP_SPELLINGS:
        raise ValueError(f"imagetyp_style={imagetyp_style!r}; expected one of {tuple(IMAGETYP_SPELLINGS)}")
    utc = date_obs.astimezone(timezone.utc).replace(tzinfo=None) if date_obs.tzinfo else date_obs
    local = utc + timedelta(hours=SITE["utc_offset_hours"])
    ccd = model.ccd_temp_c if ccd_temp is None else float(ccd_temp)
    h = fits.Header()
    h["IMAGETYP"] = (IMAGETYP_SPELLINGS[imagetyp_style][kind], "Type of exposure")
    h["EXPTIME"] = (float(exptime), "[s] Exposure duration")
    h["EXPOSURE"] = (float(exptime), "[s] Exposure duration")
    h["DATE-OBS"] = (format_date_obs(utc), "UTC start of exposure")
    h["DATE-LOC"] = (local.isoformat(timespec="microseconds"), "Local time at start of exposure")
    h["MJD-OBS"] = (float(Time(utc, scale="utc").mjd), "[d] MJD at start of exposure (UTC)")
    h["XBINNING"] = (1, "X axis binning factor")
    h["YBINNING"] = (1, "Y axis binning factor")
    h["GAIN"] = (int(model.gain_setting), "Sensor gain setting")
    h["OFFSET"] = (int(model.offset_setting), "Sensor gain offset")
    h["EGAIN"] = (float(model.gain), "[e-/ADU] Electrons per A/D unit")
    h["XPIXSZ"] = (float(model.pixel_size_um), "[um] Pixel X axis size")
    h["YPIXSZ"] = (float(model.pixel_size_um), "[um] Pixel Y axis size")
    h["INSTRUME"] = (model.instrument, "Imaging instrument name")
    h["SET-TEMP"] = (float(model.ccd_temp_c), "[degC] CCD temperature setpoint")
    h["CCD-TEMP"] = (round(ccd, 2), "[degC] CCD temperature")
    h["TELESCOP"] = (model.telescope, "Name of telescope")
    h["FOCALLEN"] = (float(model.focal_length_mm), "[mm] Focal length")
    h["APTDIA"] = (float(model.aperture_mm), "[mm] Aperture diameter")
    h["FILTER"] = (model.filter, "Active filter name")
    h["OBJECT"] = (object_name if object_name is not None else kind, "Name of the object of interest")
    if ra is not None and dec is not None:
        h["RA"] = (float(ra), "[deg] RA of telescope")
        h["DEC"] = (float(dec), "[deg] Declination of telescope")
        h["OBJCTRA"] = (format_ra(ra), "[H M S] RA of imaged object")
        h["OBJCTDEC"] = (format_dec(dec), "[D M S] Declination of imaged object")
    if airmass is not None:
        h["AIRMASS"] = (round(float(airmass), 4), "Airmass at frame start")
    h["OBSERVAT"] = (observatory, "Observatory")
    h["SITEELEV"] = (SITE["elev"], "[m] Observation site elevation")
    h["SITELAT"] = (SITE["lat"], "[deg] Observation site latitude")
    h["SITELONG"] = (SITE["lon"], "[deg] Observation site longitude")
    h["SWCREATE"] = ("mstdask.testing simulator", "Software that created this file")
    if wcs is not None:
        # relax=True keeps the SIP A_p_q/B_p_q keywords next to CTYPE 'RA---TAN-SIP'.
        h.update(wcs.to_header(relax=True))
    if extra:
        for key, value in extra.items():
            h[key] = value
    return h


def write_fits(path: str | os.PathLike, data: np.ndarray, header: fits.Header | None = None,
               *, overwrite: bool = True) -> Path:
    """Write one camera frame as a single primary HDU.

    Parameters
    ----------
    path : str or path-like
        Output file; parent folders are created.
    data : numpy.ndarray
        2-D image; uint16 is stored as BITPIX=16 with BZERO=32768, as the camera does.
    header : astropy.io.fits.Header, optional
        Keywords to write (e.g. from :func:`fits_header`).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path = Path(path)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {data.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu = fits.PrimaryHDU(data=data, header=header)
    hdu.writeto(path, overwrite=overwrite, output_verify="exception")
    return path
