"""STATIC (Xiao et al. 2025, section 3.2): photometry, reference catalogue, astrometry."""

from __future__ import annotations

from dataclasses import dataclass

from ._base import _check

__all__ = ["PhotometryConfig", "RefcatConfig", "AstrometryConfig"]


@dataclass(frozen=True)
class PhotometryConfig:
    """STATIC photometry of one exposure (Xiao et al. 2025, sections 3.2.2-3.2.3).

    Parameters
    ----------
    detect_nsigma : float
        Detection threshold per pixel, in units of the local background rms.
    detect_minarea : int
        Fewest connected pixels above the threshold for a source.
    deblend_cont : float
        SExtractor/sep minimum contrast for deblending.
    background_box_px : int
        Mesh of the background and rms maps (sep/SExtractor ``BACK_SIZE``).
    background_filter : int
        Median filter of the background mesh, in meshes (``BACK_FILTERSIZE``).
    aperture_radii_px : tuple of float
        The 25 circular apertures, evenly spaced from 2 to 50 px (paper section 3.2.2).
    best_err_range : (float, float)
        Magnitude-error range of the bright stars that choose the best aperture
        (0.002-0.008 mag, paper).
    min_best_aperture_fwhm : float
        Floor of the best aperture in units of the frame's median FWHM (1.2). The paper finds
        ~2 FWHM typical; a frame with too few bright stars for the sample falls back to
        fainter ones, whose SNR peaks at ~0.7 FWHM, which would make the aperture
        correction large and noisy (tens of mmag from exposure to exposure).
    reference_tolerance_mag : float
        The reference aperture is where the median growth curve converges: the magnitude
        difference between apertures ``n`` and ``n - 2`` is below this (1e-4 mag, paper).
    aperture_correction_order : int
        Order of the 2-D polynomial in x, y of (reference - best) magnitude (2, paper).
    isolation_px : float
        Stars of the aperture and PSF samples have no other detection this close.
    psf_stamp_px : int
        Side of the PSF stamp (odd).
    psf_oversampling : int
        Oversampling of the empirical PSF (PSFEx-like pixel basis).
    psf_variability_order : int
        Order of the polynomial in x, y of every PSF pixel (PSFEx ``PSFVAR_DEGREES``).
    psf_max_stars : int
        Most stars used to build the PSF model.
    calib_max_err : float
        Stars with errors below this calibrate the zero point (0.02 mag, paper).
    match_radius_arcsec : float
        Cross-match radius against the reference catalogue (1", paper).
    zero_point_order : int
        Order of the 2-D polynomial of the zero point over the detector.
    clip_sigma : float
        Sigma clipping of every polynomial fit (aperture correction, zero point).
    min_calib_stars : int
        Fewest matched stars for a zero point; fewer flags the exposure.
    saturation_adu : float
        Sources with a raw pixel above this carry the saturated bit anyway (50000 ADU).
    gain_e_per_adu : float
        Gain for the Poisson part of the errors when a frame's header has none (0.25).
    cloud_zp_drop_mag : float
        An exposure whose zero point is this far below the median of its night, telescope
        and filter is flagged (clouds).
    """

    detect_nsigma: float = 3.0
    detect_minarea: int = 5
    deblend_cont: float = 0.005
    background_box_px: int = 128
    background_filter: int = 3
    aperture_radii_px: tuple[float, ...] = tuple(float(r) for r in range(2, 51, 2))
    best_err_range: tuple[float, float] = (0.002, 0.008)
    reference_tolerance_mag: float = 1e-4
    min_best_aperture_fwhm: float = 1.2
    aperture_correction_order: int = 2
    isolation_px: float = 20.0
    psf_stamp_px: int = 15
    psf_oversampling: int = 3
    psf_variability_order: int = 2
    psf_max_stars: int = 3000
    calib_max_err: float = 0.02
    match_radius_arcsec: float = 1.0
    zero_point_order: int = 2
    clip_sigma: float = 3.0
    min_calib_stars: int = 10
    saturation_adu: float = 50000.0
    gain_e_per_adu: float = 0.25
    cloud_zp_drop_mag: float = 0.3

    def __post_init__(self) -> None:
        _check(self.cloud_zp_drop_mag > 0, f"cloud_zp_drop_mag={self.cloud_zp_drop_mag} must be positive")
        _check(self.detect_nsigma > 0, f"detect_nsigma={self.detect_nsigma} must be positive")
        _check(int(self.detect_minarea) >= 1, f"detect_minarea={self.detect_minarea} must be >= 1")
        _check(0 < self.deblend_cont < 1, f"deblend_cont={self.deblend_cont} must be in (0, 1)")
        _check(int(self.background_box_px) >= 8, f"background_box_px={self.background_box_px} must be >= 8")
        radii = tuple(float(r) for r in self.aperture_radii_px)
        _check(len(radii) >= 3 and all(r > 0 for r in radii) and all(b > a for a, b in zip(radii, radii[1:])),
               "aperture_radii_px must be at least 3 increasing positive radii")
        object.__setattr__(self, "aperture_radii_px", radii)
        lo, hi = self.best_err_range
        _check(0 < lo < hi, f"best_err_range={self.best_err_range} must be (low, high) with 0 < low < high")
        _check(self.reference_tolerance_mag > 0, "reference_tolerance_mag must be positive")
        _check(0 <= self.min_best_aperture_fwhm <= 5, f"min_best_aperture_fwhm={self.min_best_aperture_fwhm} "
                                                      "must be in 0..5 (FWHM units; 0 turns the floor off)")
        for name in ("aperture_correction_order", "psf_variability_order", "zero_point_order"):
            v = getattr(self, name)
            _check(int(v) == v and 0 <= v <= 4, f"{name}={v} must be an integer in 0..4")
        _check(int(self.psf_stamp_px) % 2 == 1 and self.psf_stamp_px >= 7,
               f"psf_stamp_px={self.psf_stamp_px} must be odd and >= 7")
        _check(int(self.psf_oversampling) in (1, 2, 3, 4, 5), "psf_oversampling must be 1..5")
        _check(self.psf_max_stars >= 10, "psf_max_stars must be >= 10")
        _check(self.calib_max_err > 0, "calib_max_err must be positive")
        _check(self.match_radius_arcsec > 0, "match_radius_arcsec must be positive")
        _check(self.clip_sigma > 1, "clip_sigma must be > 1")
        _check(self.min_calib_stars >= 3, "min_calib_stars must be >= 3")
        _check(self.saturation_adu > 0 and self.gain_e_per_adu > 0, "saturation_adu and gain_e_per_adu must be positive")


