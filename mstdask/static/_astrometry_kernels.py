"""Astrometry kernels of the STATIC step: blind pattern match and TPV distortion fit.

Pure NumPy/SciPy/astropy (``astropy.io.fits`` headers only); nothing here knows about Dask.
The public face is :mod:`mstdask.astrometry`.

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

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from scipy.spatial import cKDTree

from ..errors import BadInputError, InsufficientDataError

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
# Cross-match
# ---------------------------------------------------------------------------------------

def crossmatch(x1: Array, y1: Array, x2: Array, y2: Array, radius: float) -> tuple[Array, Array, Array]:
    """Nearest-neighbour match of points 1 against points 2 within ``radius``, one to one.

    Parameters
    ----------
    x1, y1, x2, y2 : array_like
        Positions in one flat coordinate system (pixels, or arcsec on a tangent plane).
    radius : float
        Largest accepted distance.

    Returns
    -------
    i1, i2 : ndarray of int
        Matched indices; each point 2 is used once (by its nearest point 1).
    distance : ndarray
        Their distances.
    """
    p1 = np.column_stack([np.asarray(x1, dtype=float), np.asarray(y1, dtype=float)])
    p2 = np.column_stack([np.asarray(x2, dtype=float), np.asarray(y2, dtype=float)])
    empty = (np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp), np.zeros(0))
    if len(p1) == 0 or len(p2) == 0:
        return empty
    dist, j = cKDTree(p2).query(p1, k=1, distance_upper_bound=radius)
    ok = np.isfinite(dist)
    i1 = np.flatnonzero(ok)
    i2 = j[ok]
    d = dist[ok]
    if i1.size == 0:
        return empty
    order = np.lexsort((d, i2))  # by reference, then distance: first of each group is nearest
    i1, i2, d = i1[order], i2[order], d[order]
    first = np.ones(i2.size, dtype=bool)
    first[1:] = i2[1:] != i2[:-1]
    i1, i2, d = i1[first], i2[first], d[first]
    back = np.argsort(i1)
    return i1[back], i2[back], d[back]


# ---------------------------------------------------------------------------------------
# Blind pattern match (triangle invariants with a scale constraint)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatternMatch:
    """Best similarity transform of a pattern match.

    ``ref = a * s + b`` in complex notation, where ``s = x + i y`` for parity +1 and
    ``s = x - i y`` for parity -1 (a mirror), in the units of the reference points.

    Attributes
    ----------
    a, b : complex
        Rotation-and-scale and translation.
    parity : int
        +1: no mirror between the source and reference point sets; -1: mirrored.
    src_index, ref_index : ndarray of int
        Matched pairs (indices into the arrays given to :func:`match_pattern`).
    n_inliers : int
        Number of pairs.
    n_candidates : int
        Matched triangle pairs that passed the scale constraint.
    n_sources, n_refs : int
        Points used on each side.
    """

    a: complex
    b: complex
    parity: int
    src_index: Array = field(repr=False)
    ref_index: Array = field(repr=False)
    n_inliers: int
    n_candidates: int
    n_sources: int
    n_refs: int


def _triplets(n: int) -> Array:
    if n < 3:
        return np.zeros((0, 3), dtype=np.intp)
    count = n * (n - 1) * (n - 2) // 6
    flat = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n), 3)),
                       dtype=np.intp, count=3 * count)
    return flat.reshape(-1, 3)


def _triangles(pts: Array, min_side: float, max_side: float, eps: float):
    """Triangles of all point triplets with canonical vertex order and their invariants.

    Vertices are ordered by the length of the opposite side (shortest first); returns the
    ordered vertex indices, the invariants (short/long, mid/long), the log of the longest
    side and the orientation (+1 counter-clockwise).
    """
    tri = _triplets(len(pts))
    if tri.size == 0:
        return tri, np.zeros((0, 2)), np.zeros(0), np.zeros(0)
    p = pts[tri]  # (T, 3, 2)
    sides = np.stack([np.hypot(*(p[:, 1] - p[:, 2]).T), np.hypot(*(p[:, 0] - p[:, 2]).T),
                      np.hypot(*(p[:, 0] - p[:, 1]).T)], axis=1)
    order = np.argsort(sides, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    s = np.take_along_axis(sides, order, axis=1)
    longest = s[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        r0 = s[:, 0] / longest
        r1 = s[:, 1] / longest
    keep = ((longest >= min_side) & (longest <= max_side) & (r0 > 0.1)
            & (r1 - r0 > 2 * eps) & (1.0 - r1 > 2 * eps))  # unambiguous vertex order
    tri, r0, r1, longest = tri[keep], r0[keep], r1[keep], longest[keep]
    q = pts[tri]
    e1 = q[:, 1] - q[:, 0]
    e2 = q[:, 2] - q[:, 0]
    orient = np.sign(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    return tri, np.stack([r0, r1], axis=1), np.log(longest), orient


def _similarity(zs: Array, zr: Array) -> tuple[complex, complex]:
    """Least-squares ``zr = a zs + b`` (complex)."""
    ms, mr = zs.mean(), zr.mean()
    ds = zs - ms
    den = float(np.sum(np.abs(ds) ** 2))
    if den <= 0:
        return complex(1.0), complex(mr - ms)
    a = complex(np.sum((zr - mr) * np.conj(ds)) / den)
    return a, complex(mr - a * ms)


def _inliers(zs: Array, tree: cKDTree, a: complex, b: complex, tol: float) -> tuple[Array, Array]:
    z = a * zs + b
    dist, j = tree.query(np.column_stack([z.real, z.imag]), k=1, distance_upper_bound=tol)
    ok = np.isfinite(dist)
    i, j, d = np.flatnonzero(ok), j[ok], dist[ok]
    order = np.lexsort((d, j))
    i, j = i[order], j[order]
    first = np.ones(j.size, dtype=bool)
    first[1:] = j[1:] != j[:-1]
    return i[first], j[first]


def match_pattern(src_xy: Array, ref_xy: Array, *, scale_tolerance: float = 0.1, tolerance: float = 4.0,
                  triangle_tolerance: float = 0.01, frame_diag: float | None = None,
                  n_vote: int = 12) -> PatternMatch | None:
    """Find the similarity transform (either parity) that puts sources on reference stars.

    Parameters
    ----------
    src_xy : ndarray (N, 2)
        Source pixel positions, brightest first (only pass the brightest few tens).
    ref_xy : ndarray (M, 2)
        Reference positions in units close to pixels (standard coordinates divided by the
        expected pixel scale), brightest first.
    scale_tolerance : float
        The scale between the two sets is 1 within this relative tolerance.
    tolerance : float
        A source is on a reference star within this distance (reference units).
    triangle_tolerance : float
        Tolerance on the triangles' side ratios.
    frame_diag : float, optional
        Frame diagonal in pixels: triangles longer than it are left out; shorter than a
        tenth of it, too (their side ratios are uncertain). Default from ``src_xy``.
    n_vote : int
        Number of the most voted-for transforms verified against all points.

    Returns
    -------
    PatternMatch or None
        The candidate with the most inliers, or None when no triangle matched.

    Notes
    -----
    All triangles of each point set are compared by their side ratios and, since the
    pixel scale is known to ``scale_tolerance``, their size (a 3-D box search in a k-d
    tree). The ratios do not depend on a mirror; the orientation of the two triangles
    tells the parity. Each triangle pair gives a similarity transform; the transforms vote
    in (parity, rotation, position of the frame centre) cells, and the most popular are
    verified by counting the sources that land on a reference star.
    """
    src = np.asarray(src_xy, dtype=float).reshape(-1, 2)
    ref = np.asarray(ref_xy, dtype=float).reshape(-1, 2)
    if len(src) < 3 or len(ref) < 3:
        return None
    if frame_diag is None:
        frame_diag = float(np.hypot(*(src.max(axis=0) - src.min(axis=0))))
    eps = float(triangle_tolerance)
    tau = math.log1p(scale_tolerance) + 2 * eps
    stri, sinv, slog, sori = _triangles(src, 0.1 * frame_diag, frame_diag, eps)
    rtri, rinv, rlog, rori = _triangles(ref, 0.1 * frame_diag / (1 + scale_tolerance),
                                        frame_diag * (1 + scale_tolerance), eps)
    if len(stri) == 0 or len(rtri) == 0:
        return None
    k = eps / tau  # the size axis scaled so that the box is eps wide on every axis
    fs = np.column_stack([sinv, slog * k])
    fr = np.column_stack([rinv, rlog * k])
    pairs = cKDTree(fs).sparse_distance_matrix(cKDTree(fr), eps, p=np.inf, output_type="ndarray")
    if len(pairs) == 0:
        return None
    i, j = pairs["i"].astype(np.intp), pairs["j"].astype(np.intp)
    parity = (sori[i] * rori[j]).astype(int)
    zsrc = src[:, 0] + 1j * src[:, 1]
    zref = ref[:, 0] + 1j * ref[:, 1]
    zs = zsrc[stri[i]]  # (P, 3)
    zs = np.where(parity[:, None] > 0, zs, np.conj(zs))
    zr = zref[rtri[j]]
    ms, mr = zs.mean(axis=1, keepdims=True), zr.mean(axis=1, keepdims=True)
    ds = zs - ms
    a = np.sum((zr - mr) * np.conj(ds), axis=1) / np.sum(np.abs(ds) ** 2, axis=1)
    b = mr[:, 0] - a * ms[:, 0]
    good = np.abs(np.log(np.abs(a))) <= tau
    a, b, parity = a[good], b[good], parity[good]
    n_cand = int(a.size)
    if n_cand == 0:
        return None
    centre = zsrc.mean()
    zc = np.where(parity > 0, a * centre + b, a * np.conj(centre) + b)
    theta = np.degrees(np.angle(a))
    cell = max(3.0 * tolerance, 0.02 * frame_diag)
    tb = np.floor((theta + 180.0) / 4.0).astype(np.int64)  # 0..90
    cx = np.floor(zc.real / cell).astype(np.int64)
    cy = np.floor(zc.imag / cell).astype(np.int64)
    cx -= cx.min()
    cy -= cy.min()
    keys = ((((parity > 0).astype(np.int64) * 91 + tb) * (int(cx.max()) + 1) + cx) * (int(cy.max()) + 1) + cy)
    uniq, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    tree = cKDTree(ref)
    best: tuple[int, int, complex, complex, Array, Array] | None = None
    for cell_id in np.argsort(counts)[::-1][:n_vote]:
        members = inverse == cell_id
        par = int(parity[first[cell_id]])
        am = complex(np.median(a[members].real), np.median(a[members].imag))
        cm = complex(np.median(zc[members].real), np.median(zc[members].imag))
        cz = centre if par > 0 else np.conj(centre)
        bm = cm - am * cz
        zs_all = zsrc if par > 0 else np.conj(zsrc)
        si, ri = _inliers(zs_all, tree, am, bm, tolerance)
        for _ in range(3):  # refine on the inliers
            if si.size < 3:
                break
            am, bm = _similarity(zs_all[si], zref[ri])
            si2, ri2 = _inliers(zs_all, tree, am, bm, tolerance)
            if si2.size <= si.size and np.array_equal(si2, si):
                break
            si, ri = si2, ri2
        if best is None or si.size > best[0]:
            best = (int(si.size), par, am, bm, si, ri)
    assert best is not None
    n_in, par, am, bm, si, ri = best
    return PatternMatch(a=am, b=bm, parity=par, src_index=si, ref_index=ri, n_inliers=n_in,
                        n_candidates=n_cand, n_sources=len(src), n_refs=len(ref))


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
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    flux = np.asarray(flux, dtype=float).ravel()
    if not x.size == y.size == flux.size:
        raise ValueError(f"x, y and flux differ in length ({x.size}, {y.size}, {flux.size})")
    ref_ra = np.asarray(ref_ra, dtype=float).ravel()
    ref_dec = np.asarray(ref_dec, dtype=float).ravel()
    ref_mag = np.asarray(ref_mag, dtype=float).ravel()
    if not ref_ra.size == ref_dec.size == ref_mag.size:
        raise ValueError(f"ref ra, dec and mag differ in length ({ref_ra.size}, {ref_dec.size}, {ref_mag.size})")
    ra0, dec0 = float(ra0) % 360.0, float(dec0)
    if not (math.isfinite(ra0) and math.isfinite(dec0) and -90.0 <= dec0 <= 90.0):
        raise BadInputError("pointing", f"RA={ra0}, Dec={dec0} is not a sky position; check the header RA/DEC")
    notes: list[str] = []
    need = cfg.min_pattern_matches

    # Sources: finite positions, brightest first.
    src_ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if src_ok.size < need:
        raise InsufficientDataError(
            f"only {src_ok.size} sources with finite positions; the blind solve needs at least {need} "
            "(AstrometryConfig.min_pattern_matches): lower the detection threshold or use a longer exposure")
    sx, sy = x[src_ok], y[src_ok]
    sflux = np.where(np.isfinite(flux[src_ok]), flux[src_ok], -np.inf)

    # Reference stars around the pointing.
    scale_deg = cfg.pixel_scale_arcsec / 3600.0
    diag = math.hypot(nx, ny)
    radius = cfg.search_radius_deg
    if radius is None:
        radius = (0.5 * diag * (1 + cfg.scale_tolerance) + cfg.pointing_error_fraction * max(nx, ny)) * scale_deg
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
    near = near[np.argsort(rmag, kind="stable")]

    # Pattern match of the brightest sources and reference stars: a few of each first (fast,
    # the cost grows as the sixth power), more when that finds too little.
    order_flux = np.argsort(-sflux, kind="stable")
    area_ratio = math.pi * (radius / scale_deg) ** 2 / (nx * ny)
    tol = max(cfg.pattern_tolerance_px, 0.003 * diag)
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
    notes.append(f"pattern match: {pm.n_inliers} of {pm.n_sources} brightest sources on {pm.n_refs} reference "
                 f"stars (parity {pm.parity:+d}, scale {abs(pm.a):.4f} x the expected, "
                 f"{pm.n_candidates} triangle candidates)")

    # Initial linear solution from the pattern pairs.
    crpix = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    ps = src_ok[bright[pm.src_index]]
    pr = pref[pm.ref_index]
    model = _fit_model(x[ps], y[ps], ref_ra[pr], ref_dec[pr], (ra0, dec0), crpix, 1)
    # Reference stars of the solved field.
    centre = model.crval
    scale_est = math.sqrt(abs(np.linalg.det(model.jacobian())))
    field_r = 0.5 * diag * scale_est * 1.05 + 10 * scale_est
    frame_refs = ref_ok[angular_distance(ref_ra[ref_ok], ref_dec[ref_ok], *centre) <= field_r]

    # Iterative re-matching and fitting, the order rising over the first iterations.
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
                f"({pm.n_inliers} pattern stars); a reliable fit needs at least "
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
            # The order that predicts left-out stars best: a high order on few stars fits them
            # but bends between and beyond them.
            xi_k, eta_k = gnomonic(pra[keep], pdec[keep], *model.crval)
            loo = [loo_rms(px[keep], py[keep], xi_k, eta_k, crpix, model.cd, o) * 3600e3 for o in range(1, order + 1)]
            best = min(o for o in range(1, order + 1) if loo[o - 1] <= 1.02 * min(loo))
            if best < order:
                notes.append(f"distortion order {best} chosen by leave-one-out cross-validation (prediction rms "
                             + ", ".join(f"order {o}: {v:.0f} mas" for o, v in enumerate(loo, 1)) + ")")
                model, keep, dx, dy = _clipped_fit(px, py, pra, pdec, model.crval, crpix, best, cfg.clip_sigma,
                                                   model.cd, need)
        rms = math.sqrt(float(np.mean(dx[keep] ** 2 + dy[keep] ** 2)))
        radius_as = max(cfg.match_radius_arcsec, min(radius_as, 5.0 * rms))
    assert pairs_s is not None and keep is not None

    # Final statistics, after and before (linear) the distortion.
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
        "n_pattern": pm.n_inliers,
        "search_radius_deg": float(radius),
        "notes": notes,
    }
