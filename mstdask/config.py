"""Typed, frozen, validated configuration objects.

Defaults come from the MST papers (Xiao et al. 2025, imaging pipeline; Zhang et al. 2025,
camera evaluation). Every object validates itself on construction and raises
:class:`~mstdask.errors.ConfigError` with a message that says which value is wrong.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["SiteConfig", "XINGLONG", "StoreLayout", "IngestConfig", "ClusterConfig", "CalibConfig", "to_dict"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class SiteConfig:
    """An observing site, used to assign frames to their local observing night.

    Parameters
    ----------
    name : str
        Site name, recorded in the store.
    utc_offset_hours : float
        Local civil time minus UTC (Xinglong: +8, China Standard Time, no daylight saving).
    latitude_deg, longitude_deg, elevation_m : float
        Geodetic position (Xinglong Observatory by default).
    night_boundary_hour : float
        Local hour at which one observing night hands over to the next (noon): a frame taken
        at 02:00 local on the 19th belongs to the night of the 18th.
    """

    name: str = "Xinglong"
    utc_offset_hours: float = 8.0
    latitude_deg: float = 40.3936
    longitude_deg: float = 117.5750
    elevation_m: float = 960.0
    night_boundary_hour: float = 12.0

    def __post_init__(self) -> None:
        _check(-12.0 <= self.utc_offset_hours <= 14.0,
               f"utc_offset_hours={self.utc_offset_hours} is not a real time zone (-12..+14)")
        _check(-90.0 <= self.latitude_deg <= 90.0, f"latitude_deg={self.latitude_deg} outside -90..90")
        _check(0.0 <= self.night_boundary_hour < 24.0,
               f"night_boundary_hour={self.night_boundary_hour} must be in 0..24")
        _check(bool(self.name.strip()), "site name must not be empty")


XINGLONG = SiteConfig()


@dataclass(frozen=True)
class StoreLayout:
    """How the raw stack is laid out in Zarr.

    One shard per frame (one file per frame on disk, written in one piece by one task, so a
    3000-exposure field is ~3000 files, not frames x tiles). Inside the shard the frame is cut
    into spatial tiles (the Zarr chunks), so stack reductions read ``frame=-1`` columns of
    tiles without touching the rest of each frame.

    Parameters
    ----------
    tile : int
        Target tile edge in pixels. The actual tile edge is the divisor of the frame edge
        closest to this target (9576 x 6388 gives 1368 x 1597 tiles), so no tile is ragged.
    compressor : str
        Blosc codec for the tiles: ``"lz4"`` (default, fast), ``"zstd"`` (smaller) or ``"none"``.
    clevel : int
        Compression level (1..9).
    """

    tile: int = 1536
    compressor: str = "lz4"
    clevel: int = 1

    def __post_init__(self) -> None:
        _check(64 <= self.tile <= 16384, f"tile={self.tile} must be within 64..16384 pixels")
        _check(self.compressor in ("lz4", "zstd", "none"),
               f"compressor={self.compressor!r}; choose 'lz4', 'zstd' or 'none'")
        _check(1 <= self.clevel <= 9, f"clevel={self.clevel} must be within 1..9")


@dataclass(frozen=True)
class IngestConfig:
    """Options of ``mstdask ingest``.

    Parameters
    ----------
    site : SiteConfig
        Where the frames were taken (defines ``night``).
    layout : StoreLayout
        Zarr layout used when the store is created (ignored when appending).
    force_imagetyp : str or None
        Treat every file of this ingest as this image type (bias, dark, flat, science),
        for cameras that write a wrong IMAGETYP (e.g. flats saved as 'Light Frame').
    mark_every_s : float
        How often the driver records finished frames in the store while ingesting; a killed
        ingest redoes at most this much work.
    """

    site: SiteConfig = field(default_factory=SiteConfig)
    layout: StoreLayout = field(default_factory=StoreLayout)
    force_imagetyp: str | None = None
    mark_every_s: float = 2.0

    def __post_init__(self) -> None:
        _check(self.force_imagetyp in (None, "bias", "dark", "flat", "science"),
               f"force_imagetyp={self.force_imagetyp!r}; choose bias, dark, flat or science")
        _check(self.mark_every_s > 0, "mark_every_s must be positive")


@dataclass(frozen=True)
class ClusterConfig:
    """The embedded Dask cluster (used when no scheduler address or config file is given).

    Parameters
    ----------
    n_workers : int or None
        Worker processes; default one per core.
    threads_per_worker : int
        Threads per worker. One keeps per-worker memory to one frame's working set.
    memory_limit : str or None
        Per-worker memory limit (Dask syntax, e.g. ``"4GiB"``); default: 80 % of the
        machine's memory shared between the workers.
    dashboard_address : str
        Where the dashboard listens; localhost only unless asked otherwise.
    """

    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = None
    dashboard_address: str = "127.0.0.1:0"

    def __post_init__(self) -> None:
        _check(self.n_workers is None or self.n_workers >= 1, "n_workers must be >= 1")
        _check(self.threads_per_worker >= 1, "threads_per_worker must be >= 1")

    def resolved_workers(self) -> int:
        """Number of workers that will be started."""
        return self.n_workers or max(1, os.cpu_count() or 1)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dictionary of a config object (for manifests and FITS provenance)."""
    return dataclasses.asdict(cfg)


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
class DetectorConfig:
    """Detector characterisation of a lab set (Zhang et al. 2025, camera paper sections 2-3).

    Parameters
    ----------
    region_px : int
        Edge of the central region of the frame-level statistics (bias stability,
        linearity, photon transfer, dark level): 2000 x 2000 pixels, or the central half
        of a smaller frame.
    bias_clip_sigma : float
        Sigma clipping of the overall mean of the per-frame bias means (3, Fig. 1).
    anomalous_nsigma : float
        Anomalous pixels lie beyond this many sigmas of the per-pixel mean or std
        distribution (5, Figs. 3-4).
    anomalous_clip_sigma : float or None
        None: the centre and spread of those distributions are the plain mean and std (the
        paper's); a number: sigma-clipped at this many sigmas.
    subarea_px : int
        Sub-area edge of the anomalous-pixel density map (20, Fig. 5).
    corner_fraction : float
        Corner boxes of the fixed-pattern summary: this fraction of each frame edge.
    saturation_adu : float
        Raw value at or above which a pixel is saturated (50000 ADU, as the pipeline flags).
    saturated_fraction : float
        A flat (pair) with more of its central region saturated is left out of the
        linearity and photon-transfer fits.
    nonlinearity_floor_adu : float
        The maximum nonlinearity is reported for signals above this (3000 ADU, Fig. 9).
    min_linearity_levels : int
        Fewest unsaturated exposure times for the linearity fit.
    ptc_min_adu, ptc_max_adu : float
        Pairs of flats whose mean signal lies in this range give the Eq. 1 gain (median).
    min_bias_frames : int
        Fewest bias frames for the per-pixel statistics (the paper: 100).
    pixel_min_flats : int
        Fewest flats at one exposure time for the per-pixel gain (the paper: 144 at 2 s).
    pixel_min_valid : float
        Fewest pixels (fraction) with a per-pixel gain for its medians to be reported.
    dark_clip_sigma : float
        Sigma clipping (median, MAD) of each bias-subtracted dark: rejects cosmic rays and
        hot pixels, keeps the skewed tail of normal dark current (at 10 sigma a 600 s dark
        loses ~3 % of its mean to clipped secondary-population pixels).
    min_dark_exptimes : int
        Fewest distinct dark exposure times for the dark-current fit.
    block_frames : int
        Frames per task of the streaming per-pixel reductions (memory per task does not
        depend on the number of frames).
    split_every : int
        Fan-in of the tree that adds the partial sums.
    """

    region_px: int = 2000
    bias_clip_sigma: float = 3.0
    anomalous_nsigma: float = 5.0
    anomalous_clip_sigma: float | None = None
    subarea_px: int = 20
    corner_fraction: float = 0.05
    saturation_adu: float = 50000.0
    saturated_fraction: float = 1e-3
    nonlinearity_floor_adu: float = 3000.0
    min_linearity_levels: int = 3
    ptc_min_adu: float = 5000.0
    ptc_max_adu: float = 45000.0
    min_bias_frames: int = 10
    pixel_min_flats: int = 20
    pixel_min_valid: float = 0.5
    dark_clip_sigma: float = 20.0
    min_dark_exptimes: int = 3
    block_frames: int = 10
    split_every: int = 4

    def __post_init__(self) -> None:
        _check(self.region_px >= 1, f"region_px={self.region_px} must be >= 1")
        _check(self.bias_clip_sigma > 0, "bias_clip_sigma must be positive")
        _check(self.anomalous_nsigma > 0, "anomalous_nsigma must be positive")
        _check(self.anomalous_clip_sigma is None or self.anomalous_clip_sigma > 0,
               "anomalous_clip_sigma must be None (plain mean and std) or positive")
        _check(self.subarea_px >= 1, f"subarea_px={self.subarea_px} must be >= 1")
        _check(0 < self.corner_fraction <= 0.5, f"corner_fraction={self.corner_fraction} must be in (0, 0.5]")
        _check(0 < self.saturation_adu <= 65535, f"saturation_adu={self.saturation_adu} must be in (0, 65535]")
        _check(0 <= self.saturated_fraction < 1, "saturated_fraction must be in [0, 1)")
        _check(self.nonlinearity_floor_adu >= 0, "nonlinearity_floor_adu must be >= 0")
        _check(self.min_linearity_levels >= 3, "min_linearity_levels must be >= 3 (a line and a residual)")
        _check(0 <= self.ptc_min_adu < self.ptc_max_adu, "ptc_min_adu must be below ptc_max_adu")
        _check(self.min_bias_frames >= 2, "min_bias_frames must be >= 2 (a variance needs two frames)")
        _check(self.pixel_min_flats >= 2, "pixel_min_flats must be >= 2 (a variance needs two frames)")
        _check(0 < self.pixel_min_valid <= 1, "pixel_min_valid must be in (0, 1]")
        _check(self.dark_clip_sigma > 0, "dark_clip_sigma must be positive")
        _check(self.min_dark_exptimes >= 2, "min_dark_exptimes must be >= 2 (a line)")
        _check(self.block_frames >= 1, "block_frames must be >= 1")
        _check(self.split_every >= 2, "split_every must be >= 2")


