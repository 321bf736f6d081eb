"""STIR per frame: bias and flat correction, masks, satellite tracks and cosmic rays
(Xiao et al. 2025, sections 3.1.4-3.1.5 and Table 1).

Two ways in:

* lazy, for notebooks: :func:`reduce_frames`, :func:`static_mask`, :func:`track_mask` and
  :func:`cosmic_ray_mask` apply the pure NumPy kernels of :mod:`mstdask._stir_kernels`
  to xarray/Dask frames (``xarray.apply_ufunc(dask="parallelized")``); nothing computes;
* per frame, for bulk runs: :func:`process_frame` runs the whole step on one raw frame
  inside one task and writes its own slot of a reduced store (and optionally a FITS
  file), so a failing frame costs only itself and a rerun does only what is missing.
  The job ``mstdask reduce`` (:mod:`mstdask.jobs.reduce`) schedules these tasks.

Calibration products are found in a ``CALDIR`` written by ``mstdask calibrate`` through its
``manifest.json`` (:func:`find_calibrations`).
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import xarray as xr

from . import _stir_kernels as K
from ..config import CalibConfig, StirConfig
from ..errors import BadInputError, InsufficientDataError, StoreError
from ..masks import MASK_DTYPE, Flag, flag, saturated

__all__ = [
    "CalibSet",
    "find_calibrations",
    "reduce_frames",
    "static_mask",
    "track_mask",
    "cosmic_ray_mask",
    "process_frame",
]


# ----------------------------------------------------------------------------- calibrations
@dataclass(frozen=True)
class CalibSet:
    """The calibration products that reduce one telescope/filter/night.

    Each product is named by its Zarr group in ``CALDIR/calib.zarr`` (``KIND/KEY``), or
    ``""`` when none exists (then its mask bits stay unset and ``notes`` says so).
    """

    caldir: str
    bias: str
    flat: str
    ps: str = ""
    bad: str = ""
    notes: tuple[str, ...] = field(default=())

    def files(self) -> dict[str, str]:
        """FITS file of each product used (for provenance headers)."""
        return {k: os.path.join(self.caldir, f"{g.replace('/', '_', 1)}.fits")
                for k, g in (("bias", self.bias), ("flat", self.flat), ("ps", self.ps), ("bad", self.bad)) if g}


def _days(a: str, b: str) -> int:
    return abs((date.fromisoformat(a) - date.fromisoformat(b)).days)


def find_calibrations(caldir: str | os.PathLike, telescope: str, filter: str, night: str,
                      config: CalibConfig | None = None) -> CalibSet:
    """Choose the calibration products for a science frame of ``telescope``/``filter``/``night``.

    The master bias and master flat of that night when they exist, else the nearest night's
    (the flat within ``flat_max_days``), said in ``notes``; the PS and bad-pixel masks of
    the nearest night of the telescope.

    Raises
    ------
    StoreError
        ``caldir`` has no ``manifest.json`` from ``mstdask calibrate``.
    InsufficientDataError
        No master bias, or no master flat within reach, for this telescope (and filter).
    """
    config = config or CalibConfig()
    caldir = Path(caldir)
    mpath = caldir / "manifest.json"
    if not mpath.exists():
        raise StoreError(f"{caldir}: no manifest.json; make the calibrations with "
                         f"`mstdask calibrate STORE --out {caldir}`")
    products = json.loads(mpath.read_text()).get("products", [])
    notes: list[str] = []

    def pick(kind: str, max_days: float | None = None, same_filter: bool = False) -> str:
        cands = [p for p in products if p.get("kind") == kind and p.get("telescope") == telescope
                 and p.get("zarr_group") and (not same_filter or p.get("filter") == filter)]
        if max_days is not None:
            cands = [p for p in cands if _days(p["night"], night) <= max_days]
        if not cands:
            return ""
        best = min(cands, key=lambda p: (_days(p["night"], night), p["night"]))
        if best["night"] != night:
            notes.append(f"{kind} of {best['night']} used for night {night}")
        return best["zarr_group"].split("calib.zarr/", 1)[1]

    bias = pick("master_bias")
    if not bias:
        raise InsufficientDataError(f"no master bias for {telescope} in {caldir}; take bias frames and run "
                                    "`mstdask calibrate` first")
    flat = pick("master_flat", config.flat_max_days, same_filter=True)
    if not flat:
        raise InsufficientDataError(f"no master flat for {telescope} filter {filter} within "
                                    f"{config.flat_max_days:.0f} days of {night} in {caldir}")
    ps, bad = pick("ps_mask"), pick("bad_pixel_mask")
    if not ps:
        notes.append(f"no PS mask for {telescope}: bit {int(Flag.PEPPER_SALT)} left unset")
    if not bad:
        notes.append(f"no bad-pixel mask for {telescope}: bit {int(Flag.BAD_PIXEL)} left unset")
    return CalibSet(str(caldir), bias, flat, ps, bad, tuple(notes))


@functools.lru_cache(maxsize=4)
def _load(caldir: str, group: str) -> np.ndarray:
    """A calibration product as NumPy, cached per worker process: every frame of a night
    uses the same few products, and reading a full-frame master costs ~0.3 s."""
    import zarr

    kind = group.split("/", 1)[0]
    arr = zarr.open_array(store=os.path.join(caldir, "calib.zarr"), path=f"{group}/{kind}", mode="r")
    return np.asarray(arr[...])


# ----------------------------------------------------------------------------- lazy API
def reduce_frames(raw: xr.DataArray, bias: xr.DataArray, flat: xr.DataArray) -> xr.DataArray:
    """Lazy ``(raw - bias) / flat`` as float32 (NaN where the flat is not positive)."""
    out = xr.apply_ufunc(K.reduce_frame, raw, bias, flat, dask="parallelized", output_dtypes=[np.float32])
    return out.rename("data")


def static_mask(raw: xr.DataArray, bad: xr.DataArray | None = None, ps: xr.DataArray | None = None,
                saturation_adu: float = 50000.0) -> xr.DataArray:
    """Lazy mask bits known before looking at the sky: bad (1), saturated (2), PS (4).

    ``bad`` and ``ps`` are the calibration masks (their own bit values, or booleans).
    """
    m = saturated(raw, saturation_adu)
    if bad is not None:
        m = m | flag(bad, Flag.BAD_PIXEL)
    if ps is not None:
        m = m | flag(ps, Flag.PEPPER_SALT)
    return m.rename("mask")


def _whole_frames(a: xr.DataArray) -> xr.DataArray:
    # track and cosmic-ray finding look at whole frames: one frame per chunk, explicitly
    return a.chunk({"y": -1, "x": -1, **({"frame": 1} if "frame" in a.dims else {})}) if a.chunks else a


def track_mask(data: xr.DataArray, mask: xr.DataArray | None = None,
               config: StirConfig | None = None) -> xr.DataArray:
    """Lazy satellite/aircraft-track bit (8) of reduced frames (rechunked to whole frames).

    ``mask`` (nonzero = ignore) keeps bad, saturated and PS pixels out of the line search.
    """
    config = config or StirConfig()

    def kernel(img, m):
        return flag(K.detect_tracks(img, m != 0, config)[0], Flag.SATELLITE_TRACK)

    m = xr.zeros_like(data, dtype=MASK_DTYPE) if mask is None else mask
    return xr.apply_ufunc(kernel, _whole_frames(data), _whole_frames(m), input_core_dims=[["y", "x"]] * 2,
                          output_core_dims=[["y", "x"]], vectorize=True, dask="parallelized",
                          output_dtypes=[MASK_DTYPE]).rename("track_mask")


def cosmic_ray_mask(data: xr.DataArray, mask: xr.DataArray | None = None, gain: float | None = None,
                    read_noise_e: float | None = None, config: StirConfig | None = None) -> xr.DataArray:
    """Lazy cosmic-ray bit (16) of reduced frames (rechunked to whole frames).

    ``gain`` (e-/ADU) and ``read_noise_e`` default to the config's (the camera paper's values).
    """
    config = config or StirConfig()
    gain = config.gain_e_per_adu if gain is None else gain
    read_noise_e = config.read_noise_e if read_noise_e is None else read_noise_e

    def kernel(img, m):
        return flag(K.detect_cosmic_rays(img, m != 0, gain, read_noise_e, config), Flag.COSMIC_RAY)

    m = xr.zeros_like(data, dtype=MASK_DTYPE) if mask is None else mask
    return xr.apply_ufunc(kernel, _whole_frames(data), _whole_frames(m), input_core_dims=[["y", "x"]] * 2,
                          output_core_dims=[["y", "x"]], vectorize=True, dask="parallelized",
                          output_dtypes=[MASK_DTYPE]).rename("cosmic_ray_mask")


# ----------------------------------------------------------------------------- per frame
def process_frame(raw_store: str, raw_index: int, path: str, out_store: str, out_index: int, calib: CalibSet,
                  config: StirConfig, gain: float, saturation_adu: float = 50000.0,
                  fits_path: str | None = None) -> dict:
    """The whole STIR step for one raw frame (``path``: its file, for messages), inside one task.

    Reads the frame and its calibrations, reduces it, builds the mask (bad, saturated, PS,
    tracks, cosmic rays), writes slot ``out_index`` of the reduced store and, when
    ``fits_path`` is given, a FITS file with SCI and MASK extensions.

    Returns
    -------
    dict
        ``out_index``, ``n_tracks``, ``track_pixels``, ``cosmic_ray_pixels``,
        ``masked_fraction``, ``lines`` (the track centrelines) and ``seconds``.
    """
    import zarr

    t0 = time.perf_counter()
    rawarr = zarr.open_array(store=raw_store, path="raw", mode="r")
    raw = np.asarray(rawarr[raw_index])
    bias = _load(calib.caldir, calib.bias)
    flat = _load(calib.caldir, calib.flat)
    if bias.shape != raw.shape or flat.shape != raw.shape:
        raise BadInputError(path, f"frame is {raw.shape} but the calibrations in {calib.caldir} are "
                                  f"{bias.shape}; calibrate the same camera's frames")
    data = K.reduce_frame(raw, bias, flat)
    mask = saturated(raw, saturation_adu)
    if calib.bad:
        mask |= flag(_load(calib.caldir, calib.bad), Flag.BAD_PIXEL)
    if calib.ps:
        mask |= flag(_load(calib.caldir, calib.ps), Flag.PEPPER_SALT)
    mask |= flag(~np.isfinite(data), Flag.BAD_PIXEL)  # no flat response there
    # one background grid serves both detectors (0.8 s per full frame)
    bkg = K.estimate_background(data, mask != 0, config) if (config.tracks or config.cosmic_rays) else None
    tracks, lines = np.zeros(raw.shape, bool), []
    if config.tracks:
        tracks, lines = K.detect_tracks(data, mask != 0, config, background=bkg)
        mask |= flag(tracks, Flag.SATELLITE_TRACK)
    crs = np.zeros(raw.shape, bool)
    if config.cosmic_rays:
        crs = K.detect_cosmic_rays(data, mask != 0, gain, config.read_noise_e, config, background=bkg)
        mask |= flag(crs, Flag.COSMIC_RAY)

    out = zarr.open_group(out_store, mode="r+")
    out["data"][out_index] = data
    out["mask"][out_index] = mask
    stats = {"out_index": out_index, "path": path, "n_tracks": len(lines), "track_pixels": int(tracks.sum()),
             "cosmic_ray_pixels": int(crs.sum()), "masked_fraction": float((mask != 0).mean()),
             "lines": [{k: (float(v) if np.isscalar(v) and not isinstance(v, str) else v) for k, v in ln.items()}
                       for ln in lines]}
    if fits_path:
        header = str(zarr.open_array(store=raw_store, path="header", mode="r")[raw_index])
        _write_fits(fits_path, data, mask, header, path, calib, stats, config)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _write_fits(fits_path: str, data: np.ndarray, mask: np.ndarray, raw_header: str, raw_path: str,
                calib: CalibSet, stats: dict, config: StirConfig) -> None:
    """SCI + MASK FITS of one reduced frame, with the raw header and the provenance."""
    from astropy.io import fits

    from .. import __version__

    try:
        hdr = fits.Header.fromstring(raw_header, sep="\n" if "\n" in raw_header else "")
    except Exception:  # an unparsable stored header must not lose the frame
        hdr = fits.Header()
    for key in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BZERO", "BSCALE"):
        hdr.remove(key, ignore_missing=True, remove_all=True)
    hdr["RAWFILE"] = (os.path.basename(raw_path), "raw frame reduced")
    for key, label in (("bias", "BIASFILE"), ("flat", "FLATFILE"), ("ps", "PSFILE"), ("bad", "BPMFILE")):
        f = calib.files().get(key)
        if f:
            hdr[label] = (os.path.basename(f), f"{key} calibration used")
    hdr["NTRACKS"] = (stats["n_tracks"], "satellite/aircraft tracks found")
    hdr["NTRKPIX"] = (stats["track_pixels"], "pixels flagged as track (bit 8)")
    hdr["NCRPIX"] = (stats["cosmic_ray_pixels"], "pixels flagged as cosmic ray (bit 16)")
    hdr["SOFTWARE"] = f"mstdask {__version__}"
    hdr["HISTORY"] = "mstdask reduce: (raw - master bias) / master flat; mask bits as MST Table 1"
    for note in calib.notes:
        hdr["HISTORY"] = note[:70]
    primary = fits.PrimaryHDU(header=hdr)
    sci = fits.ImageHDU(data=data, name="SCI")
    sci.header["BUNIT"] = "adu"
    msk = fits.ImageHDU(data=mask, name="MASK")
    for f in Flag:
        msk.header[f"MASKB{int(f).bit_length() - 1}"] = (int(f), f.name.lower())
    Path(fits_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(fits_path).with_name(f".{Path(fits_path).name}.tmp")
    fits.HDUList([primary, sci, msk]).writeto(tmp, overwrite=True)
    os.replace(tmp, fits_path)
