"""``manifest.json``: the machine-readable list of products a command wrote into a folder.

Each product entry has at least ``kind``, ``telescope``, ``filter``, ``night``, ``path``
(relative to the folder), ``n_inputs``, ``inputs`` and ``config``. Per-night products carry
strings in ``telescope``, ``filter`` and ``night``; products spanning several nights (a raw
store) carry lists. Later commands writing into the same folder add to the same manifest; a
product written again replaces its old entry (matched by ``path``). The file is replaced
atomically, so a crash never leaves half a manifest.
"""

from __future__ import annotations

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
        with os.fdopen(fd, "w") as fh:
            json.dump(self.data, fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, self.path)
        return self.path
