"""STIR: the instrumental calibrations of the MST pipeline (Xiao et al. 2025, section 3.1).

* :mod:`~mstdask.stir.calib`: night calibrations from stacks of frames (master bias,
  pepper-and-salt map, bad pixels, nightly small-scale flats and their 11-night stacks);
  pure NumPy kernels in :mod:`~mstdask.stir._calib_kernels` and the exact running median
  in :mod:`~mstdask.stir._median`.
* :mod:`~mstdask.stir.frame`: STIR per frame (bias and flat correction, the Table 1 masks,
  satellite tracks, cosmic rays); kernels in :mod:`~mstdask.stir._stir_kernels`.

The jobs that run them are :mod:`mstdask.jobs.calibrate` and :mod:`mstdask.jobs.reduce`.
"""

from .frame import (CalibSet, cosmic_ray_mask, find_calibrations, process_frame, reduce_frames, static_mask,
                    track_mask)

__all__ = ["CalibSet", "cosmic_ray_mask", "find_calibrations", "process_frame", "reduce_frames", "static_mask",
           "track_mask"]
