"""The static per-pixel truth maps of a simulated camera (defects, pepper-and-salt pixels,
bias, read noise, gain, dark current, PRNU, vignetting, optics): the part of
:class:`mstdask.testing.Camera` that does not change from frame to frame."""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np
from astropy.wcs import WCS

from ._sky import (
    make_wcs,
    sip_coefficients,
)


from ._camera_model import Array, PSTable


class CameraMaps:
    """Static truth maps, drawn lazily from streams seeded by ``(seed, map name)``; mixed into
    :class:`~mstdask.testing._camera.Camera` (which provides ``model``, ``seed``, ``_rng`` and
    ``_centre_coords``)."""

    # ------------------------------------------------------------------ defects
    @cached_property
    def _defects(self) -> dict[str, Any]:
        """PS pixels, hot, dead and bias-outlier pixels, partly clustered at edges/corners."""
        m = self.model
        ny, nx = self.shape
        length = max(2.0, 0.02 * min(ny, nx))
        y = np.arange(ny, dtype=np.float32)
        x = np.arange(nx, dtype=np.float32)
        dy = np.minimum(y, ny - 1 - y)
        dx = np.minimum(x, nx - 1 - x)
        # Density rising towards the edges, strongest at the corners (camera paper Fig. 5).
        w = np.minimum(dy[:, None], dx[None, :])
        np.multiply(w, np.float32(-1.0 / length), out=w)
        np.exp(w, out=w)
        w += np.exp(-dy / (1.5 * length))[:, None] * np.exp(-dx / (1.5 * length))[None, :]
        w *= np.float32(1.0 / w.mean(dtype=np.float64))

        def pick(name: str, fraction: float, edge_fraction: float, exclude: Array | None = None) -> Array:
            if fraction <= 0:
                return np.zeros(0, dtype=np.int64)
            rng = self._rng(name)
            p = w * np.float32(fraction * edge_fraction)
            p += np.float32(fraction * (1.0 - edge_fraction))
            u = rng.random((ny, nx), dtype=np.float32)
            sel = np.flatnonzero(u < p)
            if exclude is not None and exclude.size:
                sel = np.setdiff1d(sel, exclude, assume_unique=True)
            return sel

        ps_index = pick("ps", m.ps_fraction, m.ps_edge_fraction)
        hot = pick("hot", m.hot_pixel_fraction, 0.3)
        dead = pick("dead", m.dead_pixel_fraction, 0.3, exclude=hot)
        outliers = pick("outliers", m.bias_outlier_fraction, 0.3)
        del w
        rng = self._rng("dead", 1)
        dead_factor = rng.uniform(0.0, 0.3, dead.size).astype(np.float32)
        rng = self._rng("outliers", 1)
        low = rng.random(outliers.size) < 0.3
        out_off = np.where(low, -rng.uniform(10.0, 40.0, outliers.size),
                           rng.lognormal(np.log(25.0), 0.7, outliers.size) + 8.0).astype(np.float32)
        return {"ps": self._make_ps(ps_index), "hot": hot, "dead": dead, "dead_factor": dead_factor,
                "outliers": outliers, "outlier_offset": out_off}

    def _make_ps(self, index: Array) -> PSTable:
        """Levels and occupation probabilities of the telegraph pixels."""
        m = self.model
        rng = self._rng("ps", 1)
        n = index.size
        lo, hi = m.ps_amplitude_range
        sign = np.where(rng.random(n) < m.ps_salt_fraction, 1.0, -1.0)
        tri = rng.random(n) < m.ps_trimodal_fraction
        a1 = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
        # Trimodal: a nearer and a farther level, usually on the same side.
        near = np.exp(rng.uniform(np.log(lo), np.log(max(lo, hi / 2.0)), n))
        far = np.minimum(near + rng.uniform(lo, max(lo, hi / 2.0), n), hi)
        sign2 = np.where(rng.random(n) < 0.8, sign, -sign)
        levels = np.zeros((n, 3))
        levels[:, 1] = np.where(tri, near, a1) * sign
        levels[:, 2] = np.where(tri, far * sign2, 0.0)
        # Bimodal occupation p of the offset state in 0.2-0.8, narrowed for small amplitudes so
        # that the telegraph std a*sqrt(p(1-p)) stays >= ps_min_std_adu.
        c = np.clip((m.ps_min_std_adu / np.abs(levels[:, 1])) ** 2, 0.0, 0.25)
        pmin = np.maximum(0.2, 0.5 - 0.5 * np.sqrt(1.0 - 4.0 * c))
        pmin = np.minimum(pmin, 0.5)
        p1 = pmin + rng.random(n) * (1.0 - 2.0 * pmin)
        probs = np.stack([1.0 - p1, p1, np.zeros(n)], axis=1)
        dirichlet = rng.dirichlet((4.0, 4.0, 4.0), n)
        dirichlet = np.maximum(dirichlet, 0.1)
        dirichlet /= dirichlet.sum(axis=1, keepdims=True)
        probs[tri] = dirichlet[tri]
        mean = (probs * levels).sum(axis=1)
        std = np.sqrt(np.maximum((probs * levels**2).sum(axis=1) - mean**2, 1e-12))
        scale = np.maximum(1.0, m.ps_min_std_adu / std)
        levels *= scale[:, None]
        cum = np.cumsum(probs, axis=1)[:, :2]
        cum[~tri, 1] = 1.0  # third state unreachable for bimodal pixels
        return PSTable(index=index.astype(np.int64), n_levels=np.where(tri, 3, 2).astype(np.int8),
                       levels=levels.astype(np.float32), cumprob=cum.astype(np.float32), shape=self.shape)

    @property
    def ps(self) -> PSTable:
        """Truth table of the pepper & salt pixels."""
        return self._defects["ps"]

    def _index_map(self, index: Array) -> Array:
        mask = np.zeros(self.shape, dtype=bool)
        mask.reshape(-1)[index] = True
        return mask

    @property
    def ps_map(self) -> Array:
        """Boolean map of PS pixels."""
        return self._index_map(self.ps.index)

    @property
    def hot_pixels(self) -> Array:
        """Flat indices of hot pixels."""
        return self._defects["hot"]

    @property
    def hot_map(self) -> Array:
        """Boolean map of hot pixels (dark current 0.05-5 e-/s)."""
        return self._index_map(self.hot_pixels)

    @property
    def dead_pixels(self) -> Array:
        """Flat indices of dead/low-response pixels."""
        return self._defects["dead"]

    @property
    def dead_map(self) -> Array:
        """Boolean map of dead/low-response pixels (response 0-30 %)."""
        return self._index_map(self.dead_pixels)

    @property
    def bias_outlier_map(self) -> Array:
        """Boolean map of pixels whose bias offset is beyond ~5 sigma (low or high)."""
        return self._index_map(self._defects["outliers"])

    @property
    def bad_pixel_map(self) -> Array:
        """Hot, dead and bias-outlier pixels (PS pixels are separate: :attr:`ps_map`)."""
        return self.hot_map | self.dead_map | self.bias_outlier_map

    # ------------------------------------------------------------------ bias
    @cached_property
    def row_pattern(self) -> Array:
        """Fixed per-row bias offsets (horizontal banding), ADU, shape (ny,)."""
        ny = self.shape[0]
        rng = self._rng("rows")
        white = rng.standard_normal(ny + 64)
        rho = 0.6  # AR(1): bands a few rows wide
        out = np.empty_like(white)
        out[0] = white[0]
        for i in range(1, white.size):  # ny <= 6388: a Python loop is fine
            out[i] = rho * out[i - 1] + white[i]
        out = out[64:]
        out *= self.model.row_pattern_adu / max(out.std(), 1e-12)
        return (out - out.mean()).astype(np.float32)

    @cached_property
    def bias_map(self) -> Array:
        """Per-pixel mean bias in ADU with the telegraph pixels in state 0 (float32).

        Sum of: the offset level; a vertical gradient (counts fall bottom -> top); two warm
        bottom corners; fixed row banding; right-skewed DSNU (gamma, k=2.5); rare outliers.
        Row 0 is the bottom of the frame as displayed (FITS convention).
        """
        m = self.model
        ny, nx = self.shape
        rng = self._rng("bias")
        k = 2.5
        out = rng.standard_gamma(k, size=(ny, nx), dtype=np.float32)
        out -= np.float32(k)
        out *= np.float32(m.dsnu_adu / math.sqrt(k))
        grad = m.bias_gradient_adu * (0.5 - np.arange(ny) / max(ny - 1, 1))
        out += (m.bias_level + grad + self.row_pattern).astype(np.float32)[:, None]
        if m.bias_corner_adu > 0:
            scale = m.bias_corner_scale * math.hypot(ny, nx)
            reach = int(min(math.ceil(7 * scale), max(ny, nx)))
            by, bx = min(reach, ny), min(reach, nx)
            yy = np.arange(by, dtype=np.float32)[:, None]
            xx = np.arange(bx, dtype=np.float32)[None, :]
            bump = (m.bias_corner_adu * np.exp(-np.sqrt(yy**2 + xx**2) / scale)).astype(np.float32)
            out[:by, :bx] += bump  # bottom-left
            out[:by, nx - bx:] += bump[:, ::-1]  # bottom-right
        d = self._defects
        out.reshape(-1)[d["outliers"]] += d["outlier_offset"]
        return out

    @property
    def expected_bias_map(self) -> Array:
        """Mean of infinitely many bias frames: :attr:`bias_map` + mean PS offset."""
        out = self.bias_map.copy()
        out.reshape(-1)[self.ps.index] += self.ps.expected_offset.astype(np.float32)
        return out

    @cached_property
    def read_noise_map(self) -> Array:
        """Per-pixel read noise in ADU (lognormal tail plus a low-noise population)."""
        m = self.model
        rng = self._rng("read_noise")
        out = rng.standard_normal(self.shape, dtype=np.float32)
        out *= np.float32(m.read_noise_sigma)
        np.exp(out, out=out)
        out *= np.float32(m.read_noise_adu)
        if m.read_noise_low_fraction > 0:
            low = np.flatnonzero(rng.random(m.npix, dtype=np.float32) < m.read_noise_low_fraction)
            out.reshape(-1)[low] *= np.float32(0.7)
        return out

    @property
    def bias_std_map(self) -> Array:
        """Expected per-pixel std over bias frames in ADU: read noise, row noise, ADC
        quantisation and the telegraph signal of PS pixels."""
        m = self.model
        var = self.read_noise_map.astype(np.float32) ** 2
        var += np.float32(m.row_noise_adu**2 + m.bias_jitter_adu**2 + 1.0 / 12.0)
        var.reshape(-1)[self.ps.index] += (self.ps.std**2).astype(np.float32)
        return np.sqrt(var)

    # ------------------------------------------------------------------ gain, dark
    @cached_property
    def gain_map(self) -> Array:
        """Per-pixel gain in e-/ADU (narrow main peak, ~2 % lower secondary peak, median = gain)."""
        m = self.model
        rng = self._rng("gain")
        out = rng.standard_normal(self.shape, dtype=np.float32)
        out *= np.float32(m.gain_rms)
        out += np.float32(1.0)
        if m.gain_low_fraction > 0:
            low = np.flatnonzero(rng.random(m.npix, dtype=np.float32) < m.gain_low_fraction)
            out.reshape(-1)[low] *= np.float32(0.98)
        out *= np.float32(m.gain / np.median(out.reshape(-1)[:: max(1, m.npix // 1_000_000)]))
        return out

    @cached_property
    def _inv_gain(self) -> Array:
        return np.float32(1.0) / self.gain_map

    @cached_property
    def _fw_clip_needed(self) -> bool:
        # The ADC (65535) saturates long before 51.4 ke- at 0.25 e-/ADU; skip the clip then.
        return bool(self.model.full_well_e * float(self._inv_gain.min()) < self.model.adc_max + 1000)

    @cached_property
    def dark_map(self) -> Array:
        """Per-pixel dark current in e-/s: skewed, multi-modal, hot pixels at 0.05-5 e-/s."""
        m = self.model
        rng = self._rng("dark")
        out = rng.standard_gamma(2.0, size=self.shape, dtype=np.float32)
        # Secondary peaks at higher rates (camera paper Fig. 8).
        u = rng.random(self.shape, dtype=np.float32)
        out[u < 0.06] *= np.float32(3.0)
        out[u < 0.015] *= np.float32(3.0)
        del u
        out *= np.float32(m.dark_current_e / out.mean(dtype=np.float64)) if m.dark_current_e > 0 else np.float32(0)
        hot = self.hot_pixels
        if hot.size:
            rate = np.clip(self._rng("hot", 1).lognormal(np.log(0.3), 1.0, hot.size), 0.05, 5.0)
            out.reshape(-1)[hot] = rate.astype(np.float32)
        return out

    # ------------------------------------------------------------------ response
    @cached_property
    def prnu_base(self) -> Array:
        """Pixel QE non-uniformity on night 0 (relative, mean 1), dead pixels not included."""
        rng = self._rng("prnu")
        out = rng.standard_normal(self.shape, dtype=np.float32)
        out *= np.float32(self.model.prnu_rms)
        out += np.float32(1.0)
        return out

    def _drift(self, night_index: int) -> Array | None:
        """Per-pixel random walk of the PRNU after ``night_index`` nights (None at 0)."""
        if night_index < 0:
            raise ValueError(f"night_index={night_index} must be >= 0")
        if night_index == 0 or self.model.prnu_drift_rms == 0:
            return None
        done, state = self._drift_state
        if state is None or done > night_index:
            done, state = 0, np.zeros(self.shape, dtype=np.float32)
        else:
            state = state.copy()
        for k in range(done + 1, night_index + 1):
            step = self._rng("prnu_drift", k).standard_normal(self.shape, dtype=np.float32)
            step *= np.float32(self.model.prnu_drift_rms)
            state += step
        self._drift_state = (night_index, state)
        return state

    def prnu(self, night_index: int = 0) -> Array:
        """PRNU on a night: ``prnu_base * (1 + random walk)``; the walk steps by
        ``prnu_drift_rms`` per pixel per night."""
        drift = self._drift(int(night_index))
        out = self.prnu_base.copy()
        if drift is not None:
            out *= drift + np.float32(1.0)
        return out

    @cached_property
    def vignetting(self) -> Array:
        """Illumination relative to the optical axis: 1 - v r^2 (r = 1 at the corners)."""
        m = self.model
        x, y, rc = self._centre_coords()
        # The optical axis is slightly off the chip centre, as in a real assembly.
        rng = self._rng("vignetting")
        ox, oy = rng.normal(0.0, 0.01, 2) * np.array(self.shape[::-1])
        fx = ((x - np.float32(ox)) / np.float32(rc)) ** 2
        fy = ((y - np.float32(oy)) / np.float32(rc)) ** 2
        out = fy[:, None] + fx[None, :]
        out *= np.float32(-m.vignetting)
        out += np.float32(1.0)
        np.maximum(out, np.float32(0.05), out=out)
        return out

    def response(self, night_index: int = 0, vignetting: bool = True) -> Array:
        """Photo-electrons per incident pupil electron: vignetting x PRNU(night) x dead pixels.

        The last result is cached (frames of one night reuse it).
        """
        key = (int(night_index), bool(vignetting))
        if self._response_cache is not None and self._response_cache[0] == key:
            return self._response_cache[1]
        out = self.prnu(night_index)
        if vignetting:
            out *= self.vignetting
        d = self._defects
        out.reshape(-1)[d["dead"]] *= d["dead_factor"]
        self._response_cache = (key, out)
        return out

    def flat_response(self, night_index: int = 0, vignetting: bool = True) -> Array:
        """Relative ADU response to uniform light: ``response * gain / gain_map``.

        This is what a noise-free flat divided by its level looks like (PRNU and per-pixel
        gain cannot be told apart in a flat).
        """
        out = self.response(night_index, vignetting) * self._inv_gain
        out *= np.float32(self.model.gain)
        return out

    # ------------------------------------------------------------------ optics
    @cached_property
    def sip(self) -> tuple[Array, Array]:
        """SIP ``A`` and ``B`` matrices (5 x 5, order 4) of this camera's optics."""
        return sip_coefficients(self.shape, self.model.sip_corner_px, self._rng("sip"))

    def wcs(self, ra: float, dec: float) -> WCS:
        """True TAN-SIP WCS for a frame centred on ``(ra, dec)``."""
        m = self.model
        return make_wcs(self.shape, ra, dec, m.pixel_scale_arcsec, m.rotation_deg,
                        self.sip if m.sip_corner_px > 0 else None)

    def fwhm_at(self, x: Array, y: Array, seeing_arcsec: float | None = None) -> Array:
        """PSF FWHM in pixels at pixel positions (grows quadratically to the corners)."""
        m = self.model
        seeing = m.seeing_arcsec if seeing_arcsec is None else float(seeing_arcsec)
        r2 = self._r2(x, y)
        return seeing / m.pixel_scale_arcsec * (1.0 + m.psf_corner_growth * r2)

    def _r2(self, x: Array, y: Array) -> Array:
        ny, nx = self.shape
        rc2 = ((nx - 1) / 2) ** 2 + ((ny - 1) / 2) ** 2
        return ((np.asarray(x, float) - (nx - 1) / 2) ** 2 + (np.asarray(y, float) - (ny - 1) / 2) ** 2) / rc2

    def sky_e(self, exptime: float, sky_mag: float | None = None) -> float:
        """Sky electrons per pixel at the optical axis over ``exptime``."""
        m = self.model
        mag = m.sky_brightness if sky_mag is None else float(sky_mag)
        return float(exptime) * 10.0 ** (-0.4 * (mag - m.zp)) * m.pixel_scale_arcsec**2

    def frame_zero_point(self, airmass: float = 1.0, transparency: float = 1.0) -> float:
        """Zero point in e-/s of a frame: zenith zp - k (X - 1) + 2.5 log10(transparency)."""
        if not 0 < transparency <= 1.5:
            raise ValueError(f"transparency={transparency} must be in (0, 1.5]")
        if airmass < 1.0:
            raise ValueError(f"airmass={airmass} must be >= 1")
        m = self.model
        return m.zp - m.extinction_coefficient * (airmass - 1.0) + 2.5 * math.log10(transparency)

