"""Astrometry kernels of the STATIC step: blind pattern match and TPV distortion fit.

Pure NumPy/SciPy/astropy (``astropy.io.fits`` headers only); nothing here knows about Dask.
The public face is :mod:`mstdask.astrometry`; the cross-match and the pattern match
are in :mod:`mstdask.static._match_kernels`.

Conventions
-----------
* Pixel positions are 0-based (numpy / SExtractor ``X_IMAGE - 1``); FITS ``CRPIX`` is 1-based.
* Standard coordinates ``xi, eta`` are gnomonic (TAN) tangent-plane coordinates in degrees
  about ``(ra0, dec0)``: ``xi`` grows to the east, ``eta`` to the north, as the intermediate
  world coordinates of a TAN/TPV WCS with ``LONPOLE = 180``.
* The TPV model (the distortion convention of SCAMP/SWarp/SExtractor, read by wcslib and
  astropy): ``(u, v) = CD . (pixel - crpix)`` in degrees, then
  ``xi = sum_k PV1_k T_k(u, v)`` and ``eta = sum_k PV2_k T_k(v, u)`` with the TPV term order
  ``1, x, y, r, x^2, xy, y^2, x^3, x^2y, xy^2, y^3, r^3, x^4, ...`` (radial terms unused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from ..errors import BadInputError, InsufficientDataError
# Matching lives in its own module; its names stay importable here.
from ._match_kernels import PatternMatch, crossmatch, match_pattern  # noqa: F401

__all__ = [
    "gnomonic",
    "gnomonic_inverse",
    "angular_distance",
    "tpv_terms",
    "TpvModel",
    "fit_tpv",
    "tpv_header",
    "crossmatch",
    "loo_rms",
    "PatternMatch",
    "match_pattern",
    "solve_wcs",
]

Array = np.ndarray


# ---------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------

def gnomonic(ra: Array, dec: Array, ra0: float, dec0: float) -> tuple[Array, Array]:
    """Gnomonic (TAN) projection about ``(ra0, dec0)``.

    Parameters
    ----------
    ra, dec : array_like
        Sky positions in degrees.
    ra0, dec0 : float
        Tangent point in degrees.

    Returns
    -------
    xi, eta : ndarray
        Standard coordinates in degrees (east, north). Points 90 degrees or more from the
        tangent point have no projection and come back as NaN.
    """
    ra = np.radians(np.asarray(ra, dtype=float))
    dec = np.radians(np.asarray(dec, dtype=float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    dra = ra - a0
    cos_dec = np.cos(dec)
    sin_dec = np.sin(dec)
    cos_dra = np.cos(dra)
    cosc = math.sin(d0) * sin_dec + math.cos(d0) * cos_dec * cos_dra
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(cosc > 0, 1.0 / cosc, np.nan)
        xi = cos_dec * np.sin(dra) * inv
        eta = (math.cos(d0) * sin_dec - math.sin(d0) * cos_dec * cos_dra) * inv
    return np.degrees(xi), np.degrees(eta)


def gnomonic_inverse(xi: Array, eta: Array, ra0: float, dec0: float) -> tuple[Array, Array]:
    """Sky positions (degrees, RA in [0, 360)) of standard coordinates ``xi, eta`` (degrees)."""
    x = np.radians(np.asarray(xi, dtype=float))
    y = np.radians(np.asarray(eta, dtype=float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    denom = math.cos(d0) - y * math.sin(d0)
    ra = a0 + np.arctan2(x, denom)
    dec = np.arctan2(math.sin(d0) + y * math.cos(d0), np.hypot(x, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def angular_distance(ra: Array, dec: Array, ra0: float, dec0: float) -> Array:
    """Great-circle distance in degrees from ``(ra0, dec0)`` (haversine, exact at small angles)."""
    ra = np.radians(np.asarray(ra, dtype=float))
    dec = np.radians(np.asarray(dec, dtype=float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    h = np.sin((dec - d0) / 2) ** 2 + np.cos(dec) * math.cos(d0) * np.sin((ra - a0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


# ---------------------------------------------------------------------------------------
# TPV polynomial
# ---------------------------------------------------------------------------------------

def tpv_terms(order: int) -> list[tuple[int, int, int]]:
    """The non-radial TPV terms up to ``order``: ``(k, i, j)`` for ``PV?_k`` times ``x^i y^j``.

    >>> [k for k, _, _ in tpv_terms(2)]
    [0, 1, 2, 4, 5, 6]
    """
    if not 0 <= order <= 7:
        raise ValueError(f"TPV order {order} outside 0..7")
    terms = []
    k = 0
    for n in range(order + 1):
        for j in range(n + 1):
            terms.append((k, n - j, j))
            k += 1
        if n % 2 == 1:
            k += 1  # the radial term r^n, left at 0
    return terms


def n_tpv_terms(order: int) -> int:
    """Coefficients per axis of a complete polynomial of ``order`` (no radial terms)."""
    return (order + 1) * (order + 2) // 2


def _design(a: Array, b: Array, terms: list[tuple[int, int, int]]) -> Array:
    """Columns ``a^i b^j`` of the TPV terms (powers built once, by multiplication)."""
    order = max(i + j for _, i, j in terms)
    pa = np.empty((order + 1, a.size))
    pb = np.empty((order + 1, b.size))
    pa[0] = pb[0] = 1.0
    for n in range(1, order + 1):
        np.multiply(pa[n - 1], a, out=pa[n])
        np.multiply(pb[n - 1], b, out=pb[n])
    out = np.empty((a.size, len(terms)))
    for col, (_, i, j) in enumerate(terms):
        np.multiply(pa[i], pb[j], out=out[:, col])
    return out


@dataclass(frozen=True)
class TpvModel:
    """A TAN projection with TPV polynomial distortion.

    Attributes
    ----------
    crval : (float, float)
        Tangent point (RA, Dec) in degrees.
    crpix : (float, float)
        Reference pixel, **0-based** (FITS CRPIX minus one).
    cd : ndarray (2, 2)
        CD matrix in degrees per pixel.
    pv1, pv2 : ndarray
        TPV coefficients indexed by ``k`` (``PV1_k``, ``PV2_k``); zero where unused.
    order : int
        Polynomial order.
    """

    crval: tuple[float, float]
    crpix: tuple[float, float]
    cd: Array
    pv1: Array
    pv2: Array
    order: int

    def intermediate(self, x: Array, y: Array) -> tuple[Array, Array]:
        """``(u, v) = CD . (pixel - crpix)`` in degrees."""
        dx = np.asarray(x, dtype=float) - self.crpix[0]
        dy = np.asarray(y, dtype=float) - self.crpix[1]
        return self.cd[0, 0] * dx + self.cd[0, 1] * dy, self.cd[1, 0] * dx + self.cd[1, 1] * dy

    def standard(self, x: Array, y: Array) -> tuple[Array, Array]:
        """Standard coordinates ``xi, eta`` (degrees about ``crval``) of pixel positions."""
        u, v = self.intermediate(x, y)
        terms = tpv_terms(self.order)
        ks = [k for k, _, _ in terms]
        xi = _design(u, v, terms) @ self.pv1[ks]
        eta = _design(v, u, terms) @ self.pv2[ks]
        return xi, eta

    def sky(self, x: Array, y: Array) -> tuple[Array, Array]:
        """RA, Dec in degrees of 0-based pixel positions."""
        xi, eta = self.standard(x, y)
        return gnomonic_inverse(xi, eta, *self.crval)

    def jacobian(self) -> Array:
        """The linear part at ``crpix``: d(xi, eta)/d(x, y) in degrees per pixel."""
        m = np.array([[self.pv1[1], self.pv1[2]], [self.pv2[2], self.pv2[1]]])
        return m @ self.cd

    def header(self) -> fits.Header:
        """The TPV header of this model (see :func:`tpv_header`)."""
        return tpv_header(self)


def fit_tpv(x: Array, y: Array, xi: Array, eta: Array, crpix: tuple[float, float], order: int = 4,
            cd: Array | None = None) -> tuple[Array, Array, Array]:
    """Linear least-squares TPV fit of standard coordinates against pixel positions.

    Parameters
    ----------
    x, y : array_like
        0-based pixel positions.
    xi, eta : array_like
        Standard coordinates in degrees about the intended CRVAL.
    crpix : (float, float)
        0-based reference pixel.
    order : int
        Polynomial order (1 = linear).
    cd : ndarray (2, 2), optional
        Starting CD matrix; default from a linear fit.

    Returns
    -------
    cd : ndarray (2, 2)
        CD matrix that absorbs the linear part of the fit, so ``PV1_1 = PV2_1 = 1`` and
        ``PV1_2 = PV2_2 = 0`` to rounding.
    pv1, pv2 : ndarray
        Coefficients indexed by the TPV term number ``k``, constant terms included (close to
        zero when CRVAL is the sky position of CRPIX).

    Notes
    -----
    The fitted function does not depend on the CD matrix (a complete polynomial of order n
    composed with a linear map is again one), so refitting after absorbing the linear part
    gives the same model with identity linear terms.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    xi = np.asarray(xi, dtype=float)
    eta = np.asarray(eta, dtype=float)
    terms = tpv_terms(order)
    nterm = len(terms)
    if x.size < nterm:
        raise InsufficientDataError(f"a TPV fit of order {order} needs at least {nterm} stars, got {x.size}")
    dx, dy = x - crpix[0], y - crpix[1]
    if cd is None:
        a = np.stack([np.ones_like(dx), dx, dy], axis=1)
        cx = np.linalg.lstsq(a, xi, rcond=None)[0]
        cy = np.linalg.lstsq(a, eta, rcond=None)[0]
        cd = np.array([[cx[1], cx[2]], [cy[1], cy[2]]])
    cd = np.asarray(cd, dtype=float)
    kmax = terms[-1][0] + 1
    degree = np.array([i + j for _, i, j in terms])
    ks = [k for k, _, _ in terms]
    for _ in range(2):
        u = cd[0, 0] * dx + cd[0, 1] * dy
        v = cd[1, 0] * dx + cd[1, 1] * dy
        scale = max(float(np.max(np.abs(u))), float(np.max(np.abs(v))), 1e-12)
        norm = scale ** degree.astype(float)
        a1 = _design(u / scale, v / scale, terms)
        a2 = _design(v / scale, u / scale, terms)
        c1 = _lstsq(a1, xi) / norm
        c2 = _lstsq(a2, eta) / norm
        pv1 = np.zeros(kmax)
        pv2 = np.zeros(kmax)
        pv1[ks] = c1
        pv2[ks] = c2
        m = np.array([[pv1[1], pv1[2]], [pv2[2], pv2[1]]])
        if abs(np.linalg.det(m)) < 1e-12:
            raise InsufficientDataError("degenerate astrometric fit (the matched stars lie on a line)")
        if np.allclose(m, np.eye(2), rtol=0, atol=1e-8):
            break  # linear terms already (close to) the identity: keep them as fitted
        cd = m @ cd
    return cd, pv1, pv2


