"""Reference catalogues for astrometry and flux calibration: CSV, FITS tables or Parquet,
with configurable column names (:class:`mstdask.config.RefcatConfig`).

The simulator writes ``refcat.csv`` (``ra, dec, mag, mag_<filter>``); a SkyMapper export
reads with ``RefcatConfig(ra="raj2000", dec="dej2000", mag="{filter}_psf",
mag_err="e_{filter}_psf")``. With network access a Gaia cone from astroquery saved as
Parquet or FITS works the same way (never needed by mstdask itself).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..config import RefcatConfig
from ..errors import BadInputError, ConfigError

__all__ = ["Refcat", "check_coverage", "check_refcat", "load_refcat", "parse_columns", "refcat_columns",
           "refcat_coordinates"]


@dataclass(frozen=True)
class Refcat:
    """Reference stars: ``ra, dec`` (deg), ``mag`` and optional ``mag_err`` arrays.

    ``mag`` may hold NaN (no magnitude in this filter): such stars still serve astrometry.
    """

    ra: np.ndarray = field(repr=False)
    dec: np.ndarray = field(repr=False)
    mag: np.ndarray = field(repr=False)
    mag_err: np.ndarray | None = field(default=None, repr=False)
    path: str = ""
    mag_column: str = ""

    def __len__(self) -> int:
        return len(self.ra)

    def cone(self, ra0: float, dec0: float, radius_deg: float) -> "Refcat":
        """Stars within ``radius_deg`` of ``(ra0, dec0)``."""
        if len(self) == 0:
            return self
        d0, r0 = math.radians(dec0), math.radians(ra0)
        dec, ra = np.radians(self.dec), np.radians(self.ra)
        cosd = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - r0)
        keep = cosd >= math.cos(math.radians(radius_deg))
        return Refcat(self.ra[keep], self.dec[keep], self.mag[keep],
                      None if self.mag_err is None else self.mag_err[keep], self.path, self.mag_column)


def parse_columns(text: str | None) -> RefcatConfig:
    """``"ra=raj2000,dec=dej2000,mag={filter}_psf,mag_err=e_{filter}_psf"`` -> RefcatConfig."""
    if not text:
        return RefcatConfig()
    kw: dict[str, object] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep_, value = part.partition("=")
        key = key.strip()
        if not sep_ or key not in ("ra", "dec", "mag", "mag_err", "fallback_mag", "max_mag_err"):
            raise ConfigError(f"--refcat-columns: cannot read {part!r}; write KEY=COLUMN pairs with KEY one of "
                              "ra, dec, mag, mag_err, fallback_mag, max_mag_err, e.g. "
                              "'ra=raj2000,dec=dej2000,mag={filter}_psf'")
        kw[key] = float(value) if key == "max_mag_err" else value.strip()
    return RefcatConfig(**kw)  # type: ignore[arg-type]


def _read_table(path: Path):
    """Any of our formats -> dict of numpy columns (names as in the file)."""
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            tab = pq.read_table(path)
            return {c: tab.column(c).to_numpy(zero_copy_only=False) for c in tab.column_names}
        if name.endswith((".fits", ".fit", ".fits.gz", ".fts")):
            from astropy.table import Table

            tab = Table.read(path, hdu=1) if not name.endswith(".fits.gz") else Table.read(path)
            return {c: np.asarray(tab[c]) for c in tab.colnames}
        if name.endswith(".ecsv"):
            from astropy.table import Table

            tab = Table.read(path)
            return {c: np.asarray(tab[c]) for c in tab.colnames}
        if name.endswith((".csv", ".txt", ".csv.gz")):
            import pandas as pd

            df = pd.read_csv(path, comment="#")
            return {c: df[c].to_numpy() for c in df.columns}
    except FileNotFoundError:
        raise BadInputError(str(path), "reference catalogue not found; check --refcat") from None
    except Exception as exc:
        raise BadInputError(str(path), f"cannot read the reference catalogue ({type(exc).__name__}: {exc})") from None
    raise BadInputError(str(path), "unknown reference-catalogue format; use .csv, .fits or .parquet")


def _ecsv_columns(path: Path) -> list[str]:
    """Column names of an ECSV file: its first line that is not a ``#`` header line."""
    delimiter = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("#"):
                if "delimiter:" in line and "," in line.split("delimiter:", 1)[1]:
                    delimiter = ","
                continue
            return [c.strip() for c in line.strip().split(delimiter)]
    return []


def refcat_columns(path: str | os.PathLike) -> list[str]:
    """The column names of a reference catalogue, from its schema or header only (the rows
    are not read).

    Raises
    ------
    BadInputError
        Missing file, unknown format, unreadable header.
    """
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if name.endswith((".fits", ".fit", ".fits.gz", ".fts")):
            from astropy.io import fits

            with fits.open(path) as hdul:  # headers only: no table data is read
                for hdu in hdul[1:]:
                    if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
                        return list(hdu.columns.names)
            raise BadInputError(str(path), "no table HDU in the FITS file; give a FITS table, CSV or Parquet")
        if name.endswith(".ecsv"):
            return _ecsv_columns(path)
        if name.endswith((".csv", ".txt", ".csv.gz")):
            import pandas as pd

            return [str(c) for c in pd.read_csv(path, comment="#", nrows=0).columns]
    except FileNotFoundError:
        raise BadInputError(str(path), "reference catalogue not found; check --refcat") from None
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(str(path), f"cannot read the reference catalogue ({type(exc).__name__}: {exc})") from None
    raise BadInputError(str(path), "unknown reference-catalogue format; use .csv, .fits or .parquet")


