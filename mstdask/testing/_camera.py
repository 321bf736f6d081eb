"""A seeded model of the ZWO ASI6200MM Pro CMOS camera on the 30 cm Mini-SiTian telescopes.

Every number comes from the two MST papers in ``shared/papers``:

* Zhang et al. 2025, "The Mini-SiTian Array: Evaluation Camera System" (papers/002,
  camera paper): bias ~500 ADU with fixed-pattern noise (gradient, warm bottom corners,
  horizontal banding) and right-skewed DSNU (Sect. 3.1, Figs. 2-3); per-pixel bias std
  ~4 ADU (Fig. 4); random-telegraph "salt & pepper" pixels clustered at edges/corners
  (Sect. 3.2, Figs. 5-6); dark current 0.002 e-/pix/s at 0 C with a skewed, multi-modal
  per-pixel distribution (Sect. 3.3); nonlinearity within +-0.3 % above 3000 ADU
  (Sect. 3.4); gain 0.252-0.255 e-/ADU, median per-pixel read noise 1.028 e-, narrow
  per-pixel gain distribution (Sect. 3.5, Eqs. 1-3, Fig. 10); full well 51.4 ke-,
  16-bit ADC (Table 1).
* Xiao et al. 2025, MST imaging pipeline (papers/000, pipeline paper): 9576 x 6388
  pixels of 3.76 um = 0.862", gain 0.25 e-/ADU, saturation flagged above 50000 ADU,
  PS pixels defined by std > 8 ADU over 100 bias frames, twilight flats of ~20000 ADU
  and small-scale flats stable over a month (Sect. 3.1).

Signal chain per pixel (the order matters for what the pipeline can recover)::

    photons at the pupil [e-]  x vignetting x PRNU(night)     (optics + QE response)
    + dark current x t                                         (thermal electrons)
    -> Poisson noise (Gaussian for means >= 50 e-, same variance)
    + cosmic-ray electrons
    -> clip at full well, / per-pixel gain [e-/ADU], x (1 + nonlinearity)
    + read noise (per-pixel std) + bias map (FPN + DSNU) + row noise + PS level
    -> round, clip to the 16-bit ADC range, uint16

Vectors of ``(ny, nx)`` float32 are built once per camera and cached; single frames
touch each full-frame array only a handful of times so a full 6388 x 9576 frame takes
a few seconds.
"""

from __future__ import annotations

import math
import threading
import zlib
from functools import cached_property
from typing import Any, Sequence

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from ._sky import (
    SatelliteTrack,
    columns_of,
    cosmic_ray_hits,
    random_track,
    render_stars,
)


from ._camera_maps import CameraMaps
from ._camera_model import DEFAULT_FIELD, NONLINEARITY_REF_ADU, Array, CameraModel, FrameTruth, PSTable

__all__ = ["DEFAULT_FIELD", "NONLINEARITY_REF_ADU", "Camera", "CameraModel", "FrameTruth", "PSTable", "frame_checksum",
           "make_camera"]


# Fixed keys that give every static map its own random stream: a map's values do not
# depend on which other maps were built before it.
_STREAMS = {"bias": 1, "rows": 2, "read_noise": 3, "gain": 4, "dark": 5, "prnu": 6, "defects": 7,
            "ps": 8, "hot": 9, "dead": 10, "outliers": 11, "sip": 12, "prnu_drift": 13, "vignetting": 14}
_STREAM_TAG = 0x4D535443  # "MSTC"


