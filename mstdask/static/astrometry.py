"""Astrometry of the STATIC step (Xiao et al. 2025, section 3.2.1): blind and precise WCS.

The paper solves every frame in two steps: a *blind solution* (astrometry.net there), then a
*precise solution* with a fourth-order polynomial distortion fitted against Gaia DR3 (SCAMP
there), reaching ~80 mas on 0.862"/px pixels. This module does both in NumPy, per frame, so
it runs inside a Dask task:

1. **Blind solution.** The header pointing (RA/DEC) is the only prior: rotation unknown,
   either parity (a mirror in the optics or the readout), pixel scale known to +-10 %
   (:attr:`~mstdask.config.AstrometryConfig.scale_tolerance`), the pointing up to about a
   third of the field off. The brightest sources and the brightest reference stars around
   the pointing are matched by their triangles (side ratios and, since the scale is roughly
   known, size); the similarity transforms of matched triangles vote, and the best is
   verified by the number of sources it puts on reference stars.
2. **Precise solution.** A TPV polynomial (``CTYPE = 'RA---TPV'``, ``PV1_k``/``PV2_k``: the
   convention SCAMP writes and SExtractor, SWarp, wcslib and astropy read) is fitted to all
   cross-matched stars by linear least squares with sigma clipping, re-matching with a
   shrinking radius while the order rises to ``distortion_order`` (4). With too few matched
   stars for that order (``min_stars_per_term``) the order is lowered, and among the orders
   left the one that best predicts left-out stars (leave-one-out cross-validation) is kept:
   a high order fitted to a few stars bends between and beyond them. The solution's
   ``notes`` say what was chosen and why.

Example
-------
>>> import sep
>>> from mstdask.astrometry import pointing_from_header, solve
>>> bkg = sep.Background(data)                                          # doctest: +SKIP
>>> src = sep.extract(data - bkg, 5.0, err=bkg.globalrms)               # doctest: +SKIP
>>> ra0, dec0 = pointing_from_header(header)                            # doctest: +SKIP
>>> sol = solve(src["x"], src["y"], src["flux"], {"ra": ra, "dec": dec, "mag": g},
...             data.shape, ra0, dec0)                                  # doctest: +SKIP
>>> sol.rms_mas, sol.n_matched, sol.wcs.all_pix2world(10, 20, 0)        # doctest: +SKIP
>>> header.update(sol.to_header())                                      # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ._astrometry_kernels import solve_wcs
from ..config import AstrometryConfig
from ..errors import BadInputError

__all__ = [
    "AstrometrySolution",
    "solve",
    "pointing_from_header",
    "pixel_scale_from_header",
    "strip_wcs",
]

Array = np.ndarray

# Pointing keywords, in order of preference: (RA key, Dec key, RA strings are hours).
_POINTING_KEYS = (
    ("RA", "DEC"),
    ("OBJCTRA", "OBJCTDEC"),
    ("RA-MNT", "DEC-MNT"),
    ("TELRA", "TELDEC"),
    ("RA_OBJ", "DEC_OBJ"),
)

# Keywords of a celestial WCS (and of astrometry.net's SIP solutions) removed by strip_wcs.
_WCS_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|CTYPE\d|CUNIT\d|CRVAL\d|CRPIX\d|CDELT\d|CROTA\d|CD\d_\d|PC\d_\d|PV\d_\d+|PS\d_\d+|"
    r"LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|IMAGEW|IMAGEH|"
    r"A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_DMAX|B_DMAX|A_\d+_\d+|B_\d+_\d+|AP_\d+_\d+|BP_\d+_\d+|"
    r"ASTRRMS\d|ASTRNSTR)$")


@dataclass(frozen=True, eq=False)
class AstrometrySolution:
    """The astrometric solution of one frame.

    Attributes
    ----------
    header : astropy.io.fits.Header
        The TPV WCS (``RA---TPV``/``DEC--TPV``, CRPIX 1-based, CD, PV1_k/PV2_k, RADESYS ICRS,
        ASTRRMS1/2, ASTRNSTR). Add it to a frame's header with :meth:`apply_to`.
    order : int
        Polynomial order actually fitted (``distortion_order`` or lower, see ``notes``).
    n_matched : int
        Stars in the final fit (cross-matched and kept by the sigma clipping).
    rms_mas : float
        Rms of the 2-D on-sky residual of those stars, in milliarcseconds (the paper: ~80).
    rms_px : float
        The same in pixels.
    rms_mas_before : float
        The same stars' rms with the best linear (no distortion) solution: the "before" of
        the paper's Figs. 7-8.
    rotation_deg : float
        Position angle of the pixel +y axis, north through east, in [0, 360).
    pixel_scale_arcsec : float
        Pixel scale at the reference pixel (square root of the Jacobian determinant).
    parity : int
        Sign of the Jacobian determinant of (RA, Dec) over (x, y): -1 for the sky as seen
        through a telescope without a mirror (north up, east left), +1 for a mirrored image.
    center_ra, center_dec : float
        Sky position of the frame centre in degrees.
    n_pattern : int
        Sources matched by the blind pattern match.
    search_radius_deg : float
        Radius around the header pointing searched for reference stars.
    shape : (int, int)
        Frame shape ``(ny, nx)`` (the pixel shape of :attr:`wcs`).
    source_index, ref_index : ndarray of int
        Cross-matched pairs: indices into the source arrays and the reference catalogue
        given to :func:`solve`.
    used : ndarray of bool
        Pairs kept by the sigma clipping (the ones in ``n_matched`` and the rms).
    dra_arcsec, ddec_arcsec : ndarray
        Residual (solution minus reference) per pair, ``dRA cos(Dec)`` and ``dDec``.
    dra_before_arcsec, ddec_before_arcsec : ndarray
        The same with the linear solution.
    notes : tuple of str
        What the solver did (pattern match statistics, a lowered order and why).
    """

    header: fits.Header = field(repr=False)
    order: int
    n_matched: int
    rms_mas: float
    rms_px: float
    rms_mas_before: float
    rotation_deg: float
    pixel_scale_arcsec: float
    parity: int
    center_ra: float
    center_dec: float
    n_pattern: int
    search_radius_deg: float
    shape: tuple[int, int]
    source_index: Array = field(repr=False)
    ref_index: Array = field(repr=False)
    used: Array = field(repr=False)
    dra_arcsec: Array = field(repr=False)
    ddec_arcsec: Array = field(repr=False)
    dra_before_arcsec: Array = field(repr=False)
    ddec_before_arcsec: Array = field(repr=False)
    notes: tuple[str, ...] = ()

    @property
    def wcs(self) -> WCS:
        """An :class:`astropy.wcs.WCS` built from :attr:`header` (use origin 0 for numpy pixels)."""
        wcs = WCS(self.header)
        wcs.pixel_shape = (self.shape[1], self.shape[0])
        return wcs

    def to_header(self) -> fits.Header:
        """A copy of the TPV WCS header."""
        return self.header.copy()

    def apply_to(self, header: fits.Header) -> fits.Header:
        """A copy of ``header`` with any earlier WCS (TAN, SIP, ...) replaced by this solution."""
        out = strip_wcs(header)
        out.update(self.header)
        return out

    def pixel_to_world(self, x: Array, y: Array) -> tuple[Array, Array]:
        """RA, Dec in degrees of 0-based pixel positions."""
        ra, dec = self.wcs.all_pix2world(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 0)
        return ra, dec

    @property
    def residual_arcsec(self) -> Array:
        """Cross-matching radius of each pair after the solution (paper Fig. 7, right)."""
        return np.hypot(self.dra_arcsec, self.ddec_arcsec)

    @property
    def residual_before_arcsec(self) -> Array:
        """Cross-matching radius of each pair with the linear solution (Fig. 7, left)."""
        return np.hypot(self.dra_before_arcsec, self.ddec_before_arcsec)

    def summary(self) -> dict[str, Any]:
        """The scalar results as a JSON-ready dict (for manifests and FITS provenance)."""
        return {
            "order": self.order, "n_matched": self.n_matched, "rms_mas": self.rms_mas, "rms_px": self.rms_px,
            "rms_mas_before": self.rms_mas_before, "rotation_deg": self.rotation_deg,
            "pixel_scale_arcsec": self.pixel_scale_arcsec, "parity": self.parity, "center_ra": self.center_ra,
            "center_dec": self.center_dec, "n_pattern": self.n_pattern, "notes": list(self.notes),
        }


def _column(table: Any, name: str) -> Array:
    try:
        values = table[name]
    except (KeyError, ValueError, IndexError, TypeError):
        raise BadInputError(None, f"the reference catalogue has no column {name!r}: give a table or dict with "
                                  "'ra', 'dec' (degrees, ICRS) and 'mag' (in or near the frame's band)") from None
    return np.asarray(values, dtype=float).ravel()


def solve(sources_x: Array, sources_y: Array, flux: Array, refcat: Mapping[str, Array] | Any,
          shape: tuple[int, int], ra0: float, dec0: float,
          config: AstrometryConfig | None = None) -> AstrometrySolution:
    """Blind-solve a frame from its sources, a reference catalogue and the header pointing.

    Parameters
    ----------
    sources_x, sources_y : array_like
        0-based pixel positions of the detected sources (``sep.extract``'s ``x, y``; SExtractor's
        ``X_IMAGE - 1``). Centroids as good as ``sep.winpos`` give the best rms.
    flux : array_like
        Source fluxes: only their order matters (the brightest are pattern matched).
    refcat : table-like
        Reference catalogue with columns ``ra``, ``dec`` (degrees, ICRS, at the epoch of
        the frame) and ``mag``: a dict of arrays, an astropy Table, a pandas DataFrame or a
        structured array. It should cover the pointing plus a margin
        (``search_radius_deg`` of the solution).
    shape : (int, int)
        Frame shape ``(ny, nx)``.
    ra0, dec0 : float
        Header pointing in degrees (see :func:`pointing_from_header`); need not be the frame
        centre.
    config : AstrometryConfig, optional
        Pixel scale and tolerances, distortion order, clipping; default MST values.

    Returns
    -------
    AstrometrySolution

    Raises
    ------
    InsufficientDataError
        Too few sources or reference stars around the pointing, or no pattern match (the
        message says what to check: the header pointing, the pixel scale, the catalogue).
    BadInputError
        The reference catalogue lacks ``ra``, ``dec`` or ``mag``, or the pointing is not a
        sky position.
    """
    cfg = AstrometryConfig() if config is None else config
    if not isinstance(cfg, AstrometryConfig):
        raise TypeError(f"config must be an AstrometryConfig, not {type(cfg).__name__}")
    ra, dec, mag = (_column(refcat, name) for name in ("ra", "dec", "mag"))
    r = solve_wcs(sources_x, sources_y, flux, ra, dec, mag, shape, ra0, dec0, cfg)
    return AstrometrySolution(
        header=r["header"], order=int(r["order"]), n_matched=int(r["n_matched"]), rms_mas=float(r["rms_mas"]),
        rms_px=float(r["rms_px"]), rms_mas_before=float(r["rms_mas_before"]),
        rotation_deg=float(r["rotation_deg"]), pixel_scale_arcsec=float(r["pixel_scale_arcsec"]),
        parity=int(r["parity"]), center_ra=float(r["center"][0]), center_dec=float(r["center"][1]),
        n_pattern=int(r["n_pattern"]), search_radius_deg=float(r["search_radius_deg"]),
        shape=(int(shape[0]), int(shape[1])),
        source_index=r["source_index"], ref_index=r["ref_index"], used=r["used"],
        dra_arcsec=r["dra_arcsec"], ddec_arcsec=r["ddec_arcsec"], dra_before_arcsec=r["dra_before_arcsec"],
        ddec_before_arcsec=r["ddec_before_arcsec"], notes=tuple(r["notes"]))


def _angle(value: object, hours: bool) -> float:
    """Degrees from a header value: numbers are degrees, sexagesimal strings hours (RA) or degrees."""
    if value is None or isinstance(value, bool):
        return math.nan
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    text = str(value).strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        pass
    parts = [p for p in re.split(r"[\s:hdms'\"]+", text) if p]
    try:
        nums = [abs(float(p)) for p in parts[:3]]
    except ValueError:
        return math.nan
    if not nums:
        return math.nan
    sign = -1.0 if text.startswith("-") else 1.0
    deg = nums[0] + (nums[1] / 60.0 if len(nums) > 1 else 0.0) + (nums[2] / 3600.0 if len(nums) > 2 else 0.0)
    return sign * deg * (15.0 if hours else 1.0)


def pointing_from_header(header: fits.Header) -> tuple[float, float]:
    """The telescope pointing (RA, Dec) in degrees from a frame's header.

    Tries, in order, ``RA``/``DEC``, ``OBJCTRA``/``OBJCTDEC``, ``RA-MNT``/``DEC-MNT``,
    ``TELRA``/``TELDEC``, ``RA_OBJ``/``DEC_OBJ``, and last ``CRVAL1``/``CRVAL2`` of a celestial
    WCS. Numbers are degrees; sexagesimal strings (``'04 20 00.0'``, ``'-54:56:17'``) are hours
    for RA and degrees for Dec.

    Parameters
    ----------
    header : astropy.io.fits.Header
        The frame's header.

    Returns
    -------
    (float, float)
        RA in [0, 360) and Dec, degrees.

    Raises
    ------
    BadInputError
        No usable pair of keywords.
    """
    for ra_key, dec_key in _POINTING_KEYS:
        if ra_key in header and dec_key in header:
            ra, dec = _angle(header[ra_key], hours=True), _angle(header[dec_key], hours=False)
            if math.isfinite(ra) and math.isfinite(dec) and -90.0 <= dec <= 90.0:
                return ra % 360.0, dec
    ctype = str(header.get("CTYPE1", "")).upper()
    if "CRVAL1" in header and "CRVAL2" in header and ctype.startswith("RA"):
        ra, dec = _angle(header["CRVAL1"], hours=False), _angle(header["CRVAL2"], hours=False)
        if math.isfinite(ra) and math.isfinite(dec) and -90.0 <= dec <= 90.0:
            return ra % 360.0, dec
    keys = ", ".join(f"{a}/{b}" for a, b in _POINTING_KEYS)
    raise BadInputError("header", f"no telescope pointing: none of {keys} or a celestial CRVAL1/CRVAL2 holds a "
                                  "valid position; add RA and DEC (degrees) to the header or give the pointing")


def pixel_scale_from_header(header: fits.Header) -> float | None:
    """The pixel scale in arcsec/px a header implies, or None.

    ``PIXSCALE``/``SECPIX``/``SCALE`` when present, else ``XPIXSZ`` (micrometres, times
    ``XBINNING``) over ``FOCALLEN`` (millimetres).
    """
    for key in ("PIXSCALE", "SECPIX", "SCALE"):
        value = _angle(header.get(key), hours=False)
        if math.isfinite(value) and value > 0:
            return value
    size = _angle(header.get("XPIXSZ"), hours=False)
    focal = _angle(header.get("FOCALLEN"), hours=False)
    binning = _angle(header.get("XBINNING", 1), hours=False)
    if all(math.isfinite(v) and v > 0 for v in (size, focal, binning)):
        return 206.264806 * size * binning / focal
    return None


def strip_wcs(header: fits.Header) -> fits.Header:
    """A copy of ``header`` without celestial WCS keywords (TAN, SIP, TPV, astrometry.net's)."""
    out = header.copy()
    for key in [k for k in out.keys() if _WCS_KEY.match(k)]:
        while key in out:
            del out[key]
    return out
