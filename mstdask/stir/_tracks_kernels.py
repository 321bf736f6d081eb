"""Satellite and aircraft tracks of the per-frame STIR step (pure NumPy, no Dask, no xarray).

Xiao et al. 2025, section 3.1.4: :func:`detect_tracks` finds straight tracks by a Hough
transform of the 2x2-binned frame, verifies each candidate line at full resolution and flags
the pixels of a band around it. The method and the flagging rule are described in the
docstring of :mod:`mstdask.stir._stir_kernels` (section "Tracks"), which re-exports
:func:`detect_tracks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from ._background_kernels import _MAD_TO_SIGMA, _STRIPE_ROWS, Background, _background_from_binned, _bin, \
    _default_config

if TYPE_CHECKING:
    from ..config import StirConfig

__all__ = ["detect_tracks"]

_MEDIAN_NOISE = 1.2533  # std of the median of n Gaussian values is 1.2533 sigma / sqrt(n)


def _line_pixels(shape: tuple[int, int], x0: float, y0: float, ux: float, uy: float, half: float,
                 t_lo: float = -np.inf, t_hi: float = np.inf) -> tuple[np.ndarray, ...]:
    """Pixels whose centres lie within ``half`` px of the line ``(x0, y0) + t (ux, uy)``.

    Returns ``iy, ix`` (int) and, per pixel, ``t`` (position along the line) and ``d``
    (signed perpendicular offset, + to the left of the direction), restricted to
    ``t_lo <= t <= t_hi`` and to the frame.
    """
    ny, nx = shape
    if abs(ux) >= abs(uy):  # walk along x, one column at a time
        n_major, n_minor, a0, m0, ua, um = nx, ny, x0, y0, ux, uy
    else:
        n_major, n_minor, a0, m0, ua, um = ny, nx, y0, x0, uy, ux
    along = np.arange(n_major, dtype=np.float64)
    t_of = (along - a0) / ua
    keep = (t_of >= t_lo - half) & (t_of <= t_hi + half)
    along = along[keep]
    if along.size == 0:
        e = np.zeros(0, dtype=np.intp)
        return e, e, np.zeros(0), np.zeros(0)
    centre = m0 + (along - a0) * (um / ua)
    reach = int(math.ceil(half / abs(ua))) + 1
    offs = np.arange(-reach, reach + 1)
    minor = np.rint(centre).astype(np.intp)[:, None] + offs[None, :]
    major = np.broadcast_to(along.astype(np.intp)[:, None], minor.shape)
    if abs(ux) >= abs(uy):
        ix, iy = major.reshape(-1), minor.reshape(-1)
    else:
        iy, ix = major.reshape(-1), minor.reshape(-1)
    inside = (minor.reshape(-1) >= 0) & (minor.reshape(-1) < n_minor)
    ix, iy = ix[inside], iy[inside]
    dx, dy = ix - x0, iy - y0
    t = dx * ux + dy * uy
    d = dy * ux - dx * uy
    sel = (np.abs(d) <= half) & (t >= t_lo) & (t <= t_hi)
    return iy[sel], ix[sel], t[sel], d[sel]


def _component_stats(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Length and width (sqrt(12 x variance) along the principal axes) of labelled components.

    Returns ``length, width`` (per label 1..n, index 0 unused) and the ``(y, x)`` coordinates
    of the labelled pixels with their labels.
    """
    iy, ix = np.nonzero(labels)
    lab = labels[iy, ix]
    cnt = np.bincount(lab, minlength=n + 1).astype(np.float64)
    cnt[0] = 1
    x, y = ix.astype(np.float64), iy.astype(np.float64)
    mx = np.bincount(lab, x, n + 1) / cnt
    my = np.bincount(lab, y, n + 1) / cnt
    dx, dy = x - mx[lab], y - my[lab]
    sxx = np.bincount(lab, dx * dx, n + 1) / cnt + 1 / 12.0  # + pixel size
    syy = np.bincount(lab, dy * dy, n + 1) / cnt + 1 / 12.0
    sxy = np.bincount(lab, dx * dy, n + 1) / cnt
    tr, det = sxx + syy, sxx * syy - sxy * sxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0.0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1 / 12.0)
    return np.sqrt(12 * l1), np.sqrt(12 * l2), np.stack([iy, ix, lab])


