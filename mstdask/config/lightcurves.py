"""Light curves and photometric precision (Xiao et al. 2025, sections 4.3-4.5)."""

from __future__ import annotations

from dataclasses import dataclass

from ._base import _check

__all__ = ["LightcurveConfig", "PrecisionConfig"]


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
