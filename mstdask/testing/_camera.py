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
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ._sky import (
    BANDPASSES,
    SatelliteTrack,
    columns_of,
    cosmic_ray_hits,
    make_wcs,
    random_track,
    render_stars,
    sip_coefficients,
)

__all__ = ["DEFAULT_FIELD", "Camera", "CameraModel", "FrameTruth", "PSTable", "frame_checksum", "make_camera"]

#: Default science pointing (RA, Dec in degrees) used when none is given: an arbitrary
#: high-declination winter field, standing in for MST's 'f02'.
DEFAULT_FIELD = (115.0, 40.0)

#: Reference signal for :attr:`CameraModel.nonlinearity` (ADU above bias).
NONLINEARITY_REF_ADU = 50000.0

Array = np.ndarray


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"CameraModel: {message}")


@dataclass(frozen=True)
class CameraModel:
    """Static description of one MST camera + telescope; all values have paper defaults.

    Defaults are from Zhang et al. 2025 (MST camera evaluation, papers/002, "camera
    paper") and Xiao et al. 2025 (MST imaging pipeline, papers/000, "pipeline paper").
    Fields are validated on creation; use :func:`dataclasses.replace` to vary them.

    Attributes
    ----------
    shape : (int, int)
        Numpy shape ``(ny, nx)``; the sensor is 9576 x 6388 (NAXIS1 x NAXIS2), camera
        paper Table 1. Smaller shapes are miniature sensors: every spatial effect
        (gradients, corners, vignetting, PSF growth) scales to the frame.
    telescope, instrument, filter : str
        TELESCOP/INSTRUME/FILTER values (MST1 i, MST2 g, MST3 r; pipeline paper Sect. 2.2).
    gain : float
        Median per-pixel gain in e-/ADU (camera paper Table 3: 0.252-0.255; pipeline
        paper: 0.25).
    gain_rms : float
        Relative rms of the main per-pixel gain population (camera paper Fig. 10: narrow).
    gain_low_fraction : float
        Fraction of pixels in the secondary gain peak ~2 % lower (Fig. 10, 0.250-0.252).
    full_well_e : float
        Full-well capacity in electrons (51.4 ke-, camera paper Table 1).
    adc_max : int
        Largest ADC output (16-bit: 65535).
    saturation_adu : float
        Level above which the pipeline flags pixels as saturated (50000 ADU, pipeline
        paper Sect. 3.1.5); truth saturated masks use it.
    bias_level : float
        Mean bias offset in ADU at gain 100 / offset 50 (camera paper Fig. 6: 495-505).
    dsnu_adu : float
        Std of the right-skewed (gamma) per-pixel offsets (DSNU, camera paper Fig. 3).
    bias_gradient_adu : float
        Bias difference bottom minus top of the frame (Fig. 2: counts fall upwards).
    bias_corner_adu, bias_corner_scale : float
        Excess of the two warm bottom corners in ADU and its e-folding length as a
        fraction of the frame diagonal (Fig. 2).
    row_pattern_adu : float
        Std of the fixed row-wise banding (Fig. 2 "horizontal structures").
    row_noise_adu : float
        Std of the per-frame row offsets (correlated read noise of rolling readout).
    bias_jitter_adu : float
        Std of the frame-to-frame mean bias level (camera paper Fig. 1: +-0.03 ADU).
    bias_outlier_fraction : float
        Fraction of pixels with offsets beyond 5 sigma of the bias distribution
        (camera paper Sect. 3.2: 0.06-0.08 %, about 1/3 low and 2/3 high).
    read_noise_adu : float
        Median per-pixel read noise in ADU (1.028 e- / 0.25 ~ 4 ADU; Fig. 4 mean 3.9).
    read_noise_sigma : float
        Lognormal width of the per-pixel read noise (tail to high values, Fig. 10).
    read_noise_low_fraction : float
        Fraction of pixels in the low-noise peak at 0.7x the median (Fig. 10, bimodal).
    ps_fraction : float
        Fraction of random-telegraph "pepper & salt" pixels (pipeline paper: < 8 %).
    ps_amplitude_range : (float, float)
        Range of the PS level offsets in ADU (bottom panels of pipeline paper Fig. 5).
    ps_salt_fraction : float
        Fraction of PS pixels whose offset is positive (salt); the rest are pepper.
    ps_trimodal_fraction : float
        Fraction of PS pixels with three levels (the rest have two).
    ps_edge_fraction : float
        Fraction of PS pixels placed with a density rising towards edges/corners
        (camera paper Fig. 5); the rest are uniform.
    ps_min_std_adu : float
        Smallest intrinsic std of a PS pixel over many frames, so that the pipeline's
        ``std > 8 ADU`` criterion finds them (with read noise the total exceeds 9.8).
    hot_pixel_fraction : float
        Fraction of hot pixels (high dark current; camera paper Sect. 3.2-3.3).
    dead_pixel_fraction : float
        Fraction of dead/low-response pixels (response 0-30 %).
    dark_current_e : float
        Mean dark current of normal pixels in e-/pix/s at 0 C (camera paper Sect. 3.3).
    prnu_rms : float
        Pixel response non-uniformity (QE), relative rms.
    prnu_drift_rms : float
        Per-night random-walk step of the PRNU (relative): small-scale flats are stable
        over a month but not identical (pipeline paper Sect. 3.1.2, Fig. 4).
    vignetting : float
        Fractional illumination loss at the frame corners (smooth radial falloff).
    nonlinearity : float
        Fractional deviation from linearity at 50000 ADU of signal, quadratic in the
        signal (camera paper Sect. 3.4: within +-0.3 % above 3000 ADU). 0 disables it.
    pixel_scale_arcsec, pixel_size_um : float
        0.862"/px and 3.76 um (pipeline paper Sect. 2.3).
    rotation_deg : float
        Position angle of the detector y axis (mount/camera rotation).
    sip_corner_px : float
        Optical distortion: displacement of the frame corners by the cubic term of the
        4th-order SIP polynomial (pipeline paper Sect. 3.2.1: 4th-order polynomial).
    seeing_arcsec : float
        Default seeing FWHM (Xinglong mean 1.9", pipeline paper Sect. 2.1; SNR model 2").
    psf : {'moffat', 'gaussian'}
        PSF profile.
    moffat_beta : float
        Moffat index.
    psf_corner_growth : float
        Relative FWHM increase at the frame corners (pipeline paper Fig. 10: FWHM varies
        over the field).
    psf_corner_ellipticity : float
        Radial elongation (1 - b/a) of the PSF at the frame corners.
    zero_point : float or None
        Zenith zero point: a star of magnitude m gives ``10**(-0.4 (m - zp))``
        photo-electrons per second in total (before vignetting/PRNU). None takes it from
        the filter via Eq. 4 of the pipeline paper (g: 21.23, G: 20.79, r: 21.19, i: 20.40).
    sky_mag : float or None
        Dark-sky brightness in mag/arcsec^2; None takes the filter default (G: 21).
    extinction : float or None
        Extinction in mag/airmass; None takes the filter default.
    cosmic_ray_rate : float
        Cosmic-ray events per pixel per second. The default, 2 per 100 x 100 px per
        300 s, is ~100x the ground-level muon rate so that small test frames contain
        hits; set ~4e-9 for a realistic rate.
    gain_setting, offset_setting : int
        Camera GAIN and OFFSET settings written to headers (100 and 50, camera paper).
    ccd_temp_c : float
        Sensor set point (0 C, camera paper).
    focal_length_mm, aperture_mm : float
        30 cm f/3 optics (pipeline paper Sect. 2.1).
    gaussian_threshold_e : float
        Means at or above this (electrons) get Gaussian instead of Poisson noise (same
        variance; the skewness error is < 0.15 sigma).
    """

    shape: tuple[int, int] = (6388, 9576)
    telescope: str = "MST2"
    instrument: str = "ZWO ASI6200MM Pro"
    filter: str = "g"
    gain: float = 0.25
    gain_rms: float = 0.005
    gain_low_fraction: float = 0.08
    full_well_e: float = 51400.0
    adc_max: int = 65535
    saturation_adu: float = 50000.0
    bias_level: float = 500.0
    dsnu_adu: float = 1.5
    bias_gradient_adu: float = 2.0
    bias_corner_adu: float = 4.0
    bias_corner_scale: float = 0.03
    row_pattern_adu: float = 0.7
    row_noise_adu: float = 0.3
    bias_jitter_adu: float = 0.01
    bias_outlier_fraction: float = 7e-4
    read_noise_adu: float = 4.0
    read_noise_sigma: float = 0.15
    read_noise_low_fraction: float = 0.1
    ps_fraction: float = 0.03
    ps_amplitude_range: tuple[float, float] = (20.0, 150.0)
    ps_salt_fraction: float = 0.75
    ps_trimodal_fraction: float = 0.3
    ps_edge_fraction: float = 0.4
    ps_min_std_adu: float = 9.0
    hot_pixel_fraction: float = 3e-4
    dead_pixel_fraction: float = 1e-4
    dark_current_e: float = 0.002
    prnu_rms: float = 0.01
    prnu_drift_rms: float = 0.0005
    vignetting: float = 0.15
    nonlinearity: float = -0.002
    pixel_scale_arcsec: float = 0.862
    pixel_size_um: float = 3.76
    rotation_deg: float = 0.3
    sip_corner_px: float = 3.0
    seeing_arcsec: float = 2.0
    psf: str = "moffat"
    moffat_beta: float = 3.0
    psf_corner_growth: float = 0.4
    psf_corner_ellipticity: float = 0.1
    zero_point: float | None = None
    sky_mag: float | None = None
    extinction: float | None = None
    cosmic_ray_rate: float = 2.0 / (100 * 100 * 300)
    gain_setting: int = 100
    offset_setting: int = 50
    ccd_temp_c: float = 0.0
    focal_length_mm: float = 900.0
    aperture_mm: float = 300.0
    gaussian_threshold_e: float = 50.0

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(s) for s in self.shape)
        except (TypeError, ValueError):
            raise ValueError(f"CameraModel: shape={self.shape!r} must be (ny, nx) integers") from None
        _check(len(shape) == 2 and min(shape) >= 16, f"shape={self.shape!r} must be (ny, nx) with both >= 16")
        object.__setattr__(self, "shape", shape)
        amp = tuple(float(a) for a in self.ps_amplitude_range)
        _check(len(amp) == 2 and 0 < amp[0] <= amp[1],
               f"ps_amplitude_range={self.ps_amplitude_range} must be 0 < lo <= hi")
        object.__setattr__(self, "ps_amplitude_range", amp)
        _check(self.gain > 0, f"gain={self.gain} e-/ADU must be positive")
        _check(self.full_well_e > 0, "full_well_e must be positive")
        _check(1 <= self.adc_max <= 65535, f"adc_max={self.adc_max} must fit uint16")
        _check(0 < self.saturation_adu <= self.adc_max, f"saturation_adu={self.saturation_adu} must be in (0, adc_max]")
        _check(0 <= self.bias_level < self.adc_max, f"bias_level={self.bias_level} outside the ADC range")
        for name in ("gain_rms", "dsnu_adu", "bias_gradient_adu", "bias_corner_adu", "row_pattern_adu",
                     "row_noise_adu", "bias_jitter_adu", "read_noise_sigma", "prnu_rms", "prnu_drift_rms",
                     "dark_current_e", "sip_corner_px", "psf_corner_growth", "cosmic_ray_rate", "ps_min_std_adu"):
            _check(float(getattr(self, name)) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        _check(self.read_noise_adu > 0, f"read_noise_adu={self.read_noise_adu} must be positive")
        _check(self.bias_corner_scale > 0, "bias_corner_scale must be positive")
        for name in ("gain_low_fraction", "bias_outlier_fraction", "read_noise_low_fraction", "ps_fraction",
                     "ps_salt_fraction", "ps_trimodal_fraction", "ps_edge_fraction", "hot_pixel_fraction",
                     "dead_pixel_fraction"):
            value = float(getattr(self, name))
            _check(0.0 <= value <= 1.0, f"{name}={value} must be a fraction in [0, 1]")
        _check(self.ps_fraction <= 0.5, f"ps_fraction={self.ps_fraction} is not a camera (max 0.5)")
        _check(0.0 <= self.vignetting < 0.9, f"vignetting={self.vignetting} must be in [0, 0.9)")
        _check(abs(self.nonlinearity) <= 0.05, f"nonlinearity={self.nonlinearity} beyond +-5 % is not this camera")
        _check(self.pixel_scale_arcsec > 0 and self.pixel_size_um > 0, "pixel scale and size must be positive")
        _check(self.seeing_arcsec > 0, "seeing_arcsec must be positive")
        _check(self.psf in ("moffat", "gaussian"), f"psf={self.psf!r}; choose 'moffat' or 'gaussian'")
        _check(self.moffat_beta > 1.0, "moffat_beta must be > 1 for a finite flux")
        _check(0.0 <= self.psf_corner_ellipticity < 0.9, "psf_corner_ellipticity must be in [0, 0.9)")
        _check(self.gaussian_threshold_e >= 10, "gaussian_threshold_e below 10 e- would misrepresent Poisson noise")
        if self.zero_point is None or self.sky_mag is None or self.extinction is None:
            _check(self.filter in BANDPASSES,
                   f"filter={self.filter!r} has no default zero point/sky; known {sorted(BANDPASSES)} "
                   "or give zero_point, sky_mag and extinction")

    @property
    def npix(self) -> int:
        """Number of pixels."""
        return self.shape[0] * self.shape[1]

    @property
    def zp(self) -> float:
        """Zenith zero point in e-/s (explicit :attr:`zero_point` or the filter's)."""
        return float(self.zero_point if self.zero_point is not None else BANDPASSES[self.filter].zero_point)

    @property
    def sky_brightness(self) -> float:
        """Dark-sky surface brightness in mag/arcsec^2."""
        return float(self.sky_mag if self.sky_mag is not None else BANDPASSES[self.filter].sky_mag)

    @property
    def extinction_coefficient(self) -> float:
        """Extinction in mag per airmass."""
        return float(self.extinction if self.extinction is not None else BANDPASSES[self.filter].extinction)

    @property
    def read_noise_e(self) -> float:
        """Median read noise in electrons."""
        return self.read_noise_adu * self.gain


@dataclass(frozen=True)
class PSTable:
    """Truth of the random-telegraph "pepper & salt" pixels.

    Attributes
    ----------
    index : ndarray of int64
        Flat (row-major) pixel indices, sorted.
    n_levels : ndarray of int8
        2 (bimodal) or 3 (trimodal).
    levels : ndarray of float32, (n, 3)
        Offsets in ADU of each state relative to the pixel's bias map value; state 0 is
        always 0 (unused third levels are 0 with probability 0).
    cumprob : ndarray of float32, (n, 2)
        Cumulative probabilities of states 0 and 0-1; per frame a pixel is in state
        ``(u >= cumprob[:, 0]) + (u >= cumprob[:, 1])`` for a uniform ``u``.
    shape : (int, int)
        Frame shape.
    """

    index: Array
    n_levels: Array
    levels: Array
    cumprob: Array
    shape: tuple[int, int]

    def __len__(self) -> int:
        return int(self.index.size)

    @property
    def y(self) -> Array:
        """Row of each PS pixel."""
        return self.index // self.shape[1]

    @property
    def x(self) -> Array:
        """Column of each PS pixel."""
        return self.index % self.shape[1]

    @property
    def probabilities(self) -> Array:
        """Occupation probability of each state, (n, 3)."""
        c = self.cumprob.astype(np.float64)
        return np.stack([c[:, 0], c[:, 1] - c[:, 0], 1.0 - c[:, 1]], axis=1)

    @property
    def amplitudes(self) -> Array:
        """Largest absolute level offset of each pixel in ADU."""
        return np.abs(self.levels).max(axis=1)

    @property
    def expected_offset(self) -> Array:
        """Mean offset over many frames in ADU."""
        return (self.probabilities * self.levels).sum(axis=1)

    @property
    def std(self) -> Array:
        """Intrinsic std of the telegraph signal over many frames in ADU."""
        p, lv = self.probabilities, self.levels.astype(np.float64)
        mean = (p * lv).sum(axis=1)
        return np.sqrt(np.maximum((p * lv**2).sum(axis=1) - mean**2, 0.0))

    def sample(self, rng: np.random.Generator) -> Array:
        """Offsets (float32, ADU) of all PS pixels in one frame."""
        u = rng.random(self.index.size, dtype=np.float32)
        state = (u >= self.cumprob[:, 0]).astype(np.intp) + (u >= self.cumprob[:, 1])
        return self.levels[np.arange(self.index.size), state]


@dataclass
class FrameTruth:
    """Everything that went into one simulated frame.

    Large per-pixel maps (``*_mask``, ``ps_offsets``) are only kept when asked for or
    for small frames; see :meth:`drop_maps`.

    Attributes
    ----------
    kind : {'bias', 'dark', 'flat', 'science'}
        Frame type.
    exptime : float
        Exposure time in seconds.
    telescope, filter : str
        Camera identity.
    night_index : int
        Night number used for the PRNU drift (0 = first night).
    path : pathlib.Path or None
        Where the frame was written (None for in-memory frames).
    night : str or None
        Observing night ``YYYYMMDD`` (local evening date).
    date_obs : str or None
        UTC start of exposure, ISO with microseconds (as DATE-OBS).
    mjd_obs : float or None
        MJD at start of exposure.
    header : astropy.io.fits.Header or None
        The written header.
    sequence : str
        'nightly', 'ps' (100-bias PS sequence), 'lab-ladder', 'lab-series' or 'lab'.
    object_name : str or None
        OBJECT keyword.
    level_adu : float or None
        Flats: requested mean signal at the frame centre in ADU above bias.
    gradient : (float, float) or None
        Flats: fractional illumination gradient across the half-frame in x and y.
    zero_point : float or None
        Science: frame zero point in e-/s including extinction and transparency:
        ``flux_e = exptime * 10**(-0.4 (mag - zero_point))`` (before vignetting/PRNU).
    zero_point_adu : float or None
        Same in ADU/s at the median gain (``zero_point + 2.5 log10(1/gain)``).
    transparency, airmass : float or None
        Cloud transmission (1 = clear) and airmass.
    sky_mag : float or None
        Sky brightness in mag/arcsec^2.
    sky_e, sky_adu : float or None
        Sky per pixel over the exposure at the optical axis, in e- and ADU.
    seeing_arcsec, fwhm_px : float or None
        Seeing and PSF FWHM at the frame centre in pixels.
    pointing : (float, float) or None
        True frame centre (CRVAL) in degrees, including pointing jitter.
    header_pointing : (float, float) or None
        Commanded pointing written to RA/DEC.
    wcs : astropy.wcs.WCS or None
        True TAN-SIP WCS (0-based pixel convention of astropy's ``*_world2pix(..., 0)``).
    stars : astropy.table.Table or None
        Injected stars near the frame: ``id`` (row in the input list), ``x, y`` (0-based
        pixels), ``mag``, ``flux_e`` (total electrons at the pupil), ``flux_in_frame_e``,
        ``flux_adu`` and ``peak_adu`` (expected, noise-free ADU after vignetting, PRNU and
        gain), ``fwhm`` (px), ``ellipticity``, ``saturated`` (peak + sky + bias above
        ``saturation_adu``), ``in_frame``; plus ``ra, dec`` when from a sky catalogue.
    tracks : list of SatelliteTrack
        Injected tracks (with ``amplitude_e`` filled in).
    cosmic_rays : astropy.table.Table or None
        Cosmic-ray events.
    cosmic_ray_mask, track_mask, saturated_mask : ndarray of bool or None
        Pixels hit by cosmic rays, within one FWHM of a track, above ``saturation_adu``.
    checksum : int or None
        Adler-32 of the frame's uint16 pixels in C order (set when written to disk), to
        verify that a file reads back pixel-exactly.
    row_offsets : ndarray or None
        Per-frame row offsets (row noise + frame bias jitter) in ADU.
    ps_offsets : ndarray or None
        PS level offset of each PS pixel in this frame (order of ``PSTable.index``).
    """

    kind: str
    exptime: float
    telescope: str
    filter: str
    night_index: int = 0
    path: Path | None = None
    night: str | None = None
    date_obs: str | None = None
    mjd_obs: float | None = None
    header: fits.Header | None = field(default=None, repr=False)
    sequence: str = "nightly"
    object_name: str | None = None
    level_adu: float | None = None
    gradient: tuple[float, float] | None = None
    zero_point: float | None = None
    zero_point_adu: float | None = None
    transparency: float | None = None
    airmass: float | None = None
    sky_mag: float | None = None
    sky_e: float | None = None
    sky_adu: float | None = None
    seeing_arcsec: float | None = None
    fwhm_px: float | None = None
    pointing: tuple[float, float] | None = None
    header_pointing: tuple[float, float] | None = None
    wcs: WCS | None = field(default=None, repr=False)
    stars: Table | None = field(default=None, repr=False)
    tracks: list[SatelliteTrack] = field(default_factory=list)
    cosmic_rays: Table | None = field(default=None, repr=False)
    cosmic_ray_mask: Array | None = field(default=None, repr=False)
    track_mask: Array | None = field(default=None, repr=False)
    saturated_mask: Array | None = field(default=None, repr=False)
    checksum: int | None = None
    row_offsets: Array | None = field(default=None, repr=False)
    ps_offsets: Array | None = field(default=None, repr=False)

    def drop_maps(self) -> None:
        """Forget the per-pixel maps (keeps tables and scalars) to bound memory."""
        self.cosmic_ray_mask = self.track_mask = self.saturated_mask = None
        self.ps_offsets = None

    def summary(self) -> dict[str, Any]:
        """Scalar fields as a flat dict (one row of ``truth_frames.csv``)."""
        row: dict[str, Any] = {}
        for name in _SCALAR_FIELDS:
            v = getattr(self, name)
            if name in ("pointing", "header_pointing", "gradient"):
                row[f"{name}_0"] = "" if v is None else float(v[0])
                row[f"{name}_1"] = "" if v is None else float(v[1])
            else:
                row[name] = "" if v is None else (str(v) if isinstance(v, Path) else v)
        row["n_tracks"] = len(self.tracks)
        row["n_cosmic_rays"] = 0 if self.cosmic_rays is None else len(self.cosmic_rays)
        row["n_stars"] = 0 if self.stars is None else len(self.stars)
        return row


_SCALAR_FIELDS = ("path", "kind", "telescope", "filter", "night", "night_index", "sequence", "date_obs", "mjd_obs",
                  "exptime", "object_name", "level_adu", "gradient", "zero_point", "zero_point_adu", "transparency",
                  "airmass", "sky_mag", "sky_e", "sky_adu", "seeing_arcsec", "fwhm_px", "pointing",
                  "header_pointing", "checksum")


# Fixed keys that give every static map its own random stream: a map's values do not
# depend on which other maps were built before it.
_STREAMS = {"bias": 1, "rows": 2, "read_noise": 3, "gain": 4, "dark": 5, "prnu": 6, "defects": 7,
            "ps": 8, "hot": 9, "dead": 10, "outliers": 11, "sip": 12, "prnu_drift": 13, "vignetting": 14}
_STREAM_TAG = 0x4D535443  # "MSTC"


class Camera:
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