def _fit_line(py: np.ndarray, px: np.ndarray, w: np.ndarray) -> tuple[float, float, float, float]:
    """Weighted total-least-squares line through points: centroid and unit direction."""
    ws = w.sum()
    cx, cy = float((w * px).sum() / ws), float((w * py).sum() / ws)
    dx, dy = px - cx, py - cy
    sxx, syy, sxy = (w * dx * dx).sum(), (w * dy * dy).sum(), (w * dx * dy).sum()
    ang = 0.5 * math.atan2(2 * sxy, sxx - syy)
    return cx, cy, math.cos(ang), math.sin(ang)


def _robust_sigma(v: np.ndarray) -> float:
    if v.size < 8:
        return float("nan")
    med = np.median(v)
    return float(_MAD_TO_SIGMA * np.median(np.abs(v - med)))


def _medians_by_group(values: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Median and count of ``values`` in each group ``0..n_groups-1`` (NaN where empty)."""
    order = np.argsort(groups, kind="stable")
    g, v = groups[order], values[order]
    counts = np.bincount(g, minlength=n_groups)[:n_groups]
    med = np.full(n_groups, np.nan)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for k in np.flatnonzero(counts):
        med[k] = np.median(v[starts[k]:starts[k] + counts[k]])
    return med, counts



@dataclass(frozen=True)
class _Band:
    """Pixels within ``track_max_halfwidth_px + 8`` px of a candidate line.

    ``t`` is the position along the line, ``d`` the signed and ``ad`` the absolute offset
    from it, ``v`` the value minus the background and the band's local offset, ``valid``
    the pixels that count (finite, unmasked, not on a track or a halo found before) and
    ``sigma`` the robust per-pixel noise of the band's outer 8 px.
    """

    iy: np.ndarray
    ix: np.ndarray
    t: np.ndarray
    d: np.ndarray
    ad: np.ndarray
    v: np.ndarray
    valid: np.ndarray
    sigma: float


@dataclass(frozen=True)
class _Segments:
    """Significance of a line per ~``track_segment_px`` segment of its in-frame part.

    ``t_lo, t_hi`` bound the in-frame centre line, ``edges`` the segments; ``core`` marks
    the valid pixels within 1.5 px of the line; ``z`` is the significance of each
    segment's core median (NaN below 8 pixels), ``linelike`` is False where a shoulder is
    bright too.
    """

    t_lo: float
    t_hi: float
    edges: np.ndarray
    core: np.ndarray
    z: np.ndarray
    linelike: np.ndarray


def _band_around(image: np.ndarray, mask: np.ndarray | None, bkg: Background, line: tuple[float, ...],
                 r_max: float, out: np.ndarray, blobs: np.ndarray | None, b: int) -> _Band | None:
    """The band around ``line`` with its local offset and noise; None when too little is valid."""
    ny, nx = image.shape
    r_out = r_max + 8.0  # the outer 8 px of the band measure the local background and noise
    cx, cy, ux, uy = line
    iy, ix, t, d = _line_pixels((ny, nx), cx, cy, ux, uy, r_out)
    if iy.size == 0:
        return None
    v = image[iy, ix]
    valid = np.isfinite(v) & ~out[iy, ix]  # pixels of tracks found before do not count twice
    if mask is not None:
        valid &= ~mask[iy, ix]
    if blobs is not None:  # nor do star halos (binned map)
        valid &= ~blobs[np.minimum(iy // b, blobs.shape[0] - 1), np.minimum(ix // b, blobs.shape[1] - 1)]
    v = v - bkg.at(iy, ix)
    ad = np.abs(d)
    outer = valid & (ad >= r_max)
    if outer.sum() < 50:
        return None
    off = float(np.median(v[outer]))
    sigma = _robust_sigma(v[outer] - off)
    if not sigma > 0:
        return None
    return _Band(iy=iy, ix=ix, t=t, d=d, ad=ad, v=v - off, valid=valid, sigma=sigma)


def _n_above(band: _Band, sel: np.ndarray, nb: int, config: StirConfig) -> int:
    """Offset bins (1 px, |d|) from the centre line out whose median over ``sel`` is above
    ``track_nsigma`` (of the median), contiguous from the line."""
    aprof, acnt = _medians_by_group(band.v[sel], np.floor(band.ad[sel]).astype(np.intp), nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        above = aprof > config.track_nsigma * _MEDIAN_NOISE * band.sigma / np.sqrt(acnt)
    return int(np.argmin(np.append(above, False)))


def _segment_tests(band: _Band, r_max: float, config: StirConfig) -> _Segments | None:
    """Per segment: significance of the core median, and whether the shoulders stay dark."""
    t, d, ad, v, sigma = band.t, band.d, band.ad, band.v, band.sigma
    # Segments of ~segment_px along the in-frame part of the line (equal lengths, no stubs).
    t_lo, t_hi = float(t[ad <= 1.5].min(initial=np.inf)), float(t[ad <= 1.5].max(initial=-np.inf))
    length = t_hi - t_lo
    if not length >= config.track_min_length_px:
        return None
    n_seg = max(1, int(round(length / config.track_segment_px)))
    edges = np.linspace(t_lo, t_hi, n_seg + 1)
    seg = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, n_seg - 1)
    in_line = band.valid & (t >= t_lo) & (t <= t_hi)
    # Width of the whole line's profile, to put the shoulders beyond the track's wings.
    s0 = max(float(_n_above(band, in_line & (ad < r_max), int(r_max), config)) + 2.0, 8.0)
    # Per segment: median of the core (|d| <= 1.5) and of each shoulder (s0 <= |d| <= s0 + 6).
    core = in_line & (ad <= 1.5)
    med, cnt = _medians_by_group(v[core], seg[core], n_seg)
    shoulder = in_line & (ad >= s0) & (ad <= s0 + 6.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = med / (_MEDIAN_NOISE * sigma / np.sqrt(cnt))
        z = np.where(cnt >= 8, z, np.nan)
        # A track is bright on its centre line and not beside it; a line through a star
        # halo or along its edge is bright on (at least) one side too.
        linelike = np.ones(n_seg, dtype=bool)
        for side in (shoulder & (d > 0), shoulder & (d < 0)):
            m_s, c_s = _medians_by_group(v[side], seg[side], n_seg)
            bright = (m_s > 0.3 * med) & (m_s / (_MEDIAN_NOISE * sigma / np.sqrt(c_s)) > 3.0)
            linelike &= ~bright
    return _Segments(t_lo=t_lo, t_hi=t_hi, edges=edges, core=core, z=z, linelike=linelike)


def _signal_extent(band: _Band, segs: _Segments) -> tuple[float, float, float] | None:
    """Ends ``e_lo, e_hi`` (along the line) of the part with signal, and its coverage.

    From the first to the last strong segment, the ends trimmed to quarter segments with
    signal; the coverage is the fraction of measured segments in between with signal.
    """
    t, v, sigma, edges = band.t, band.v, band.sigma, segs.edges
    strong = np.flatnonzero((segs.z > 3.0) & segs.linelike)
    if strong.size == 0:
        return None
    first, last = int(strong[0]), int(strong[-1])
    zz, ll = segs.z[first:last + 1], segs.linelike[first:last + 1]
    measured = np.isfinite(zz)
    coverage = float(np.mean((zz[measured] > 2.0) & ll[measured])) if measured.any() else 0.0
    e_lo, e_hi = float(edges[first]), float(edges[last + 1])
    # Trim the ends to quarter segments with signal (a track leaving the frame along an edge).
    quarter = (edges[1] - edges[0]) / 4.0
    for _ in range(3):
        for end in (0, 1):
            a, c = (e_lo, e_lo + quarter) if end == 0 else (e_hi - quarter, e_hi)
            q = segs.core & (t >= a) & (t <= c)
            nq = int(q.sum())
            if nq >= 8 and np.median(v[q]) / (_MEDIAN_NOISE * sigma / math.sqrt(nq)) > 2.0:
                continue
            if end == 0:
                e_lo += quarter
            else:
                e_hi -= quarter
    if e_hi <= e_lo:
        return None
    return e_lo, e_hi, coverage


def _is_defect(band: _Band, line: tuple[float, ...], in_ext: np.ndarray, shape: tuple[int, int],
               config: StirConfig) -> bool:
    """A line within ``track_axis_tolerance_deg`` of a row or column that is a bad column
    (row) or a frame edge rather than a track."""
    ny, nx = shape
    cx, cy, ux, uy = line
    if not min(abs(ux), abs(uy)) < math.sin(math.radians(config.track_axis_tolerance_deg)):
        return False
    # A bad column or row is one pixel wide: nearly all of the excess in one column (row).
    # Measured with the line snapped to the pixel grid, since a star near the defect can
    # tilt the fit by a fraction of a degree and share the column between two offset bins.
    sel_ax = band.valid & in_ext & (band.ad <= 6)
    t_mid = float(np.median(band.t[sel_ax])) if sel_ax.any() else 0.0
    if abs(uy) > abs(ux):
        across = band.ix[sel_ax] - (cx + t_mid * ux)
    else:
        across = band.iy[sel_ax] - (cy + t_mid * uy)
    cbin = np.clip(np.floor(across + 0.5).astype(np.intp) + 6, 0, 12)
    cprof, ccnt = _medians_by_group(band.v[sel_ax], cbin, 13)
    c = np.nan_to_num(np.clip(cprof[3:10], 0, None))
    k = int(np.argmax(c))
    z_col = c[k] / (_MEDIAN_NOISE * band.sigma / math.sqrt(max(int(ccnt[3 + k]), 1)))
    if c.sum() > 0 and c[k] / c.sum() > 0.6 and z_col > 5:
        return True
    # ... and a line hugging a frame edge is the edge, not a track.
    dist_edge = min(cx, nx - 1 - cx) if abs(uy) > abs(ux) else min(cy, ny - 1 - cy)
    return dist_edge < config.track_band_px


def _cross_profile(band: _Band, sel: np.ndarray, nb: int, config: StirConfig) -> tuple[float, float, np.ndarray]:
    """Half-width above ``track_nsigma``, FWHM and signed cross profile (median per 1-px
    offset bin, ``2 nb + 1`` bins) of the pixels ``sel``."""
    sbin = np.clip(np.floor(band.d[sel] + 0.5).astype(np.intp) + nb, 0, 2 * nb)
    sprof, _ = _medians_by_group(band.v[sel], sbin, 2 * nb + 1)
    n_above = _n_above(band, sel, nb, config)  # contiguous from the centre line
    halfwidth = float(min(n_above, nb))
    pos = np.clip(np.nan_to_num(sprof), 0, None)
    offs = np.arange(-nb, nb + 1)
    w_in = np.abs(offs) <= max(3, n_above)
    fwhm = float(2.3548 * math.sqrt((pos[w_in] * offs[w_in] ** 2).sum() / pos[w_in].sum())) if pos[w_in].sum() > 0 \
        else float("nan")
    return halfwidth, fwhm, sprof


def _line_geometry(line: tuple[float, ...], e_lo: float, e_hi: float) -> dict[str, float]:
    """Hough angle and distance, direction and flagged ends of a line (see :func:`detect_tracks`)."""
    cx, cy, ux, uy = line
    theta = math.atan2(ux, -uy)  # Hough normal angle, skimage convention: x cos + y sin = rho
    if theta >= math.pi / 2:
        theta -= math.pi
    elif theta < -math.pi / 2:
        theta += math.pi
    rho = cx * math.cos(theta) + cy * math.sin(theta)
    return {"angle": theta, "dist": rho, "direction_deg": math.degrees(math.atan2(uy, ux)) % 180.0,
            "x0": cx + e_lo * ux, "y0": cy + e_lo * uy, "x1": cx + e_hi * ux, "y1": cy + e_hi * uy}


def _verify_and_flag(image: np.ndarray, mask: np.ndarray | None, bkg: Background, line: tuple[float, ...],
                     config: StirConfig, out: np.ndarray, blobs: np.ndarray | None = None,
                     b: int = 1) -> dict[str, Any] | None:
    """Check a candidate line at full resolution; flag its band in ``out`` if it is a track.

    Returns the line's description, or None when it is rejected.
    """
    r_max = float(config.track_max_halfwidth_px)
    nb = int(r_max)
    band = _band_around(image, mask, bkg, line, r_max, out, blobs, b)
    if band is None:
        return None
    segs = _segment_tests(band, r_max, config)
    if segs is None:
        return None
    extent = _signal_extent(band, segs)
    if extent is None:
        return None
    e_lo, e_hi, coverage = extent
    t, ad, sigma = band.t, band.ad, band.sigma
    in_ext = (t >= e_lo) & (t <= e_hi)
    sel = segs.core & in_ext
    n_core = int(sel.sum())
    # Medians: stars strung along a line raise the mean of its core, not its median.
    core_level = float(np.median(band.v[sel]) / sigma) if n_core else 0.0
    snr = core_level * math.sqrt(n_core) / _MEDIAN_NOISE
    info = {"snr": snr, "coverage": coverage, "length_px": e_hi - e_lo, "core_sigma": core_level}
    # The core must be as bright as what lit up the detection map: a line grazing the wing
    # of a track found before, or a chance alignment, is fainter than that.
    if e_hi - e_lo < config.track_min_length_px or coverage < config.track_min_coverage \
            or snr < config.track_min_snr or core_level < config.track_min_core_sigma:
        return None
    if _is_defect(band, line, in_ext, image.shape, config):
        return None
    # Cross-track profile over the extent: median per 1-px offset bin (signed and |d|).
    halfwidth, fwhm, sprof = _cross_profile(band, band.valid & in_ext & (ad < r_max), nb, config)

    # Flag: the paper's per-pixel rule in the band, and the profile's 3-sigma width. A track
    # that reaches the frame edge is flagged up to it, over the band's full width.
    f_lo = -np.inf if e_lo == segs.t_lo else e_lo
    f_hi = np.inf if e_hi == segs.t_hi else e_hi
    rule = (ad <= config.track_band_px / 2.0) & (band.v > config.track_nsigma * sigma) & band.valid
    wide = ad <= halfwidth + 1.0  # to the outer edge of the first offset bin below 3 sigma
    flag = (t >= f_lo) & (t <= f_hi) & (rule | wide)
    out[band.iy[flag], band.ix[flag]] = True

    info.update(_line_geometry(line, e_lo, e_hi))
    info.update({
        "halfwidth_px": halfwidth + 1.0, "fwhm_px": fwhm,
        "peak_sigma": float(np.nanmax(sprof[nb - 1:nb + 2]) / sigma), "sigma_adu": sigma,
        "n_flagged": int(flag.sum()),
    })
    return {k: (v if isinstance(v, int) else float(v)) for k, v in info.items()}


def _fill_nan_nearest(a: np.ndarray) -> None:
    """Replace NaN pixels of ``a`` in place by the nearest finite pixel (0 if none near)."""
    nan = np.isnan(a)
    if not nan.any():
        return
    lab, n = ndi.label(nan)
    for sl in ndi.find_objects(lab):
        sl = tuple(slice(max(0, q.start - 1), q.stop + 1) for q in sl)
        hole = nan[sl]
        if hole.all():
            a[sl][hole] = 0.0
            continue
        idx = ndi.distance_transform_edt(hole, return_distances=False, return_indices=True)
        a[sl] = a[sl][tuple(idx)]



def _detection_map(binned: np.ndarray, background: Background, config: StirConfig) -> np.ndarray:
    """Pixels of the binned frame above ``track_detect_nsigma`` after a matched filter."""
    b = config.track_binning
    nby = binned.shape[0]
    # Significance of the binned frame, smoothed by a Gaussian ~ a track's width (matched filter).
    sig = np.empty_like(binned)
    step = _STRIPE_ROWS
    for r0 in range(0, nby, step):
        r1 = min(nby, r0 + step)
        lev = background.rows(r0, r1, "level", binned=True)
        sgm = background.rows(r0, r1, "sigma_binned", binned=True)
        np.subtract(binned[r0:r1], lev, out=sig[r0:r1])
        sig[r0:r1] /= sgm
    # Fully masked binned pixels are mostly saturated star cores: give them the value of the
    # nearest valid pixel, so a halo is a disc (cut out below), not a ring around a hole.
    _fill_nan_nearest(sig)
    # A saturated star core is masked, its halo is not: clip so that no pixel outweighs a track.
    np.clip(sig, -10.0, 10.0, out=sig)
    smooth = ndi.gaussian_filter(sig, config.track_smooth_px / b, mode="constant", truncate=3.0)
    del sig
    sub = smooth[::3, ::3]
    norm = _robust_sigma(sub[sub != 0]) or 1.0
    det = smooth > config.track_detect_nsigma * norm
    del smooth
    e = 2  # frame edges: the smoothing and the background are least certain there
    det[:e], det[-e:], det[:, :e], det[:, -e:] = False, False, False, False
    return det


def _halo_blobs(labels: np.ndarray, long_: np.ndarray, config: StirConfig) -> np.ndarray:
    """Binned map of the round, fat parts of the long pieces ``long_[labels]`` (star halos).

    Halos of bright stars (and groups of stars) are fat: cut out the round parts that
    contain a square wider than a track's ribbon (an opening, separable min/max filters),
    keep the thin arms (a track crossing a halo) and fat elongated parts (a wide trail).
    """
    fat_r = max(2, int(round(config.track_blob_radius_px / config.track_binning)))
    long_map = long_[labels].view(np.uint8)
    fat = ndi.maximum_filter(ndi.minimum_filter(long_map, size=2 * fat_r + 1, mode="constant"), size=2 * fat_r + 1)
    del long_map
    flab, nf = ndi.label(fat, structure=np.ones((3, 3), dtype=bool))
    del fat
    if not nf:
        return np.zeros(labels.shape, dtype=bool)
    fl, fw, _ = _component_stats(flab, nf)
    round_ = fl < 3 * fw
    round_[0] = False
    return ndi.maximum_filter(round_[flab].view(np.uint8), size=5).view(bool)


def _skeleton_points(det: np.ndarray, config: StirConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Skeleton pixels ``py, px`` of the long thin pieces of ``det``, and the halo map.

    Long pieces only, reduced to their skeletons: a track becomes its centre line (one vote
    per pixel along it), a star a dot or a short spur, however bright. None if none is left.
    """
    from skimage.morphology import skeletonize

    labels, n = ndi.label(det, structure=np.ones((3, 3), dtype=bool))
    del det
    if n == 0:
        return None
    length, _, (py, px, plab) = _component_stats(labels, n)
    min_len_b = config.track_min_length_px / config.track_binning
    long_ = length >= min_len_b
    long_[0] = False
    if not long_.any():
        return None
    blobs = _halo_blobs(labels, long_, config)
    sel = long_[plab] & ~blobs[py, px]
    py, px = py[sel], px[sel]
    del labels
    if py.size == 0:
        return None
    y0b, x0b = int(py.min()), int(px.min())
    box = np.zeros((int(py.max()) - y0b + 1, int(px.max()) - x0b + 1), dtype=bool)
    box[py - y0b, px - x0b] = True
    # A halo cut away leaves short stubs: drop pieces shorter than half a track.
    blab, nbl = ndi.label(box, structure=np.ones((3, 3), dtype=bool))
    bl, _, _ = _component_stats(blab, nbl)
    box &= (bl >= min_len_b / 2)[blab]
    del blab
    py, px = np.nonzero(skeletonize(box))
    py += y0b
    px += x0b
    return py, px, blobs


def _hough_peak(qy: np.ndarray, qx: np.ndarray, thetas: np.ndarray,
                min_votes: float) -> tuple[float, float, int, int] | None:
    """Strongest ``hough_line`` peak ``(angle, dist)`` of the points, in the frame of their
    bounding box (origin ``y0b, x0b``); None below ``min_votes``."""
    from skimage.transform import hough_line

    # Hough on the bounding box of the remaining points (a smaller accumulator).
    y0b, x0b = int(qy.min()), int(qx.min())
    canvas = np.zeros((int(qy.max()) - y0b + 1, int(qx.max()) - x0b + 1), dtype=bool)
    canvas[qy - y0b, qx - x0b] = True
    acc, angles, dists = hough_line(canvas, thetas)
    k = int(np.argmax(acc))
    ir, it = np.unravel_index(k, acc.shape)
    if acc[ir, it] < min_votes:
        return None
    return float(angles[it]), float(dists[ir]), y0b, x0b


def _refine_line(qy: np.ndarray, qx: np.ndarray, near: np.ndarray) -> tuple[float, float, float, float]:
    """Least-squares line through the points ``near`` a Hough line, refitted on the points
    within 4 and then 3 px of the fit: centroid and unit direction (binned pixels)."""
    fx, fy, ux, uy = _fit_line(qy[near].astype(float), qx[near].astype(float), np.ones(near.sum()))
    for tol in (4.0, 3.0):
        dd = (qy - fy) * ux - (qx - fx) * uy
        near2 = np.abs(dd) <= tol
        if near2.sum() >= 3:
            fx, fy, ux, uy = _fit_line(qy[near2].astype(float), qx[near2].astype(float), np.ones(near2.sum()))
    return fx, fy, ux, uy


def _hough_tracks(image: np.ndarray, mask: np.ndarray | None, background: Background, config: StirConfig,
                  out: np.ndarray, py: np.ndarray, px: np.ndarray, blobs: np.ndarray) -> list[dict[str, Any]]:
    """Strongest Hough line of the skeleton points ``py, px`` first, verified and flagged in
    ``out``, until no peak is left; returns the accepted lines in the order found."""
    b = config.track_binning
    min_len_b = config.track_min_length_px / b
    lines: list[dict[str, Any]] = []
    alive = np.ones(py.size, dtype=bool)
    thetas = np.deg2rad(np.arange(-90.0, 90.0, config.track_hough_step_deg))
    tried = 0
    while alive.sum() >= min_len_b and len(lines) < config.track_max_lines and tried < 4 * config.track_max_lines:
        tried += 1
        qy, qx = py[alive], px[alive]
        peak = _hough_peak(qy, qx, thetas, min_len_b / 2)
        if peak is None:
            break
        th, rho, y0b, x0b = peak
        # Refine: least-squares line through the points near the Hough line, twice narrower.
        ct, st = math.cos(th), math.sin(th)
        dist = (qx - x0b) * ct + (qy - y0b) * st - rho
        near = np.abs(dist) <= 6.0
        if near.sum() < 3:
            alive[np.flatnonzero(alive)[near]] = False
            continue
        fx, fy, ux, uy = _refine_line(qy, qx, near)
        # Binned pixel centre j sits at full-resolution coordinate b j + (b - 1) / 2.
        full = (b * fx + (b - 1) / 2.0, b * fy + (b - 1) / 2.0, ux, uy)
        info = _verify_and_flag(image, mask, background, full, config, out, blobs, b)
        # Remove the points of this line whatever the verdict (so the loop always advances),
        # of an accepted track all those within its flagged band.
        reach = 4.0 if info is None else max(4.0, (info["halfwidth_px"] + 2 * config.track_smooth_px + 2) / b)
        dd = (qy - fy) * ux - (qx - fx) * uy
        alive[np.flatnonzero(alive)[np.abs(dd) <= reach]] = False
        if info is not None:
            lines.append(info)
    return lines


def detect_tracks(image: np.ndarray, mask: np.ndarray | None = None, config: StirConfig | None = None, *,
                  background: Background | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Satellite and aircraft tracks of one reduced frame (Xiao et al. 2025, section 3.1.4).

    Bin 2 x 2, subtract the background, smooth with a Gaussian of about a track's width,
    keep long thin connected pieces above ``config.track_detect_nsigma``, find straight lines
    with ``skimage.transform.hough_line`` (strongest peak first, refined by a least-squares
    fit), verify each line at full resolution and flag its band (see the module docstring).

    Parameters
    ----------
    image : ndarray of float32, shape (ny, nx)
        Reduced frame (ADU, sky included); NaN pixels are ignored.
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels to ignore (bad, saturated, pepper & salt). Masked pixels inside a track's
        band are still flagged as track.
    config : StirConfig, optional
    background : Background, optional
        From :func:`estimate_background`, to share it with :func:`detect_cosmic_rays`.

    Returns
    -------
    track_mask : ndarray of bool, shape (ny, nx)
        Pixels of a satellite/aircraft track.
    lines : list of dict
        One per track, strongest first, in full-frame pixel coordinates (0-based, x along
        NAXIS1): ``angle`` (rad) and ``dist`` (px) of the centre line in the convention of
        ``skimage.transform.hough_line`` (``x cos(angle) + y sin(angle) = dist``),
        ``direction_deg`` (direction in [0, 180), from +x towards +y), ``x0, y0, x1, y1``
        (ends of the flagged extent), ``halfwidth_px`` (flagged half-width), ``fwhm_px``,
        ``peak_sigma`` (peak per pixel in units of the noise), ``core_sigma`` (median of the
        central 3 px, same unit), ``snr`` (of that median along the line), ``coverage``
        (fraction of the line's segments with signal), ``length_px``,
        ``sigma_adu``, ``n_flagged``.
    """
    config = config or _default_config()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, not shape {image.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    ny, nx = image.shape
    out = np.zeros((ny, nx), dtype=bool)
    b = config.track_binning
    binned = _bin(image, mask, b)
    if background is None:
        background = _background_from_binned(binned, b, config.background_box_px, image.shape)
    elif background.binning != b or tuple(background.shape) != image.shape:
        raise ValueError("background must come from estimate_background(image, mask, config) of this frame")
    nby, nbx = binned.shape
    if min(nby, nbx) < 8:
        return out, []
    points = _skeleton_points(_detection_map(binned, background, config), config)
    if points is None:
        return out, []
    py, px, blobs = points
    lines = _hough_tracks(image, mask, background, config, out, py, px, blobs)
    lines.sort(key=lambda r: -r["snr"])
    return out, lines