def _missing_columns(cols: list[str], config: RefcatConfig, filters) -> list[str]:
    """What is missing for :func:`load_refcat` (``filters`` None: for any filter)."""
    import re

    missing = [f"no {what} column {name!r} (--refcat-columns {key}=COLUMN)"
               for what, key, name in (("RA", "ra", config.ra), ("Dec", "dec", config.dec)) if name not in cols]
    fallback = config.fallback_mag if config.fallback_mag in cols else None
    if fallback is None and filters is None and "{filter}" in config.mag:
        pattern = re.compile("^" + ".+".join(re.escape(p) for p in config.mag.split("{filter}")) + "$")
        if not any(pattern.match(c) for c in cols):
            missing.append(f"no magnitude column {config.mag!r} for any filter"
                           + (f" and no {config.fallback_mag!r}" if config.fallback_mag else "")
                           + " (--refcat-columns mag=COLUMN)")
    elif fallback is None:
        for filt in sorted(set(filters)) if filters is not None else [""]:
            mag = config.mag.replace("{filter}", str(filt))
            if mag not in cols:
                missing.append(f"no magnitude column {mag!r} for filter {filt!r}"
                               + (f" and no {config.fallback_mag!r}" if config.fallback_mag else "")
                               + " (--refcat-columns mag=COLUMN)")
    return missing


def check_refcat(path: str | os.PathLike, config: RefcatConfig | None = None, filters=None) -> list[str]:
    """Check, from its schema or header only, that a reference catalogue has the columns
    ``config`` names: RA, Dec and a magnitude for each of ``filters`` (``None``: for some
    filter). Returns the column names.

    Raises
    ------
    BadInputError
        Missing file, unreadable header, or missing columns: the message names them, the
        columns the file has and the ``--refcat-columns`` fix.
    """
    config = config or RefcatConfig()
    path = Path(path)
    if not path.is_file():
        raise BadInputError(str(path), "reference catalogue not found (or not a file); check --refcat")
    cols = refcat_columns(path)
    missing = _missing_columns(cols, config, filters)
    if missing:
        shown = ", ".join(cols[:30]) + (f", ... ({len(cols)} in all)" if len(cols) > 30 else "")
        raise BadInputError(str(path), "; ".join(missing) + f". The catalogue's columns: {shown or 'none'}. "
                                       "Name yours with --refcat-columns, e.g. "
                                       "--refcat-columns 'ra=RAJ2000,dec=DEJ2000,mag={filter}_psf'")
    return cols


def _column(cols: dict, name: str, path: Path, what: str, option: str) -> np.ndarray:
    if name not in cols:
        shown = ", ".join(list(cols)[:30])
        raise BadInputError(str(path), f"no {what} column {name!r} (columns: {shown}); "
                                       f"name it with --refcat-columns {option}=COLUMN")
    try:
        return np.asarray(cols[name], dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInputError(str(path), f"column {name!r} is not numeric") from None


def load_refcat(path: str | os.PathLike, config: RefcatConfig | None = None, filter: str | None = None) -> Refcat:
    """Read a reference catalogue.

    Parameters
    ----------
    path : path
        ``.csv``, ``.fits`` (first table HDU) or ``.parquet``.
    config : RefcatConfig
        Column names; ``{filter}`` in them is replaced by ``filter``.
    filter : str, optional
        The exposure's filter.

    Raises
    ------
    BadInputError
        Missing file, unreadable table, missing columns (the message lists the columns).
    """
    config = config or RefcatConfig()
    path = Path(path)
    st = path.stat() if path.exists() else None
    if st is None:
        raise BadInputError(str(path), "reference catalogue not found; check --refcat")
    return _load_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, config, filter or "")


@lru_cache(maxsize=8)
def _load_cached(path_s: str, mtime: int, size: int, config: RefcatConfig, filt: str) -> Refcat:
    # one read per worker process and catalogue version, however many exposures use it
    path = Path(path_s)
    cols = _read_table(path)
    ra = _column(cols, config.ra, path, "RA", "ra")
    dec = _column(cols, config.dec, path, "Dec", "dec")
    mag_name = config.mag.replace("{filter}", filt)
    if mag_name not in cols and config.fallback_mag and config.fallback_mag in cols:
        mag_name = config.fallback_mag
    mag = _column(cols, mag_name, path, f"magnitude (filter {filt!r})", "mag")
    err = None
    if config.mag_err:
        err_name = config.mag_err.replace("{filter}", filt)
        if err_name in cols:
            err = _column(cols, err_name, path, "magnitude-error", "mag_err")
            mag = np.where(np.isfinite(err) & (err <= config.max_mag_err), mag, np.nan)
    ok = np.isfinite(ra) & np.isfinite(dec)
    if ok.sum() == 0 and len(ra):
        raise BadInputError(str(path), f"no finite coordinates in columns {config.ra!r}, {config.dec!r}")
    return Refcat(ra[ok], dec[ok], mag[ok], None if err is None else err[ok], str(path), mag_name)


