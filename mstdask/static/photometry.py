"""STATIC per exposure (Xiao et al. 2025, section 3.2): sources, astrometry, 25-aperture
photometry, aperture correction, PSF photometry and flux calibration.

:func:`measure_exposure` does everything for one reduced frame held in memory and
returns the source table and the exposure record; :func:`photometry_task` is the Dask task
of ``mstdask photometry`` (one per exposure): it reads its frame from the reduced store,
calls :func:`measure_exposure` and writes ``CATDIR/sources/NIGHT/EXPOSURE.parquet``
atomically, so a rerun skips what is done. Nothing here submits or computes on a cluster
(:mod:`mstdask.jobs.photometry` does).

Source table columns (one row per detection; magnitudes are calibrated AB-like magnitudes
in the reference catalogue's system)::

    exposure, time, mjd_mid, night, telescope, filter, source_id, ra, dec, x, y,
    mag_aper, magerr_aper, mag_psf, magerr_psf, mag_aper_inst, mag_psf_inst,
    flux_aper, fluxerr_aper, flux_psf, fluxerr_psf, fwhm, a, b, theta, flags,
    extract_flags, ref_id, ref_mag, ref_sep_arcsec

``flags`` is the OR of the reduced mask bits (:class:`mstdask.masks.Flag`) under the best
aperture; ``x, y`` are 0-based pixel coordinates; ``ref_id`` is the row of the matched
reference star (-1 if none within the match radius).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.stats import mad_std

from . import _phot_kernels as K
from ..config import AstrometryConfig, PhotometryConfig, RefcatConfig
from ..errors import InsufficientDataError
from ..masks import Flag

__all__ = ["EXPOSURE_COLUMNS", "EXPOSURE_SCHEMA", "SOURCE_COLUMNS", "ExposureResult", "measure_exposure", "photometry_task",
           "exposure_id"]

#: Columns of the per-source catalogue (stable names: scripts rely on them).
SOURCE_COLUMNS = ("exposure", "time", "mjd_mid", "night", "telescope", "filter", "source_id", "ra", "dec", "x", "y",
                  "mag_aper", "magerr_aper", "mag_psf", "magerr_psf", "mag_aper_inst", "mag_psf_inst",
                  "flux_aper", "fluxerr_aper", "flux_psf", "fluxerr_psf", "fwhm", "a", "b", "theta", "flags",
                  "extract_flags", "ref_id", "ref_mag", "ref_sep_arcsec")

#: Columns of the per-exposure table and their Parquet types (``time``: UTC timestamp).
EXPOSURE_SCHEMA: dict[str, str] = {
    **dict.fromkeys(("exposure", "status", "reason", "path", "night", "telescope", "filter"), "string"),
    "time": "timestamp", "mjd_mid": "float64", "exptime": "float64",
    **dict.fromkeys(("n_sources", "n_stars", "n_calib"), "int64"),
    "best_aperture_px": "float64", "reference_aperture_px": "float64", "reference_rule": "string",
    **dict.fromkeys(("aperture_correction_rms", "zero_point", "zero_point_err", "zero_point_scatter",
                     "zero_point_psf", "zero_point_psf_scatter"), "float64"),
    "zero_point_poly": "string", "aperture_correction_poly": "string",
    "astrometric_rms_mas": "float64", "astrometric_rms_mas_before": "float64", "n_astrometric": "int64",
    **dict.fromkeys(("pixel_scale_arcsec", "rotation_deg", "seeing_arcsec", "fwhm_px", "background_adu",
                     "background_rms_adu"), "float64"),
    "psf_stars": "int64", "wcs": "string", "catalog": "string", "seconds": "float64",
}
EXPOSURE_COLUMNS = tuple(EXPOSURE_SCHEMA)

# Source mask bits that disqualify a star from the aperture, PSF and calibration samples.
_SAMPLE_BAD = int(Flag.SATURATED | Flag.SATELLITE_TRACK)  # bad, PS and cosmic-ray pixels are filled
# Scattered masked pixels that aperture photometry fills from their neighbours.
_FILL = int(Flag.BAD_PIXEL | Flag.PEPPER_SALT | Flag.COSMIC_RAY)
# Pixels never used for detection (saturated cores stay: a saturated star is still a star).
_DETECT_BAD = int(Flag.BAD_PIXEL | Flag.PEPPER_SALT | Flag.SATELLITE_TRACK | Flag.COSMIC_RAY)


def exposure_id(telescope: str, time_ns: int) -> str:
    """``TEL_YYYYMMDDTHHMMSS`` (UTC start of exposure): the ``exposure`` key of the catalogues."""
    t = np.datetime64(int(time_ns), "ns").astype("datetime64[s]").astype(object)
    return f"{telescope or 'TEL'}_{t:%Y%m%dT%H%M%S}"


@dataclass
class ExposureResult:
    """What :func:`measure_exposure` returns: the sources (dict of columns), the exposure
    record (``EXPOSURE_COLUMNS``) and the diagnostics the notebooks plot."""

    sources: dict[str, np.ndarray]
    record: dict[str, Any]
    diagnostics: dict[str, Any]


class ExposureFlagged(InsufficientDataError):
    """The exposure cannot be calibrated (no stars, no astrometric match, ...)."""


def _robust_std(a: np.ndarray) -> float:
    return float(mad_std(a, ignore_nan=True)) if np.isfinite(a).any() else float("nan")


class _Exposure:
    """One frame through STATIC: each step of :func:`measure_exposure` is a method that reads
    what the steps before it stored on the instance and adds its own results (and its
    diagnostics to ``diag``, in the order the notebooks expect)."""

    def __init__(self, data: np.ndarray, mask: np.ndarray, *, exptime: float, gain: float,
                 config: PhotometryConfig) -> None:
        self.data, self.exptime, self.gain, self.config = data, exptime, gain, config
        self.shape = data.shape
        self.diag: dict[str, Any] = {}
        self.mask = np.asarray(mask, dtype=np.uint8)
        self.radii = np.asarray(config.aperture_radii_px)

    # 1. background and sources
    def detect(self, noise_correlation: float) -> None:
        """Background (two passes), fill of scattered masked pixels, detection and shapes."""
        data, mask, config = self.data, self.mask, self.config
        finite = np.isfinite(data)
        bad_det = ((mask & _DETECT_BAD) != 0) | ~finite
        self.bad_phot = bad_phot = ((mask & (_DETECT_BAD | int(Flag.SATURATED))) != 0) | ~finite
        back, rms = K.background(data, bad_phot, config)
        footprints = K.detect(np.where(finite, data - back, 0.0), rms, bad_det, config, footprints_only=True)
        # second pass with the sources masked: wings and faint neighbours must not lift the sky;
        # sources are detected and measured on this background
        self.back, self.rms = back, rms = K.background(data, bad_phot | footprints, config, debias=True)
        if not noise_correlation >= 1.0:
            raise ValueError(f"noise_correlation={noise_correlation} must be >= 1 (1: independent pixels)")
        self.rms_phot = rms if noise_correlation == 1.0 else (rms * np.float32(math.sqrt(noise_correlation)))
        del footprints
        sub = np.where(finite, data - back, 0.0).astype(np.float32)
        # scattered masked pixels (bad, pepper-and-salt, cosmic rays) take their neighbours' mean:
        # with ~3 % PS pixels most apertures hold one, and scaling a sum up for a missing core
        # pixel loses about twice as much; saturated pixels, tracks and pixels without data stay masked
        fillable = ((mask & _FILL) != 0) & finite
        self.sub, self.unfilled = sub, unfilled = K.fill_masked(sub, fillable, ~bad_phot)
        self.bad_ap = (bad_phot & ~fillable) | unfilled
        self.det = det = K.measure(sub, bad_det, K.detect(sub, rms, bad_det, config))
        self.n = len(det["x"])
        if self.n == 0:
            raise ExposureFlagged("no sources detected (clouds, a closed dome or a wrong exposure?)")
        self.x, self.y = det["x"], det["y"]

    def find_clean(self) -> None:
        """Median FWHM, the flags under each source's core, and which sources are clean."""
        det, x, y = self.det, self.x, self.y
        fw_ok = det["fwhm"][(det["extract_flags"] == 0) & np.isfinite(det["fwhm"])]
        self.fwhm_med = fwhm_med = float(np.median(fw_ok)) if fw_ok.size else float(np.nanmedian(det["fwhm"]))
        # a source is clean for the samples when its core (one FWHM) has no flagged pixel; the
        # catalogue's flags cover the whole best aperture
        self.core_flags = K.flags_under(self.mask, x, y, max(1.0, fwhm_med))
        # filled pixels (see above) do not spoil a star; saturation, tracks and unfillable ones do
        sample_mask = np.where(self.unfilled, np.uint8(Flag.BAD_PIXEL), self.mask & np.uint8(_SAMPLE_BAD))
        self.clean = K.flags_under(sample_mask, x, y, max(1.0, fwhm_med)) == 0

    def _photometry(self, x: np.ndarray, y: np.ndarray, radii: np.ndarray):
        return K.aperture_photometry(self.sub, x, y, radii, self.rms_phot, self.gain, self.bad_ap)

    # 2. apertures: a fiducial one (~1.5 FWHM) for the errors that choose the bright sample
    def bright_sample(self) -> None:
        """Up to 2000 isolated, clean stars in ``config.best_err_range`` (random, seed 0)."""
        config, radii, det = self.config, self.radii, self.det
        k_fid = int(np.argmin(np.abs(radii - 1.5 * self.fwhm_med)))
        f_fid, e_fid, _ = self._photometry(self.x, self.y, radii[[k_fid]])
        _, me_fid = K.mag_from_flux(f_fid[:, 0], e_fid[:, 0], self.exptime)
        lo, hi = config.best_err_range
        self.nn = nn = K.nearest_neighbour(self.x, self.y)
        iso = nn >= config.isolation_px
        bright = np.flatnonzero((me_fid >= lo) & (me_fid <= hi) & iso & self.clean & (det["extract_flags"] == 0))
        if bright.size < 5:  # faint or cloudy frames: widen to the best stars there are
            order = np.argsort(np.where(iso & self.clean & np.isfinite(me_fid), me_fid, np.inf))
            bright = order[:min(50, int(np.sum(np.isfinite(me_fid[order]) & (me_fid[order] < 0.05))))]
        if bright.size < 3:
            raise ExposureFlagged(f"only {bright.size} isolated stars with errors below 0.05 mag: "
                                  "too few for the aperture choice (clouds or bad focus?)")
        rng = np.random.default_rng(0)
        self.sample = np.sort(rng.choice(bright, size=min(bright.size, 2000), replace=False))

    def choose_apertures(self) -> None:
        """Best (SNR) and reference apertures from the sample's growth curves, then the
        best- and reference-aperture photometry and the flags of every source."""
        config, radii, sample, fwhm_med = self.config, self.radii, self.sample, self.fwhm_med
        fs, es, _ = self._photometry(self.x[sample], self.y[sample], radii)
        best, snr = K.best_aperture(fs, es, radii)
        floor = np.flatnonzero(radii >= config.min_best_aperture_fwhm * fwhm_med)
        if floor.size and best < floor[0]:
            best = int(floor[0])
        ms, _ = K.mag_from_flux(fs, es, self.exptime)
        # a star counts at an aperture only if no detected neighbour lies near its edge
        valid = self.nn[sample, None] > radii[None, :] + 2.0 * fwhm_med
        ref, offsets, rule = K.reference_aperture(ms, best, config.reference_tolerance_mag, valid)
        self.choice = K.ApertureChoice(best, ref, float(radii[best]), float(radii[ref]), int(sample.size),
                                       snr[:200], offsets, rule)
        self.ref_ap, self.rule = ref, rule
        self.diag["apertures"] = self.choice
        self.diag["growth_curves"] = ms[:200] - ms[:200, [ref]]
        self.fa, self.ea, self.fla = self._photometry(self.x, self.y, radii[[best, ref]])
        self.m_best, self.me_best = K.mag_from_flux(self.fa[:, 0], self.ea[:, 0], self.exptime)
        self.m_ref, _ = K.mag_from_flux(self.fa[:, 1], self.ea[:, 1], self.exptime)
        self.flags = K.flags_under(self.mask, self.x, self.y, radii[best])

    # 3. aperture correction: 2-D polynomial of (reference - best) over the bright sample
    # stars clean out to the reference aperture, weighted by the difference's error (the sky
    # noise of the large aperture relative to the star's flux dominates it)
    def aperture_correction(self) -> None:
        """Instrumental magnitudes in the best aperture corrected to the reference one."""
        x, y, sample, nn, fa, ea = self.x, self.y, self.sample, self.nn, self.fa, self.ea
        acs = sample[nn[sample] > self.radii[self.ref_ap] + 2.0 * self.fwhm_med]
        if acs.size < 10:  # few stars that clean: the most isolated ones
            acs = np.sort(sample[np.argsort(-nn[sample])][:10])
        apc_w = 1.0 / ((ea[acs, 1] / np.maximum(fa[acs, 0], 1e-30)) ** 2 + self.me_best[acs] ** 2 + 1e-6)
        delta = self.m_ref - self.m_best
        self.apc, self.apc_used, self.apc_res = K.fit_poly2d(
            x[acs], y[acs], delta[acs], self.config.aperture_correction_order, self.shape, weights=apc_w,
            clip_sigma=self.config.clip_sigma)
        self.corr = self.apc(x, y)
        self.mag_aper_inst = self.m_best + self.corr
        self.diag["aperture_correction"] = {"x": x[acs], "y": y[acs], "delta": delta[acs], "resid": self.apc_res,
                                            "used": self.apc_used, "fwhm": self.det["fwhm"][acs], "poly": self.apc}

    # 4. astrometry: blind pattern match from the header pointing, then 4th-order TPV
    def astrometry(self, refcat, ra0: float, dec0: float, astro_config: AstrometryConfig) -> None:
        """The WCS of the frame and the sky position of every source."""
        from .astrometry import solve

        x, y = self.x, self.y
        # saturated stars stay: they are the brightest, the ones the pattern match pairs first
        usable = np.flatnonzero(((self.core_flags & _DETECT_BAD) == 0) & (self.det["extract_flags"] < 4)
                                & np.isfinite(self.m_best))
        if usable.size < 5:
            raise ExposureFlagged(f"only {usable.size} clean sources: too few for astrometry")
        try:
            ref = {"ra": refcat.ra, "dec": refcat.dec,
                   "mag": np.where(np.isfinite(refcat.mag), refcat.mag, 99.0)}  # no magnitude: astrometry only
            self.sol = solve(x[usable], y[usable], self.fa[usable, 0], ref, self.shape, ra0, dec0, astro_config)
        except InsufficientDataError as exc:
            raise ExposureFlagged(f"astrometry failed: {exc}") from None
        self.ra, self.dec = self.sol.wcs.all_pix2world(x, y, 0)
        self.diag["astrometry"] = self.sol
        self.diag["astrometry_xy"] = (x[usable], y[usable])  # sol.source_index points into these

    # 5. PSF model from isolated, clean, unsaturated stars; linear PSF fluxes for all
    def psf(self) -> None:
        """Aperture-corrected fluxes, the PSF model and PSF photometry (NaN without a model)."""
        config, me_best = self.config, self.me_best
        self.flux_corr = flux_corr = self.fa[:, 0] * 10 ** (-0.4 * self.corr)
        psf_iso = self.nn >= config.psf_stamp_px
        psf_sel = np.flatnonzero(psf_iso & self.clean & (self.det["extract_flags"] == 0) & (me_best < 0.02)
                                 & np.isfinite(flux_corr) & (flux_corr > 0))
        self.psf_sel = psf_sel = psf_sel[np.argsort(me_best[psf_sel])][:config.psf_max_stars]
        if psf_sel.size >= 5:
            x, y = self.x, self.y
            psf = K.build_psf(self.sub, self.bad_phot, x[psf_sel], y[psf_sel], flux_corr[psf_sel], config)
            self.f_psf, self.e_psf, _ = K.psf_photometry(self.sub, self.bad_phot, self.rms_phot, x, y, psf, self.gain)
            self.diag["psf"] = psf
        else:
            self.f_psf = self.e_psf = np.full(self.n, np.nan)
        self.m_psf_inst, self.me_psf = K.mag_from_flux(self.f_psf, self.e_psf, self.exptime)

    # 6. flux calibration: stars with errors < 0.02 mag matched within 1" to the reference
    def match_reference(self, refcat, ra0: float, dec0: float) -> None:
        """Nearest reference star within ``config.match_radius_arcsec`` of every source."""
        from scipy.spatial import cKDTree

        n = self.n
        self.ref_id = ref_id = np.full(n, -1, np.int64)
        self.ref_sep = ref_sep = np.full(n, np.nan)
        if len(refcat):
            cd = math.cos(math.radians(dec0))
            tree = cKDTree(np.column_stack([(refcat.ra - ra0) * cd, refcat.dec - dec0]))
            dist, j = tree.query(np.column_stack([(self.ra - ra0) * cd, self.dec - dec0]),
                                 distance_upper_bound=self.config.match_radius_arcsec / 3600.0)
            hit = np.isfinite(dist)
            ref_id[hit] = j[hit]
            ref_sep[hit] = dist[hit] * 3600.0
        self.ref_mag = np.where(ref_id >= 0, refcat.mag[np.maximum(ref_id, 0)] if len(refcat) else np.nan, np.nan)

    def calibrate(self) -> None:
        """Zero-point polynomials of the aperture and PSF magnitudes, and their statistics."""
        config, shape, x, y, ref_mag = self.config, self.shape, self.x, self.y, self.ref_mag
        cal = np.flatnonzero((self.ref_id >= 0) & np.isfinite(ref_mag) & (self.me_best < config.calib_max_err)
                             & self.clean & np.isfinite(self.mag_aper_inst))
        if cal.size < config.min_calib_stars:
            raise ExposureFlagged(f"only {cal.size} stars with errors < {config.calib_max_err} mag matched the "
                                  f"reference catalogue within {config.match_radius_arcsec}\" "
                                  f"(need {config.min_calib_stars}); check the catalogue covers the field and filter")
        zp, zp_used, zp_res = K.fit_zero_point(x[cal], y[cal], self.mag_aper_inst[cal], self.me_best[cal],
                                               ref_mag[cal], config.zero_point_order, shape, config.clip_sigma)
        self.zp, self.zp_used = zp, zp_used
        self.mag_aper = self.mag_aper_inst + zp(x, y)
        # the exposure's zero point: the polynomial's mean over the detector (a 16 x 16 grid)
        gy, gx = np.mgrid[0:shape[0] - 1:16j, 0:shape[1] - 1:16j]
        self.zp0 = float(np.mean(zp(gx.ravel(), gy.ravel())))
        self.zp_scatter = _robust_std(zp_res[zp_used])
        self.zp_err = self.zp_scatter / math.sqrt(max(int(zp_used.sum()), 1))
        self.diag["zero_point"] = {"x": x[cal], "y": y[cal], "resid": zp_res, "used": zp_used, "poly": zp,
                                   "mag_ref": ref_mag[cal]}
        m_psf_inst = self.m_psf_inst
        calp = cal[np.isfinite(m_psf_inst[cal])]
        if calp.size >= config.min_calib_stars:
            zpp, zpp_used, zpp_res = K.fit_zero_point(x[calp], y[calp], m_psf_inst[calp], self.me_psf[calp],
                                                      ref_mag[calp], config.zero_point_order, shape,
                                                      config.clip_sigma)
            self.mag_psf = m_psf_inst + zpp(x, y)
            self.zpp0, self.zpp_scatter = float(np.mean(zpp(gx.ravel(), gy.ravel()))), _robust_std(zpp_res[zpp_used])
        else:
            self.mag_psf, self.zpp0, self.zpp_scatter = np.full(self.n, np.nan), float("nan"), float("nan")

    def sources(self) -> dict[str, np.ndarray]:
        """The source table's measured columns (``SOURCE_COLUMNS`` but the exposure's own)."""
        det = self.det
        return {
            "source_id": np.arange(self.n, dtype=np.int32),
            "ra": self.ra.astype(np.float64), "dec": self.dec.astype(np.float64),
            "x": self.x.astype(np.float32), "y": self.y.astype(np.float32),
            "mag_aper": self.mag_aper.astype(np.float32), "magerr_aper": self.me_best.astype(np.float32),
            "mag_psf": np.asarray(self.mag_psf, np.float32), "magerr_psf": self.me_psf.astype(np.float32),
            "mag_aper_inst": self.mag_aper_inst.astype(np.float32),
            "mag_psf_inst": self.m_psf_inst.astype(np.float32),
            "flux_aper": self.flux_corr.astype(np.float32), "fluxerr_aper": self.ea[:, 0].astype(np.float32),
            "flux_psf": self.f_psf.astype(np.float32), "fluxerr_psf": self.e_psf.astype(np.float32),
            "fwhm": det["fwhm"].astype(np.float32), "a": det["a"], "b": det["b"], "theta": det["theta"],
            "flags": self.flags.astype(np.uint8), "extract_flags": (det["extract_flags"] | self.fla).astype(np.int16),
            "ref_id": self.ref_id, "ref_mag": np.asarray(self.ref_mag, np.float32),
            "ref_sep_arcsec": self.ref_sep.astype(np.float32),
        }

    def record(self, t0: float) -> dict[str, Any]:
        """The exposure record (``EXPOSURE_COLUMNS`` but the metadata); ``t0`` started the clock."""
        det, sol, choice = self.det, self.sol, self.choice
        good_fw = self.clean & (det["extract_flags"] == 0) & (self.me_best < 0.05) & np.isfinite(det["fwhm"])
        fwhm_px = float(np.median(det["fwhm"][good_fw])) if good_fw.any() else self.fwhm_med
        scale = float(sol.pixel_scale_arcsec)
        return {
            "status": "ok", "reason": "", "n_sources": int(self.n), "n_stars": int((self.ref_id >= 0).sum()),
            "n_calib": int(self.zp_used.sum()), "best_aperture_px": choice.best_radius,
            "reference_aperture_px": choice.reference_radius, "reference_rule": self.rule,
            "aperture_correction_rms": _robust_std(self.apc_res[self.apc_used]),
            "zero_point": self.zp0, "zero_point_err": self.zp_err, "zero_point_scatter": self.zp_scatter,
            "zero_point_psf": self.zpp0, "zero_point_psf_scatter": self.zpp_scatter,
            "zero_point_poly": json.dumps(self.zp.to_dict()), "aperture_correction_poly": json.dumps(self.apc.to_dict()),
            "astrometric_rms_mas": float(sol.rms_mas), "astrometric_rms_mas_before": float(sol.rms_mas_before),
            "n_astrometric": int(sol.n_matched), "pixel_scale_arcsec": scale, "rotation_deg": float(sol.rotation_deg),
            "seeing_arcsec": fwhm_px * scale, "fwhm_px": fwhm_px,
            "background_adu": float(np.median(self.back)), "background_rms_adu": float(np.median(self.rms)),
            "psf_stars": int(self.psf_sel.size), "wcs": sol.to_header().tostring(sep="\n"),
            "seconds": time.perf_counter() - t0, "exptime": float(self.exptime),
        }


