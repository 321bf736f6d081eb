"""Image coaddition, STATIC multiple (Xiao et al. 2025, sections 3.2.2 and 4.4)."""

from __future__ import annotations

from dataclasses import dataclass

from ._base import _check

__all__ = ["CoaddConfig"]


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