@dataclass(frozen=True)
class RefcatConfig:
    """How to read a reference catalogue (CSV, FITS table or Parquet).

    Parameters
    ----------
    ra, dec : str
        Column names of the coordinates in degrees (ICRS).
    mag : str
        Column of the magnitudes; ``{filter}`` is replaced by the exposure's filter, e.g.
        ``"{filter}_psf"`` for SkyMapper or ``"mag_{filter}"`` for the simulator. When that
        column does not exist, ``fallback_mag`` is used.
    mag_err : str or None
        Column of the magnitude errors (same ``{filter}`` rule), optional.
    fallback_mag : str or None
        Magnitude column to use when the filter's one is missing.
    max_mag_err : float
        Reference stars with larger errors are not used for the zero point.
    """

    ra: str = "ra"
    dec: str = "dec"
    mag: str = "mag_{filter}"
    mag_err: str | None = None
    fallback_mag: str | None = "mag"
    max_mag_err: float = 0.05

    def __post_init__(self) -> None:
        for name in ("ra", "dec", "mag"):
            _check(isinstance(getattr(self, name), str) and getattr(self, name) != "",
                   f"RefcatConfig.{name} must be a column name")
        _check(self.max_mag_err > 0, "max_mag_err must be positive")


@dataclass(frozen=True)
class AstrometryConfig:
    """Astrometry of the STATIC step (Xiao et al. 2025, section 3.2.1).

    A blind solution by pattern matching the brightest sources against the brightest
    reference stars around the header pointing (rotation and parity unknown, pixel scale
    known to ``scale_tolerance``), then a precise TPV solution (a polynomial distortion of
    ``distortion_order``) fitted to the reference catalogue with sigma clipping and
    iterative re-matching.

    Parameters
    ----------
    pixel_scale_arcsec : float
        Expected pixel scale (MST: 0.862"/px, pipeline paper section 2.3).
    scale_tolerance : float
        Relative uncertainty of that scale accepted by the pattern match (0.1: +-10 %).
    pointing_error_fraction : float
        The header pointing may be this fraction of the frame's longer side away from the
        frame centre; it widens the circle of reference stars used for the blind solve.
    search_radius_deg : float or None
        Radius of that circle in degrees; None derives it from the frame size, the pixel
        scale and the two tolerances above.
    n_pattern_stars : int
        Most of the brightest sources used in the pattern match (20 and 30 are tried first;
        the reference stars are the brightest of the circle, up to three times as many,
        matching the source density). The match costs about the sixth power of this.
    min_pattern_matches : int
        Fewest sources a pattern match must put on reference stars to be accepted.
    pattern_tolerance_px : float
        A source is on a reference star when within this many pixels after the similarity
        transform (at least 0.3 % of the frame diagonal, so field distortion fits in).
    triangle_tolerance : float
        Tolerance on the side ratios of matched star triangles.
    distortion_order : int
        Highest order of the TPV polynomial (4, as SCAMP in the paper); lowered
        automatically when too few stars are matched (``min_stars_per_term``) or when a lower
        order predicts left-out stars better (``select_order``).
    min_stars_per_term : float
        A polynomial order is fitted only with at least this many matched stars per
        coefficient (per axis).
    select_order : bool
        Choose the order, up to ``distortion_order``, with the smallest leave-one-out
        (cross-validated) residual: a high order fitted to few stars bends between and beyond
        them. False fits ``distortion_order`` whenever there are enough stars.
    match_radius_arcsec : float
        Cross-match radius of the last iterations: the first uses the pattern tolerance,
        later ones shrink to five times the rms, but not below this.
    clip_sigma : float
        Matched stars beyond this many robust standard deviations are left out of the fit.
    iterations : int
        Cross-match and fit cycles (the polynomial order rises over the first three).
    """

    pixel_scale_arcsec: float = 0.862
    scale_tolerance: float = 0.1
    pointing_error_fraction: float = 0.35
    search_radius_deg: float | None = None
    n_pattern_stars: int = 40
    min_pattern_matches: int = 8
    pattern_tolerance_px: float = 4.0
    triangle_tolerance: float = 0.01
    distortion_order: int = 4
    min_stars_per_term: float = 3.0
    select_order: bool = True
    match_radius_arcsec: float = 1.0
    clip_sigma: float = 3.0
    iterations: int = 5

    def __post_init__(self) -> None:
        _check(self.pixel_scale_arcsec > 0,
               f"pixel_scale_arcsec={self.pixel_scale_arcsec} must be positive (MST: 0.862)")
        _check(0 <= self.scale_tolerance < 0.5,
               f"scale_tolerance={self.scale_tolerance} must be in [0, 0.5) (0.1 accepts +-10 %)")
        _check(0 <= self.pointing_error_fraction <= 2,
               f"pointing_error_fraction={self.pointing_error_fraction} must be in [0, 2] (frame sides)")
        _check(self.search_radius_deg is None or 0 < self.search_radius_deg <= 30,
               f"search_radius_deg={self.search_radius_deg} must be None (automatic) or in (0, 30]")
        _check(not isinstance(self.n_pattern_stars, bool) and int(self.n_pattern_stars) == self.n_pattern_stars
               and 6 <= self.n_pattern_stars <= 50,
               f"n_pattern_stars={self.n_pattern_stars} must be an integer in 6..50 (the match costs ~n^6)")
        object.__setattr__(self, "n_pattern_stars", int(self.n_pattern_stars))
        _check(not isinstance(self.min_pattern_matches, bool)
               and int(self.min_pattern_matches) == self.min_pattern_matches
               and 4 <= self.min_pattern_matches <= self.n_pattern_stars,
               f"min_pattern_matches={self.min_pattern_matches} must be an integer in 4..n_pattern_stars")
        object.__setattr__(self, "min_pattern_matches", int(self.min_pattern_matches))
        _check(self.pattern_tolerance_px > 0, f"pattern_tolerance_px={self.pattern_tolerance_px} must be positive")
        _check(0 < self.triangle_tolerance <= 0.1,
               f"triangle_tolerance={self.triangle_tolerance} must be in (0, 0.1]")
        _check(not isinstance(self.distortion_order, bool)
               and int(self.distortion_order) == self.distortion_order and 1 <= self.distortion_order <= 7,
               f"distortion_order={self.distortion_order} must be an integer in 1..7 (TPV; 1 = linear)")
        object.__setattr__(self, "distortion_order", int(self.distortion_order))
        _check(self.min_stars_per_term >= 1, f"min_stars_per_term={self.min_stars_per_term} must be >= 1")
        _check(self.match_radius_arcsec > 0, f"match_radius_arcsec={self.match_radius_arcsec} must be positive")
        _check(self.clip_sigma >= 1.5, f"clip_sigma={self.clip_sigma} must be >= 1.5 (3 is usual)")
        _check(not isinstance(self.iterations, bool) and int(self.iterations) == self.iterations
               and 1 <= self.iterations <= 50, f"iterations={self.iterations} must be an integer in 1..50")
        object.__setattr__(self, "iterations", int(self.iterations))
