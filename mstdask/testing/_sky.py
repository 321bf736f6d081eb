"""The sky side of the simulator: photometric zero points, star catalogues, PSF stamps,
TAN-SIP WCS, airmass, satellite tracks and cosmic rays.

Numbers follow the MST imaging pipeline paper (Xiao et al. 2025, papers/000): 30 cm
aperture, 0.862"/px, seeing ~2", the SNR model of its Eqs. 1-5 (used here for zero
points and sky levels), fourth-order astrometric distortion (Sect. 3.2.1) and satellite
tracks as straight lines (Sect. 3.1.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS, Sip

__all__ = [
    "BANDPASSES",
    "Bandpass",
    "SatelliteTrack",
    "airmass_at",
    "columns_of",
    "cosmic_ray_hits",
    "make_star_catalog",
    "make_wcs",
    "random_track",
    "render_stars",
    "sip_coefficients",
    "zenith_radec",
    "zero_point_e",
]

_H_CGS = 6.62607015e-27  # erg s
_C_CGS = 2.99792458e10  # cm / s


def zero_point_e(wavelength_aa: float, bandwidth_aa: float, efficiency: float,
                 diameter_cm: float = 30.0) -> float:
    """AB zero point in photo-electrons per second from the MST SNR model.

    Implements Eqs. 4-5 of Xiao et al. 2025 (papers/000 Sect. 4.3):
    ``N = eta * pi (D/2)^2 * F_nu * t / (h nu) * c / lambda^2 * dlambda`` with
    ``F_nu = 10**(-(m + 48.6) / 2.5)``.

    Parameters
    ----------
    wavelength_aa, bandwidth_aa : float
        Central wavelength and width of the band in Angstrom.
    efficiency : float
        Total throughput eta (optics x QE x filter x atmosphere at zenith).
    diameter_cm : float
        Telescope aperture.

    Returns
    -------
    float
        ``zp`` such that a star of AB magnitude ``m`` gives ``10**(-0.4 (m - zp))`` e-/s.
    """
    lam = wavelength_aa * 1e-8
    dlam = bandwidth_aa * 1e-8
    area = math.pi * (diameter_cm / 2.0) ** 2
    f0 = 10.0 ** (-48.6 / 2.5)  # erg/s/cm^2/Hz at m = 0
    rate0 = efficiency * area * f0 / (_H_CGS * _C_CGS / lam) * _C_CGS / lam**2 * dlam
    return 2.5 * math.log10(rate0)


@dataclass(frozen=True)
class Bandpass:
    """One MST filter.

    Attributes
    ----------
    wavelength_aa, bandwidth_aa : float
        Centre and FWHM (Xiao et al. 2025, Sect. 2.2; G band from Sect. 4.3).
    efficiency : float
        Total throughput; 0.32 is the paper's G-band value, the others are assumptions
        (lower in i for the falling QE).
    sky_mag : float
        Dark-sky surface brightness at Xinglong in mag/arcsec^2 (paper: 21 in G; others
        assumed).
    extinction : float
        Extinction coefficient in mag/airmass (typical Xinglong values; assumed).
    """

    wavelength_aa: float
    bandwidth_aa: float
    efficiency: float
    sky_mag: float
    extinction: float

    @property
    def zero_point(self) -> float:
        """Zenith zero point in e-/s for the 30 cm MST aperture, see :func:`zero_point_e`."""
        return zero_point_e(self.wavelength_aa, self.bandwidth_aa, self.efficiency)


#: MST filters (MST1 i, MST2 g, MST3 r; early G/R test filters too).
BANDPASSES: dict[str, Bandpass] = {
    "g": Bandpass(4800.0, 1200.0, 0.32, 21.2, 0.20),
    "G": Bandpass(5400.0, 900.0, 0.32, 21.0, 0.18),
    "r": Bandpass(6200.0, 1500.0, 0.32, 20.6, 0.12),
    "R": Bandpass(6500.0, 800.0, 0.32, 20.5, 0.11),
    "i": Bandpass(7700.0, 1300.0, 0.22, 19.9, 0.08),
}

# Colour offsets relative to g as functions of (g-r, r-i); crude but smooth stellar locus.
_COLOUR_TERMS = {
    "g": (0.0, 0.0),
    "G": (-0.45, 0.0),
    "r": (-1.0, 0.0),
    "R": (-1.0, -0.25),
    "i": (-1.0, -1.0),
}


def make_star_catalog(
    ra0: float,
    dec0: float,
    width_deg: float,
    height_deg: float,
    *,
    density_per_deg2: float = 10000.0,
    mag_range: tuple[float, float] = (10.0, 20.0),
    slope: float = 0.3,
    filters: tuple[str, ...] = ("g",),
    rng: np.random.Generator | int | None = None,
) -> Table:
    """Random stars uniform on the tangent plane with a power-law number-magnitude law.

    Parameters
    ----------
    ra0, dec0 : float
        Field centre in degrees.
    width_deg, height_deg : float
        Extent along RA (on the sky, not in RA degrees) and Dec.
    density_per_deg2 : float
        Mean number of stars per square degree between the magnitude limits.
    mag_range : (float, float)
        Bright and faint limits of ``mag``.
    slope : float
        ``dN/dm ~ 10**(slope * m)`` (0.3 is typical at intermediate latitudes).
    filters : tuple of str
        Bands to give magnitudes in; ``mag`` is the first, and every band also gets a
        ``mag_<band>`` column, related by a random colour (g-r ~ N(0.55, 0.25)).
    rng : Generator, int or None
        Random generator or seed.

    Returns
    -------
    astropy.table.Table
        Columns ``ra, dec, mag`` (+ ``mag_<band>``), sorted by magnitude, brightest first.
    """
    rng = np.random.default_rng(rng)
    if width_deg <= 0 or height_deg <= 0:
        raise ValueError("width_deg and height_deg must be positive")
    m1, m2 = map(float, mag_range)
    if not m1 < m2:
        raise ValueError(f"mag_range={mag_range} must be (bright, faint) with bright < faint")
    for band in filters:
        if band not in _COLOUR_TERMS:
            raise ValueError(f"unknown filter {band!r}; known: {sorted(_COLOUR_TERMS)}")
    n = int(rng.poisson(density_per_deg2 * width_deg * height_deg))
    xi = np.deg2rad((rng.random(n) - 0.5) * width_deg)
    eta = np.deg2rad((rng.random(n) - 0.5) * height_deg)
    ra, dec = _tan_deproject(xi, eta, ra0, dec0)
    u = rng.random(n)
    if slope == 0:
        mag = m1 + u * (m2 - m1)
    else:  # inverse CDF of dN/dm ~ 10**(slope m)
        a, b = 10.0 ** (slope * m1), 10.0 ** (slope * m2)
        mag = np.log10(a + u * (b - a)) / slope
    gr = np.clip(rng.normal(0.55, 0.25, n), -0.3, 1.8)
    ri = 0.35 * gr + 0.05 + rng.normal(0.0, 0.05, n)
    first = filters[0] if filters else "g"
    cg, ci = _COLOUR_TERMS[first]
    mag_g = mag - (cg * gr + ci * ri)
    order = np.argsort(mag, kind="stable")
    table = Table({"ra": ra[order], "dec": dec[order], "mag": mag[order]})
    for band in filters:
        cg, ci = _COLOUR_TERMS[band]
        table[f"mag_{band}"] = (mag_g + cg * gr + ci * ri)[order]
    table.meta["center"] = (float(ra0), float(dec0))
    return table


def _tan_deproject(xi: np.ndarray, eta: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic deprojection of standard coordinates (radians) to RA/Dec (degrees)."""
    d0 = np.deg2rad(dec0)
    den = np.cos(d0) - eta * np.sin(d0)
    ra = np.rad2deg(np.arctan2(xi, den)) + ra0
    dec = np.rad2deg(np.arctan2(np.sin(d0) + eta * np.cos(d0), np.hypot(xi, den)))
    return np.mod(ra, 360.0), dec


