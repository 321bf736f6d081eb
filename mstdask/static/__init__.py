"""STATIC: astrometry, photometry and flux calibration of every exposure (Xiao et al. 2025,
section 3.2).

* :mod:`~mstdask.static.astrometry`: blind pattern-match solutions with a TPV distortion
  (kernels in :mod:`~mstdask.static._astrometry_kernels`);
* :mod:`~mstdask.static.photometry`: sources, apertures, aperture correction, PSF fluxes,
  the position-dependent zero point (kernels in :mod:`~mstdask.static._phot_kernels`);
* :mod:`~mstdask.static.refcat`: reference catalogues from CSV, FITS or Parquet.

The job that runs them is :mod:`mstdask.jobs.photometry`.
"""
