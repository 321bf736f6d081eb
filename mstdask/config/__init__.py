"""Typed, frozen, validated configuration objects.

Defaults come from the MST papers (Xiao et al. 2025, imaging pipeline; Zhang et al. 2025,
camera evaluation). Every object validates itself on construction and raises
:class:`~mstdask.errors.ConfigError` with a message that says which value is wrong.

One module per step, the way the papers read:

- :mod:`._base`: validation (``_check``) and :func:`to_dict`;
- :mod:`.site`: the observing site (:class:`SiteConfig`, :data:`XINGLONG`);
- :mod:`.ingest`: the raw store (:class:`StoreLayout`, :class:`IngestConfig`) and the
  embedded cluster (:class:`ClusterConfig`);
- :mod:`.stir`: STIR calibrations and per-frame step (:class:`CalibConfig`, :class:`StirConfig`);
- :mod:`.static`: STATIC (:class:`PhotometryConfig`, :class:`RefcatConfig`,
  :class:`AstrometryConfig`);
- :mod:`.stacks`: coaddition (:class:`CoaddConfig`);
- :mod:`.lightcurves`: light curves and precision (:class:`LightcurveConfig`,
  :class:`PrecisionConfig`);
- :mod:`.lab`: detector characterisation (:class:`DetectorConfig`).
"""

from __future__ import annotations

from ._base import _check, to_dict  # noqa: F401  (_check: importable here before)
from .ingest import ClusterConfig, IngestConfig, StoreLayout
from .lab import DetectorConfig
from .lightcurves import _STACK_N, LightcurveConfig, PrecisionConfig  # noqa: F401
from .site import XINGLONG, SiteConfig
from .stacks import CoaddConfig
from .static import AstrometryConfig, PhotometryConfig, RefcatConfig
from .stir import CalibConfig, StirConfig

__all__ = ["SiteConfig", "XINGLONG", "StoreLayout", "IngestConfig", "ClusterConfig", "CalibConfig", "to_dict",
           "DetectorConfig", "StirConfig", "PhotometryConfig", "RefcatConfig", "AstrometryConfig", "CoaddConfig",
           "LightcurveConfig", "PrecisionConfig"]
