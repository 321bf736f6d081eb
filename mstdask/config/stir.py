"""STIR (Xiao et al. 2025, section 3.1): night calibrations and the per-frame step."""

from __future__ import annotations

from dataclasses import dataclass

from ._base import _check

__all__ = ["CalibConfig", "StirConfig"]


@dataclass(frozen=True)
class CalibConfig:
    """Night calibrations (STIR, Xiao et al. 2025 section 3.1; Zhang et al. 2025 section 3).

    Parameters
    ----------
    bias_combine : str
        ``"clipped-mean"`` (sigma-clipped mean, the default) or ``"median"``.
    clip_sigma, clip_maxiters : float, int
        Sigma clipping of the combines.
    bias_max_frames : int
        A master bias combines at most this many bias frames of the night, the first in
        time (MST takes 10 at the start of each night); a longer sequence, such as the
        100-frame PS sequence, adds little to the master and costs 10x the time.
    min_frames : int
        Fewest frames a master is made from; fewer raise InsufficientDataError.
    ps_threshold_adu : float
        A pixel is pepper-and-salt when its std over bias frames exceeds this (8 ADU).
    ps_frames : int
        Bias frames of one night used for the PS map (100 in MST).
    ps_min_frames : int
        Fewest bias frames of one night accepted for a PS map (each of the 3 groups needs
        enough frames for a meaningful std).
    ps_groups : int
        Non-overlapping groups in time whose PS maps are intersected (3).
    bad_pixel_nsigma : float
        Bad pixels lie outside this many robust sigmas of the bias-subtracted dark (3).
    saturation_adu : float
        Saturated pixels: raw value above this (50000 ADU).
    flat_window_px : int
        Median-smoothing window of the large-scale flat (51 px).
    flat_half_window_nights : int
        Nightly small-scale flats of nights d-5 .. d+5 are stacked (5).
    flat_max_days : float
        Never use flats further than this from the night (two months, 62 days).
    flat_min_adu, flat_max_adu : float
        Flats whose median (bias-subtracted) lies outside this range are left out.
    tile_bytes : int
        Working memory of a stack kernel: a ``frame=-1`` tile is combined in row strips of
        at most this many bytes (frames x strip pixels x 8). Small strips stay in the
        CPU caches: 16 MiB combines a 20-frame MST tile 20 % faster than 64 MiB.
    stack_bytes : int
        Largest raw stack one task reads (frames x tile pixels x raw itemsize). Stack
        reductions read whole stored tiles (each tile decoded once) unless that exceeds
        this, and then split them.
    """

    bias_combine: str = "clipped-mean"
    clip_sigma: float = 3.0
    clip_maxiters: int = 5
    bias_max_frames: int = 20
    min_frames: int = 3
    ps_threshold_adu: float = 8.0
    ps_frames: int = 100
    ps_min_frames: int = 30
    ps_groups: int = 3
    bad_pixel_nsigma: float = 3.0
    saturation_adu: float = 50000.0
    flat_window_px: int = 51
    flat_half_window_nights: int = 5
    flat_max_days: float = 62.0
    flat_min_adu: float = 5000.0
    flat_max_adu: float = 45000.0
    tile_bytes: int = 16 * 2**20
    stack_bytes: int = 768 * 2**20

    def __post_init__(self) -> None:
        _check(self.bias_combine in ("clipped-mean", "median"),
               f"bias_combine={self.bias_combine!r}; choose 'clipped-mean' or 'median'")
        _check(self.clip_sigma > 0 and self.clip_maxiters >= 1, "clip_sigma must be > 0 and clip_maxiters >= 1")
        _check(self.min_frames >= 1, "min_frames must be >= 1")
        _check(self.bias_max_frames >= self.min_frames, "bias_max_frames must be >= min_frames")
        _check(self.ps_threshold_adu > 0, "ps_threshold_adu must be positive")
        _check(self.ps_groups >= 1 and self.ps_min_frames >= 2 * self.ps_groups,
               "ps_min_frames must give every PS group at least 2 frames")
        _check(self.ps_frames >= self.ps_min_frames, "ps_frames must be >= ps_min_frames")
        _check(self.flat_window_px >= 3 and self.flat_window_px % 2 == 1, "flat_window_px must be odd and >= 3")
        _check(self.flat_half_window_nights >= 0 and self.flat_max_days > 0, "flat night window must be >= 0")
        _check(0 <= self.flat_min_adu < self.flat_max_adu, "flat_min_adu must be below flat_max_adu")
        _check(self.tile_bytes >= 2**20, "tile_bytes must be at least 1 MiB")
        _check(self.stack_bytes >= 2**20, "stack_bytes must be at least 1 MiB")