def measure_exposure(data: np.ndarray, mask: np.ndarray, refcat, *, exptime: float, ra0: float, dec0: float,
                     gain: float | None = None, meta: dict[str, Any] | None = None,
                     config: PhotometryConfig | None = None, astro_config: AstrometryConfig | None = None,
                     noise_correlation: float = 1.0) -> ExposureResult:
    """STATIC on one reduced frame.

    Parameters
    ----------
    data : ndarray (y, x) float32
        Reduced frame (ADU, NaN where there is no flat response).
    mask : ndarray (y, x) uint8
        Table 1 mask bits of the frame.
    refcat : mstdask.refcat.Refcat
        Reference stars around the field (astrometry and flux calibration).
    exptime : float
        Seconds; instrumental magnitudes are ``-2.5 log10(flux / exptime)``.
    ra0, dec0 : float
        Header pointing in degrees (the blind astrometric solve starts there).
    gain : float, optional
        e-/ADU for the Poisson part of the errors (default ``config.gain_e_per_adu``).
    meta : dict, optional
        ``exposure, time, mjd_mid, night, telescope, filter, path`` copied into the tables.
    noise_correlation : float
        Variance of a sum of sky pixels over the sum of their per-pixel variances: 1 for a
        frame straight off the camera, > 1 for a resampled image (a coadd), whose pixels
        share noise. It scales the sky term of the aperture and PSF errors, so that the
        best aperture (the peak of the SNR) and every error are right; detection still
        uses the per-pixel rms.

    Returns
    -------
    ExposureResult

    Raises
    ------
    ExposureFlagged
        No stars, too few stars for the astrometry, no reference stars with magnitudes.
    """
    config = config or PhotometryConfig()
    astro_config = astro_config or AstrometryConfig()
    meta = dict(meta or {})
    gain = float(gain) if gain and gain > 0 else config.gain_e_per_adu
    if not exptime or exptime <= 0:
        raise ExposureFlagged(f"exposure time {exptime!r} is not positive: magnitudes need it")
    t0 = time.perf_counter()
    exposure = _Exposure(data, mask, exptime=exptime, gain=gain, config=config)
    exposure.detect(noise_correlation)
    exposure.find_clean()
    exposure.bright_sample()
    exposure.choose_apertures()
    exposure.aperture_correction()
    exposure.astrometry(refcat, ra0, dec0, astro_config)
    exposure.psf()
    exposure.match_reference(refcat, ra0, dec0)
    exposure.calibrate()
    sources = exposure.sources()
    record = exposure.record(t0)
    for key in ("exposure", "path", "night", "telescope", "filter", "time", "mjd_mid"):
        if key in meta:
            record[key] = meta[key]
    return ExposureResult(sources, record, exposure.diag)


