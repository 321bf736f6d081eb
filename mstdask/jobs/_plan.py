"""The dry-run plan (``--dry-run``): what a command would do, found from FITS headers and
store metadata only."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..io import FrameInfo
from ..store import RawStore


@dataclass
class Plan:
    """What a command would do (``--dry-run``), found from FITS headers and store metadata
    only: nothing is computed and nothing is written.

    Attributes
    ----------
    command : str
        ``ingest``, ``calibrate``, ``reduce`` or ``run``.
    target : str
        The store or folder the command would write.
    frames : Counter
        ``(night, telescope, imagetyp) -> frames`` the command would read.
    steps : list of str
        What it would do, one line each, and what is already done.
    tasks : int
        Dask tasks it would submit (for calibrate an estimate: about one per frame and stored
        tile read, plus the combining tasks).
    bytes_read, bytes_written : int
        Estimated data volume (pixels, before compression).
    notes : list of str
        What the run would report (rejected files, frames without calibrations...).
    parts : list of Plan
        ``run``: the plans of ingest, calibrate and reduce.
    skipped : int
        Products the command would skip (``calibrate``: too few frames...).
    """

    command: str
    target: str
    frames: Counter = field(default_factory=Counter)
    steps: list[str] = field(default_factory=list)
    tasks: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    notes: list[str] = field(default_factory=list)
    parts: list["Plan"] = field(default_factory=list)
    tasks_estimated: bool = False
    skipped: int = 0

    @property
    def rejected(self) -> int:
        """Inputs the command would reject (its ``REJECTED`` notes and those of its parts)."""
        return sum(n.startswith("REJECTED ") for n in self.notes) + sum(p.rejected for p in self.parts)

    @property
    def would_skip(self) -> int:
        """Products the command (and its parts) would skip."""
        return self.skipped + sum(p.would_skip for p in self.parts)

    @property
    def exit_status(self) -> int:
        """The dry run's exit status: the one the run would have, as far as headers tell
        (1 when inputs would be rejected or products skipped, else 0)."""
        return 1 if self.rejected or self.would_skip else 0

    def outcome(self) -> str | None:
        """The line that says why the dry run exits with 1 (None when it exits with 0)."""
        if not self.exit_status:
            return None
        if self.rejected and not sum(self.frames.values()) and not self.tasks:
            return (f"every input would be rejected ({self.rejected}): nothing to do; fix or remove them "
                    "(exit status 1)")
        parts = [f"{self.rejected} inputs would be rejected"] if self.rejected else []
        parts += [f"{self.would_skip} products would be skipped"] if self.would_skip else []
        return " and ".join(parts) + ": the run would exit with status 1"

    def frame_table(self) -> list[str]:
        """Frames per night and telescope, one column per image type."""
        kinds = ("bias", "dark", "flat", "science")
        rows = sorted({(n, t) for n, t, _ in self.frames})
        total = Counter()
        for (_, _, k), v in self.frames.items():
            total[k] += v
        by_kind = ", ".join(f"{k} {total[k]}" for k in kinds if total[k])
        lines = [f"frames: {sum(self.frames.values())}" + (f" ({by_kind})" if by_kind else "")]
        if rows:
            lines.append(f"  {'night':<12}{'telescope':<11}" + "".join(f"{k:>9}" for k in kinds))
            for n, t in rows:
                lines.append(f"  {n:<12}{t:<11}" + "".join(f"{self.frames.get((n, t, k), 0):>9}" for k in kinds))
        return lines

    def text(self, _part: bool = False) -> str:
        """The plan as printed by ``--dry-run``."""
        lines = [f"{self.command} {self.target}" + (":" if _part else ": dry run, nothing computed or written")]
        body = self.frame_table() + self.steps
        if self.parts:
            for part in self.parts:
                body += [""] + part.text(_part=True).splitlines()
            body.append("")
            label = "total: "
        else:
            label = ""
        body.append(f"{label}tasks: {'~' if self.tasks_estimated else ''}{self.tasks}"
                    + (" (estimated: one per frame and stored tile read, plus the combining ones)"
                       if self.tasks_estimated and not self.parts else ""))
        body.append(f"{label}data: {self.bytes_read / 1e6:.1f} MB read, {self.bytes_written / 1e6:.1f} MB written "
                    "(pixels, before compression)")
        body += [f"note: {n}" for n in self.notes]
        if not _part and (why := self.outcome()):
            body.append(why)
        return "\n".join(lines + ["  " + b if b else "" for b in body])


_TABLE = ("telescope", "imagetyp", "night", "filter", "time", "path", "frame_key")


def _store_table(store: RawStore) -> dict:
    """Per-frame coordinates of the ingested frames of a store (no pixels read)."""
    done = store.coord("ingested")
    table = {k: store.coord(k)[done] for k in _TABLE}
    table["time"] = table["time"].astype("datetime64[ns]")
    return table


def _infos_table(infos: list[FrameInfo]) -> dict:
    """The same table for frames not yet ingested, from their headers."""
    import numpy as np

    table = {k: np.array([getattr(i, "key" if k == "frame_key" else k) for i in infos], dtype=object)
             for k in _TABLE if k != "time"}
    table["time"] = np.array([np.datetime64(i.time, "ns") for i in infos], dtype="datetime64[ns]")
    return table


def _concat(a: dict, b: dict) -> dict:
    """Two such tables, one after the other."""
    import numpy as np

    return {k: np.concatenate([np.asarray(a[k], dtype=b[k].dtype if k == "time" else object),
                               np.asarray(b[k], dtype=b[k].dtype if k == "time" else object)]) for k in _TABLE}


def _tiles(shape: tuple[int, int], tile) -> int:
    """Stored tiles of a frame (partial tiles at the edges count); 0 without frames."""
    if not (shape[0] and shape[1] and tile[0] and tile[1]):
        return 0
    return -(-shape[0] // tile[0]) * -(-shape[1] // tile[1])