def sip_coefficients(shape: tuple[int, int], corner_px: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fourth-order SIP polynomials: a radial (pincushion) cubic plus small 2nd/4th-order terms.

    The cubic is ``dx = k u r^2, dy = k v r^2`` with ``k`` chosen so the frame corner moves
    by ``corner_px``; random 2nd- and 4th-order terms add ~10 % of that, as a real optical
    system fitted by SCAMP (papers/000 Sect. 3.2.1) would show.
    """
    ny, nx = shape
    rc = math.hypot(nx / 2.0, ny / 2.0)
    a = np.zeros((5, 5))
    b = np.zeros((5, 5))
    k = corner_px / rc**3
    a[3, 0] = a[1, 2] = k
    b[2, 1] = b[0, 3] = k
    small = 0.1 * corner_px
    for p, q in ((2, 0), (1, 1), (0, 2)):
        a[p, q] = rng.normal(0.0, small / rc**2)
        b[p, q] = rng.normal(0.0, small / rc**2)
    for p, q in ((4, 0), (3, 1), (2, 2), (1, 3), (0, 4)):
        a[p, q] = rng.normal(0.0, small / rc**4)
        b[p, q] = rng.normal(0.0, small / rc**4)
    return a, b


def make_wcs(shape: tuple[int, int], ra: float, dec: float, pixel_scale_arcsec: float,
             rotation_deg: float = 0.0, sip: tuple[np.ndarray, np.ndarray] | None = None) -> WCS:
    """A TAN (or TAN-SIP) WCS centred on the frame.

    Parameters
    ----------
    shape : (int, int)
        ``(ny, nx)``.
    ra, dec : float
        Sky position of the frame centre (CRVAL) in degrees.
    pixel_scale_arcsec : float
        Pixel scale.
    rotation_deg : float
        Position angle of the detector y axis east of north.
    sip : (ndarray, ndarray), optional
        SIP ``A`` and ``B`` matrices (order 4); no inverse is stored, astropy inverts
        iteratively in ``all_world2pix``.

    Returns
    -------
    astropy.wcs.WCS
    """
    ny, nx = shape
    s = pixel_scale_arcsec / 3600.0
    t = math.radians(rotation_deg)
    w = WCS(naxis=2)
    w.wcs.crpix = [nx / 2.0 + 0.5, ny / 2.0 + 0.5]
    w.wcs.crval = [float(ra) % 360.0, float(dec)]
    # East left, north up for rotation 0 (determinant < 0, as on the sky).
    w.wcs.cd = s * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    if sip is not None:
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.sip = Sip(sip[0], sip[1], None, None, w.wcs.crpix)
    else:
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.pixel_shape = (nx, ny)
    w.wcs.set()
    return w


def _gmst_deg(when_utc: datetime) -> float:
    """Greenwich mean sidereal time (IAU 1982 linear form; < 0.1 s error, offline)."""
    jd = 2440587.5 + (when_utc - datetime(1970, 1, 1)).total_seconds() / 86400.0
    return (280.46061837 + 360.98564736629 * (jd - 2451545.0)) % 360.0


def zenith_radec(when_utc: datetime, lat: float, lon: float) -> tuple[float, float]:
    """RA/Dec (degrees) of the zenith: where a parked telescope or a twilight flat points."""
    return (_gmst_deg(when_utc) + lon) % 360.0, lat


def airmass_at(ra: float, dec: float, when_utc: datetime, lat: float, lon: float) -> tuple[float, float]:
    """Altitude (degrees) and airmass of a sky position at a time.

    Uses the Hardie (1962) polynomial in ``sec z``; altitudes below 5 degrees are clamped.
    """
    ha = math.radians((_gmst_deg(when_utc) + lon - ra) % 360.0)
    phi, d = math.radians(lat), math.radians(dec)
    sin_alt = math.sin(phi) * math.sin(d) + math.cos(phi) * math.cos(d) * math.cos(ha)
    alt = math.degrees(math.asin(max(-1.0, min(1.0, sin_alt))))
    sec_z = 1.0 / max(math.sin(math.radians(max(alt, 5.0))), 1e-3)
    x = sec_z - 1.0
    airmass = sec_z - 0.0018167 * x - 0.002875 * x**2 - 0.0008083 * x**3
    return alt, airmass


# ---------------------------------------------------------------------------------------
# PSF stamps
# ---------------------------------------------------------------------------------------

def _stamp_halfsize(flux_e: np.ndarray, fwhm: np.ndarray) -> np.ndarray:
    """Half-size of the stamp that keeps the truncated wing below ~1 e- per pixel.

    For a Moffat with beta ~ 3 the pixel value at radius R is about
    ``0.12 flux (1 + (R/alpha)^2)^-3``, hence ``R/alpha = sqrt((flux/8)^(1/3) - 1)``.
    """
    level = np.cbrt(np.maximum(flux_e, 1.0) / 8.0)
    r_alpha = np.sqrt(np.maximum(level - 1.0, 0.0))
    h = np.ceil(np.maximum(r_alpha * fwhm, 3.0 * fwhm))
    # Quantise so that stars fall in few groups evaluated together.
    steps = np.array([4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128])
    return steps[np.minimum(np.searchsorted(steps, h), steps.size - 1)]


def render_stars(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux_e: np.ndarray,
    fwhm: np.ndarray,
    ellipticity: np.ndarray,
    angle: np.ndarray,
    *,
    psf: str = "moffat",
    beta: float = 3.0,
    weight: np.ndarray | tuple[np.ndarray, ...] | None = None,
    oversample: int = 2,
) -> dict[str, np.ndarray]:
    """Add PSF stamps of stars to ``image`` in place (no full-frame PSF evaluation).

    Each stamp is the PSF integrated over pixels (``oversample`` x ``oversample`` points
    per pixel) and normalised to sum 1 inside the stamp, so the injected total is exact.

    Parameters
    ----------
    image : ndarray, float32, (ny, nx)
        Photo-electrons before the pixel response; modified in place.
    x, y : ndarray
        Star centres in 0-based pixel coordinates (pixel centres at integers).
    flux_e : ndarray
        Total electrons per star.
    fwhm : ndarray
        Geometric-mean FWHM in pixels per star.
    ellipticity, angle : ndarray
        ``1 - b/a`` and the major-axis angle (radians from +x) per star.
    psf : {'moffat', 'gaussian'}
        Profile.
    beta : float
        Moffat index.
    weight : ndarray or tuple of ndarray, (ny, nx), optional
        Per-pixel factor(s) from electrons to ADU (e.g. ``(response, 1 / gain)``; a tuple
        is multiplied out only inside the stamps); when given the expected ADU total and
        peak of each star are returned.
    oversample : int
        Sub-pixel sampling per axis.

    Returns
    -------
    dict
        ``flux_in_frame_e`` (electrons that landed on the frame) and, with ``weight``,
        ``flux_adu`` and ``peak_adu`` (expected, noise-free, before nonlinearity).
    """
    if psf not in ("moffat", "gaussian"):
        raise ValueError(f"psf={psf!r}; choose 'moffat' or 'gaussian'")
    ny, nx = image.shape
    n = x.size
    out_in = np.zeros(n)
    out_adu = np.zeros(n)
    out_peak = np.zeros(n)
    if n == 0:
        return {"flux_in_frame_e": out_in, "flux_adu": out_adu, "peak_adu": out_peak}
    weights = () if weight is None else (tuple(weight) if isinstance(weight, (tuple, list)) else (weight,))
    half = _stamp_halfsize(flux_e, fwhm)
    sub = ((np.arange(oversample) + 0.5) / oversample - 0.5).astype(np.float32)
    if psf == "moffat":
        scale = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))  # alpha
    else:
        scale = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))  # sigma
    q = np.sqrt(np.clip(1.0 - ellipticity, 0.05, 1.0))
    a2 = (scale / q) ** 2  # major axis^2
    b2 = (scale * q) ** 2
    c, s = np.cos(angle), np.sin(angle)
    qa = c**2 / a2 + s**2 / b2
    qb = c * s * (1.0 / a2 - 1.0 / b2)
    qc = s**2 / a2 + c**2 / b2
    cx = np.rint(x).astype(np.int64)
    cy = np.rint(y).astype(np.int64)
    for h in np.unique(half):
        members = np.flatnonzero(half == h)
        size = 2 * int(h) + 1
        grid = (np.arange(size, dtype=np.float32) - h)[:, None] + sub[None, :]  # (size, os)
        grid = grid.reshape(-1)
        chunk = max(1, int(4_000_000 // (grid.size**2)))
        for start in range(0, members.size, chunk):
            idx = members[start:start + chunk]
            dx = (cx[idx] - x[idx]).astype(np.float32)[:, None] + grid[None, :]  # (m, size*os)
            dy = (cy[idx] - y[idx]).astype(np.float32)[:, None] + grid[None, :]
            r2 = (qa[idx].astype(np.float32)[:, None, None] * dx[:, None, :] ** 2
                  + (2.0 * qb[idx]).astype(np.float32)[:, None, None] * dy[:, :, None] * dx[:, None, :]
                  + qc[idx].astype(np.float32)[:, None, None] * dy[:, :, None] ** 2)
            if psf == "moffat":
                prof = np.power(1.0 + r2, np.float32(-beta))
            else:
                prof = np.exp(-0.5 * r2)
            prof = prof.reshape(idx.size, size, oversample, size, oversample).sum(axis=(2, 4))
            prof /= prof.sum(axis=(1, 2), keepdims=True)
            prof *= flux_e[idx].astype(np.float32)[:, None, None]
            for k, j in enumerate(idx):
                y0, x0 = int(cy[j] - h), int(cx[j] - h)
                ya, yb = max(y0, 0), min(y0 + size, ny)
                xa, xb = max(x0, 0), min(x0 + size, nx)
                if ya >= yb or xa >= xb:
                    continue
                st = prof[k, ya - y0:yb - y0, xa - x0:xb - x0]
                image[ya:yb, xa:xb] += st
                out_in[j] = float(st.sum())
                if weights:
                    wst = st * weights[0][ya:yb, xa:xb]
                    for extra in weights[1:]:
                        wst *= extra[ya:yb, xa:xb]
                    out_adu[j] = float(wst.sum())
                    out_peak[j] = float(wst.max())
    return {"flux_in_frame_e": out_in, "flux_adu": out_adu, "peak_adu": out_peak}


# ---------------------------------------------------------------------------------------
# Satellite tracks
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SatelliteTrack:
    """A straight satellite/aircraft trail (Xiao et al. 2025, Sect. 3.1.4).

    Attributes
    ----------
    x0, y0, x1, y1 : float
        End points in 0-based pixel coordinates (``x`` along NAXIS1); tracks crossing the
        frame have them on the frame edges.
    width : float
        FWHM of the Gaussian cross-track profile in pixels (3-6 typical).
    amplitude_sigma : float
        Peak surface brightness in units of the sky noise at the frame centre.
    amplitude_e : float
        The same peak in photo-electrons per pixel per exposure (before vignetting and
        pixel response); filled in by the camera when the track is drawn.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    width: float = 4.0
    amplitude_sigma: float = 10.0
    amplitude_e: float = float("nan")

    def __post_init__(self) -> None:
        if math.hypot(self.x1 - self.x0, self.y1 - self.y0) < 1.0:
            raise ValueError("a track needs end points at least 1 px apart")
        if not self.width > 0:
            raise ValueError(f"track width={self.width} must be positive")

    @property
    def angle_deg(self) -> float:
        """Direction of the track, degrees from +x towards +y, in [0, 180)."""
        return math.degrees(math.atan2(self.y1 - self.y0, self.x1 - self.x0)) % 180.0

    def pixels(self, shape: tuple[int, int], extent: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixels within ``extent * width`` of the track segment and their distances.

        Returns
        -------
        iy, ix : ndarray of int
            Pixel indices (each pixel at most once).
        dist : ndarray of float32
            Perpendicular distance of the pixel centre from the centre line.
        """
        ny, nx = shape
        dx, dy = self.x1 - self.x0, self.y1 - self.y0
        length = math.hypot(dx, dy)
        if abs(dx) >= abs(dy):  # walk along x, one column at a time
            major, minor_n, slope = (self.x0, self.x1), ny, dy / dx
            cos_t = abs(dx) / length
            start, n_major, origin_minor = self.x0, nx, self.y0
        else:
            major, minor_n, slope = (self.y0, self.y1), nx, dx / dy
            cos_t = abs(dy) / length
            start, n_major, origin_minor = self.y0, ny, self.x0
        lo = max(math.ceil(min(major)), 0)
        hi = min(math.floor(max(major)), n_major - 1)
        if hi < lo:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0, dtype=np.float32)
        along = np.arange(lo, hi + 1)
        centre = origin_minor + (along - start) * slope
        reach = int(math.ceil(extent * self.width / cos_t)) + 1
        offs = np.arange(-reach, reach + 1)
        across = np.rint(centre).astype(np.int64)[:, None] + offs[None, :]
        dist = (np.abs(across - centre[:, None]) * cos_t).astype(np.float32)
        along2 = np.broadcast_to(along[:, None], across.shape)
        keep = (across >= 0) & (across < minor_n) & (dist <= extent * self.width)
        a, c, d = along2[keep], across[keep], dist[keep]
        if abs(dx) >= abs(dy):
            return c, a, d
        return a, c, d

    def profile(self, dist: np.ndarray) -> np.ndarray:
        """Relative cross-track profile (1 on the centre line)."""
        return np.exp(-4.0 * math.log(2.0) * (dist / self.width) ** 2)

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Truth mask: pixels within one FWHM of the centre line (profile >= 1/16 of peak)."""
        m = np.zeros(shape, dtype=bool)
        iy, ix, d = self.pixels(shape, extent=1.0)
        m[iy, ix] = True
        return m


def random_track(shape: tuple[int, int], rng: np.random.Generator, *,
                 width_range: tuple[float, float] = (3.0, 6.0),
                 amplitude_range: tuple[float, float] = (5.0, 40.0)) -> SatelliteTrack:
    """A track entering and leaving the frame through two different edges.

    The amplitude (in sky-noise sigma) is drawn log-uniformly in ``amplitude_range``.
    """
    ny, nx = shape

    def edge_point(edge: int) -> tuple[float, float]:
        t = rng.uniform(0.05, 0.95)
        return [(t * (nx - 1), -0.5), (t * (nx - 1), ny - 0.5), (-0.5, t * (ny - 1)),
                (nx - 0.5, t * (ny - 1))][edge]

    e0 = int(rng.integers(4))
    e1 = int((e0 + rng.integers(1, 4)) % 4)
    (x0, y0), (x1, y1) = edge_point(e0), edge_point(e1)
    width = float(rng.uniform(*width_range))
    amp = float(np.exp(rng.uniform(np.log(amplitude_range[0]), np.log(amplitude_range[1]))))
    return SatelliteTrack(x0, y0, x1, y1, width, amp)


# ---------------------------------------------------------------------------------------
# Cosmic rays
# ---------------------------------------------------------------------------------------

_NEIGHBOURS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])


