"""The detector lab: the camera evaluation of Zhang et al. (2025), sections 2-3 (bias
stability, anomalous pixels, dark current, linearity, photon-transfer gain and read noise,
per-pixel gain and read-noise maps): :mod:`~mstdask.lab.detector`, kernels in
:mod:`~mstdask.lab._detector_kernels`.

The job that runs it is :mod:`mstdask.jobs.characterize`.
"""