# ----------------------------------------------------------------------------- the task
def _write_parquet(path: Path, sources: dict[str, np.ndarray], meta: dict[str, Any], record: dict[str, Any]) -> None:
    """Atomic write: a temporary file renamed into place, so a file that exists is complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(sources["source_id"])
    cols: dict[str, Any] = {
        "exposure": pa.array([meta["exposure"]] * n, pa.string()),
        "time": pa.array(np.full(n, int(meta["time"]), np.int64)).cast(pa.timestamp("ns", tz="UTC")),
        "mjd_mid": pa.array(np.full(n, float(meta["mjd_mid"]))),
        "night": pa.array([meta["night"]] * n, pa.string()),
        "telescope": pa.array([meta["telescope"]] * n, pa.string()),
        "filter": pa.array([meta["filter"]] * n, pa.string()),
    }
    for name in SOURCE_COLUMNS:
        if name not in cols:
            cols[name] = pa.array(sources[name])
    table = pa.table(cols)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"mstdask.exposure": json.dumps(record, default=str).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_exposure_record(path: str | os.PathLike) -> dict[str, Any]:
    """The exposure record stored in a source file's Parquet metadata."""
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    return json.loads(md[b"mstdask.exposure"])


def photometry_task(reduced_store: str, index: int, out_file: str, refcat_path: str, refcat_config: RefcatConfig,
                    meta: dict[str, Any], exptime: float, ra0: float, dec0: float, gain: float | None,
                    config: PhotometryConfig, astro_config: AstrometryConfig) -> dict[str, Any]:
    """One exposure of ``mstdask photometry``, inside one task.

    Returns the exposure record. A flagged exposure (no stars, no astrometric match, too few
    calibration stars, ...) returns ``status="flagged"`` with the reason and writes no file;
    other errors propagate to the job, which reports them.
    """
    import zarr

    from .refcat import load_refcat

    t0 = time.perf_counter()
    record: dict[str, Any] = {k: meta.get(k) for k in ("exposure", "path", "night", "telescope", "filter",
                                                       "time", "mjd_mid")}
    record["exptime"] = float(exptime)
    try:
        refcat = load_refcat(refcat_path, refcat_config, meta.get("filter"))
        group = zarr.open_group(reduced_store, mode="r")
        data = np.asarray(group["data"][index])
        mask = np.asarray(group["mask"][index])
        ny, nx = data.shape
        # the catalogue around the pointing: half the diagonal plus the pointing margin
        half_diag = math.hypot(nx, ny) / 2 * astro_config.pixel_scale_arcsec / 3600
        radius = astro_config.search_radius_deg or half_diag * (1 + astro_config.scale_tolerance
                                                                + astro_config.pointing_error_fraction)
        refcat = refcat.cone(ra0, dec0, radius)
        res = measure_exposure(data, mask, refcat, exptime=exptime, ra0=ra0, dec0=dec0, gain=gain, meta=meta,
                               config=config, astro_config=astro_config)
    except ExposureFlagged as exc:
        record.update(status="flagged", reason=str(exc), seconds=time.perf_counter() - t0)
        return record
    res.record["catalog"] = str(out_file)
    res.record["seconds"] = time.perf_counter() - t0
    _write_parquet(Path(out_file), res.sources, meta, res.record)
    return res.record