def _lstsq(a: Array, b: Array) -> Array:
    """Least squares by the normal equations (columns are normalised, so well conditioned),
    falling back to SVD when they are singular."""
    try:
        return np.linalg.solve(a.T @ a, a.T @ b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def loo_rms(x: Array, y: Array, xi: Array, eta: Array, crpix: tuple[float, float], cd: Array,
            order: int) -> float:
    """Leave-one-out rms (degrees, 2-D) of a TPV fit of ``order``: each star's residual from
    the fit to all the others (the PRESS statistic, from the hat matrix in one pass).

    Parameters as :func:`fit_tpv`; ``cd`` fixes the intermediate coordinates.
    """
    terms = tpv_terms(order)
    dx = np.asarray(x, dtype=float) - crpix[0]
    dy = np.asarray(y, dtype=float) - crpix[1]
    u = cd[0, 0] * dx + cd[0, 1] * dy
    v = cd[1, 0] * dx + cd[1, 1] * dy
    scale = max(float(np.max(np.abs(u))), float(np.max(np.abs(v))), 1e-12)
    a = _design(u / scale, v / scale, terms)
    if a.shape[0] <= a.shape[1]:
        return math.inf
    try:
        g = np.linalg.inv(a.T @ a)
    except np.linalg.LinAlgError:
        return math.inf
    h = np.sum((a @ g) * a, axis=1)  # leverage; the same for (v, u): a permutation of the columns
    if np.any(h >= 1.0 - 1e-9):
        return math.inf
    b = _design(v / scale, u / scale, terms)
    r1 = xi - a @ (g @ (a.T @ xi))
    r2 = eta - b @ (np.linalg.solve(b.T @ b, b.T @ eta))
    return math.sqrt(float(np.mean((r1 ** 2 + r2 ** 2) / (1.0 - h) ** 2)))


def _fmt(value: float) -> float:
    return float(value)


def tpv_header(model: TpvModel, *, rms_arcsec: tuple[float, float] | None = None,
               n_stars: int | None = None) -> fits.Header:
    """A FITS header with the TPV WCS of ``model`` (astropy/wcslib, SExtractor, SWarp, SCAMP).

    Parameters
    ----------
    model : TpvModel
        The fitted model.
    rms_arcsec : (float, float), optional
        Per-axis rms of the fit, written as SCAMP's ASTRRMS1/2 (degrees).
    n_stars : int, optional
        Stars in the fit (ASTRNSTR).

    Returns
    -------
    astropy.io.fits.Header
        WCSAXES, CTYPE (``RA---TPV``/``DEC--TPV``), CUNIT, CRVAL, CRPIX (1-based), CD,
        RADESYS ``ICRS``, EQUINOX, and ``PV1_k``/``PV2_k`` for the non-radial terms.
    """
    h = fits.Header()
    h["WCSAXES"] = (2, "Number of WCS axes")
    h["CTYPE1"] = ("RA---TPV", "TAN projection + TPV polynomial distortion")
    h["CTYPE2"] = ("DEC--TPV", "TAN projection + TPV polynomial distortion")
    h["CUNIT1"] = ("deg", "Unit of CRVAL1 and CD1_*")
    h["CUNIT2"] = ("deg", "Unit of CRVAL2 and CD2_*")
    h["CRVAL1"] = (_fmt(model.crval[0] % 360.0), "[deg] RA of the reference point")
    h["CRVAL2"] = (_fmt(model.crval[1]), "[deg] Dec of the reference point")
    h["CRPIX1"] = (_fmt(model.crpix[0] + 1.0), "Reference pixel, x (1-based)")
    h["CRPIX2"] = (_fmt(model.crpix[1] + 1.0), "Reference pixel, y (1-based)")
    for i in range(2):
        for j in range(2):
            h[f"CD{i + 1}_{j + 1}"] = (_fmt(model.cd[i, j]), "[deg/px] Linear transformation")
    h["RADESYS"] = ("ICRS", "Reference frame of the reference catalogue")
    h["EQUINOX"] = (2000.0, "Mean equinox")
    for axis, pv in ((1, model.pv1), (2, model.pv2)):
        for k, _, _ in tpv_terms(model.order):
            h[f"PV{axis}_{k}"] = (_fmt(pv[k]), "TPV distortion coefficient")
    if rms_arcsec is not None:
        h["ASTRRMS1"] = (_fmt(rms_arcsec[0] / 3600.0), "[deg] Astrometric rms, axis 1")
        h["ASTRRMS2"] = (_fmt(rms_arcsec[1] / 3600.0), "[deg] Astrometric rms, axis 2")
    if n_stars is not None:
        h["ASTRNSTR"] = (int(n_stars), "Reference stars in the astrometric fit")
    return h



# ---------------------------------------------------------------------------------------
# The solver
# ---------------------------------------------------------------------------------------

def _fit_model(x: Array, y: Array, ra: Array, dec: Array, crval: tuple[float, float],
               crpix: tuple[float, float], order: int, cd: Array | None = None) -> TpvModel:
    """TPV fit with CRVAL moved to the sky position of CRPIX (two passes)."""
    for _ in range(3):
        xi, eta = gnomonic(ra, dec, *crval)
        cd, pv1, pv2 = fit_tpv(x, y, xi, eta, crpix, order, cd)
        model = TpvModel(crval=crval, crpix=crpix, cd=cd, pv1=pv1, pv2=pv2, order=order)
        shift = math.hypot(pv1[0], pv2[0])
        if shift < 1e-6:  # 3.6 mas: the rest stays in PV1_0, PV2_0 (the model is exact either way)
            break
        ra_c, dec_c = gnomonic_inverse(pv1[0], pv2[0], *crval)
        crval = (float(ra_c), float(dec_c))
    return model


def _residuals_arcsec(model: TpvModel, x: Array, y: Array, ra: Array, dec: Array) -> tuple[Array, Array]:
    """On-sky residual model - reference: (dRA cos Dec, dDec) in arcsec."""
    ra_m, dec_m = model.sky(x, y)
    dra = (ra_m - ra + 180.0) % 360.0 - 180.0
    return dra * np.cos(np.radians(dec)) * 3600.0, (dec_m - dec) * 3600.0


def _clipped_fit(x: Array, y: Array, ra: Array, dec: Array, crval: tuple[float, float],
                 crpix: tuple[float, float], order: int, clip: float, cd: Array | None = None,
                 min_keep: int = 3) -> tuple[TpvModel, Array, Array, Array]:
    """Fit, reject beyond ``clip`` robust sigmas (per axis), refit until stable.

    CRVAL follows the sky position of CRPIX (so PV1_0, PV2_0 stay below 3.6 mas). Returns the
    model, the kept pairs and the tangent-plane residuals (model - reference, arcsec).
    """
    keep = np.ones(x.size, dtype=bool)
    xi, eta = gnomonic(ra, dec, *crval)
    recentred = 0
    model = None
    for _ in range(15):
        cd, pv1, pv2 = fit_tpv(x[keep], y[keep], xi[keep], eta[keep], crpix, order, cd)
        if math.hypot(pv1[0], pv2[0]) >= 1e-6 and recentred < 3:
            ra_c, dec_c = gnomonic_inverse(pv1[0], pv2[0], *crval)
            crval = (float(ra_c), float(dec_c))
            xi, eta = gnomonic(ra, dec, *crval)
            recentred += 1
            continue
        model = TpvModel(crval=crval, crpix=crpix, cd=cd, pv1=pv1, pv2=pv2, order=order)
        xm, em = model.standard(x, y)
        dx, dy = (xm - xi) * 3600.0, (em - eta) * 3600.0
        both = np.concatenate([dx[keep], dy[keep]])
        sigma = 1.4826 * float(np.median(np.abs(both - np.median(both))))
        sigma = max(sigma, 1e-4)  # 0.1 mas: do not clip below measurement precision
        new = (np.abs(dx) <= clip * sigma) & (np.abs(dy) <= clip * sigma)
        if new.sum() < max(min_keep, n_tpv_terms(order)) or np.array_equal(new, keep):
            break
        keep = new
    assert model is not None
    return model, keep, dx, dy



def _describe(ra0: float, dec0: float) -> str:
    return f"RA={ra0:.5f}, Dec={dec0:.5f}"


def _columns(*arrays) -> list[Array]:
    """Each argument as a flat float64 array."""
    return [np.asarray(a, dtype=float).ravel() for a in arrays]


def _finite_sources(x: Array, y: Array, need: int) -> Array:
    """Indices of the sources with finite positions; raises when fewer than ``need``."""
    src_ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if src_ok.size < need:
        raise InsufficientDataError(
            f"only {src_ok.size} sources with finite positions; the blind solve needs at least {need} "
            "(AstrometryConfig.min_pattern_matches): lower the detection threshold or use a longer exposure")
    return src_ok


def _refs_near(ref_ra: Array, ref_dec: Array, ref_mag: Array, ra0: float, dec0: float, radius: float,
               need: int) -> tuple[Array, Array, str]:
    """Reference stars with finite positions (``ref_ok``), those within ``radius`` of the
    pointing, brightest first (``near``), and the text that says where; raises when fewer
    than ``need`` are near."""
    ref_ok = np.flatnonzero(np.isfinite(ref_ra) & np.isfinite(ref_dec))
    near = ref_ok[angular_distance(ref_ra[ref_ok], ref_dec[ref_ok], ra0, dec0) <= radius]
    where = f"within {radius:.3g} deg of {_describe(ra0, dec0)}"
    if near.size < need:
        what = "the reference catalogue is empty" if ref_ra.size == 0 else \
            f"only {near.size} of {ref_ra.size} reference stars lie {where}"
        raise InsufficientDataError(
            f"{what}; the blind solve needs at least {need}: check the header pointing (RA/DEC) and that the "
            "reference catalogue covers the field")
    rmag = np.where(np.isfinite(ref_mag[near]), ref_mag[near], np.inf)
    return ref_ok, near[np.argsort(rmag, kind="stable")], where


def _pattern_search(sx: Array, sy: Array, sflux: Array, ref_ra: Array, ref_dec: Array, near: Array,
                    ra0: float, dec0: float, shape: tuple[int, int], radius: float, tol: float, where: str,
                    cfg) -> tuple[PatternMatch, Array, Array]:
    """Pattern match of the brightest sources and reference stars: a few of each first (fast,
    the cost grows as the sixth power), more when that finds too little.

    Returns the match and the sources (indices into ``sx``) and reference stars it used;
    raises when it pairs fewer than ``cfg.min_pattern_matches`` stars.
    """
    ny, nx = shape
    need = cfg.min_pattern_matches
    scale_deg = cfg.pixel_scale_arcsec / 3600.0
    diag = math.hypot(nx, ny)
    order_flux = np.argsort(-sflux, kind="stable")
    area_ratio = math.pi * (radius / scale_deg) ** 2 / (nx * ny)
    n_max = min(cfg.n_pattern_stars, sx.size)
    tries = sorted({min(n, n_max) for n in (20, 30)} | {n_max})
    pm = None
    for n_try in tries:
        n_ref_try = int(min(near.size, max(n_try, min(3 * n_try, round(n_try * area_ratio)))))
        pref_try = near[:n_ref_try]
        xi, eta = gnomonic(ref_ra[pref_try], ref_dec[pref_try], ra0, dec0)
        bright_try = order_flux[:n_try]
        m = match_pattern(np.column_stack([sx[bright_try], sy[bright_try]]), np.column_stack([xi, eta]) / scale_deg,
                          scale_tolerance=cfg.scale_tolerance, tolerance=tol,
                          triangle_tolerance=cfg.triangle_tolerance, frame_diag=diag)
        if m is not None and (pm is None or m.n_inliers > pm.n_inliers):
            pm, bright, pref = m, bright_try, pref_try
        n_src, n_ref = n_try, n_ref_try
        if pm is not None and pm.n_inliers >= max(need, n_try // 2):
            break  # a clear match: more stars would only cost time
    n_pat = 0 if pm is None else pm.n_inliers
    if pm is None or n_pat < need:
        raise InsufficientDataError(
            f"no pattern match between {n_src} sources and {n_ref} reference stars {where} "
            f"(best: {n_pat} stars in common, {need} needed); check the header pointing (RA/DEC) and the pixel "
            f"scale (AstrometryConfig.pixel_scale_arcsec={cfg.pixel_scale_arcsec} +-{cfg.scale_tolerance:.0%}, "
            "--pixel-scale), and that the reference catalogue reaches the frame's brightest stars")
    return pm, bright, pref


def _loo_order(px: Array, py: Array, pra: Array, pdec: Array, model: TpvModel, keep: Array,
               crpix: tuple[float, float], order: int, notes: list[str]) -> int:
    """The order (up to ``order``) that predicts left-out stars best, within 2 %: a high order
    on few stars fits them but bends between and beyond them. Notes a lower choice."""
    xi_k, eta_k = gnomonic(pra[keep], pdec[keep], *model.crval)
    loo = [loo_rms(px[keep], py[keep], xi_k, eta_k, crpix, model.cd, o) * 3600e3 for o in range(1, order + 1)]
    best = min(o for o in range(1, order + 1) if loo[o - 1] <= 1.02 * min(loo))
    if best < order:
        notes.append(f"distortion order {best} chosen by leave-one-out cross-validation (prediction rms "
                     + ", ".join(f"order {o}: {v:.0f} mas" for o, v in enumerate(loo, 1)) + ")")
    return best


def _refine_solution(model: TpvModel, x: Array, y: Array, ref_ra: Array, ref_dec: Array, src_ok: Array,
                     ref_ok: Array, crpix: tuple[float, float], diag: float, tol: float, n_pattern: int, cfg,
                     notes: list[str]) -> tuple[TpvModel, Array, Array, Array]:
    """Iterative re-matching and fitting from the linear solution ``model``, the order rising
    over the first iterations; returns the model, the matched pairs (source and reference
    indices) and the pairs kept by the clipping."""
    need = cfg.min_pattern_matches
    sx, sy = x[src_ok], y[src_ok]
    # Reference stars of the solved field.
    scale_est = math.sqrt(abs(np.linalg.det(model.jacobian())))
    field_r = 0.5 * diag * scale_est * 1.05 + 10 * scale_est
    frame_refs = ref_ok[angular_distance(ref_ra[ref_ok], ref_dec[ref_ok], *model.crval) <= field_r]
    radius_as = max(tol * scale_est * 3600.0, cfg.match_radius_arcsec)
    order_max = cfg.distortion_order
    pairs_s = pairs_r = keep = None
    for it in range(cfg.iterations):
        xi_s, eta_s = model.standard(sx, sy)
        xi_r, eta_r = gnomonic(ref_ra[frame_refs], ref_dec[frame_refs], *model.crval)
        i1, i2, _ = crossmatch(xi_s * 3600.0, eta_s * 3600.0, xi_r * 3600.0, eta_r * 3600.0, radius_as)
        n = i1.size
        order = order_max if it == cfg.iterations - 1 else min(order_max, it + 2)
        while order > 1 and n < cfg.min_stars_per_term * n_tpv_terms(order):
            order -= 1
        if n < max(need, cfg.min_stars_per_term * n_tpv_terms(1)):
            raise InsufficientDataError(
                f"only {n} sources matched reference stars within {radius_as:.2f} arcsec after the pattern match "
                f"({n_pattern} pattern stars); a reliable fit needs at least "
                f"{max(need, int(math.ceil(cfg.min_stars_per_term * 3)))}: use a deeper reference catalogue "
                "or detect fainter sources")
        pairs_s, pairs_r = src_ok[i1], frame_refs[i2]
        px, py, pra, pdec = x[pairs_s], y[pairs_s], ref_ra[pairs_r], ref_dec[pairs_r]
        model, keep, dx, dy = _clipped_fit(px, py, pra, pdec, model.crval, crpix, order, cfg.clip_sigma,
                                           model.cd, need)
        if it == cfg.iterations - 1 and order < order_max:
            notes.append(
                f"distortion order lowered from {order_max} to {order}: {n} matched stars, order {order_max} "
                f"needs >= {int(math.ceil(cfg.min_stars_per_term * n_tpv_terms(order_max)))} "
                f"({cfg.min_stars_per_term:g} per coefficient); a deeper reference catalogue gives more")
        if it == cfg.iterations - 1 and cfg.select_order and order > 1:
            best = _loo_order(px, py, pra, pdec, model, keep, crpix, order, notes)
            if best < order:
                model, keep, dx, dy = _clipped_fit(px, py, pra, pdec, model.crval, crpix, best, cfg.clip_sigma,
                                                   model.cd, need)
        rms = math.sqrt(float(np.mean(dx[keep] ** 2 + dy[keep] ** 2)))
        radius_as = max(cfg.match_radius_arcsec, min(radius_as, 5.0 * rms))
    assert pairs_s is not None and keep is not None
    return model, pairs_s, pairs_r, keep


def _solution(model: TpvModel, x: Array, y: Array, ref_ra: Array, ref_dec: Array, pairs_s: Array, pairs_r: Array,
              keep: Array, crpix: tuple[float, float]) -> dict:
    """Final statistics of a solution, after and before (linear) the distortion: the keys of
    :func:`solve_wcs` but ``n_pattern``, ``search_radius_deg`` and ``notes``."""
    dra, ddec = _residuals_arcsec(model, x[pairs_s], y[pairs_s], ref_ra[pairs_r], ref_dec[pairs_r])
    rms_as = math.sqrt(float(np.mean(dra[keep] ** 2 + ddec[keep] ** 2)))
    ks, kr = pairs_s[keep], pairs_r[keep]  # the best linear solution on the same stars
    linear = _fit_model(x[ks], y[ks], ref_ra[kr], ref_dec[kr], model.crval, crpix, 1, model.cd)
    dra0, ddec0 = _residuals_arcsec(linear, x[pairs_s], y[pairs_s], ref_ra[pairs_r], ref_dec[pairs_r])
    rms_before = math.sqrt(float(np.mean(dra0[keep] ** 2 + ddec0[keep] ** 2)))
    jac = model.jacobian()
    det = float(np.linalg.det(jac))
    pixel_scale = math.sqrt(abs(det)) * 3600.0
    rotation = math.degrees(math.atan2(jac[0, 1], jac[1, 1])) % 360.0
    rms_axes = (math.sqrt(float(np.mean(dra[keep] ** 2))), math.sqrt(float(np.mean(ddec[keep] ** 2))))
    header = tpv_header(model, rms_arcsec=rms_axes, n_stars=int(keep.sum()))
    ra_c, dec_c = model.sky(np.array([crpix[0]]), np.array([crpix[1]]))
    return {
        "header": header,
        "model": model,
        "order": model.order,
        "n_matched": int(keep.sum()),
        "rms_mas": rms_as * 1000.0,
        "rms_px": rms_as / pixel_scale,
        "rms_mas_before": rms_before * 1000.0,
        "source_index": pairs_s,
        "ref_index": pairs_r,
        "used": keep,
        "dra_arcsec": dra,
        "ddec_arcsec": ddec,
        "dra_before_arcsec": dra0,
        "ddec_before_arcsec": ddec0,
        "rotation_deg": rotation,
        "pixel_scale_arcsec": pixel_scale,
        "parity": 1 if det > 0 else -1,
        "center": (float(ra_c[0]), float(dec_c[0])),
    }


def solve_wcs(x: Array, y: Array, flux: Array, ref_ra: Array, ref_dec: Array, ref_mag: Array,
              shape: tuple[int, int], ra0: float, dec0: float, config=None) -> dict:
    """Blind astrometric solution of one frame: pattern match, then a clipped TPV fit.

    Parameters
    ----------
    x, y : array_like
        0-based pixel positions of the detected sources.
    flux : array_like
        Their fluxes (any unit; only the order matters: the brightest are pattern matched).
    ref_ra, ref_dec, ref_mag : array_like
        Reference catalogue in degrees and magnitudes (NaN magnitudes count as faintest).
    shape : (int, int)
        Frame shape ``(ny, nx)``.
    ra0, dec0 : float
        Header pointing in degrees.
    config : AstrometryConfig, optional
        Defaults: MST values.

    Returns
    -------
    dict
        ``header`` (fits.Header, TPV), ``model`` (TpvModel), ``order``, ``n_matched``,
        ``rms_mas``, ``rms_px``, ``rms_mas_before``, ``source_index``, ``ref_index``,
        ``used`` (pairs kept by the clipping), ``dra_arcsec``, ``ddec_arcsec`` (after) and
        ``dra_before_arcsec``, ``ddec_before_arcsec`` (linear solution) per pair,
        ``rotation_deg``, ``pixel_scale_arcsec``, ``parity``, ``center`` (RA, Dec of the
        frame centre), ``n_pattern``, ``search_radius_deg``, ``notes``.

    Raises
    ------
    InsufficientDataError
        Too few sources or reference stars, or no pattern match.
    BadInputError
        The pointing is not a sky position.
    """
    if config is None:
        from ..config import AstrometryConfig

        config = AstrometryConfig()
    cfg = config
    ny, nx = (int(s) for s in shape)
    x, y, flux = _columns(x, y, flux)
    if not x.size == y.size == flux.size:
        raise ValueError(f"x, y and flux differ in length ({x.size}, {y.size}, {flux.size})")
    ref_ra, ref_dec, ref_mag = _columns(ref_ra, ref_dec, ref_mag)
    if not ref_ra.size == ref_dec.size == ref_mag.size:
        raise ValueError(f"ref ra, dec and mag differ in length ({ref_ra.size}, {ref_dec.size}, {ref_mag.size})")
    ra0, dec0 = float(ra0) % 360.0, float(dec0)
    if not (math.isfinite(ra0) and math.isfinite(dec0) and -90.0 <= dec0 <= 90.0):
        raise BadInputError("pointing", f"RA={ra0}, Dec={dec0} is not a sky position; check the header RA/DEC")
    notes: list[str] = []
    need = cfg.min_pattern_matches

    # Sources: finite positions, brightest first.
    src_ok = _finite_sources(x, y, need)
    sx, sy = x[src_ok], y[src_ok]
    sflux = np.where(np.isfinite(flux[src_ok]), flux[src_ok], -np.inf)

    # Reference stars around the pointing.
    scale_deg = cfg.pixel_scale_arcsec / 3600.0
    diag = math.hypot(nx, ny)
    radius = cfg.search_radius_deg
    if radius is None:
        radius = (0.5 * diag * (1 + cfg.scale_tolerance) + cfg.pointing_error_fraction * max(nx, ny)) * scale_deg
    ref_ok, near, where = _refs_near(ref_ra, ref_dec, ref_mag, ra0, dec0, radius, need)

    tol = max(cfg.pattern_tolerance_px, 0.003 * diag)
    pm, bright, pref = _pattern_search(sx, sy, sflux, ref_ra, ref_dec, near, ra0, dec0, (ny, nx), radius, tol,
                                       where, cfg)
    notes.append(f"pattern match: {pm.n_inliers} of {pm.n_sources} brightest sources on {pm.n_refs} reference "
                 f"stars (parity {pm.parity:+d}, scale {abs(pm.a):.4f} x the expected, "
                 f"{pm.n_candidates} triangle candidates)")

    # Initial linear solution from the pattern pairs, then the distortion.
    crpix = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    ps = src_ok[bright[pm.src_index]]
    pr = pref[pm.ref_index]
    model = _fit_model(x[ps], y[ps], ref_ra[pr], ref_dec[pr], (ra0, dec0), crpix, 1)
    model, pairs_s, pairs_r, keep = _refine_solution(model, x, y, ref_ra, ref_dec, src_ok, ref_ok, crpix, diag, tol,
                                                     pm.n_inliers, cfg, notes)
    return {**_solution(model, x, y, ref_ra, ref_dec, pairs_s, pairs_r, keep, crpix),
            "n_pattern": pm.n_inliers, "search_radius_deg": float(radius), "notes": notes}
