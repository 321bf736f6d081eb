"""Simulated repeated photometry with ground truth: per-exposure source catalogues in the
layout of ``mstdask photometry`` (CATDIR) and directly written light-curve cubes.

Far faster than simulating images when only the catalogue statistics matter (tests,
notebook 07, the light-curve benchmark). Constant stars get Gaussian noise of a known
``sigma(mag)`` (by default the Eqs. 1-5 theory of Xiao et al. 2025 with the paper's
instrument); variables get a sinusoid on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["CatalogTruth", "write_catalogs", "simulate_cube"]


@dataclass
class CatalogTruth:
    """What :func:`write_catalogs` made: per star ``ra, dec, mag, sigma, amplitude``
    (0 for constant stars), ``in_refcat``; the exposures, the folder and the refcat."""

    ra: np.ndarray
    dec: np.ndarray
    mag: np.ndarray
    sigma: np.ndarray
    amplitude: np.ndarray
    period_days: np.ndarray
    in_refcat: np.ndarray
    exposures: list[str] = field(default_factory=list)
    times_ns: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    catdir: Path | None = None
    refcat_path: Path | None = None

    @property
    def variable(self) -> np.ndarray:
        """Which stars vary."""
        return self.amplitude > 0


def _theory_sigma(mag: np.ndarray) -> np.ndarray:
    from ..lightcurves._lc_kernels import snr_theory
    from ..config import PrecisionConfig

    return snr_theory(mag, PrecisionConfig())["total"]


def _place_stars(rng: np.random.Generator, n_sources: int, ra0: float, dec0: float, radius_deg: float,
                 min_separation_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """Uniform positions in a disc, no two stars closer than ``min_separation_arcsec`` (no
    blends in the truth): stars too close to another are drawn again."""
    from scipy.spatial import cKDTree

    from ..lightcurves._lc_kernels import chord, unit_vectors

    ra, dec = np.empty(n_sources), np.empty(n_sources)
    redo = np.arange(n_sources)
    while redo.size:
        r = radius_deg * np.sqrt(rng.random(redo.size))
        th = rng.uniform(0, 2 * np.pi, redo.size)
        dec[redo] = dec0 + r * np.sin(th)
        ra[redo] = ra0 + r * np.cos(th) / np.cos(np.radians(dec0))
        pairs = cKDTree(unit_vectors(ra, dec)).query_pairs(chord(min_separation_arcsec), output_type="ndarray")
        redo = np.unique(pairs[:, 1]) if len(pairs) else np.empty(0, int)
    return ra, dec


def _new_stars(rng: np.random.Generator, catdir: Path, n_sources: int, mag_range: tuple[float, float],
               sigma: Callable | float | None, n_variables: int, amplitude: tuple[float, float],
               refcat_fraction: float, ra0: float, dec0: float, radius_deg: float,
               min_separation_arcsec: float) -> CatalogTruth:
    """Draw the stars (positions, magnitudes, noise, variables, refcat membership) and write
    ``CATDIR/refcat.csv``."""
    import pandas as pd

    ra, dec = _place_stars(rng, n_sources, ra0, dec0, radius_deg, min_separation_arcsec)
    # a steep luminosity function, like a real field: many faint stars
    u = rng.random(n_sources)
    lo, hi = mag_range
    mag = lo + (hi - lo) * np.log1p(u * (np.e ** 2 - 1)) / 2
    if sigma is None:
        sig = _theory_sigma(mag)
    elif callable(sigma):
        sig = np.asarray(sigma(mag), float)
    else:
        sig = np.full(n_sources, float(sigma))
    amp = np.zeros(n_sources)
    period = np.full(n_sources, np.inf)
    var = rng.choice(n_sources, size=min(n_variables, n_sources), replace=False)
    amp[var] = rng.uniform(*amplitude, len(var))
    period[var] = rng.uniform(0.05, 2.0, len(var))
    in_ref = rng.random(n_sources) < refcat_fraction
    truth = CatalogTruth(ra, dec, mag, sig, amp, period, in_ref, catdir=catdir)
    catdir.mkdir(parents=True, exist_ok=True)
    refcat = catdir / "refcat.csv"
    pd.DataFrame({"ra": ra[in_ref], "dec": dec[in_ref], "mag": mag[in_ref]}).to_csv(refcat, index=False)
    truth.refcat_path = refcat
    return truth


def _detections(rng: np.random.Generator, truth: CatalogTruth, mjd: float, detect_fraction: float,
                jitter_arcsec: float, spurious_per_epoch: int) -> tuple[np.ndarray, ...]:
    """One exposure's detections ``ra, dec, mag, magerr``: the stars seen, each with its
    variability, noise and position error, then the spurious ones."""
    n = len(truth.ra)
    seen = rng.random(n) < detect_fraction
    idx = np.flatnonzero(seen)
    phase = 2 * np.pi * (mjd / truth.period_days[idx])
    m = truth.mag[idx] + truth.amplitude[idx] * np.sin(np.where(np.isfinite(phase), phase, 0.0)) \
        + rng.normal(0, 1, idx.size) * truth.sigma[idx]
    j = jitter_arcsec / 3600.0
    dec = truth.dec[idx] + rng.normal(0, j, idx.size)
    ra = truth.ra[idx] + rng.normal(0, j, idx.size) / np.cos(np.radians(truth.dec[idx]))
    err = truth.sigma[idx]
    if spurious_per_epoch:
        rr = 0.2 * np.sqrt(rng.random(spurious_per_epoch))
        tt = rng.uniform(0, 2 * np.pi, spurious_per_epoch)
        sdec = float(np.mean(truth.dec)) + rr * np.sin(tt)
        sra = float(np.mean(truth.ra)) + rr * np.cos(tt) / np.cos(np.radians(sdec))
        ra, dec = np.r_[ra, sra], np.r_[dec, sdec]
        m, err = np.r_[m, rng.uniform(18, 20, spurious_per_epoch)], np.r_[err, np.full(spurious_per_epoch, 0.1)]
    return ra, dec, m, err


def _source_table(exp: str, t_ns: int, mjd: float, night: str, telescope: str, filter: str, ra: np.ndarray,
                  dec: np.ndarray, m: np.ndarray, err: np.ndarray):
    """One exposure's source catalogue in the columns of ``mstdask photometry``."""
    import pyarrow as pa

    nrow = len(ra)
    return pa.table({
        "exposure": pa.array([exp] * nrow, pa.string()),
        "time": pa.array(np.full(nrow, t_ns, np.int64)).cast(pa.timestamp("ns", tz="UTC")),
        "mjd_mid": np.full(nrow, mjd), "night": pa.array([night] * nrow, pa.string()),
        "telescope": pa.array([telescope] * nrow, pa.string()), "filter": pa.array([filter] * nrow, pa.string()),
        "source_id": np.arange(nrow, dtype=np.int64), "ra": ra, "dec": dec,
        "mag_aper": m.astype(np.float32), "magerr_aper": err.astype(np.float32),
        "mag_psf": m.astype(np.float32), "magerr_psf": err.astype(np.float32),
        "flags": np.zeros(nrow, np.uint8)})


