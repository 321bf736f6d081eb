"""The shared base of the configuration objects: validation and serialisation.

Every configuration object is a frozen dataclass that validates itself in
``__post_init__`` with :func:`_check`, which raises
:class:`~mstdask.errors.ConfigError` with a message that says which value is wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError

__all__ = ["to_dict"]


def _check(cond: bool, msg: str) -> None:
    """Raise :class:`~mstdask.errors.ConfigError` with ``msg`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(msg)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dictionary of a config object (for manifests and FITS provenance)."""
    return dataclasses.asdict(cfg)