@dataclass(frozen=True)
class StirConfig:
    """Per-frame STIR step: tracks and cosmic rays (Xiao et al. 2025, sections 3.1.4-3.1.5).

    Parameters
    ----------
    tracks, cosmic_rays : bool
        Run the track and the cosmic-ray detection (the reduction and the calibration
        masks always run).
    gain_e_per_adu : float
        Gain for the cosmic-ray noise model when a frame's header has no EGAIN
        (0.25 e-/ADU, pipeline paper section 2.3).
    read_noise_e : float
        Read noise in electrons for that noise model (1.028 e-, pipeline paper section 2.3).
    track_binning : int
        The frame is binned this many pixels a side before the Hough transform (2).
    track_band_px : float
        Width of the band around a track's centre line whose pixels more than
        ``track_nsigma`` above the background are flagged (10 px).
    track_nsigma : float
        Flagging threshold above the background median, in standard deviations (3), applied
        per pixel in the band and to the track's along-track median profile (which widens
        the band to wherever the track is significant).
    track_detect_nsigma : float
        Threshold of the smoothed, binned significance map whose long, thin pieces go into
        the Hough transform (in units of that map's noise).
    track_smooth_px : float
        Gaussian sigma (full-resolution pixels) of the matched filter before thresholding,
        about half a track's FWHM.
    track_min_length_px : float
        Shortest track, and shortest connected piece of the thresholded map whose skeleton
        votes in the Hough transform (a star or a halo skeletonises to a dot or a spur).
    track_blob_radius_px : float
        Round parts of the thresholded map wider than a disk of this radius (full-resolution
        pixels) are star halos: they are cut out before the Hough transform and ignored
        when a line is verified.
    track_min_snr : float
        A line is a track when the median of its core along the detected extent is this many
        standard deviations (of that median) above the background ...
    track_min_coverage : float
        ... and this fraction of its ``track_segment_px`` segments show signal (a row of
        stars is bright in a few segments only) ...
    track_min_core_sigma : float
        ... and the median of its central 3 px is at least this many standard deviations per
        pixel (a fainter line could not have been detected: it is the wing of a track found
        before, or a chance alignment).
    track_segment_px : float
        Length of the segments along a line for the coverage and extent tests.
    track_max_halfwidth_px : float
        Widest half-width flagged by the profile rule (aircraft trails are wider than
        satellite tracks).
    track_max_lines : int
        Most tracks per frame.
    track_hough_step_deg : float
        Angle step of the (coarse) Hough accumulator; each line is then refined by a fit.
    track_axis_tolerance_deg : float
        Lines this close to a row or column are checked for being a defect (one pixel wide)
        or a frame edge.
    background_box_px : int
        Cell of the background and noise grid (full-resolution pixels).
    cr_sigclip, cr_sigfrac, cr_objlim : float
        L.A.Cosmic's Laplacian-to-noise limit, neighbour fraction and contrast limit against
        the fine structure. ``objlim`` 15 instead of astroscrappy's 5 keeps undersampled star
        cores (FWHM 1.6-2.3 px) unflagged.
    cr_niter : int
        L.A.Cosmic iterations (1: later ones add nothing on MST frames).
    cr_sepmed : bool
        Separable median filters (astroscrappy's fast default).
    cr_cleantype : str
        astroscrappy's cleaning between iterations.
    cr_fsmode : str
        Fine-structure image: ``"median"`` (L.A.Cosmic) or ``"convolve"`` (matched filter).
    cr_psffwhm_px : float
        PSF FWHM for ``cr_fsmode="convolve"``.
    cr_region : str
        ``"candidates"``: run astroscrappy on cut-outs around candidate pixels only (same
        result, cost scales with the number of cosmic rays and sharp stars); ``"full"``: on
        the whole frame.
    cr_candidate_slack : (float, float)
        Factors (< 1) on ``sigclip`` and ``objlim`` of the candidate pre-filter; lower is
        safer and slower.
    """

    tracks: bool = True
    cosmic_rays: bool = True
    gain_e_per_adu: float = 0.25
    read_noise_e: float = 1.028
    track_binning: int = 2
    track_band_px: float = 10.0
    track_nsigma: float = 3.0
    track_detect_nsigma: float = 4.0
    track_smooth_px: float = 2.0
    track_min_length_px: float = 60.0
    track_blob_radius_px: float = 8.0
    track_min_snr: float = 10.0
    track_min_coverage: float = 0.6
    track_min_core_sigma: float = 1.0
    track_segment_px: float = 64.0
    track_max_halfwidth_px: float = 20.0
    track_max_lines: int = 20
    track_hough_step_deg: float = 0.5
    track_axis_tolerance_deg: float = 2.0
    background_box_px: int = 64
    cr_sigclip: float = 5.0
    cr_sigfrac: float = 0.3
    cr_objlim: float = 15.0
    cr_niter: int = 1
    cr_sepmed: bool = True
    cr_cleantype: str = "meanmask"
    cr_fsmode: str = "median"
    cr_psffwhm_px: float = 2.5
    cr_region: str = "candidates"
    cr_candidate_slack: tuple[float, float] = (0.8, 0.5)

    def __post_init__(self) -> None:
        _check(self.gain_e_per_adu > 0, f"gain_e_per_adu={self.gain_e_per_adu} must be positive")
        _check(self.read_noise_e >= 0, f"read_noise_e={self.read_noise_e} must be >= 0")
        _check(not isinstance(self.track_binning, bool) and int(self.track_binning) == self.track_binning
               and 1 <= self.track_binning <= 8, f"track_binning={self.track_binning} must be an integer in 1..8")
        object.__setattr__(self, "track_binning", int(self.track_binning))
        _check(self.track_band_px > 0, f"track_band_px={self.track_band_px} must be positive")
        _check(self.track_nsigma > 0 and self.track_detect_nsigma > 0,
               "track_nsigma and track_detect_nsigma must be > 0")
        _check(self.track_smooth_px > 0, "track_smooth_px must be positive")
        _check(self.track_min_length_px >= 4 * self.track_binning,
               f"track_min_length_px={self.track_min_length_px} must be >= 4 binned pixels")
        _check(self.track_blob_radius_px >= 2 * self.track_binning, "track_blob_radius_px must be >= 2 binned pixels")
        _check(self.track_min_snr > 0, "track_min_snr must be positive")
        _check(0 < self.track_min_coverage <= 1, f"track_min_coverage={self.track_min_coverage} must be in (0, 1]")
        _check(self.track_min_core_sigma >= 0, "track_min_core_sigma must be >= 0")
        _check(self.track_segment_px >= 8, "track_segment_px must be >= 8")
        _check(self.track_max_halfwidth_px >= self.track_band_px / 2,
               "track_max_halfwidth_px must be >= half of track_band_px")
        _check(self.track_max_lines >= 1, "track_max_lines must be >= 1")
        _check(0 < self.track_hough_step_deg <= 5,
               f"track_hough_step_deg={self.track_hough_step_deg} must be in (0, 5]")
        _check(0 <= self.track_axis_tolerance_deg < 45, "track_axis_tolerance_deg must be in [0, 45)")
        _check(self.background_box_px >= 8 * self.track_binning,
               f"background_box_px={self.background_box_px} must be >= 8 binned pixels")
        _check(self.cr_sigclip > 0 and self.cr_objlim > 0, "cr_sigclip and cr_objlim must be positive")
        _check(0 < self.cr_sigfrac <= 1, f"cr_sigfrac={self.cr_sigfrac} must be in (0, 1]")
        _check(1 <= self.cr_niter <= 10, f"cr_niter={self.cr_niter} must be in 1..10")
        _check(self.cr_cleantype in ("median", "medmask", "meanmask", "idw"),
               f"cr_cleantype={self.cr_cleantype!r}; choose median, medmask, meanmask or idw")
        _check(self.cr_fsmode in ("median", "convolve"),
               f"cr_fsmode={self.cr_fsmode!r}; choose 'median' or 'convolve'")
        _check(self.cr_psffwhm_px > 0, "cr_psffwhm_px must be positive")
        _check(self.cr_region in ("candidates", "full"), f"cr_region={self.cr_region!r}; choose 'candidates' or 'full'")
        slack = tuple(float(v) for v in self.cr_candidate_slack)
        _check(len(slack) == 2 and all(0 < v <= 1 for v in slack),
               f"cr_candidate_slack={self.cr_candidate_slack} must be two factors in (0, 1]")
        object.__setattr__(self, "cr_candidate_slack", slack)
