"""The small error hierarchy of mstdask.

Library code raises these; only the command line and the jobs (:mod:`mstdask.jobs`) catch them, so that one
bad frame is reported and skipped while the rest of a run goes on. Every message names
the file or product concerned and says how to fix the problem.
"""

from __future__ import annotations

__all__ = [
    "MstdaskError",
    "BadInputError",
    "InsufficientDataError",
    "ConfigError",
    "ChunkingError",
    "StoreError",
]


class MstdaskError(Exception):
    """Base class of every error mstdask raises on purpose."""


class BadInputError(MstdaskError):
    """An input file or array cannot be used (not FITS, truncated, wrong shape, ...).

    Parameters
    ----------
    path : str or None
        The offending file, when there is one; it is put at the head of the message.
    problem : str
        What is wrong and how to fix it.
    """

    def __init__(self, path: str | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # keep path/problem when the error crosses a process boundary
        return (type(self), (self.path, self.problem))


class InsufficientDataError(MstdaskError):
    """Too few frames (or sources, nights, ...) to compute a product honestly."""


class ConfigError(MstdaskError):
    """A configuration value or command-line option is invalid."""


class ChunkingError(MstdaskError):
    """An array is chunked in a way the operation cannot stream over."""


class StoreError(MstdaskError):
    """A Zarr store is missing, not an mstdask store, or not writable."""