__all__ += ["DetectorConfig"]


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


__all__ += ["StirConfig"]


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


__all__ += ["PhotometryConfig"]


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


__all__ += ["RefcatConfig"]


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


__all__ += ["AstrometryConfig"]


@dataclass(frozen=True)
class CoaddConfig:
    """Image coaddition, STATIC multiple (Xiao et al. 2025, sections 3.2.2 and 4.4, Fig. 13).

    Parameters
    ----------
    pixel_scale_arcsec : float
        Pixel scale of the TAN output grid (MST native: 0.862"/px).
    combine : str
        ``"mean"`` (inverse-variance weighted, SWarp's WEIGHTED, the default), ``"median"``
        or ``"clipped-mean"`` (weighted mean after sigma clipping around the median).
    n_stack : tuple of int
        Stacks of N consecutive exposures to make and measure (2, 4, ... 64, Fig. 13).
    resampling : str
        ``"bilinear"`` (ours: SWarp-like mapping grid, Jacobian flux scaling, oversampled
        when output pixels are larger than input ones) or ``"adaptive"`` (reproject's
        anti-aliased flux-conserving kernel, about 15x slower).
    map_step_px : int
        The exact astrometric mapping is evaluated every this many output pixels and
        interpolated in between (SWarp does the same).
    oversample : int or None
        Sub-samples per output pixel edge; None picks it from the pixel-area ratio.
    tile_px : int
        Output tile edge of the weighted mean (one task per tile and input frame).
    frames_per_task : int
        The weighted mean adds frames to a running sum along chains of at most this many
        frames (one chain per group of the frame list and tile, run in parallel).
    tile_bytes : int
        Median and clipped mean hold N resampled tiles at once: their tile shrinks so that
        this many bytes suffice whatever N.
    clip_sigma, clip_maxiters : float, int
        Sigma clipping of ``clipped-mean``.
    bad_bits : int
        Mask bits (:class:`mstdask.masks.Flag`) that exclude an input pixel: all but
        SATURATED (29). A saturated core is still starlight, in every frame at the same place:
        left out it would be a hole that STATIC cannot detect; it is carried into the coadd's
        ``flags`` instead, and the stack photometry flags the star.
    weighting : str
        ``"background"`` (inverse variance of each frame's sky after flux scaling) or
        ``"uniform"``.
    subtract_background : bool
        Subtract each frame's median sky level before combining (SWarp's SUBTRACT_BACK).
    mag_bin : float
        Magnitude bins of the error-versus-magnitude curves.
    limit_snr : float
        Limiting magnitude: where the median error reaches ``1.0857 / limit_snr`` (5 sigma).
    """

    pixel_scale_arcsec: float = 0.862
    combine: str = "mean"
    n_stack: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    resampling: str = "bilinear"
    map_step_px: int = 16
    oversample: int | None = None
    tile_px: int = 2048
    frames_per_task: int = 8
    tile_bytes: int = 512 * 2**20
    clip_sigma: float = 3.0
    clip_maxiters: int = 5
    bad_bits: int = 29
    weighting: str = "background"
    subtract_background: bool = True
    mag_bin: float = 0.5
    limit_snr: float = 5.0

    def __post_init__(self) -> None:
        _check(0.01 <= self.pixel_scale_arcsec <= 60,
               f"pixel_scale_arcsec={self.pixel_scale_arcsec} must be in 0.01..60 (MST native: 0.862)")
        _check(self.combine in ("mean", "median", "clipped-mean"),
               f"combine={self.combine!r}; choose 'mean', 'median' or 'clipped-mean'")
        stack = tuple(int(n) for n in self.n_stack)
        _check(len(stack) >= 1 and all(n >= 1 for n in stack), f"n_stack={self.n_stack} must be positive integers")
        object.__setattr__(self, "n_stack", tuple(sorted(set(stack))))
        _check(self.resampling in ("bilinear", "adaptive"),
               f"resampling={self.resampling!r}; choose 'bilinear' or 'adaptive'")
        _check(1 <= int(self.map_step_px) <= 256, f"map_step_px={self.map_step_px} must be in 1..256")
        _check(self.oversample is None or 1 <= int(self.oversample) <= 8,
               f"oversample={self.oversample} must be None (automatic) or 1..8")
        _check(64 <= int(self.tile_px) <= 16384, f"tile_px={self.tile_px} must be in 64..16384")
        _check(self.tile_bytes >= 2**20, "tile_bytes must be at least 1 MiB")
        _check(int(self.frames_per_task) >= 1, f"frames_per_task={self.frames_per_task} must be >= 1")
        _check(self.clip_sigma > 1 and int(self.clip_maxiters) >= 1, "clip_sigma must be > 1 and clip_maxiters >= 1")
        _check(0 <= int(self.bad_bits) <= 255, f"bad_bits={self.bad_bits} must be a mask value in 0..255")
        _check(self.weighting in ("background", "uniform"),
               f"weighting={self.weighting!r}; choose 'background' or 'uniform'")
        _check(self.mag_bin > 0 and self.limit_snr > 0, "mag_bin and limit_snr must be positive")


