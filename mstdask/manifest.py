"""``manifest.json``: the machine-readable list of products a command wrote into a folder.

Each product entry has at least ``kind``, ``telescope``, ``filter``, ``night``, ``path``
(relative to the folder), ``n_inputs``, ``inputs`` and ``config``. Per-night products carry
strings in ``telescope``, ``filter`` and ``night``; products spanning several nights (a raw
store) carry lists. Later commands writing into the same folder add to the same manifest; a
product written again replaces its old entry (matched by ``path``). The file is replaced
atomically, so a crash never leaves half a manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__

__all__ = ["Manifest"]

MANIFEST_NAME = "manifest.json"


class Manifest:
    """Load-or-create the manifest of an output folder.

    Parameters
    ----------
    folder : path-like
        The output folder; ``folder/manifest.json`` is read if it exists.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        if self.path.exists():
            self.data: dict[str, Any] = json.loads(self.path.read_text())
        else:
            self.data = {"mstdask_version": __version__, "products": [], "runs": []}

    @property
    def products(self) -> list[dict[str, Any]]:
        """Every product entry."""
        return self.data["products"]

    def add(self, kind: str, path: str | os.PathLike, *, telescope: Any, filter: Any, night: Any,
            inputs: list[str], config: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Add (or replace) one product entry and return it."""
        rel = os.path.relpath(Path(path).resolve(), self.folder.resolve())
        entry = {"kind": kind, "telescope": telescope, "filter": filter, "night": night, "path": rel,
                 "n_inputs": len(inputs), "inputs": list(inputs), "config": config,
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}
        self.data["products"] = [p for p in self.products if p["path"] != rel] + [entry]
        return entry

    def _rel(self, path: str | os.PathLike) -> str:
        return os.path.relpath(Path(self.folder, path).resolve(), self.folder.resolve())

    def get(self, path: str | os.PathLike) -> dict[str, Any] | None:
        """The entry of the product at ``path`` (relative to the folder, or absolute), or None."""
        rel = self._rel(path)
        return next((p for p in self.products if p["path"] == rel), None)

    def remove(self, path: str | os.PathLike) -> bool:
        """Drop the entry of the product at ``path``; True when there was one. A product about
        to be rewritten is unlisted first, so the manifest never lists a half-written file."""
        rel = self._rel(path)
        n = len(self.products)
        self.data["products"] = [p for p in self.products if p["path"] != rel]
        return len(self.products) < n

    def record_run(self, argv: list[str] | None = None, **info: Any) -> None:
        """Remember which command wrote into this folder, and when."""
        self.data.setdefault("runs", []).append({
            "command": " ".join(argv if argv is not None else sys.argv),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mstdask_version": __version__, **info})

    def write(self) -> Path:
        """Atomically write ``manifest.json``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.data, fh, indent=2, default=str)
                fh.write("\n")
            os.replace(tmp, self.path)
        except BaseException:  # a full disk: the old manifest stays, no half-written copy is left
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return self.path
