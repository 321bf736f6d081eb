"""Image stacks (STATIC multiple, Xiao et al. 2025, section 4.2, Fig. 13): exposures
resampled through their astrometric solutions onto one TAN grid and combined
(:mod:`~mstdask.stacks.coadd`, kernels in :mod:`~mstdask.stacks._coadd_kernels`).

The job that runs them is :mod:`mstdask.jobs.coadd`.
"""