__all__ += ["CoaddConfig"]


#: Light-curve scatter of catalogue stacks of N consecutive epochs: N = 1, 4, 9, ... 100
#: (1^2 to 10^2, Xiao et al. 2025 Fig. 14).
_STACK_N = tuple(k * k for k in range(1, 11))


@dataclass(frozen=True)
class LightcurveConfig:
    """``mstdask lightcurves``: cross-match every exposure's catalogue to one master source
    list and write the source x epoch cube (Xiao et al. 2025, sections 4.3-4.5).

    Parameters
    ----------
    match_radius_arcsec : float
        A detection belongs to the nearest master source within this radius (1", paper).
    magnitude : {"aper", "psf"}
        Which calibrated magnitude goes into the cube (``mag_aper`` or ``mag_psf``).
    source_chunk : int
        Sources per Zarr chunk. The per-source reductions read all epochs of this many
        sources at once (``source_chunk x n_epochs`` float32 per variable, three variables),
        so keep it modest: 4096 x 3000 epochs is ~50 MB per variable, which keeps a 1-thread
        worker under 2 GB.
    epoch_chunk : int
        Epochs per Zarr chunk, also the number of exposures one writing task handles: an
        append rewrites at most the last, partial chunk column.
    use_refcat : bool
        Put reference-catalogue stars first in the master list (their ``ref_id``); without
        it, or without a reference catalogue, sources are built from detections only.
    """

    match_radius_arcsec: float = 1.0
    magnitude: str = "aper"
    source_chunk: int = 4096
    epoch_chunk: int = 64
    use_refcat: bool = True

    def __post_init__(self) -> None:
        _check(0 < self.match_radius_arcsec <= 60,
               f"match_radius_arcsec={self.match_radius_arcsec} must be in (0, 60] (1 is the paper's)")
        _check(self.magnitude in ("aper", "psf"), f"magnitude={self.magnitude!r} must be 'aper' or 'psf'")
        for name in ("source_chunk", "epoch_chunk"):
            v = getattr(self, name)
            _check(not isinstance(v, bool) and int(v) == v and v >= 1, f"{name}={v} must be a positive integer")
            object.__setattr__(self, name, int(v))


