"""Pure-NumPy kernels of the light-curve cube (Xiao et al. 2025, sections 4.3-4.5).

Cross-matching on unit vectors (scipy cKDTree), the per-source statistics of one block of
the source x epoch cube (scatter, 1.4826 MAD, chi2/dof, catalogue stacks) and the
theoretical precision of Eqs. 1-5. No Dask or xarray here: :mod:`mstdask.lightcurves`
applies these lazily, block by block.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

Array = np.ndarray

__all__ = ["unit_vectors", "chord", "match_nearest", "cluster_positions", "fill_block", "block_statistics",
           "STAT_NAMES", "binned_median", "snr_theory"]

#: 1.4826 MAD is the standard deviation of a Gaussian.
MAD_TO_SIGMA = 1.482602218505602
#: Magnitudes per unit relative flux error: 2.5 / ln 10.
MAG_PER_REL = 2.5 / math.log(10.0)
_H_CGS = 6.62607015e-27  # erg s
_C_CGS = 2.99792458e10  # cm / s


# ----------------------------------------------------------------------------- cross-match
def unit_vectors(ra_deg: Array, dec_deg: Array) -> Array:
    """(n, 3) unit vectors of positions in degrees (no wrap-around or pole problems)."""
    ra, dec = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def chord(radius_arcsec: float) -> float:
    """Chord length on the unit sphere of an angular radius."""
    return 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)


def match_nearest(tree: cKDTree, xyz: Array, radius_arcsec: float, unique: bool = True) -> tuple[Array, Array]:
    """Nearest tree point within ``radius_arcsec`` of every position.

    Parameters
    ----------
    tree : cKDTree
        Built on the master list's unit vectors.
    xyz : ndarray (n, 3)
        Detections' unit vectors.
    radius_arcsec : float
        Match radius.
    unique : bool
        Keep only the nearest detection of a master source (two detections of one
        exposure on the same star: a blend or a split source); the others get -1.

    Returns
    -------
    index : ndarray (n,) int64
        Master row, -1 for none.
    sep_arcsec : ndarray (n,) float64
        Separation (inf for none).
    """
    if len(xyz) == 0 or tree.n == 0:
        return np.full(len(xyz), -1, np.int64), np.full(len(xyz), np.inf)
    d, idx = tree.query(xyz, k=1, distance_upper_bound=chord(radius_arcsec))
    ok = np.isfinite(d)
    idx = np.where(ok, idx, -1).astype(np.int64)
    sep = np.where(ok, np.degrees(2 * np.arcsin(np.minimum(d, 2.0) / 2)) * 3600.0, np.inf)
    if unique and ok.any():
        rows = np.flatnonzero(ok)
        order = rows[np.lexsort((sep[rows], idx[rows]))]  # by master row, nearest first
        first = np.r_[True, idx[order][1:] != idx[order][:-1]]
        idx[order[~first]] = -1
        sep[order[~first]] = np.inf
    return idx, sep


def cluster_positions(ra_deg: Array, dec_deg: Array, radius_arcsec: float) -> tuple[Array, Array, Array]:
    """Friends-of-friends groups of positions closer than ``radius_arcsec``: the new sources
    built from detections that match no master source.

    Returns
    -------
    ra, dec : ndarray (k,)
        Mean position of every group (degrees; mean of unit vectors).
    labels : ndarray (n,) int64
        Group of every input position.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(ra_deg)
    if n == 0:
        return np.empty(0), np.empty(0), np.empty(0, np.int64)
    xyz = unit_vectors(ra_deg, dec_deg)
    pairs = cKDTree(xyz).query_pairs(chord(radius_arcsec), output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    k, labels = connected_components(graph, directed=False)
    sums = np.zeros((k, 3))
    np.add.at(sums, labels, xyz)
    sums /= np.linalg.norm(sums, axis=1, keepdims=True)
    ra = np.degrees(np.arctan2(sums[:, 1], sums[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(sums[:, 2], -1, 1)))
    return ra, dec, labels.astype(np.int64)


def fill_block(rows: Array, cols: Array, values: dict[str, Array], s0: int, s1: int, n_cols: int,
               ) -> dict[str, Array]:
    """Scatter detections ``(rows, cols, values)`` with ``s0 <= rows < s1`` into dense
    ``(s1 - s0, n_cols)`` float32 blocks, NaN where nothing was measured. ``rows`` must be
    sorted (the caller sorts once per writing task)."""
    lo, hi = np.searchsorted(rows, [s0, s1])
    r, c = rows[lo:hi] - s0, cols[lo:hi]
    out = {}
    for name, v in values.items():
        block = np.full((s1 - s0, n_cols), np.nan, np.float32)
        block[r, c] = v[lo:hi]
        out[name] = block
    return out


# ----------------------------------------------------------------------------- statistics
#: Per-source outputs of :func:`block_statistics` (then the stacked scatter, one per N).
STAT_NAMES = ("n_epochs", "mean_mag", "median_mag", "std", "robust_std", "weighted_mean", "chi2_dof",
              "rms_err")


def _row_median(sorted_rows: Array, n: Array) -> Array:
    """Median of each row of a row-sorted array whose first ``n`` entries are valid."""
    lo = np.clip((n - 1) // 2, 0, None)[:, None]
    hi = np.clip(n // 2, 0, None)[:, None]
    a = np.take_along_axis(sorted_rows, lo, axis=1)[:, 0]
    b = np.take_along_axis(sorted_rows, hi, axis=1)[:, 0]
    return np.where(n > 0, 0.5 * (a.astype(np.float64) + b), np.nan)


def _stacked_std(mag: Array, valid: Array, n: Array, stack_n: tuple[int, ...], min_blocks: int = 2) -> Array:
    """Std (ddof 1) of the means of consecutive, non-overlapping runs of N good epochs."""
    rows, ne = mag.shape
    # good values moved to the front of each row, in epoch order (a stable sort of ~valid)
    order = np.argsort(~valid, axis=1, kind="stable")
    packed = np.take_along_axis(np.where(valid, mag, 0.0).astype(np.float64), order, axis=1)
    csum = np.concatenate([np.zeros((rows, 1)), np.cumsum(packed, axis=1)], axis=1)
    out = np.full((rows, len(stack_n)), np.nan, np.float32)
    for j, N in enumerate(stack_n):
        nb_max = ne // N
        if nb_max < min_blocks:
            continue
        ends = np.arange(1, nb_max + 1) * N
        means = (csum[:, ends] - csum[:, ends - N]) / N  # (rows, nb_max)
        nblk = n // N
        use = np.arange(nb_max)[None, :] < nblk[:, None]
        cnt = np.maximum(nblk, 1)
        mu = np.where(use, means, 0.0).sum(axis=1) / cnt
        var = np.where(use, (means - mu[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(nblk - 1, 1)
        out[:, j] = np.where(nblk >= min_blocks, np.sqrt(var), np.nan)
    return out


def block_statistics(mag: Array, magerr: Array | None = None, flags: Array | None = None, *,
                     bad_flags: int = 26, min_epochs: int = 5, stack_n: tuple[int, ...] = (),
                     rows_per_pass: int = 1024) -> tuple[Array, ...]:
    """Per-source statistics of a ``(source, epoch)`` block, over the good epochs.

    An epoch is good where ``mag`` (and ``magerr > 0``) is finite and ``flags`` shares no bit
    with ``bad_flags``. Rows are processed ``rows_per_pass`` at a time so the temporaries
    (two sorted copies) stay small whatever the block size.

    Returns
    -------
    tuple of ndarray
        ``n_epochs`` (float32, a count), ``mean_mag``, ``median_mag``, ``std`` (ddof 1),
        ``robust_std`` (1.4826 MAD), ``weighted_mean`` (weights 1/magerr^2), ``chi2_dof``
        (about the weighted mean, over n - 1), ``rms_err`` (sqrt of the mean magerr^2: the
        scatter the errors predict; all ``(source,)`` float32,
        NaN below ``min_epochs``), then ``stacked`` ``(source, len(stack_n))``: the std of
        the means of consecutive runs of N good epochs (NaN with fewer than 2 runs).
    """
    mag = np.asarray(mag)
    rows = mag.shape[0]
    outs = [np.full(rows, np.nan, np.float32) for _ in STAT_NAMES]
    stacked = np.full((rows, len(stack_n)), np.nan, np.float32)
    for r0 in range(0, rows, rows_per_pass):
        sl = slice(r0, min(rows, r0 + rows_per_pass))
        m = np.asarray(mag[sl], np.float32)
        valid = np.isfinite(m)
        e = None
        if magerr is not None:
            e = np.asarray(magerr[sl], np.float32)
            valid &= np.isfinite(e) & (e > 0)
        if flags is not None:
            f = np.asarray(flags[sl])
            fi = np.where(np.isfinite(f), f, 0).astype(np.int64) if f.dtype.kind == "f" else f.astype(np.int64)
            valid &= (fi & bad_flags) == 0
        n = valid.sum(axis=1)
        enough = n >= min_epochs
        mz = np.where(valid, m, 0.0).astype(np.float64)
        mean = mz.sum(axis=1) / np.maximum(n, 1)
        dev = np.where(valid, m - mean[:, None], 0.0)
        std = np.sqrt((dev * dev).sum(axis=1) / np.maximum(n - 1, 1))
        s = np.sort(np.where(valid, m, np.nan), axis=1)  # NaN sort last
        med = _row_median(s, n)
        s = np.sort(np.where(valid, np.abs(m - med[:, None].astype(np.float32)), np.nan), axis=1)
        rstd = MAD_TO_SIGMA * _row_median(s, n)
        del s
        if e is not None:
            w = np.where(valid, 1.0 / (e.astype(np.float64) ** 2), 0.0)
            wsum = w.sum(axis=1)
            wmean = (w * mz).sum(axis=1) / np.where(wsum > 0, wsum, 1)
            chi2 = (w * (mz - wmean[:, None]) ** 2).sum(axis=1) / np.maximum(n - 1, 1)
            merr = np.sqrt(np.where(valid, e.astype(np.float64) ** 2, 0.0).sum(axis=1) / np.maximum(n, 1))
            del w
        else:
            wmean = mean
            chi2 = merr = np.full(len(n), np.nan)
        for out, v in zip(outs, (n, mean, med, std, rstd, wmean, chi2, merr)):
            out[sl] = np.where(enough, v, np.nan) if out is not outs[0] else n
        if stack_n:
            st = _stacked_std(m, valid, n, stack_n)
            stacked[sl] = np.where(enough[:, None], st, np.nan)
    return (*outs, stacked)


def binned_median(x: Array, y: Array, edges: Array, min_count: int = 1) -> dict[str, Array]:
    """Median (and 16th/84th percentiles) of ``y`` in bins of ``x``; NaNs are ignored.

    Returns ``center, count, median, p16, p84`` arrays (one entry per bin; NaN where a bin
    has fewer than ``min_count`` points).
    """
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    k = np.digitize(x, edges) - 1
    nb = len(edges) - 1
    inside = (k >= 0) & (k < nb)
    k, y = k[inside], y[inside]
    order = np.lexsort((y, k))
    k, y = k[order], y[order]
    count = np.bincount(k, minlength=nb)
    start = np.r_[0, np.cumsum(count)[:-1]]
    med, p16, p84 = (np.full(nb, np.nan) for _ in range(3))
    for b in np.flatnonzero(count >= max(min_count, 1)):
        v = y[start[b]:start[b] + count[b]]
        med[b], p16[b], p84[b] = np.percentile(v, [50, 16, 84])
    return {"center": 0.5 * (edges[1:] + edges[:-1]), "count": count, "median": med, "p16": p16, "p84": p84}


# ----------------------------------------------------------------------------- theory (Eqs. 1-5)
def electrons(mag: Array | float, *, diameter_cm: float, exptime_s: float, wavelength_aa: float,
              bandwidth_aa: float, efficiency: float) -> Array:
    """Eqs. 4-5: photo-electrons collected from a source of AB magnitude ``mag`` in ``t``:
    ``eta pi (D/2)^2 F t / (h nu) c / lambda^2 dlambda`` with ``F = 10^(-(m + 48.6) / 2.5)``."""
    lam, dlam = wavelength_aa * 1e-8, bandwidth_aa * 1e-8  # cm
    f_nu = 10.0 ** (-(np.asarray(mag, float) + 48.6) / 2.5)  # erg/s/cm^2/Hz
    photon = _H_CGS * _C_CGS / lam  # h nu, erg
    return efficiency * math.pi * (diameter_cm / 2) ** 2 * f_nu * exptime_s / photon * _C_CGS / lam**2 * dlam


def snr_theory(mag: Array, params: Any) -> dict[str, Array]:
    """Theoretical magnitude errors of Eqs. 1-5 (Xiao et al. 2025, section 4.3).

    ``params`` has the fields of :class:`mstdask.config.PrecisionConfig`. The sky of
    ``sky_mag`` mag/arcsec^2 gives ``N_sky`` electrons per pixel of ``pixel_scale^2``
    arcsec^2; the aperture holds ``n_pix = pi (0.5 x 2 seeing / size)^2`` pixels (Eq. 3).
    Scintillation is Young's (1967) relative flux error
    ``C D^(-2/3) X^1.75 exp(-h / 8000) (2 t)^(-1/2)``.

    Returns
    -------
    dict
        ``n_star, n_sky_per_pix, n_pix, snr`` (Eq. 1) and the magnitude errors
        ``photon, sky, read, dark, scintillation, total`` (``2.5 / ln 10 / SNR`` per term,
        ``total`` their quadrature sum including scintillation).
    """
    p = params
    kw = dict(diameter_cm=p.diameter_cm, exptime_s=p.exptime_s, wavelength_aa=p.wavelength_aa,
              bandwidth_aa=p.bandwidth_aa, efficiency=p.efficiency)
    n_star = electrons(mag, **kw)
    n_sky = electrons(p.sky_mag, **kw) * p.pixel_scale_arcsec**2
    n_pix = math.pi * (0.5 * 2 * p.seeing_arcsec / p.pixel_scale_arcsec) ** 2
    rn2, dark = p.read_noise_e**2, p.dark_e_per_s * p.exptime_s
    noise = np.sqrt(n_star + (n_sky + rn2 + dark) * n_pix)
    snr = n_star / noise
    scint = (p.scintillation_coeff * p.diameter_cm ** (-2 / 3) * p.airmass**1.75
             * math.exp(-p.altitude_m / 8000.0) / math.sqrt(2 * p.exptime_s))
    terms = {"photon": MAG_PER_REL / np.sqrt(n_star),
             "sky": MAG_PER_REL * np.sqrt(n_sky * n_pix) / n_star,
             "read": MAG_PER_REL * np.sqrt(rn2 * n_pix) / n_star,
             "dark": MAG_PER_REL * np.sqrt(dark * n_pix) / n_star,
             "scintillation": np.full(np.shape(n_star), MAG_PER_REL * scint)}
    total = np.sqrt(MAG_PER_REL**2 / snr**2 + terms["scintillation"] ** 2)
    return {"n_star": n_star, "n_sky_per_pix": np.full(np.shape(n_star), n_sky), "n_pix": n_pix, "snr": snr,
            **terms, "total": total}


# ----------------------------------------------------------------------------- compiled rows
from numba import njit  # noqa: E402  (numba is a dependency: mstdask._median uses it too)


@njit(cache=True, nogil=True)
def _select(buf, n, k):  # pragma: no cover - compiled
    """k-th smallest of buf[:n] (Hoare quickselect, in place, O(n))."""
    lo, hi = 0, n - 1
    while lo < hi:
        pivot = buf[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while buf[i] < pivot:
                i += 1
            while buf[j] > pivot:
                j -= 1
            if i <= j:
                t = buf[i]
                buf[i] = buf[j]
                buf[j] = t
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return buf[k]


@njit(cache=True, nogil=True)
def _median_inplace(buf, n):  # pragma: no cover - compiled
    hi = _select(buf, n, n // 2)
    if n % 2:
        return hi
    # the lower middle is the largest of the part left of n // 2 after the selection
    lo = buf[0]
    for i in range(1, n // 2):
        if buf[i] > lo:
            lo = buf[i]
    return 0.5 * (lo + hi)


@njit(cache=True, nogil=True)
def _rows_kernel(mag, magerr, flags, has_err, has_flags, bad_flags, min_epochs, stack_n, out, stacked):
    # pragma: no cover - compiled; the same statistics as the NumPy path of block_statistics
    rows, ne = mag.shape
    vals = np.empty(ne, np.float64)
    errs = np.empty(ne, np.float64)
    buf = np.empty(ne, np.float64)
    csum = np.empty(ne + 1, np.float64)
    for r in range(rows):
        n = 0
        for c in range(ne):
            m = mag[r, c]
            if not np.isfinite(m):
                continue
            if has_err:
                e = magerr[r, c]
                if not (np.isfinite(e) and e > 0):
                    continue
                errs[n] = e
            if has_flags:
                f = flags[r, c]
                if np.isfinite(f) and (np.int64(f) & bad_flags) != 0:
                    continue
            vals[n] = m
            n += 1
        out[r, 0] = n
        if n < min_epochs:
            continue
        s = 0.0
        for i in range(n):
            s += vals[i]
        mean = s / n
        ss = 0.0
        for i in range(n):
            d = vals[i] - mean
            ss += d * d
        out[r, 1] = mean
        out[r, 3] = np.sqrt(ss / (n - 1))
        for i in range(n):
            buf[i] = vals[i]
        med = _median_inplace(buf, n)
        out[r, 2] = med
        for i in range(n):
            buf[i] = abs(vals[i] - med)
        out[r, 4] = MAD_TO_SIGMA * _median_inplace(buf, n)
        if has_err:
            sw = 0.0
            swm = 0.0
            se2 = 0.0
            for i in range(n):
                w = 1.0 / (errs[i] * errs[i])
                sw += w
                swm += w * vals[i]
                se2 += errs[i] * errs[i]
            wm = swm / sw
            chi = 0.0
            for i in range(n):
                d = vals[i] - wm
                chi += d * d / (errs[i] * errs[i])
            out[r, 5] = wm
            out[r, 6] = chi / (n - 1)
            out[r, 7] = np.sqrt(se2 / n)
        else:
            out[r, 5] = mean
        if stack_n.size == 0:
            continue
        # prefix sums of the deviations from the mean: a run's mean is then two lookups
        csum[0] = 0.0
        for i in range(n):
            csum[i + 1] = csum[i] + (vals[i] - mean)
        for j in range(stack_n.size):
            N = stack_n[j]
            nb = n // N
            if nb < 2:
                continue
            s1 = 0.0
            s2 = 0.0
            for b in range(nb):
                t = (csum[(b + 1) * N] - csum[b * N]) / N
                s1 += t
                s2 += t * t
            mu = s1 / nb
            stacked[r, j] = np.sqrt(max((s2 - nb * mu * mu) / (nb - 1), 0.0))


def block_statistics_fast(mag: Array, magerr: Array | None = None, flags: Array | None = None, *,
                          bad_flags: int = 26, min_epochs: int = 5, stack_n: tuple[int, ...] = ()
                          ) -> tuple[Array, ...]:
    """:func:`block_statistics` compiled row by row (numba): quickselect medians instead of
    sorts, one pass over each light curve, no temporaries bigger than one row. Same outputs."""
    mag = np.ascontiguousarray(mag)
    rows, ne = mag.shape
    dummy = np.empty((1, 1), np.float32)
    err = dummy if magerr is None else np.ascontiguousarray(magerr)
    flg = dummy if flags is None else np.ascontiguousarray(flags)
    out = np.full((rows, len(STAT_NAMES)), np.nan, np.float64)
    stacked = np.full((rows, len(stack_n)), np.nan, np.float64)
    _rows_kernel(mag, err, flg.astype(np.float32, copy=False) if flags is not None else dummy,
                 magerr is not None, flags is not None, np.int64(bad_flags), np.int64(min_epochs),
                 np.asarray(stack_n, np.int64), out, stacked)
    return (*(out[:, i].astype(np.float32) for i in range(len(STAT_NAMES))), stacked.astype(np.float32))
