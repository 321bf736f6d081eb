"""Light curves (Xiao et al. 2025, sections 4.3-4.5): the source x epoch cube
(:mod:`~mstdask.lightcurves.cube`) and its per-source statistics
(:mod:`~mstdask.lightcurves.statistics`); kernels in :mod:`~mstdask.lightcurves._lc_kernels`.

The jobs that run them are :mod:`mstdask.jobs.lightcurves` and :mod:`mstdask.jobs.precision`.
"""

from .cube import CUBE_KIND, STAT_COLUMNS, CubeStore, match_task, open_cube, write_task
from .statistics import precision_table, select_light_curves, source_statistics, stacking_table, theory_curve

__all__ = ["CUBE_KIND", "CubeStore", "open_cube", "match_task", "write_task", "source_statistics",
           "precision_table", "stacking_table", "theory_curve", "select_light_curves", "STAT_COLUMNS"]
