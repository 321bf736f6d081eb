"""Simulated MST data with ground truth: a seeded ZWO ASI6200MM Pro CMOS camera on a
30 cm Mini-SiTian telescope, writing real FITS files.

The camera model follows Zhang et al. 2025 (MST camera evaluation, papers/002) and the
observing routine follows Xiao et al. 2025 (MST imaging pipeline, papers/000). Frame
functions return ``(data, truth)`` like photutils' ``make_psf_model_image``:

>>> from mstdask.testing import CameraModel, make_camera
>>> cam = make_camera(CameraModel(shape=(200, 300)), seed=1)
>>> data, truth = cam.bias(rng=0)
>>> data.dtype, data.shape
(dtype('uint16'), (200, 300))

:func:`write_survey` writes whole nights (bias, twilight flats, science, darks and a
100-bias "pepper & salt" sequence) and :func:`write_lab_set` the detector lab plan;
:func:`write_catalogs` writes per-exposure source catalogues of constant and variable
stars (a ``mstdask photometry`` folder) and :func:`simulate_cube` a light-curve cube.
"""

from ._catalogs import CatalogTruth, simulate_cube, write_catalogs
from ._camera import DEFAULT_FIELD, Camera, CameraModel, FrameTruth, PSTable, frame_checksum, make_camera
from ._fits import IMAGETYP_SPELLINGS, SITE, fits_header, format_date_obs, format_dec, format_ra, write_fits
from ._sky import (
    BANDPASSES,
    Bandpass,
    SatelliteTrack,
    airmass_at,
    cosmic_ray_hits,
    make_star_catalog,
    make_wcs,
    random_track,
    zero_point_e,
)
from ._survey import DEFAULT_FILTERS, LabTruth, SurveyTruth, write_lab_set, write_survey

__all__ = [
    "CatalogTruth",
    "simulate_cube",
    "write_catalogs",
    "BANDPASSES",
    "DEFAULT_FIELD",
    "DEFAULT_FILTERS",
    "IMAGETYP_SPELLINGS",
    "SITE",
    "Bandpass",
    "Camera",
    "CameraModel",
    "FrameTruth",
    "LabTruth",
    "PSTable",
    "SatelliteTrack",
    "SurveyTruth",
    "airmass_at",
    "cosmic_ray_hits",
    "fits_header",
    "format_date_obs",
    "format_dec",
    "format_ra",
    "frame_checksum",
    "make_camera",
    "make_star_catalog",
    "make_wcs",
    "random_track",
    "write_fits",
    "write_lab_set",
    "write_survey",
    "zero_point_e",
]
