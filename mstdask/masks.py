"""The bit-flag convention of MST masks (Xiao et al. 2025, Table 1), in one registry.

A mask pixel is the OR of the flags that apply: 25 = 16 + 8 + 1 is a cosmic ray on a
satellite track on a bad pixel. Every product and every later step uses these values.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["Flag", "MASK_DTYPE", "describe_flags", "flag", "saturated"]

#: dtype of every mask array (five bits in use).
MASK_DTYPE = np.uint8


class Flag(enum.IntFlag):
    """Mask bits, exactly Table 1 of the MST imaging-pipeline paper."""

    BAD_PIXEL = 1  #: 2**0, from the darks (outside 3 sigma of the bias-subtracted dark)
    SATURATED = 2  #: 2**1, raw value above the saturation level (50000 ADU)
    PEPPER_SALT = 4  #: 2**2, random-telegraph pixel (std over bias frames above 8 ADU)
    SATELLITE_TRACK = 8  #: 2**3, satellite or aircraft track
    COSMIC_RAY = 16  #: 2**4, cosmic-ray hit


def describe_flags(value: int) -> list[str]:
    """Names of the flags set in one mask value, e.g. ``describe_flags(25)``."""
    return [f.name for f in Flag if value & f]


def flag(condition, bit: Flag):
    """``bit`` where ``condition`` is true (nonzero), else 0, as mask values (uint8).

    Works on NumPy, Dask and xarray arrays alike; OR the results to build a mask.
    """
    return (condition != 0).astype(MASK_DTYPE) * MASK_DTYPE(bit)


def saturated(raw: np.ndarray, level: float = 50000.0) -> np.ndarray:
    """``Flag.SATURATED`` where the raw value exceeds ``level``, else 0 (uint8)."""
    return flag(raw > level, Flag.SATURATED)