@dataclass(frozen=True)
class PrecisionConfig:
    """``mstdask precision``: repeatability vs magnitude, catalogue stacks, variability, and
    the theoretical precision of Eqs. 1-5 of Xiao et al. 2025 (section 4.3).

    The instrument defaults are the paper's MST G-band values. Read noise and dark current
    are neglected in the paper (0 here). Scintillation follows Young (1967),
    ``sigma = C D^(-2/3) X^1.75 exp(-h / 8000 m) (2 t)^(-1/2)`` (D in cm): the paper only
    cites it (Xiao et al. submitted), so the altitude and airmass are Xinglong's and zenith.

    Parameters
    ----------
    diameter_cm, exptime_s, gain_e_per_adu, seeing_arcsec, pixel_scale_arcsec : float
        D = 30 cm, t = 300 s, 0.25 e-/ADU (recorded; the model counts electrons), 2", 0.86"/px.
    wavelength_aa, bandwidth_aa, efficiency, sky_mag : float
        lambda = 5400 A, dlambda = 900 A, eta = 0.32, m_sky = 21 mag/arcsec^2.
    read_noise_e, dark_e_per_s : float
        RN (e-/px) and dark current (e-/px/s) of Eq. 1 (0: negligible for the MST CMOS).
    airmass, altitude_m, scintillation_coeff : float
        Young's formula inputs (X = 1, Xinglong 960 m, C = 0.09).
    bad_flags : int
        Epochs whose ``flags`` share a bit with this are left out (default: saturated,
        satellite track, cosmic ray = 26). Bad and pepper-and-salt pixels (1, 4) are left
        out of the apertures, whose sums are scaled up for the missing area: with the
        camera's ~3 % PS pixels most apertures hold one, and dropping those epochs would
        leave most sources without statistics.
    min_epochs : int
        Sources with fewer good epochs get no statistics (NaN).
    mag_range, mag_bin : (float, float), float
        Magnitude bins of the precision curves.
    min_per_bin : int
        Bins with fewer sources get no median.
    stack_n : tuple of int
        Catalogue stacks of N consecutive epochs (1, 4, 9, ... 100, Fig. 14).
    n_variables, n_constants : int
        Light curves drawn: the top variables by ``chi2_dof`` and constant stars spread in
        magnitude (Fig. 15 shows 6 and 9).
    """

    diameter_cm: float = 30.0
    exptime_s: float = 300.0
    gain_e_per_adu: float = 0.25
    seeing_arcsec: float = 2.0
    pixel_scale_arcsec: float = 0.86
    wavelength_aa: float = 5400.0
    bandwidth_aa: float = 900.0
    efficiency: float = 0.32
    sky_mag: float = 21.0
    read_noise_e: float = 0.0
    dark_e_per_s: float = 0.0
    airmass: float = 1.0
    altitude_m: float = 960.0
    scintillation_coeff: float = 0.09
    bad_flags: int = 26
    min_epochs: int = 5
    mag_range: tuple[float, float] = (8.0, 22.0)
    mag_bin: float = 0.25
    min_per_bin: int = 5
    stack_n: tuple[int, ...] = _STACK_N
    n_variables: int = 6
    n_constants: int = 9

    def __post_init__(self) -> None:
        for name in ("diameter_cm", "exptime_s", "gain_e_per_adu", "seeing_arcsec", "pixel_scale_arcsec",
                     "wavelength_aa", "bandwidth_aa", "efficiency", "airmass"):
            _check(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        _check(self.efficiency <= 1, f"efficiency={self.efficiency} is a throughput: must be in (0, 1]")
        _check(self.airmass >= 1, f"airmass={self.airmass} must be >= 1")
        for name in ("read_noise_e", "dark_e_per_s", "scintillation_coeff"):
            _check(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        _check(int(self.bad_flags) == self.bad_flags and self.bad_flags >= 0, "bad_flags must be a bit mask >= 0")
        object.__setattr__(self, "bad_flags", int(self.bad_flags))
        _check(int(self.min_epochs) == self.min_epochs and self.min_epochs >= 2,
               f"min_epochs={self.min_epochs} must be an integer >= 2 (a scatter needs two epochs)")
        object.__setattr__(self, "min_epochs", int(self.min_epochs))
        lo, hi = self.mag_range
        _check(lo < hi, f"mag_range={self.mag_range} must be (faint-limit-below, bright-limit-above) increasing")
        _check(0 < self.mag_bin <= hi - lo, f"mag_bin={self.mag_bin} must be in (0, {hi - lo}]")
        _check(self.min_per_bin >= 1, "min_per_bin must be >= 1")
        stack = tuple(int(n) for n in self.stack_n)
        _check(len(stack) > 0 and all(n >= 1 for n in stack) and stack == tuple(sorted(set(stack))),
               f"stack_n={self.stack_n} must be increasing positive integers, e.g. (1, 4, 9, 16)")
        object.__setattr__(self, "stack_n", stack)
        _check(self.n_variables >= 0 and self.n_constants >= 0, "n_variables and n_constants must be >= 0")


__all__ += ["LightcurveConfig", "PrecisionConfig"]