def cosmic_ray_hits(shape: tuple[int, int], n: int, rng: np.random.Generator,
                    worm_fraction: float = 0.4) -> tuple[np.ndarray, np.ndarray, Table]:
    """Cosmic-ray deposits: sharp 1-3 px hits and short straight worms.

    Parameters
    ----------
    shape : (int, int)
        Frame shape.
    n : int
        Number of events.
    rng : Generator
        Random generator.
    worm_fraction : float
        Fraction of events that are worms (3-15 px long, grazing muons).

    Returns
    -------
    flat_index : ndarray of int64
        Hit pixels (a pixel hit by two events appears twice).
    electrons : ndarray of float32
        Deposit per entry.
    events : astropy.table.Table
        One row per event: ``x, y, kind, length, angle_deg, npix, electrons``.
    """
    ny, nx = shape
    n_worm = int(rng.binomial(n, worm_fraction)) if n else 0
    n_spot = n - n_worm
    idx_parts, e_parts = [], []
    xs = rng.uniform(-0.5, nx - 0.5, n)
    ys = rng.uniform(-0.5, ny - 0.5, n)
    kinds = np.array(["spot"] * n_spot + ["worm"] * n_worm, dtype="U4")
    lengths = np.zeros(n)
    angles = np.zeros(n)
    npix = np.zeros(n, dtype=np.int64)
    energy = np.zeros(n)
    if n_spot:
        # Sharp hits: a bright pixel plus 0-2 fainter neighbours (charge sharing).
        cx = np.rint(xs[:n_spot]).astype(np.int64)
        cy = np.rint(ys[:n_spot]).astype(np.int64)
        e0 = rng.lognormal(np.log(800.0), 0.6, n_spot)
        extra = rng.integers(0, 3, n_spot)
        d1 = rng.integers(0, 8, n_spot)
        d2 = (d1 + rng.integers(1, 8, n_spot)) % 8
        frac = rng.uniform(0.1, 0.5, (n_spot, 2))
        py = [cy, cy + _NEIGHBOURS[d1, 0], cy + _NEIGHBOURS[d2, 0]]
        px = [cx, cx + _NEIGHBOURS[d1, 1], cx + _NEIGHBOURS[d2, 1]]
        pe = [e0, e0 * frac[:, 0], e0 * frac[:, 1]]
        use = [np.ones(n_spot, bool), extra >= 1, extra >= 2]
        ev = np.arange(n_spot)
        for yy, xx, ee, uu in zip(py, px, pe, use):
            ok = uu & (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            idx_parts.append(yy[ok] * nx + xx[ok])
            e_parts.append(ee[ok])
            np.add.at(npix, ev[ok], 1)
            np.add.at(energy, ev[ok], ee[ok])
    if n_worm:
        sl = slice(n_spot, n)
        length = rng.uniform(3.0, 15.0, n_worm)
        ang = rng.uniform(0.0, np.pi, n_worm)
        lengths[sl], angles[sl] = length, np.degrees(ang)
        steps = np.ceil(2.0 * length).astype(np.int64) + 1  # 0.5 px sampling
        ev = np.repeat(np.arange(n_worm), steps)
        first = np.cumsum(steps) - steps
        t = (np.arange(ev.size) - first[ev]) / (steps[ev] - 1) - 0.5  # -0.5..0.5
        px = np.rint(xs[sl][ev] + t * length[ev] * np.cos(ang[ev])).astype(np.int64)
        py = np.rint(ys[sl][ev] + t * length[ev] * np.sin(ang[ev])).astype(np.int64)
        ok = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
        key = np.unique(ev[ok] * (ny * nx) + py[ok] * nx + px[ok])  # each pixel once per worm
        wev, wpix = np.divmod(key, ny * nx)
        we = rng.lognormal(np.log(500.0), 0.5, wpix.size)
        idx_parts.append(wpix)
        e_parts.append(we)
        np.add.at(npix, n_spot + wev, 1)
        np.add.at(energy, n_spot + wev, we)
    flat = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
    elec = np.concatenate(e_parts).astype(np.float32) if e_parts else np.zeros(0, np.float32)
    events = Table({"x": xs, "y": ys, "kind": kinds, "length": lengths, "angle_deg": angles,
                    "npix": npix, "electrons": energy})
    return flat.astype(np.int64), elec, events


def columns_of(stars: Any) -> dict[str, np.ndarray]:
    """Columns of a star list given as astropy Table, dict, structured array or DataFrame."""
    if stars is None:
        return {}
    if isinstance(stars, Table):
        names = stars.colnames
    elif isinstance(stars, np.ndarray) and stars.dtype.names:
        names = list(stars.dtype.names)
    elif isinstance(stars, Mapping):
        names = list(stars.keys())
    elif hasattr(stars, "columns"):
        names = list(stars.columns)
    else:
        raise TypeError(f"stars must be a table-like object with named columns, not {type(stars).__name__}")
    return {str(k): np.asarray(stars[k]) for k in names}
