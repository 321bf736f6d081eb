"""The jobs under their first names: ``mstdask.runner.ingest`` and the others keep working.

The jobs live in :mod:`mstdask.jobs`, one module per command; this module only re-exports
them for scripts and notebooks written against it.
"""

from .jobs import (CalibReport, CharacterizeReport, CoaddReport, IngestReport, LightcurveReport,
                   PhotometryReport, Plan, PrecisionReport, ReduceReport, calibrate, characterize, check_writable,
                   coadd, ingest, lightcurves, photometry, plan_calibrate, plan_ingest, plan_reduce, plan_run,
                   precision, reduce, run_pipeline)
from .jobs._job import TASK_RETRIES

__all__ = ["CalibReport", "CharacterizeReport", "CoaddReport", "IngestReport", "LightcurveReport",
           "PhotometryReport", "Plan", "PrecisionReport", "ReduceReport", "TASK_RETRIES", "calibrate",
           "characterize", "check_writable", "coadd", "ingest", "lightcurves", "photometry", "plan_calibrate",
           "plan_ingest", "plan_reduce", "plan_run", "precision", "reduce", "run_pipeline"]
