"""Matching kernels of the STATIC astrometry: one-to-one cross-match and the blind pattern
match (triangle invariants with a scale constraint).

Pure NumPy/SciPy; :mod:`mstdask.static._astrometry_kernels` re-exports the public names.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["crossmatch", "PatternMatch", "match_pattern"]

Array = np.ndarray


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



def _triangle_transforms(src: Array, ref: Array, zsrc: Array, zref: Array, scale_tolerance: float,
                         triangle_tolerance: float, frame_diag: float) -> tuple[Array, Array, Array] | None:
    """Similarity transforms ``a, b`` and parities of the matched triangle pairs whose scale
    is 1 within ``scale_tolerance``; None when no triangle pair matched."""
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
    zs = zsrc[stri[i]]  # (P, 3)
    zs = np.where(parity[:, None] > 0, zs, np.conj(zs))
    zr = zref[rtri[j]]
    ms, mr = zs.mean(axis=1, keepdims=True), zr.mean(axis=1, keepdims=True)
    ds = zs - ms
    a = np.sum((zr - mr) * np.conj(ds), axis=1) / np.sum(np.abs(ds) ** 2, axis=1)
    b = mr[:, 0] - a * ms[:, 0]
    good = np.abs(np.log(np.abs(a))) <= tau
    return a[good], b[good], parity[good]


def _refined_inliers(zs_all: Array, zref: Array, tree: cKDTree, am: complex, bm: complex,
                     tolerance: float) -> tuple[complex, complex, Array, Array]:
    """Inliers of the transform ``am, bm``, refitted on its inliers up to three times."""
    si, ri = _inliers(zs_all, tree, am, bm, tolerance)
    for _ in range(3):  # refine on the inliers
        if si.size < 3:
            break
        am, bm = _similarity(zs_all[si], zref[ri])
        si2, ri2 = _inliers(zs_all, tree, am, bm, tolerance)
        if si2.size <= si.size and np.array_equal(si2, si):
            break
        si, ri = si2, ri2
    return am, bm, si, ri


def _best_voted(zsrc: Array, zref: Array, ref: Array, a: Array, b: Array, parity: Array, tolerance: float,
                frame_diag: float, n_vote: int) -> tuple[int, int, complex, complex, Array, Array]:
    """The transform with the most inliers among the ``n_vote`` most voted-for cells of
    (parity, rotation, position of the frame centre): ``(n_inliers, parity, a, b, src, ref)``."""
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
        am, bm, si, ri = _refined_inliers(zs_all, zref, tree, am, bm, tolerance)
        if best is None or si.size > best[0]:
            best = (int(si.size), par, am, bm, si, ri)
    assert best is not None
    return best


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
    zsrc = src[:, 0] + 1j * src[:, 1]
    zref = ref[:, 0] + 1j * ref[:, 1]
    found = _triangle_transforms(src, ref, zsrc, zref, scale_tolerance, triangle_tolerance, frame_diag)
    if found is None:
        return None
    a, b, parity = found
    n_cand = int(a.size)
    if n_cand == 0:
        return None
    n_in, par, am, bm, si, ri = _best_voted(zsrc, zref, ref, a, b, parity, tolerance, frame_diag, n_vote)
    return PatternMatch(a=am, b=bm, parity=par, src_index=si, ref_index=ri, n_inliers=n_in,
                        n_candidates=n_cand, n_sources=len(src), n_refs=len(ref))
