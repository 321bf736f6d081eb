"""The camera description and the truth records of the simulator: :class:`CameraModel`
(every number from the two MST papers, see :mod:`mstdask.testing._camera`), the
pepper-and-salt table :class:`PSTable` and the per-frame truth :class:`FrameTruth`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ._sky import (
    BANDPASSES,
    SatelliteTrack,
)


__all__ = ["DEFAULT_FIELD", "NONLINEARITY_REF_ADU", "CameraModel", "FrameTruth", "PSTable"]

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

