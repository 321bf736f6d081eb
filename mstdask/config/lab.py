"""Detector characterisation of a lab set (Zhang et al. 2025, camera paper)."""

from __future__ import annotations

from dataclasses import dataclass

from ._base import _check

__all__ = ["DetectorConfig"]


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
