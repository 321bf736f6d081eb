"""Pure NumPy kernels of the STATIC photometry (Xiao et al. 2025, sections 3.2.2-3.2.3).

Background, source extraction and aperture sums use ``sep`` (the SExtractor library);
the rest is ours: best and reference apertures from the growth curves, the 2-D
polynomial aperture correction, a PSFEx-like empirical PSF whose oversampled pixels vary
as polynomials over the detector with linear (fixed-position) PSF fluxes, and the
position-dependent zero point. No Dask or xarray here: :mod:`mstdask.photometry` applies
these to one exposure per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sep

from ..config import PhotometryConfig

__all__ = [
    "ApertureChoice",
    "PSFModel",
    "adaptive_fwhm",
    "aperture_photometry",
    "background",
    "best_aperture",
    "build_psf",
    "detect",
    "fit_poly2d",
    "fit_zero_point",
    "fill_masked",
    "flags_under",
    "mag_from_flux",
    "measure",
    "nearest_neighbour",
    "poly2d",
    "psf_photometry",
    "reference_aperture",
]

Array = np.ndarray
_MAG_ERR = 2.5 / math.log(10.0)  # d(mag) = 1.0857 d(flux) / flux


def _c32(a: Array) -> Array:
    """sep wants C-contiguous, native-endian float arrays."""
    return np.ascontiguousarray(a, dtype=np.float32)


def background(data: Array, bad: Array, config: PhotometryConfig, debias: bool = False) -> tuple[Array, Array]:
    """Sky background and its rms, as maps (sep's SExtractor background: sigma-clipped mode
    per ``background_box_px`` mesh, median-filtered, bicubic between meshes).

    Parameters
    ----------
    data : ndarray
        Reduced frame; NaN pixels are treated as masked.
    bad : ndarray of bool
        Pixels to ignore (bad, saturated, pepper-and-salt, tracks, cosmic rays).
    debias : bool
        Shift the map to the clipped mean of the unmasked residuals (use when ``bad`` masks
        the sources, see :func:`detect`).

    Returns
    -------
    back, rms : ndarray of float32
    """
    finite = np.isfinite(data)
    img = _c32(np.where(finite, data, 0.0))  # one pass; np.nan_to_num takes three on a full frame
    msk = np.ascontiguousarray(bad | ~finite)
    box = int(config.background_box_px)
    bkg = sep.Background(img, mask=msk, bw=box, bh=box, fw=int(config.background_filter),
                         fh=int(config.background_filter))
    back, rms = bkg.back(dtype=np.float32), bkg.rms(dtype=np.float32)
    if debias:
        # SExtractor's mode (2.5 median - 1.5 mean) sits below the mean of a Poisson-skewed
        # sky by ~0.03 sigma, which aperture sums integrate into a growth curve that never
        # converges; with the sources masked the clipped mean is the sky.
        step = max(1, int(np.sqrt(img.size / 2e6)))  # ~2 million pixels are plenty
        r = (img - back)[::step, ::step][~msk[::step, ::step]].astype(np.float64)
        lo, hi = -np.inf, np.inf
        for _ in range(5):
            r = r[(r > lo) & (r < hi)]
            if r.size < 100:
                break
            m, sd = r.mean(), r.std()
            lo, hi = m - 3 * sd, m + 3 * sd
        if r.size >= 100:
            back = back + np.float32(r.mean())
    return back, rms


def detect(sub: Array, rms: Array, bad: Array, config: PhotometryConfig, *, footprints_only: bool = False,
           grow_px: int = 4) -> Array:
    """Detect sources on a background-subtracted frame (sep.extract, SExtractor's algorithm).

    Masked pixels never trigger a detection.

    Returns
    -------
    objects : structured ndarray
        sep's catalogue (isophotal ``x, y``, ``a, b, theta``, ``npix``, ``peak``, ``flux``, ``flag``);
    or, with ``footprints_only``, a bool mask
        of the sources' pixels (no deblending or cleaning, all of them) grown by ``grow_px``:
        masked in a second background pass so that star wings and faint neighbours do not
        lift the sky (which would bias every aperture flux low).
    """
    img = _c32(sub)
    # sep keeps every above-threshold pixel on one stack; size it for dense fields.
    sep.set_extract_pixstack(max(300_000, img.size // 4))
    sep.set_sub_object_limit(4096)
    kw = dict(err=_c32(rms), mask=np.ascontiguousarray(bad), minarea=int(config.detect_minarea))
    if not footprints_only:
        return sep.extract(img, float(config.detect_nsigma), deblend_cont=float(config.deblend_cont), clean=True,
                           **kw)
    from scipy import ndimage

    _, seg = sep.extract(img, float(config.detect_nsigma), deblend_cont=1.0, clean=False, segmentation_map=True,
                         **kw)
    return ndimage.maximum_filter(seg > 0, size=2 * grow_px + 1)


def measure(sub: Array, bad: Array, obj: Array) -> dict[str, Array]:
    """Windowed centroids (``XWIN_IMAGE``) and adaptive-moment FWHMs of :func:`detect`'s sources.

    Returns
    -------
    dict
        ``x, y`` (0-based windowed centroids), ``x_iso, y_iso``, ``a, b, theta``, ``npix``,
        ``peak``, ``flux_iso``, ``fwhm`` (adaptive-moment FWHM, px),
        ``extract_flags`` (sep/SExtractor flags: 1 crowded, 2 blended, 8 truncated...).
    """
    img = _c32(sub)
    out: dict[str, Array] = {
        "x_iso": obj["x"].astype(np.float64), "y_iso": obj["y"].astype(np.float64),
        "a": obj["a"].astype(np.float32), "b": obj["b"].astype(np.float32),
        "theta": obj["theta"].astype(np.float32), "npix": obj["npix"].astype(np.int32),
        "peak": obj["peak"].astype(np.float32), "flux_iso": obj["flux"].astype(np.float32),
        "extract_flags": obj["flag"].astype(np.int16),
    }
    if len(obj) == 0:
        out.update(x=np.zeros(0), y=np.zeros(0), fwhm=np.zeros(0, np.float32))
        return out
    # Windowed centroids (SExtractor's XWIN: Gaussian window of sigma = 2 r_half / 2.3548),
    # then the FWHM from adaptive Gaussian moments around them.
    rmax = np.clip(6.0 * obj["a"], 3.0, 40.0)
    r50, _ = sep.flux_radius(img, obj["x"], obj["y"], rmax, 0.5, subpix=5)
    sig = np.clip(2.0 * r50 / 2.3548, 0.5, 20.0)
    xw, yw, wflag = sep.winpos(img, obj["x"], obj["y"], sig)
    bad_w = (wflag != 0) | ~np.isfinite(xw) | ~np.isfinite(yw) | (np.hypot(xw - obj["x"], yw - obj["y"]) > 2.0 * sig)
    out["x"] = np.where(bad_w, obj["x"], xw).astype(np.float64)
    out["y"] = np.where(bad_w, obj["y"], yw).astype(np.float64)
    out["fwhm"] = adaptive_fwhm(img, bad, out["x"], out["y"], sig).astype(np.float32)
    return out


def adaptive_fwhm(sub: Array, bad: Array, x: Array, y: Array, sigma0: Array, half: int = 8,
                  iterations: int = 6, batch: int = 8192) -> Array:
    """FWHM (px) from adaptive Gaussian-weighted second moments (Bernstein & Jarvis 2002).

    The weight's sigma is iterated to ``sigma^2 = 2 M`` (M the weighted moment per axis),
    whose fixed point is the source's sigma for a Gaussian and close to the core FWHM for a
    Moffat profile (the half-light radius overestimates a Moffat beta=3 FWHM by 26 %). The
    pixel's own width (1/12 px^2) is removed. NaN where the moments do not converge.
    """
    n = len(x)
    out = np.full(n, np.nan)
    ny, nx = sub.shape
    for s0 in range(0, n, batch):
        sl = slice(s0, min(n, s0 + batch))
        xs, ys = np.asarray(x[sl], float), np.asarray(y[sl], float)
        vals, dx, dy, ok, (iy, ix) = _stamps(sub, xs, ys, half)
        ok &= ~bad[np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)].reshape(ok.shape)
        vals = np.where(ok, vals, 0.0)
        r2 = dx * dx + dy * dy
        s2 = np.clip(np.asarray(sigma0, float)[sl], 0.5, half / 2.0) ** 2
        for _ in range(iterations):
            w = np.exp(-r2 / (2.0 * s2[:, None])) * vals
            sw = w.sum(axis=1)
            m = np.where(sw > 0, (w * r2).sum(axis=1) / np.where(sw > 0, sw, 1.0) / 2.0, np.nan)
            s2 = np.clip(2.0 * m, 0.09, (half / 2.0) ** 2)
        out[sl] = np.where(np.isfinite(m) & (m > 0), 2.3548 * np.sqrt(np.maximum(s2 - 1.0 / 12.0, 0.01)), np.nan)
    return out


def fill_masked(img: Array, fill: Array, usable: Array) -> tuple[Array, Array]:
    """Masked pixels replaced by the mean of their usable 8 neighbours (IRAF's fixpix).

    For scattered single pixels (pepper-and-salt, bad pixels, cosmic-ray hits) inside an
    aperture this is closer to the truth than scaling the sum up for the missing area, which
    assumes the missing pixel holds the aperture's mean flux: for the central pixel of a
    star of FWHM 2.3 / 3 / 4 px the sum loses 8 / 3 / 1.4 % instead of 15 / 9 / 5 %; in the
    wings both are within ~1 % (tested). A PSF-model fill would do better in the core.

    Parameters
    ----------
    img : ndarray (y, x)
    fill : ndarray of bool
        Pixels to replace.
    usable : ndarray of bool
        Pixels whose values may be used (neither masked nor without data).

    Returns
    -------
    filled : ndarray
        A copy of ``img`` with the fillable pixels replaced.
    left : ndarray of bool
        Pixels of ``fill`` with no usable neighbour (still masked).
    """
    out = np.array(img, copy=True)
    iy, ix = np.nonzero(fill)
    if iy.size == 0:
        return out, np.zeros_like(fill, dtype=bool)
    ny, nx = img.shape
    total = np.zeros(iy.size)
    count = np.zeros(iy.size)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            yy, xx = iy + dy, ix + dx
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            yy, xx = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
            ok = inside & usable[yy, xx]
            total += np.where(ok, img[yy, xx], 0.0)
            count += ok
    done = count > 0
    out[iy[done], ix[done]] = (total[done] / count[done]).astype(out.dtype)
    left = np.zeros_like(fill, dtype=bool)
    left[iy[~done], ix[~done]] = True
    return out, left


def aperture_photometry(sub: Array, x: Array, y: Array, radii: Array, rms: Array, gain: float,
                        bad: Array | None = None) -> tuple[Array, Array, Array]:
    """Circular-aperture sums (exact pixel overlap, sep) in every radius.

    Masked pixels are left out and the sum is scaled up for the missing area (as
    SExtractor does); such apertures carry sep's flag 0x20.

    Returns
    -------
    flux, fluxerr : ndarray (n_sources, n_radii) of float64
    flags : ndarray (n_sources,) of int16, OR over radii of sep's aperture flags
    """
    img, err = _c32(sub), _c32(rms)
    msk = None if bad is None else np.ascontiguousarray(bad)
    n, nr = len(x), len(radii)
    flux = np.zeros((n, nr))
    ferr = np.zeros((n, nr))
    flags = np.zeros(n, np.int16)
    if n == 0:
        return flux, ferr, flags
    xs, ys = np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.float64)
    for k, r in enumerate(radii):
        f, e, fl = sep.sum_circle(img, xs, ys, float(r), err=err, mask=msk, gain=float(gain), subpix=0)
        flux[:, k], ferr[:, k] = f, e
        flags |= fl.astype(np.int16)
    return flux, ferr, flags


def mag_from_flux(flux: Array, fluxerr: Array, exptime: float) -> tuple[Array, Array]:
    """Instrumental magnitude ``-2.5 log10(flux / exptime)`` and its error; NaN where
    the flux is not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = flux > 0
        mag = np.where(pos, -2.5 * np.log10(np.where(pos, flux, 1.0) / float(exptime)), np.nan)
        err = np.where(pos, _MAG_ERR * fluxerr / np.where(pos, flux, 1.0), np.nan)
    return mag, err


def flags_under(mask: Array, x: Array, y: Array, radius: float) -> Array:
    """OR of the mask bits of every pixel whose centre is within ``radius`` of each source."""
    ny, nx = mask.shape
    r = max(float(radius), 0.5)
    h = int(math.ceil(r))
    dy, dx = np.mgrid[-h:h + 1, -h:h + 1]
    out = np.zeros(len(x), dtype=mask.dtype)
    if len(x) == 0:
        return out
    ix0 = np.rint(np.asarray(x)).astype(np.int64)
    iy0 = np.rint(np.asarray(y)).astype(np.int64)
    fx, fy = np.asarray(x) - ix0, np.asarray(y) - iy0
    for ddy, ddx in zip(dy.ravel(), dx.ravel()):
        inside = (ddx - fx) ** 2 + (ddy - fy) ** 2 <= r * r
        iy, ix = iy0 + ddy, ix0 + ddx
        ok = inside & (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
        out[ok] |= mask[iy[ok], ix[ok]]
    return out


def nearest_neighbour(x: Array, y: Array) -> Array:
    """Distance (px) from each source to the nearest other one (inf when alone)."""
    from scipy.spatial import cKDTree

    n = len(x)
    if n < 2:
        return np.full(n, np.inf)
    pts = np.column_stack([x, y])
    d, _ = cKDTree(pts).query(pts, k=2)
    return d[:, 1]


@dataclass
class ApertureChoice:
    """Best and reference apertures of one exposure (Fig. 9 of the paper).

    Attributes
    ----------
    best_index, reference_index : int
        Indices into the aperture radii.
    best_radius, reference_radius : float
        Radii in pixels.
    n_stars : int
        Size of the bright sample that chose them.
    snr_curves : ndarray (n_stars, n_radii)
        SNR against radius of (up to 200) sample stars, for Fig. 9a.
    growth_offsets : ndarray (n_radii,)
        Median over the sample of ``mag(n) - mag(n - 2)`` (NaN for n < 2), Fig. 9b.
    rule : str
        How the reference aperture was chosen.
    """

    best_index: int
    reference_index: int
    best_radius: float
    reference_radius: float
    n_stars: int
    snr_curves: Array = field(repr=False)
    growth_offsets: Array = field(repr=False)
    rule: str = "converged"


def best_aperture(flux: Array, fluxerr: Array, radii: Array) -> tuple[int, Array]:
    """Best aperture: the radius of peak SNR per star, median over the stars (paper 3.2.2).

    Parameters
    ----------
    flux, fluxerr : ndarray (n_stars, n_radii)
        Aperture sums of the bright reference sample.

    Returns
    -------
    index : int
        Index of the aperture nearest the median radius of peak SNR.
    snr : ndarray (n_stars, n_radii)
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(fluxerr > 0, flux / fluxerr, -np.inf)
    peak = np.asarray(radii)[np.argmax(snr, axis=1)]
    med = float(np.median(peak))
    return int(np.argmin(np.abs(np.asarray(radii) - med))), snr


def reference_aperture(mag: Array, best_index: int, tolerance: float, valid: Array | None = None,
                       min_stars: int = 5) -> tuple[int, Array, str]:
    """Reference aperture: where the growth curve converges (paper 3.2.2).

    The paper's rule is ``|mag(n) - mag(n - 2)| < 1e-4`` mag. Single stars are far too noisy
    for that at large radii, so it is applied to the median over the bright sample; where
    the median's own standard error is above the tolerance, the first aperture whose offset
    is consistent with zero (within twice that error) is taken and ``rule`` says so.

    Parameters
    ----------
    mag : ndarray (n_stars, n_radii)
        Instrumental magnitudes of the sample in every aperture.
    valid : ndarray of bool (n_stars, n_radii), optional
        Which stars count at each aperture (those with no detected neighbour near that
        aperture's edge: a neighbour's light would never let the growth curve converge).
    min_stars : int
        Fewest valid stars for an aperture's offset.

    Returns
    -------
    index : int
    offsets : ndarray (n_radii,)
        Median of ``mag(n) - mag(n - 2)``.
    rule : str
        ``"converged"`` or ``"converged within noise"`` or ``"largest aperture"``.
    """
    n, nr = mag.shape
    offsets = np.full(nr, np.nan)
    se = np.full(nr, np.inf)
    for k in range(2, nr):
        d = mag[:, k] - mag[:, k - 2]
        if valid is not None:
            d = d[valid[:, k]]
        d = d[np.isfinite(d)]
        if d.size >= min_stars:
            offsets[k] = np.median(d)
            se[k] = 1.2533 * 1.4826 * np.median(np.abs(d - offsets[k])) / math.sqrt(d.size)
    for k in range(max(2, best_index + 1), nr):
        if np.isfinite(offsets[k]) and abs(offsets[k]) < tolerance:
            return k, offsets, "converged"
    for k in range(max(2, best_index + 1), nr):
        if np.isfinite(offsets[k]) and abs(offsets[k]) < max(tolerance, 2.0 * se[k]):
            return k, offsets, "converged within noise"
    measurable = np.flatnonzero(np.isfinite(offsets))
    if measurable.size and measurable[-1] > best_index:
        return int(measurable[-1]), offsets, "largest measurable aperture (not converged)"
    return min(nr - 1, best_index + 2), offsets, "too few isolated stars: best + 2"


def _poly_terms(u: Array, v: Array, order: int) -> Array:
    cols = [u ** (d - j) * v ** j for d in range(order + 1) for j in range(d + 1)]
    return np.column_stack(cols) if cols else np.ones((len(u), 1))


@dataclass(frozen=True)
class Poly2D:
    """A 2-D polynomial in pixel coordinates, normalised to [-1, 1] over the frame."""

    coeffs: tuple[float, ...]
    order: int
    shape: tuple[int, int]

    def __call__(self, x: Array, y: Array) -> Array:
        ny, nx = self.shape
        u = (np.asarray(x, float) - (nx - 1) / 2) / max((nx - 1) / 2, 1.0)
        v = (np.asarray(y, float) - (ny - 1) / 2) / max((ny - 1) / 2, 1.0)
        return _poly_terms(u.ravel(), v.ravel(), self.order) @ np.asarray(self.coeffs)

    def to_dict(self) -> dict[str, Any]:
        return {"order": self.order, "coeffs": list(self.coeffs), "shape": list(self.shape)}


def poly2d(coeffs: Any, order: int, shape: tuple[int, int]) -> Poly2D:
    """Rebuild a :class:`Poly2D` (e.g. from a stored ``to_dict``)."""
    return Poly2D(tuple(float(c) for c in coeffs), int(order), (int(shape[0]), int(shape[1])))


def fit_poly2d(x: Array, y: Array, z: Array, order: int, shape: tuple[int, int], *,
               weights: Array | None = None, clip_sigma: float = 3.0, iterations: int = 5,
               min_per_term: int = 3) -> tuple[Poly2D, Array, Array]:
    """Weighted least-squares 2-D polynomial with iterative sigma clipping.

    The order is lowered when there are too few points for it (fewer than ``min_per_term``
    per term).

    Returns
    -------
    poly : Poly2D
    used : ndarray of bool
        Points kept by the clipping.
    resid : ndarray
        ``z - poly(x, y)`` for every point.
    """
    x, y, z = (np.asarray(a, float) for a in (x, y, z))
    w = np.ones_like(z) if weights is None else np.asarray(weights, float)
    good = np.isfinite(z) & np.isfinite(w) & (w > 0)
    while order > 0 and good.sum() < min_per_term * (order + 1) * (order + 2) // 2:
        order -= 1
    ny, nx = shape
    u = (x - (nx - 1) / 2) / max((nx - 1) / 2, 1.0)
    v = (y - (ny - 1) / 2) / max((ny - 1) / 2, 1.0)
    a = _poly_terms(u, v, order)
    used = good.copy()
    coeffs = np.zeros(a.shape[1])
    coeffs[0] = np.median(z[good]) if good.any() else np.nan
    for _ in range(max(1, iterations)):
        if used.sum() < a.shape[1]:
            break
        sw = np.sqrt(w[used])
        coeffs, *_ = np.linalg.lstsq(a[used] * sw[:, None], z[used] * sw, rcond=None)
        resid = z - a @ coeffs
        r = resid[used] * sw / np.sqrt(np.mean(w[used]))
        sigma = 1.4826 * np.median(np.abs(r - np.median(r)))
        if not sigma > 0:
            break
        new = good & (np.abs(resid * np.sqrt(w / np.mean(w[used]))) < clip_sigma * sigma)
        if np.array_equal(new, used):
            break
        used = new
    resid = np.where(np.isfinite(z), z - a @ coeffs, np.nan)
    return Poly2D(tuple(float(c) for c in coeffs), order, (int(ny), int(nx))), used, resid


# ----------------------------------------------------------------------------- PSF
@dataclass
class PSFModel:
    """PSFEx-like empirical PSF: every oversampled pixel is a polynomial in (x, y).

    ``coeffs[k]`` is the k-th polynomial term's plane over the oversampled grid (values are
    fractions of the star's aperture-corrected flux per detector pixel at that offset, the
    effective-PSF convention of Anderson & King 2000 and photutils).
    """

    coeffs: Array  # (n_terms, G, G) float64
    order: int
    oversampling: int
    half: int
    shape: tuple[int, int]
    n_stars: int

    @property
    def grid(self) -> int:
        return self.coeffs.shape[-1]

    def _terms(self, x: Array, y: Array) -> Array:
        ny, nx = self.shape
        u = (np.asarray(x, float) - (nx - 1) / 2) / max((nx - 1) / 2, 1.0)
        v = (np.asarray(y, float) - (ny - 1) / 2) / max((ny - 1) / 2, 1.0)
        return _poly_terms(u, v, self.order)

    def evaluate(self, x: Array, y: Array, dx: Array, dy: Array) -> Array:
        """ePSF of stars at (x, y) at pixel offsets (dx, dy) (shape (n, m)), bilinear
        between oversampled cells; 0 outside the modelled stamp."""
        o, h, g = self.oversampling, self.half, self.grid
        # continuous cell coordinate whose integer values are cell centres
        cu = (dx + h + 0.5) * o - 0.5
        cv = (dy + h + 0.5) * o - 0.5
        inside = (cu >= 0) & (cu <= g - 1) & (cv >= 0) & (cv <= g - 1)
        cu = np.clip(cu, 0, g - 1 - 1e-9)
        cv = np.clip(cv, 0, g - 1 - 1e-9)
        i0, j0 = np.floor(cv).astype(np.int64), np.floor(cu).astype(np.int64)
        fv, fu = cv - i0, cu - j0
        i1, j1 = np.minimum(i0 + 1, g - 1), np.minimum(j0 + 1, g - 1)
        terms = self._terms(x, y)  # (n, k)
        out = np.zeros(dx.shape)
        for k in range(self.coeffs.shape[0]):
            c = self.coeffs[k]
            val = ((1 - fv) * ((1 - fu) * c[i0, j0] + fu * c[i0, j1])
                   + fv * ((1 - fu) * c[i1, j0] + fu * c[i1, j1]))
            out += terms[:, k:k + 1] * val
        return np.where(inside, out, 0.0)


def _stamps(img: Array, x: Array, y: Array, half: int) -> tuple[Array, Array, Array, Array, Array]:
    """Pixel stamps (n, s, s) around rounded centres, with pixel offsets from the star and
    a validity mask (inside the frame)."""
    ny, nx = img.shape
    s = 2 * half + 1
    ix0 = np.rint(x).astype(np.int64)
    iy0 = np.rint(y).astype(np.int64)
    oy, ox = np.mgrid[-half:half + 1, -half:half + 1]
    iy = iy0[:, None, None] + oy[None]
    ix = ix0[:, None, None] + ox[None]
    ok = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
    vals = img[np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)]
    dx = (ix - np.asarray(x)[:, None, None]).reshape(len(x), s * s)
    dy = (iy - np.asarray(y)[:, None, None]).reshape(len(x), s * s)
    return vals.reshape(len(x), s * s), dx, dy, ok.reshape(len(x), s * s), (iy, ix)


def build_psf(sub: Array, bad: Array, x: Array, y: Array, flux: Array, config: PhotometryConfig
              ) -> PSFModel:
    """Build the field-varying empirical PSF from isolated, unsaturated bright stars.

    Every stamp pixel of every star is a sample of the ePSF at its offset from the star;
    the samples of each oversampled cell are fitted with a polynomial in the star's (x, y)
    (normal equations accumulated per cell), with one round of 5-sigma rejection.

    Parameters
    ----------
    x, y, flux : ndarray
        Positions and (aperture-corrected) fluxes of the PSF stars.
    """
    half = int(config.psf_stamp_px) // 2
    o = int(config.psf_oversampling)
    order = int(config.psf_variability_order)
    n = len(x)
    # Each oversampled cell sees about n / o^2 samples: keep >= 15 per fitted term, first by
    # lowering the variability order, then the oversampling (never below 2 if avoidable).
    while order > 0 and n / o**2 < 15 * (order + 1) * (order + 2) // 2:
        order -= 1
    while o > 1 and n / o**2 < 15:
        o -= 1
    g = (2 * half + 1) * o
    if n < 3:
        raise ValueError(f"only {n} stars to build a PSF")
    vals, dx, dy, ok, (iy, ix) = _stamps(sub, x, y, half)
    ok &= ~bad[np.clip(iy, 0, sub.shape[0] - 1), np.clip(ix, 0, sub.shape[1] - 1)].reshape(ok.shape)
    samp = vals / np.asarray(flux)[:, None]
    cu = np.floor((dx + half + 0.5) * o).astype(np.int64)
    cv = np.floor((dy + half + 0.5) * o).astype(np.int64)
    ok &= (cu >= 0) & (cu < g) & (cv >= 0) & (cv < g) & np.isfinite(samp)
    model = PSFModel(np.zeros((1, g, g)), order, o, half, tuple(sub.shape), n)
    terms = model._terms(x, y)  # (n, k)
    k = terms.shape[1]
    cell = cv * g + cu
    keep = ok.copy()
    for _ in range(2):
        idx = cell[keep]
        b = np.broadcast_to(terms[:, None, :], (*keep.shape, k))[keep]
        ata = np.zeros((g * g, k, k))
        atb = np.zeros((g * g, k))
        for p in range(k):
            atb[:, p] = np.bincount(idx, weights=b[:, p] * samp[keep], minlength=g * g)
            for q in range(p, k):
                s = np.bincount(idx, weights=b[:, p] * b[:, q], minlength=g * g)
                ata[:, p, q] = s
                ata[:, q, p] = s
        # tiny ridge: cells a polynomial cannot constrain fall back towards zero
        ridge = 1e-6 * np.maximum(ata[:, 0, 0], 1.0)
        ata += ridge[:, None, None] * np.eye(k)[None]
        coef = np.linalg.solve(ata, atb[..., None])[..., 0]  # (g*g, k)
        model = PSFModel(coef.T.reshape(k, g, g).copy(), order, o, half, tuple(sub.shape), n)
        pred = np.einsum("nk,nmk->nm", terms, coef[np.clip(cell, 0, g * g - 1)])
        r = np.where(ok, samp - pred, np.nan)
        # per-star noise scale from the stamp's outer residuals
        sig = 1.4826 * np.nanmedian(np.abs(r), axis=1, keepdims=True)
        new = ok & (np.abs(r) < 5.0 * np.maximum(sig, 1e-12))
        if np.array_equal(new, keep):
            break
        keep = new
    return model


def psf_photometry(sub: Array, bad: Array, rms: Array, x: Array, y: Array, psf: PSFModel, gain: float,
                   batch: int = 4096) -> tuple[Array, Array, Array]:
    """Linear PSF fluxes at fixed positions: ``F = sum(P D / var) / sum(P^2 / var)``.

    Masked pixels are left out of the fit (a PSF flux survives a cosmic ray on the star).
    The weights use the sky variance only, so the estimate stays unbiased for bright stars.

    Returns
    -------
    flux, fluxerr : ndarray
    frac_used : ndarray
        Fraction of the PSF (by weight) on unmasked pixels: low values mean an unreliable fit.
    """
    n = len(x)
    flux = np.full(n, np.nan)
    ferr = np.full(n, np.nan)
    frac = np.zeros(n)
    ny, nx = sub.shape
    for s0 in range(0, n, batch):
        sl = slice(s0, min(n, s0 + batch))
        xs, ys = np.asarray(x[sl], float), np.asarray(y[sl], float)
        vals, dx, dy, ok, (iy, ix) = _stamps(sub, xs, ys, psf.half)
        ciy, cix = np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)
        good = ok & ~bad[ciy, cix].reshape(ok.shape) & np.isfinite(vals)
        var_sky = np.maximum(rms[ciy, cix].reshape(ok.shape).astype(float) ** 2, 1e-12)
        p = psf.evaluate(xs, ys, dx, dy)
        w = np.where(good, 1.0 / var_sky, 0.0)
        spp = np.sum(w * p * p, axis=1)
        spd = np.sum(w * p * np.where(good, vals, 0.0), axis=1)
        f = np.where(spp > 0, spd / np.where(spp > 0, spp, 1.0), np.nan)
        var = var_sky + np.maximum(f[:, None] * p, 0.0) / float(gain)
        num = np.sum(w * w * p * p * var, axis=1)
        flux[sl] = f
        ferr[sl] = np.where(spp > 0, np.sqrt(num) / np.where(spp > 0, spp, 1.0), np.nan)
        wall = np.sum(p * p / var_sky, axis=1)
        frac[sl] = np.where(wall > 0, spp / np.where(wall > 0, wall, 1.0), 0.0)
    return flux, ferr, frac


def fit_zero_point(x: Array, y: Array, mag_inst: Array, mag_err: Array, mag_ref: Array, order: int,
                   shape: tuple[int, int], clip_sigma: float = 3.0, floor: float = 0.003
                   ) -> tuple[Poly2D, Array, Array]:
    """Zero point as a 2-D polynomial over the detector: ``mag_ref - mag_inst = ZP(x, y)``.

    Weighted by ``1 / (err^2 + floor^2)``, sigma-clipped.

    Returns
    -------
    poly : Poly2D
    used : ndarray of bool
    resid : ndarray
    """
    w = 1.0 / (np.asarray(mag_err, float) ** 2 + floor ** 2)
    return fit_poly2d(x, y, np.asarray(mag_ref, float) - np.asarray(mag_inst, float), order, shape,
                      weights=w, clip_sigma=clip_sigma)