def refcat_coordinates(path: str | os.PathLike, config: RefcatConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The RA and Dec columns (degrees, finite rows only) of a reference catalogue; no other
    column is read (Parquet and CSV read those two columns only, FITS memory-maps them).

    Raises
    ------
    BadInputError
        Missing file, unreadable table, missing or non-numeric RA/Dec column.
    """
    config = config or RefcatConfig()
    path = Path(path)
    name = path.name.lower()
    wanted = [config.ra, config.dec]
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            tab = pq.read_table(path, columns=wanted)
            cols = {c: tab.column(c).to_numpy(zero_copy_only=False) for c in wanted}
        elif name.endswith((".csv", ".txt", ".csv.gz")):
            import pandas as pd

            df = pd.read_csv(path, comment="#", usecols=wanted)
            cols = {c: df[c].to_numpy() for c in wanted}
        elif name.endswith((".fits", ".fit", ".fts")):
            from astropy.io import fits

            with fits.open(path, memmap=True) as hdul:
                hdu = next(h for h in hdul[1:] if isinstance(h, (fits.BinTableHDU, fits.TableHDU)))
                cols = {c: np.array(hdu.data[c], dtype=np.float64) for c in wanted}
        else:  # .fits.gz, .ecsv: small formats, read whole
            cols = _read_table(path)
    except (FileNotFoundError, StopIteration, KeyError, ValueError):
        check_refcat(path, config)  # the clear message: missing file, table or column
        raise BadInputError(str(path), f"cannot read columns {config.ra!r}, {config.dec!r} of the reference "
                                       "catalogue") from None
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(str(path), f"cannot read the reference catalogue ({type(exc).__name__}: {exc})") from None
    ra = _column(cols, config.ra, path, "RA", "ra")
    dec = _column(cols, config.dec, path, "Dec", "dec")
    ok = np.isfinite(ra) & np.isfinite(dec)
    return ra[ok], dec[ok]


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=-1)


def _covered(ra: np.ndarray, dec: np.ndarray, pointings: np.ndarray, radius_deg: float) -> bool:
    """Whether some star lies within ``radius_deg`` of some pointing (vectorised; a k-d tree
    of the stars when there are many distinct pointings)."""
    if not len(ra) or not len(pointings):
        return False
    chord = 2 * math.sin(math.radians(min(radius_deg, 180.0)) / 2)
    centres = _unit_vectors(pointings[:, 0], pointings[:, 1])
    if len(centres) > 16:
        from scipy.spatial import cKDTree

        tree = cKDTree(_unit_vectors(ra, dec))
        return bool(np.any(tree.query_ball_point(centres, chord, return_length=True) > 0))
    stars = _unit_vectors(ra, dec)
    cos_r = 1 - chord * chord / 2
    # one pointing at a time, stopping at the first covered one: memory stays O(stars)
    return any(bool(np.any(stars @ c >= cos_r)) for c in centres)


def check_coverage(path: str | os.PathLike, pointings, radius_deg: float,
                   config: RefcatConfig | None = None) -> int:
    """Check that a reference catalogue has stars where the frames point: at least one of
    ``pointings`` (``(ra, dec)`` pairs in degrees) has a catalogue star within
    ``radius_deg``. Only the RA/Dec columns are read (:func:`refcat_coordinates`). Returns
    the number of stars in the catalogue; no pointing given: nothing to check.

    Raises
    ------
    BadInputError
        No pointing has a catalogue star near it: the message names the catalogue, its
        RA/Dec extent, where the frames point and the fix.
    """
    pts = np.asarray(list(pointings), dtype=np.float64).reshape(-1, 2)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if not len(pts):
        return 0
    ra, dec = refcat_coordinates(path, config)
    # frames of one field share a pointing (to the jitter): one test for each distinct one
    pts = np.unique(np.round(pts, 3), axis=0)
    if _covered(ra, dec, pts, radius_deg):
        return len(ra)
    extent = (f"RA {ra.min():.3f} to {ra.max():.3f}, Dec {dec.min():.3f} to {dec.max():.3f} deg "
              f"({len(ra)} stars)") if len(ra) else "no stars with finite coordinates"
    shown = ", ".join(f"({r:.3f}, {d:+.3f})" for r, d in pts[:5]) + (f", ... ({len(pts)} in all)"
                                                                     if len(pts) > 5 else "")
    raise BadInputError(str(path), f"the reference catalogue does not cover the field: it holds {extent}, and no "
                                   f"frame pointing (RA, Dec in deg: {shown}) has a catalogue star within "
                                   f"{radius_deg:.3f} deg. Give a catalogue of that field (--refcat), or check "
                                   "RA/DEC in the raw headers")