def _write_exposure_table(table_path: Path, records: list[dict]) -> list[dict]:
    """Rewrite the exposure table with the exposures already there and ``records`` (as
    photometry rewrites it whole); returns all of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = pq.read_table(table_path).to_pylist() if table_path.exists() else []
    for r in old:
        r["time"] = int(r["time"].timestamp() * 1e9) if hasattr(r["time"], "timestamp") else r["time"]
    recs = old + records
    cols = {k: [r.get(k) for r in recs] for k in recs[0]}
    t = pa.table({**{k: v for k, v in cols.items() if k != "time"},
                  "time": pa.array(cols["time"], pa.int64()).cast(pa.timestamp("ns", tz="UTC"))})
    pq.write_table(t, table_path)
    return recs


def _write_manifest(catdir: Path, truth: CatalogTruth, recs: list[dict], telescope: str, filter: str) -> None:
    """``CATDIR/manifest.json`` listing the catalogues and the exposure table."""
    manifest = {"mstdask_version": "sim", "runs": [], "products": [
        {"kind": "source_catalog", "path": "sources", "telescope": [telescope], "filter": [filter],
         "night": sorted({r["night"] for r in recs}), "n_inputs": 2,
         "inputs": ["simulated", str(truth.refcat_path.resolve())],
         "config": {"refcat": {"ra": "ra", "dec": "dec", "mag": "mag_{filter}", "mag_err": None,
                               "fallback_mag": "mag", "max_mag_err": 0.05}}},
        {"kind": "exposure_table", "path": "exposures.parquet", "telescope": [telescope], "filter": [filter],
         "night": sorted({r["night"] for r in recs}), "n_inputs": 0, "inputs": [], "config": {}}]}
    (catdir / "manifest.json").write_text(json.dumps(manifest, indent=2))


def write_catalogs(catdir: str | Path, n_sources: int = 2000, n_epochs: int = 60, *, seed: int = 0,
                   mag_range: tuple[float, float] = (11.0, 19.0), sigma: Callable | float | None = None,
                   n_variables: int = 10, amplitude: tuple[float, float] = (0.05, 0.3),
                   refcat_fraction: float = 0.9, detect_fraction: float = 0.95, jitter_arcsec: float = 0.1,
                   spurious_per_epoch: int = 0, min_separation_arcsec: float = 3.0, ra0: float = 150.0,
                   dec0: float = 2.0, radius_deg: float = 0.2,
                   epochs_per_night: int = 30, telescope: str = "MST2", filter: str = "G",
                   start: str = "2023-01-18T13:00:00", cadence_s: float = 330.0, first_epoch: int = 0,
                   truth: CatalogTruth | None = None) -> CatalogTruth:
    """Write ``CATDIR/sources/NIGHT/EXPOSURE.parquet``, ``CATDIR/exposures.parquet``,
    ``CATDIR/refcat.csv`` and ``CATDIR/manifest.json`` as ``mstdask photometry`` does.

    Parameters
    ----------
    n_sources, n_epochs : int
        Stars and exposures.
    sigma : callable, float or None
        Per-epoch noise (mag) as a function of magnitude, a constant, or None for the
        Eqs. 1-5 theory with the paper's instrument. The catalogues' ``magerr`` is this
        sigma (errors that are right).
    n_variables, amplitude : int, (float, float)
        Sinusoidal variables and their semi-amplitude range (mag); periods 0.05-2 days.
    refcat_fraction : float
        Stars in ``refcat.csv`` (the others become new sources of the cube).
    detect_fraction : float
        Chance a star is in a given exposure's catalogue (missing epochs).
    jitter_arcsec : float
        Gaussian position error of every detection.
    spurious_per_epoch : int
        Random one-off detections per exposure (noise, cosmic rays).
    min_separation_arcsec : float
        Stars are placed at least this far apart (unresolved pairs would merge).
    first_epoch, truth : int, CatalogTruth
        Append more exposures of the same stars (pass the previous ``truth``): exposures
        are numbered from ``first_epoch`` and continue in time.
    """
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed + 7919 * first_epoch)  # one generator: the draws follow in this order
    catdir = Path(catdir)
    if truth is None:
        truth = _new_stars(rng, catdir, n_sources, mag_range, sigma, n_variables, amplitude, refcat_fraction,
                           ra0, dec0, radius_deg, min_separation_arcsec)
    t_start = np.datetime64(start, "ns").astype(np.int64)
    records = []
    times = []
    for k in range(first_epoch, first_epoch + n_epochs):
        night_i, within = divmod(k, epochs_per_night)
        t_ns = int(t_start + night_i * 86400 * 10**9 + within * cadence_s * 1e9)
        night = str(np.datetime64(int(t_start + night_i * 86400 * 10**9), "ns").astype("datetime64[D]"))
        exp = f"{telescope}_{k:06d}"
        mjd = t_ns / 86400e9 + 40587.0
        ra, dec, m, err = _detections(rng, truth, mjd, detect_fraction, jitter_arcsec, spurious_per_epoch)
        path = catdir / "sources" / night / f"{exp}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_source_table(exp, t_ns, mjd, night, telescope, filter, ra, dec, m, err), path)
        records.append({"exposure": exp, "status": "ok", "reason": None, "night": night, "telescope": telescope,
                        "filter": filter, "time": t_ns, "mjd_mid": mjd, "exptime": 300.0, "n_sources": len(ra),
                        "zero_point": 25.0, "catalog": str(path)})
        times.append(t_ns)
        truth.exposures.append(exp)
    truth.times_ns = np.r_[truth.times_ns, np.asarray(times, np.int64)]
    recs = _write_exposure_table(catdir / "exposures.parquet", records)
    _write_manifest(catdir, truth, recs, telescope, filter)
    return truth


def simulate_cube(path: str | Path, n_sources: int, n_epochs: int, *, seed: int = 0,
                  mag_range: tuple[float, float] = (11.0, 19.0), source_chunk: int = 4096, epoch_chunk: int = 64,
                  miss_fraction: float = 0.05, with_magerr: bool = True, client=None,
                  rows_per_task: int | None = None) -> dict[str, np.ndarray]:
    """Write a light-curve cube of constant stars with theory noise straight to Zarr (no
    catalogues): the scale benchmark's input. Rows are generated block by block (memory
    ``rows_per_task x n_epochs``), on ``client`` when given. Returns ``{"mag", "sigma"}``
    per source."""
    import dask

    from ..config import LightcurveConfig
    from ..lightcurves.cube import CubeStore

    cfg = LightcurveConfig(source_chunk=source_chunk, epoch_chunk=epoch_chunk)
    store = CubeStore.create(path, cfg)
    rng = np.random.default_rng(seed)
    lo, hi = mag_range
    mag = lo + (hi - lo) * np.log1p(rng.random(n_sources) * (np.e ** 2 - 1)) / 2
    sig = _theory_sigma(mag)
    r = 0.5 * np.sqrt(rng.random(n_sources))
    th = rng.uniform(0, 2 * np.pi, n_sources)
    store.add_sources({"ra": 150 + r * np.cos(th), "dec": 2 + r * np.sin(th), "ref_id": np.arange(n_sources),
                       "ref_mag": mag.astype(np.float32)})
    t0 = np.datetime64("2023-01-18T13:00:00", "ns").astype(np.int64)
    times = t0 + np.arange(n_epochs, dtype=np.int64) * 330 * 10**9
    store.add_epochs({"exposure": [f"SIM_{k:06d}" for k in range(n_epochs)], "time": times,
                      "mjd_mid": times / 86400e9 + 40587.0, "night": ["2023-01-18"] * n_epochs,
                      "telescope": ["MST2"] * n_epochs, "filter": ["G"] * n_epochs,
                      "zero_point": np.full(n_epochs, 25.0)})
    rows = rows_per_task or source_chunk
    vars_ = ("mag", "magerr") if with_magerr else ("mag",)

    if rows % source_chunk:
        raise ValueError(f"rows_per_task={rows} must be a multiple of source_chunk={source_chunk} (no two tasks "
                         "may write one chunk)")

    def block(s0: int, mag_b: np.ndarray, sig_b: np.ndarray) -> int:
        import zarr

        g = zarr.open_group(str(path), mode="r+", zarr_format=3, use_consolidated=False)
        s1 = s0 + len(mag_b)
        rg = np.random.default_rng([seed, s0])
        m = (mag_b[:, None] + rg.standard_normal((s1 - s0, n_epochs), np.float32)
             * sig_b[:, None]).astype(np.float32)
        if miss_fraction:
            m[rg.random((s1 - s0, n_epochs), np.float32) < miss_fraction] = np.nan
        g["mag"][s0:s1, :] = m
        if with_magerr:
            e = np.broadcast_to(sig_b[:, None].astype(np.float32), m.shape).copy()
            e[np.isnan(m)] = np.nan
            g["magerr"][s0:s1, :] = e
        return s1 - s0

    tasks = [dask.delayed(block)(s0, mag[s0:s0 + rows], sig[s0:s0 + rows]) for s0 in range(0, n_sources, rows)]
    if client is not None:
        client.compute(tasks, sync=True)
    else:
        dask.compute(*tasks, scheduler="synchronous")
    store.mark_written(range(n_epochs))
    store.consolidate()
    return {"mag": mag, "sigma": sig, "vars": np.array(vars_)}
