"""mstdask: Dask-parallel reduction of wide-field CMOS survey frames, the Mini-SiTian way.

Quick start::

    import mstdask
    ds = mstdask.open_store("night.zarr")      # lazy xarray Dataset of raw frames
    bias = ds.raw.sel(frame=ds.imagetyp == "bias")

The package reads like the papers: :mod:`mstdask.stir` (calibrations and STIR per frame),
:mod:`mstdask.static` (astrometry, photometry), :mod:`mstdask.stacks` (image coadds),
:mod:`mstdask.lightcurves` (the cube and its statistics), :mod:`mstdask.lab` (detector
characterisation); :mod:`mstdask.jobs` runs them on a cluster, one module per command.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

__version__ = "0.1.0"

from .errors import BadInputError, ChunkingError, ConfigError, InsufficientDataError, MstdaskError, StoreError  # noqa: E402
from .store import open_store  # noqa: E402

__all__ = [
    "__version__",
    "open_store",
    "MstdaskError",
    "BadInputError",
    "InsufficientDataError",
    "ConfigError",
    "ChunkingError",
    "StoreError",
]

#: Modules that moved into the paper's folders, by their old names: ``import mstdask.calib``
#: (and pickles, notebooks and scripts that name them) keep working.
MOVED_MODULES = {
    "mstdask.calib": "mstdask.stir.calib", "mstdask._calib_kernels": "mstdask.stir._calib_kernels",
    "mstdask._median": "mstdask.stir._median", "mstdask._stir_kernels": "mstdask.stir._stir_kernels",
    "mstdask.astrometry": "mstdask.static.astrometry",
    "mstdask._astrometry_kernels": "mstdask.static._astrometry_kernels",
    "mstdask.photometry": "mstdask.static.photometry", "mstdask._phot_kernels": "mstdask.static._phot_kernels",
    "mstdask.refcat": "mstdask.static.refcat",
    "mstdask.coadd": "mstdask.stacks.coadd", "mstdask._coadd_kernels": "mstdask.stacks._coadd_kernels",
    "mstdask._lc_kernels": "mstdask.lightcurves._lc_kernels",
    "mstdask.detector": "mstdask.lab.detector", "mstdask._detector_kernels": "mstdask.lab._detector_kernels",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module under its old name as the very module object of its new name."""

    def find_spec(self, name, path=None, target=None):
        if name in MOVED_MODULES:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(MOVED_MODULES[spec.name])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # the import system stamped the old name's spec on the module: give it back its own
        if isinstance(module.__spec__.loader_state, importlib.machinery.ModuleSpec):
            module.__spec__ = module.__spec__.loader_state


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
