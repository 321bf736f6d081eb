"""Jobs: one module per command, each a short sequence of steps on a Dask client.

Library modules (:mod:`mstdask.stir`, :mod:`mstdask.static`, :mod:`mstdask.stacks`,
:mod:`mstdask.lightcurves`, :mod:`mstdask.lab`) build pure functions and lazy graphs; a job
sends them to the cluster, shows progress, turns one frame's failure into a line of the
summary instead of the end of the run, writes the products atomically and records them in
``manifest.json``. What every job shares is in :mod:`mstdask.jobs._job`; each job's
``--dry-run`` plan lives beside it (:class:`~mstdask.jobs._plan.Plan`).

=================  ===============================================  ==========================
command            job                                              paper
=================  ===============================================  ==========================
``ingest``         :func:`~mstdask.jobs.ingest.ingest`              raw frames into Zarr
``calibrate``      :func:`~mstdask.jobs.calibrate.calibrate`        STIR calibrations
``reduce``         :func:`~mstdask.jobs.reduce.reduce`              STIR per frame
``photometry``     :func:`~mstdask.jobs.photometry.photometry`      STATIC
``coadd``          :func:`~mstdask.jobs.coadd.coadd`                image stacks
``lightcurves``    :func:`~mstdask.jobs.lightcurves.lightcurves`    the light-curve cube
``precision``      :func:`~mstdask.jobs.precision.precision`        precision, catalogue stacks
``characterize``   :func:`~mstdask.jobs.characterize.characterize`  the detector lab
``run``            :func:`~mstdask.jobs.run.run_pipeline`           all of the above
=================  ===============================================  ==========================
"""

from ._job import JobReport, check_writable
from ._plan import Plan
from .calibrate import CalibReport, calibrate, plan_calibrate
from .characterize import CharacterizeReport, characterize
from .coadd import CoaddReport, coadd
from .ingest import IngestReport, ingest, plan_ingest
from .lightcurves import LightcurveReport, lightcurves
from .photometry import PhotometryReport, photometry
from .precision import PrecisionReport, precision
from .reduce import ReduceReport, plan_reduce, reduce
from .run import plan_run, run_pipeline

__all__ = ["CalibReport", "CharacterizeReport", "CoaddReport", "IngestReport", "JobReport", "LightcurveReport",
           "PhotometryReport", "Plan", "PrecisionReport", "ReduceReport", "calibrate", "characterize",
           "check_writable", "coadd", "ingest", "lightcurves", "photometry", "plan_calibrate", "plan_ingest",
           "plan_reduce", "plan_run", "precision", "reduce", "run_pipeline"]