class Camera(CameraMaps):
    """One simulated camera: static per-pixel truth maps plus frame generators.

    Maps are drawn lazily (first access) from streams seeded by ``(seed, map name)``, so
    they are reproducible in any access order and can be dropped with
    :meth:`clear_cache` and rebuilt identically. A pickled camera carries only its
    model and seed.

    Memory: a full-size camera holds ~9 float32 maps (~2.2 GB) once all are built, and
    each thread that makes frames keeps ~1.5 GB of scratch arrays (reused, because
    fresh allocations of that size cost more than the arithmetic). Frame methods may be
    called from several threads; each thread uses its own scratch arrays.

    Parameters
    ----------
    model : CameraModel
        Camera description.
    seed : int
        Seed of the static maps (frames take their own generator).
    """

    def __init__(self, model: CameraModel | None = None, seed: int = 0) -> None:
        self.model = model if model is not None else CameraModel()
        if int(seed) < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.seed = int(seed)
        self._drift_state: tuple[int, Array | None] = (0, None)
        self._response_cache: tuple[tuple[int, bool], Array] | None = None
        self._ws = _Workspace()

    def __getstate__(self) -> dict[str, Any]:
        # Pickle only the recipe (model, seed): maps are rebuilt identically where unpickled.
        return {"model": self.model, "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model"], state["seed"])

    def __repr__(self) -> str:
        m = self.model
        return f"Camera({m.telescope} {m.filter}, shape={m.shape}, seed={self.seed})"

    # ------------------------------------------------------------------ helpers
    def _rng(self, name: str, *extra: int) -> np.random.Generator:
        # The tag keeps map streams apart from frame generators a caller seeds with
        # short lists such as [seed, i].
        return np.random.default_rng([self.seed, _STREAM_TAG, _STREAMS[name], *extra])

    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape ``(ny, nx)``."""
        return self.model.shape

    def _centre_coords(self) -> tuple[Array, Array, float]:
        """x and y offsets from the frame centre (float32) and the half-diagonal."""
        ny, nx = self.shape
        x = np.arange(nx, dtype=np.float32) - np.float32((nx - 1) / 2)
        y = np.arange(ny, dtype=np.float32) - np.float32((ny - 1) / 2)
        return x, y, math.hypot((nx - 1) / 2, (ny - 1) / 2)

    def clear_cache(self) -> None:
        """Drop all cached full-frame maps (they are rebuilt identically on next use)."""
        for name in ("bias_map", "read_noise_map", "gain_map", "_inv_gain", "dark_map", "prnu_base",
                     "vignetting", "_defects", "_fw_clip_needed", "_read_var"):
            self.__dict__.pop(name, None)
        self._drift_state = (0, None)
        self._response_cache = None
        self._ws = _Workspace()

    # ------------------------------------------------------------------ noise engine
    def _buf(self, name: str, dtype: type = np.float32) -> Array:
        """A reusable full-frame scratch array of this thread (contents undefined).

        Fresh 250 MB allocations are dominated by page faults on full-size frames, so the
        frame makers work in a few buffers that are allocated once per thread.
        """
        return self._ws.get(name, self.shape, dtype)

    @cached_property
    def _read_var(self) -> Array:
        return np.square(self.read_noise_map)

    def _readout(self, e_exp: Array | None, rng: np.random.Generator,
                 cr: tuple[Array, Array] | None = None) -> tuple[Array, Array, Array]:
        """Turn expected electrons into a uint16 frame. ``e_exp`` (a scratch buffer) is consumed.

        Returns the frame, the per-frame row offsets and the PS offsets.
        """
        m = self.model
        shape = self.shape
        z = rng.standard_normal(dtype=np.float32, out=self._buf("z"))
        rn = self.read_noise_map
        if e_exp is None:
            sig = z
            sig *= rn
        else:
            invg = self._inv_gain
            thr = np.float32(m.gaussian_threshold_e)
            lo_mask = np.less(e_exp, thr, out=self._buf("mask", np.bool_))
            n_lo = int(np.count_nonzero(lo_mask))
            half = e_exp.size // 2
            lo_idx = hi_idx = None
            if 0 < n_lo <= half:
                # Mostly bright (flats, science): Gaussian everywhere, exact Poisson on the
                # few faint pixels (dead pixels) patched in afterwards.
                lo_idx = np.flatnonzero(lo_mask)
                e_lo, z_lo = e_exp.reshape(-1)[lo_idx], z.reshape(-1)[lo_idx]
            elif half < n_lo < e_exp.size:
                # Mostly faint (darks): Poisson everywhere, Gaussian for the few bright (hot) pixels.
                hi_idx = np.flatnonzero(~lo_mask)
                e_hi, z_hi = e_exp.reshape(-1)[hi_idx], z.reshape(-1)[hi_idx]
            if n_lo <= half:
                # Gaussian photon noise and read noise in one draw: var = e/g^2 + rn^2.
                np.multiply(e_exp, invg, out=e_exp)  # mean signal in ADU
                var = np.multiply(e_exp, invg, out=self._buf("var"))
                var += self._read_var
                np.sqrt(var, out=var)
                z *= var
                e_exp += z
                sig = e_exp
                if lo_idx is not None:
                    k_lo = _poisson_small(e_lo, rng)
                    sig.reshape(-1)[lo_idx] = (k_lo * invg.reshape(-1)[lo_idx]
                                               + rn.reshape(-1)[lo_idx] * z_lo)
            else:
                if hi_idx is not None:
                    e_exp.reshape(-1)[hi_idx] = 0.0  # their Poisson draw is replaced below
                k = _poisson_small(e_exp, rng, self._buf)
                k *= invg
                z *= rn
                k += z
                sig = k
                if hi_idx is not None:
                    ig, r = invg.reshape(-1)[hi_idx], rn.reshape(-1)[hi_idx]
                    mean = e_hi * ig
                    sig.reshape(-1)[hi_idx] = mean + np.sqrt(mean * ig + r * r) * z_hi
            if cr is not None and cr[0].size:
                np.add.at(sig.reshape(-1), cr[0], cr[1] * invg.reshape(-1)[cr[0]])
            # Full well: the charge a pixel holds is capped. When the ADC saturates first (the
            # default, 51.4 ke- = 205600 ADU) a scalar cap is equivalent and keeps the
            # nonlinearity below in its valid range.
            if self._fw_clip_needed:
                np.minimum(sig, np.float32(m.full_well_e) * invg, out=sig)
            else:
                np.minimum(sig, np.float32(m.full_well_e * float(invg.max())), out=sig)
            if m.nonlinearity != 0:
                # Quadratic nonlinearity: s -> s (1 + c s / 50000).
                tmp = np.multiply(sig, np.float32(m.nonlinearity / NONLINEARITY_REF_ADU),
                                  out=self._buf("var"))
                tmp += np.float32(1.0)
                sig *= tmp
        rows = (rng.standard_normal(shape[0]) * m.row_noise_adu
                + rng.standard_normal() * m.bias_jitter_adu).astype(np.float32)
        sig += rows[:, None]
        sig += self.bias_map
        ps = self.ps
        ps_off = ps.sample(rng)
        sig.reshape(-1)[ps.index] += ps_off
        np.rint(sig, out=sig)
        np.clip(sig, 0, m.adc_max, out=sig)
        return sig.astype(np.uint16), rows, ps_off

    def _cosmic_rays(self, exptime: float, rng: np.random.Generator, cosmic_rays: bool | float,
                     masks: bool) -> tuple[tuple[Array, Array] | None, Table | None, Array | None]:
        if cosmic_rays is False or exptime <= 0:
            return None, None, None
        rate = self.model.cosmic_ray_rate if cosmic_rays is True else float(cosmic_rays)
        if rate < 0:
            raise ValueError(f"cosmic ray rate {rate} must be >= 0")
        n = int(rng.poisson(rate * self.model.npix * exptime))
        idx, elec, events = cosmic_ray_hits(self.shape, n, rng)
        mask = self._index_map(idx) if masks else None
        return (idx, elec), events, mask

    # ------------------------------------------------------------------ frames
    def bias(self, rng: np.random.Generator | int | None = None) -> tuple[Array, FrameTruth]:
        """A zero-second bias frame.

        Returns
        -------
        data : ndarray of uint16, ``model.shape``
        truth : FrameTruth
        """
        rng = np.random.default_rng(rng)
        data, rows, ps_off = self._readout(None, rng)
        return data, self._truth("bias", 0.0, rows=rows, ps_off=ps_off)

    def dark(self, exptime: float = 300.0, rng: np.random.Generator | int | None = None, *,
             cosmic_rays: bool | float = True, masks: bool = True) -> tuple[Array, FrameTruth]:
        """A dark frame (dust cap on): dark current with exact Poisson noise, hot pixels,
        cosmic rays.

        Parameters
        ----------
        exptime : float
            Seconds.
        rng : Generator, int or None
            Frame random generator or seed.
        cosmic_rays : bool or float
            True for :attr:`CameraModel.cosmic_ray_rate`, a float for another rate
            (events/px/s), False for none.
        masks : bool
            Keep the cosmic-ray and saturation truth maps.
        """
        if exptime < 0:
            raise ValueError(f"exptime={exptime} must be >= 0")
        rng = np.random.default_rng(rng)
        e_exp = np.multiply(self.dark_map, np.float32(exptime), out=self._buf("e"))
        cr, events, cr_mask = self._cosmic_rays(exptime, rng, cosmic_rays, masks)
        data, rows, ps_off = self._readout(e_exp, rng, cr)
        truth = self._truth("dark", exptime, rows=rows, ps_off=ps_off, cosmic_rays=events,
                            cosmic_ray_mask=cr_mask)
        if masks:
            truth.saturated_mask = data > self.model.saturation_adu
        return data, truth

    def flat(self, level_adu: float = 20000.0, night_index: int = 0,
             rng: np.random.Generator | int | None = None, *, exptime: float | None = None,
             gradient: tuple[float, float] | None = None, vignetting: bool = True,
             cosmic_rays: bool | float = True, masks: bool = True) -> tuple[Array, FrameTruth]:
        """A flat field: uniform light x (twilight gradient) x vignetting x PRNU(night).

        Parameters
        ----------
        level_adu : float
            Mean signal above bias at the optical axis, in ADU at the median gain. The
            pipeline keeps flats of 5000-45000 ADU; other levels make rejectable flats.
        night_index : int
            Night number (PRNU drift).
        rng : Generator, int or None
            Frame random generator or seed.
        exptime : float, optional
            Exposure time written to the truth (default 3 s); the level does not depend on it.
        gradient : (float, float), optional
            Fractional illumination change from centre to the right and top edges. None
            draws a twilight-sky gradient of ~1 % (pass (0, 0) for none).
        vignetting : bool
            Apply the telescope vignetting (False for lab flats from an integrating sphere).
        cosmic_rays : bool or float
            As in :meth:`dark`.
        masks : bool
            Keep the truth maps.
        """
        if not level_adu >= 0:
            raise ValueError(f"level_adu={level_adu} must be >= 0")
        rng = np.random.default_rng(rng)
        exptime = 3.0 if exptime is None else float(exptime)
        if gradient is None:
            gradient = tuple(float(g) for g in rng.normal(0.0, 0.01, 2))
        gx, gy = float(gradient[0]), float(gradient[1])
        ny, nx = self.shape
        x = np.linspace(-1.0, 1.0, nx, dtype=np.float32)
        y = np.linspace(-1.0, 1.0, ny, dtype=np.float32)
        level_e = np.float32(level_adu * self.model.gain)
        e_exp = np.add(((np.float32(gy) * y + np.float32(1.0)) * level_e)[:, None],
                       (np.float32(gx) * level_e * x)[None, :], out=self._buf("e"))
        np.maximum(e_exp, np.float32(0.0), out=e_exp)
        e_exp *= self.response(night_index, vignetting)
        e_exp += np.multiply(self.dark_map, np.float32(exptime), out=self._buf("z"))
        cr, events, cr_mask = self._cosmic_rays(exptime, rng, cosmic_rays, masks)
        data, rows, ps_off = self._readout(e_exp, rng, cr)
        truth = self._truth("flat", exptime, night_index=night_index, rows=rows, ps_off=ps_off,
                            cosmic_rays=events, cosmic_ray_mask=cr_mask)
        truth.level_adu = float(level_adu)
        truth.gradient = (gx, gy)
        if masks:
            truth.saturated_mask = data > self.model.saturation_adu
        return data, truth

    def science(
        self,
        exptime: float = 300.0,
        pointing_ra: float = DEFAULT_FIELD[0],
        pointing_dec: float = DEFAULT_FIELD[1],
        stars: Any = None,
        rng: np.random.Generator | int | None = None,
        *,
        night_index: int = 0,
        tracks: int | Sequence[SatelliteTrack] = 0,
        cosmic_rays: bool | float = True,
        seeing_arcsec: float | None = None,
        transparency: float = 1.0,
        airmass: float = 1.0,
        sky_mag: float | None = None,
        masks: bool = True,
    ) -> tuple[Array, FrameTruth]:
        """A science (light) frame.

        Parameters
        ----------
        exptime : float
            Seconds.
        pointing_ra, pointing_dec : float
            True frame centre in degrees (include any pointing jitter here).
        stars : table-like, optional
            Columns ``ra, dec, mag`` (sky catalogue, projected with the true WCS) or
            ``x, y`` plus ``mag`` or ``flux_e`` (total electrons), e.g. for an isolated
            test star. Astropy Table, dict of arrays, structured array or DataFrame.
        rng : Generator, int or None
            Frame random generator or seed.
        night_index : int
            Night number (PRNU drift).
        tracks : int or sequence of SatelliteTrack
            Number of random satellite tracks, or explicit tracks.
        cosmic_rays : bool or float
            As in :meth:`dark`.
        seeing_arcsec : float, optional
            Seeing FWHM; default the model's.
        transparency : float
            Cloud transmission (1 = photometric); lowers the zero point.
        airmass : float
            Airmass; lowers the zero point by ``extinction * (airmass - 1)``.
        sky_mag : float, optional
            Sky brightness in mag/arcsec^2; default the filter's.
        masks : bool
            Keep the truth maps (cosmic rays, tracks, saturation).

        Returns
        -------
        data : ndarray of uint16
        truth : FrameTruth
            With zero point, WCS, star table, tracks, cosmic rays and masks.
        """
        m = self.model
        if exptime <= 0:
            raise ValueError(f"exptime={exptime} must be positive for a science frame")
        rng = np.random.default_rng(rng)
        ny, nx = self.shape
        seeing = m.seeing_arcsec if seeing_arcsec is None else float(seeing_arcsec)
        if seeing <= 0:
            raise ValueError(f"seeing_arcsec={seeing} must be positive")
        zp = self.frame_zero_point(airmass, transparency)
        sky_mag = m.sky_brightness if sky_mag is None else float(sky_mag)
        sky_e = self.sky_e(exptime, sky_mag)
        wcs = self.wcs(pointing_ra, pointing_dec)
        photons = self._buf("e")
        photons.fill(np.float32(sky_e))
        # Satellite tracks, amplitude in sky-noise sigma at the frame centre.
        sigma_e = math.sqrt(sky_e + m.read_noise_e**2)
        if isinstance(tracks, (int, np.integer)):
            if tracks < 0:
                raise ValueError(f"tracks={tracks} must be >= 0")
            track_list = [random_track(self.shape, rng) for _ in range(int(tracks))]
        else:
            track_list = list(tracks)
        drawn: list[SatelliteTrack] = []
        track_mask = np.zeros(self.shape, dtype=bool) if masks else None
        for t in track_list:
            t = SatelliteTrack(t.x0, t.y0, t.x1, t.y1, t.width, t.amplitude_sigma, t.amplitude_sigma * sigma_e)
            iy, ix, d = t.pixels(self.shape)
            photons[iy, ix] += (t.amplitude_e * t.profile(d)).astype(np.float32)
            if track_mask is not None:
                inside = d <= t.width
                track_mask[iy[inside], ix[inside]] = True
            drawn.append(t)
        response = self.response(night_index)
        star_table = self._add_stars(photons, stars, wcs, zp, exptime, seeing, response, sky_e)
        e_exp = photons
        e_exp *= response
        e_exp += np.multiply(self.dark_map, np.float32(exptime), out=self._buf("z"))
        cr, events, cr_mask = self._cosmic_rays(exptime, rng, cosmic_rays, masks)
        data, rows, ps_off = self._readout(e_exp, rng, cr)
        truth = self._truth("science", exptime, night_index=night_index, rows=rows, ps_off=ps_off,
                            cosmic_rays=events, cosmic_ray_mask=cr_mask)
        truth.zero_point = zp
        truth.zero_point_adu = zp + 2.5 * math.log10(1.0 / m.gain)
        truth.transparency = float(transparency)
        truth.airmass = float(airmass)
        truth.sky_mag = sky_mag
        truth.sky_e = sky_e
        truth.sky_adu = sky_e / m.gain
        truth.seeing_arcsec = seeing
        truth.fwhm_px = seeing / m.pixel_scale_arcsec
        truth.pointing = (float(pointing_ra) % 360.0, float(pointing_dec))
        truth.wcs = wcs
        truth.stars = star_table
        truth.tracks = drawn
        truth.track_mask = track_mask
        if masks:
            truth.saturated_mask = data > m.saturation_adu
        return data, truth

    def _add_stars(self, photons: Array, stars: Any, wcs: WCS, zp: float, exptime: float,
                   seeing: float, response: Array, sky_e: float) -> Table | None:
        """Render stars into ``photons`` and return their truth table."""
        cols = columns_of(stars)
        if not cols:
            return None if stars is None else Table()
        m = self.model
        ny, nx = self.shape
        ids = np.arange(len(next(iter(cols.values()))))
        if "x" in cols and "y" in cols:
            x = cols["x"].astype(float)
            y = cols["y"].astype(float)
            ra = dec = None
        elif "ra" in cols and "dec" in cols:
            ra_all, dec_all = cols["ra"].astype(float), cols["dec"].astype(float)
            # Pre-select by angular distance so huge catalogues cost little.
            c_ra, c_dec = np.deg2rad(wcs.wcs.crval)
            cosd = (np.sin(c_dec) * np.sin(np.deg2rad(dec_all))
                    + np.cos(c_dec) * np.cos(np.deg2rad(dec_all)) * np.cos(np.deg2rad(ra_all) - c_ra))
            radius = math.radians(math.hypot(nx, ny) / 2.0 * m.pixel_scale_arcsec / 3600.0 * 1.2 + 0.02)
            near = np.flatnonzero(cosd > math.cos(radius))
            ids = ids[near]
            ra, dec = ra_all[near], dec_all[near]
            if near.size:
                x, y = wcs.all_world2pix(ra, dec, 0, tolerance=1e-6, maxiter=50, quiet=True)
            else:
                x = y = np.zeros(0)
        else:
            raise ValueError("stars need columns ('ra', 'dec') or ('x', 'y'), plus 'mag' or 'flux_e'")
        if "flux_e" in cols:
            flux = cols["flux_e"].astype(float)[ids]
            mag = zp - 2.5 * np.log10(np.maximum(flux, 1e-30) / exptime)
        elif "mag" in cols:
            mag = cols["mag"].astype(float)[ids]
            flux = exptime * 10.0 ** (-0.4 * (mag - zp))
        else:
            raise ValueError("stars need a 'mag' or a 'flux_e' column")
        margin = 140.0  # largest stamp half-size + 12
        keep = (x > -margin) & (x < nx - 1 + margin) & (y > -margin) & (y < ny - 1 + margin) & np.isfinite(x)
        ids, x, y, flux, mag = ids[keep], x[keep], y[keep], flux[keep], mag[keep]
        if ra is not None:
            ra, dec = ra[keep], dec[keep]
        fwhm = self.fwhm_at(x, y, seeing)
        r2 = self._r2(x, y)
        ell = m.psf_corner_ellipticity * r2
        ang = np.arctan2(y - (ny - 1) / 2, x - (nx - 1) / 2)
        res = render_stars(photons, x, y, flux, fwhm, ell, ang, psf=m.psf, beta=m.moffat_beta,
                           weight=(response, self._inv_gain))
        iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
        ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
        sky_adu_local = sky_e * response[iy, ix] * self._inv_gain[iy, ix]
        table = Table()
        table["id"] = ids
        if ra is not None:
            table["ra"], table["dec"] = ra, dec
        table["x"], table["y"] = x, y
        table["mag"] = mag
        table["flux_e"] = flux
        table["flux_in_frame_e"] = res["flux_in_frame_e"]
        table["flux_adu"] = res["flux_adu"]
        table["peak_adu"] = res["peak_adu"]
        table["fwhm"] = fwhm
        table["ellipticity"] = ell
        table["saturated"] = (res["peak_adu"] + sky_adu_local + m.bias_level) > m.saturation_adu
        table["in_frame"] = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        return table

    def _truth(self, kind: str, exptime: float, *, night_index: int = 0, rows: Array | None = None,
               ps_off: Array | None = None, cosmic_rays: Table | None = None,
               cosmic_ray_mask: Array | None = None) -> FrameTruth:
        m = self.model
        return FrameTruth(kind=kind, exptime=float(exptime), telescope=m.telescope, filter=m.filter,
                          night_index=int(night_index), row_offsets=rows, ps_offsets=ps_off,
                          cosmic_rays=cosmic_rays, cosmic_ray_mask=cosmic_ray_mask)


def _poisson_small(lam: Array, rng: np.random.Generator, buf: Any = None,
                   dense_passes: int = 3) -> Array:
    """Poisson deviates for small means (< ~50) by CDF inversion, float32 out.

    About 3x faster than ``Generator.poisson`` for dark frames (means ~1 e-): the first
    ``dense_passes`` terms of the CDF are compared for all pixels with whole-array
    operations, the rest only for the few pixels still above the CDF. Pixels that have
    not converged after many terms (float32 round-off as u -> 1) fall back to
    ``Generator.poisson``.

    Parameters
    ----------
    lam : ndarray of float32
        Means.
    rng : Generator
        Random generator.
    buf : callable, optional
        ``buf(name, dtype)`` returning scratch arrays of ``lam``'s shape (the result is
        one of them); default fresh arrays.
    dense_passes : int
        CDF terms evaluated for all pixels.
    """
    if buf is None:
        def buf(name: str, dtype: type = np.float32) -> Array:
            return np.empty(lam.shape, dtype)
    flat_lam = lam.reshape(-1)
    u = rng.random(dtype=np.float32, out=buf("var")).reshape(-1)
    p = np.negative(flat_lam, out=buf("p").reshape(-1))
    np.exp(p, out=p)
    c = buf("c").reshape(-1)
    c[...] = p
    above = np.greater(u, c, out=buf("mask", np.bool_).reshape(-1))
    k = buf("k").reshape(-1)
    k[...] = above
    for j in range(1, dense_passes + 1):
        p *= flat_lam
        p *= np.float32(1.0 / j)
        c += p
        np.greater(u, c, out=above)
        k += above
    active = np.flatnonzero(above)  # these have k = dense_passes + 1 so far
    j = dense_passes
    limit = int(float(flat_lam.max(initial=0.0)) * 3 + 40)
    while active.size:
        j += 1
        if j > limit:
            k[active] = rng.poisson(flat_lam[active].astype(np.float64))
            break
        pa = p[active] * (flat_lam[active] / np.float32(j))
        ca = c[active] + pa
        p[active] = pa
        c[active] = ca
        active = active[u[active] > ca]
        k[active] = j + 1
    return k.reshape(lam.shape)


class _Workspace(threading.local):
    """Per-thread scratch arrays, reused across frames."""

    def __init__(self) -> None:
        self.buffers: dict[str, Array] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> Array:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != np.dtype(dtype):
            buf = np.empty(shape, dtype)
            self.buffers[name] = buf
        return buf


def frame_checksum(data: Array) -> int:
    """Adler-32 of a frame's pixels as native uint16 in C order (see :attr:`FrameTruth.checksum`)."""
    return zlib.adler32(np.ascontiguousarray(data, dtype=np.uint16))


def make_camera(model: CameraModel | None = None, seed: int = 0) -> Camera:
    """Create a :class:`Camera` (maps are drawn lazily on first use).

    Parameters
    ----------
    model : CameraModel, optional
        Camera description; default the full-size MST2 g-band camera.
    seed : int
        Seed of the static per-pixel maps.
    """
    return Camera(model if model is not None else CameraModel(), seed)
