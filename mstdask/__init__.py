"""mstdask: Dask-parallel reduction of wide-field CMOS survey frames, the Mini-SiTian way.

Quick start::

    import mstdask
    ds = mstdask.open_store("night.zarr")      # lazy xarray Dataset of raw frames
    bias = ds.raw.sel(frame=ds.imagetyp == "bias")
"""

from __future__ import annotations

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
