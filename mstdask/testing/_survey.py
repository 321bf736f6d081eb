"""Write whole simulated data sets to disk: MST survey nights and the camera lab plan.

* :func:`write_survey` follows the nightly routine of the MST pipeline paper (Xiao et al.
  2025, papers/000 Sect. 3.1): 10 bias frames and ~20 twilight flats of ~20000 ADU at the
  start of each night, science frames through the night, darks, and on one night the
  100-bias sequence used to define PS pixels (Sect. 3.1.3).
* :func:`write_lab_set` follows the laboratory exposure plan of Table 2 of the camera
  paper (Zhang et al. 2025, papers/002): 100 bias, flats over 0.01-8.1 s from a stable
  source giving 20000-40000 ADU at 2 s, 144 flats at 2 s, darks of 0.01-600 s.

Frames are written one at a time as they are made; only small truth is kept in memory.
"""

from __future__ import annotations

import csv
import os
import zlib
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from astropy.table import Table

from ._camera import DEFAULT_FIELD, Camera, CameraModel, FrameTruth, frame_checksum, make_camera
from ._fits import SITE, fits_header, write_fits
from ._sky import airmass_at, make_star_catalog, zenith_radec

__all__ = ["DEFAULT_FILTERS", "LabTruth", "SurveyTruth", "write_lab_set", "write_survey"]

#: Filters of the three MST telescopes (pipeline paper Sect. 2.2).
DEFAULT_FILTERS = {"MST1": "i", "MST2": "g", "MST3": "r"}

# Frames with at most this many pixels keep their per-pixel truth maps by default.
_SMALL_NPIX = 1_000_000

_KIND_CODE = {"bias": 1, "flat": 2, "dark": 3, "science": 4, "ps": 5}


@dataclass
class _TruthSet:
    """Common part of :class:`SurveyTruth` and :class:`LabTruth`."""

    outdir: Path
    frames: list[FrameTruth]

    def select(self, kind: str | None = None, telescope: str | None = None, night: str | None = None,
               sequence: str | None = None) -> list[FrameTruth]:
        """Frames matching all given criteria, in time order.

        Parameters
        ----------
        kind : {'bias', 'dark', 'flat', 'science'}, optional
        telescope : str, optional
        night : str, optional
            ``YYYYMMDD``.
        sequence : str, optional
            'nightly', 'ps', 'lab-ladder', 'lab-series' or 'lab'.
        """
        out = [f for f in self.frames
               if (kind is None or f.kind == kind) and (telescope is None or f.telescope == telescope)
               and (night is None or f.night == night) and (sequence is None or f.sequence == sequence)]
        return sorted(out, key=lambda f: (f.mjd_obs or 0.0, str(f.path)))

    def paths(self, **criteria: str | None) -> list[Path]:
        """Paths of :meth:`select` (same keyword arguments)."""
        return [f.path for f in self.select(**criteria) if f.path is not None]


@dataclass
class SurveyTruth(_TruthSet):
    """Ground truth of a simulated survey written by :func:`write_survey`.

    Attributes
    ----------
    outdir : pathlib.Path
        Root folder; one ``YYYYMMDD`` sub-folder per night.
    frames : list of FrameTruth
        Every written frame, in time order.
    nights : list of str
        Night folder names ``YYYYMMDD`` (local evening dates).
    night_indices : dict of str to int
        Days since the first night (drives the PRNU drift).
    telescopes : tuple of str
        Telescopes simulated.
    filters : dict of str to str
        Filter of each telescope.
    cameras : dict of str to Camera
        Camera of each telescope, with all static truth maps (rebuilt lazily on access
        when they were dropped to save memory).
    field_name : str
        Science field name (OBJECT of science frames).
    field_center : (float, float)
        Commanded pointing in degrees.
    catalog : astropy.table.Table
        Reference stars (``ra, dec, mag, mag_<filter>``).
    refcat_path : pathlib.Path
        CSV copy of the catalogue.
    frames_csv : pathlib.Path
        Per-frame scalar truth as CSV.
    ps_night : str or None
        Night holding the PS bias sequence.
    seed : int
        Master seed.
    """

    nights: list[str] = field(default_factory=list)
    night_indices: dict[str, int] = field(default_factory=dict)
    telescopes: tuple[str, ...] = ()
    filters: dict[str, str] = field(default_factory=dict)
    cameras: dict[str, Camera] = field(default_factory=dict, repr=False)
    field_name: str = "f02"
    field_center: tuple[float, float] = DEFAULT_FIELD
    catalog: Table | None = field(default=None, repr=False)
    refcat_path: Path | None = None
    frames_csv: Path | None = None
    ps_night: str | None = None
    seed: int = 0


@dataclass
class LabTruth(_TruthSet):
    """Ground truth of the lab exposure plan written by :func:`write_lab_set`.

    Attributes
    ----------
    outdir : pathlib.Path
        Folder holding all frames.
    frames : list of FrameTruth
        Every frame; flats of the exposure ladder have sequence 'lab-ladder', the
        same-exposure series 'lab-series', bias and darks 'lab'.
    camera : Camera
        The camera with its truth maps.
    rate_adu_per_s : float
        Light-source signal at the frame centre in ADU/s (at the median gain).
    flat_exptimes : list of float
        Exposure times of the ladder (each taken ``flats_per_level`` times).
    series_exptime : float
        Exposure time of the series of identical flats.
    dark_exptimes : list of float
        Exposure times of the darks.
    frames_csv : pathlib.Path
        Per-frame scalar truth as CSV.
    """

    camera: Camera | None = field(default=None, repr=False)
    rate_adu_per_s: float = 0.0
    flat_exptimes: list[float] = field(default_factory=list)
    series_exptime: float = 2.0
    dark_exptimes: list[float] = field(default_factory=list)
    frames_csv: Path | None = None


def _camera_seed(seed: int, telescope: str) -> int:
    """Stable per-telescope camera seed (independent of the order of ``telescopes``)."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(telescope.encode())]).generate_state(1)[0])


def _night_list(nights: int | Sequence[str], start_night: str) -> list[date]:
    if isinstance(nights, (int, np.integer)):
        if nights < 1:
            raise ValueError(f"nights={nights} must be >= 1")
        first = _parse_night(start_night)
        return [first + timedelta(days=i) for i in range(int(nights))]
    out = sorted({_parse_night(n) for n in nights})
    if not out:
        raise ValueError("nights is empty")
    return out


def _parse_night(text: str | date) -> date:
    if isinstance(text, date):
        return text
    t = str(text).strip()
    try:
        return datetime.strptime(t, "%Y%m%d").date() if len(t) == 8 else date.fromisoformat(t)
    except ValueError:
        raise ValueError(f"night {text!r} is not YYYY-MM-DD or YYYYMMDD") from None


def _local_to_utc(night: date, hour: float) -> datetime:
    """UTC time of a local (UTC+8) clock time on the evening of ``night`` (hours may pass 24)."""
    local = datetime(night.year, night.month, night.day) + timedelta(hours=hour)
    return local - timedelta(hours=SITE["utc_offset_hours"])


def _write_frames_csv(path: Path, frames: Iterable[FrameTruth], root: Path) -> Path:
    rows = []
    for f in frames:
        row = f.summary()
        if row.get("path"):
            row["path"] = os.path.relpath(row["path"], root)
        rows.append(row)
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_truth_maps(camera: Camera, folder: Path) -> None:
    """Static camera maps as float32/uint8 FITS images (for benchmarks against truth)."""
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    tel = camera.model.telescope
    maps = {"bias_map": camera.bias_map, "expected_bias_map": camera.expected_bias_map,
            "read_noise_map": camera.read_noise_map, "gain_map": camera.gain_map,
            "dark_map": camera.dark_map, "prnu_base": camera.prnu_base, "vignetting": camera.vignetting,
            "ps_map": camera.ps_map.astype(np.uint8), "bad_pixel_map": camera.bad_pixel_map.astype(np.uint8)}
    for name, data in maps.items():
        fits.PrimaryHDU(data=data).writeto(folder / f"{tel}_{name}.fits", overwrite=True)


def _check_survey_options(night_dates: list[date], ps_bias_night: int | None, counts: dict[str, int],
                          exptime: float, dark_exptime: float, overhead: float, track_probability: float) -> None:
    """Reject impossible :func:`write_survey` options before anything is written."""
    for name, value in counts.items():
        if int(value) < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    if exptime <= 0 or dark_exptime < 0 or overhead < 0:
        raise ValueError("exptime must be > 0, dark_exptime and overhead >= 0")
    if not 0.0 <= track_probability <= 1.0:
        raise ValueError(f"track_probability={track_probability} must be in [0, 1]")
    if ps_bias_night is not None and not 0 <= ps_bias_night < len(night_dates):
        raise ValueError(f"ps_bias_night={ps_bias_night} is not a night index (0..{len(night_dates) - 1})")


def _telescope_filters(telescopes: Sequence[str],
                       filters: dict[str, str] | None) -> tuple[tuple[str, ...], dict[str, str]]:
    """The telescopes (unique) and the filter of each (defaults: :data:`DEFAULT_FILTERS`)."""
    telescopes = tuple(telescopes)
    if not telescopes or len(set(telescopes)) != len(telescopes):
        raise ValueError(f"telescopes={telescopes} must be non-empty and unique")
    filt = dict(DEFAULT_FILTERS)
    filt.update(filters or {})
    missing = [t for t in telescopes if t not in filt]
    if missing:
        raise ValueError(f"no filter for telescope(s) {missing}; pass filters={{...}}")
    return telescopes, filt


def _survey_catalog(catalog: Table | None, base: CameraModel, field_center: tuple[float, float],
                    pointing_jitter_arcsec: float, star_density: float, mag_range: tuple[float, float],
                    bands: tuple[str, ...], seed: int) -> Table:
    """The given catalogue, checked, or a random one covering every pointing (frame diagonal
    + jitter margin)."""
    if catalog is None:
        ny, nx = base.shape
        scale = base.pixel_scale_arcsec / 3600.0
        margin = 6 * pointing_jitter_arcsec / 3600.0 + 40 * scale
        catalog = make_star_catalog(field_center[0], field_center[1], nx * scale * 1.05 + 2 * margin,
                                    ny * scale * 1.05 + 2 * margin, density_per_deg2=star_density,
                                    mag_range=mag_range, filters=bands, rng=np.random.default_rng([seed, 99]))
    for col in ("ra", "dec", "mag"):
        if col not in catalog.colnames:
            raise ValueError(f"catalog lacks column {col!r}")
    return catalog


@dataclass
class _Survey:
    """One :func:`write_survey` call: the checked options, and every frame written so far
    (their number seeds each frame's header noise)."""

    outdir: Path
    seed: int
    night_dates: list[date]
    telescopes: tuple[str, ...]
    filters: dict[str, str]
    base: CameraModel
    catalog: Table
    keep_maps: bool | None
    imagetyp_style: str
    write_truth_maps: bool
    ps_bias_night: int | None
    n_ps_bias: int
    n_bias: int
    n_flat: int
    flat_level: float
    n_bad_flats: int
    n_science: int
    exptime: float
    overhead: float
    field_name: str
    field_center: tuple[float, float]
    pointing_jitter_arcsec: float
    seeing_scatter: float
    transparency_scatter: float
    track_probability: float
    cosmic_rays: bool | float
    write_wcs: bool
    n_dark: int
    dark_exptime: float
    frames: list[FrameTruth] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keep = self.base.npix <= _SMALL_NPIX if self.keep_maps is None else bool(self.keep_maps)
        self.night_names = [d.strftime("%Y%m%d") for d in self.night_dates]
        self.night_index = {n: (d - self.night_dates[0]).days for n, d in zip(self.night_names, self.night_dates)}
        self.ps_name = (self.night_names[self.ps_bias_night]
                        if self.ps_bias_night is not None and self.n_ps_bias > 0 else None)

    def write(self) -> SurveyTruth:
        """The reference catalogue, every telescope's nights, then the truth table."""
        refcat_path = self.outdir / "refcat.csv"
        self.catalog.write(refcat_path, format="ascii.csv", overwrite=True)
        cameras = {tel: self._write_telescope(tel) for tel in self.telescopes}
        frames = sorted(self.frames, key=lambda f: (f.mjd_obs or 0.0, f.telescope))
        frames_csv = _write_frames_csv(self.outdir / "truth_frames.csv", frames, self.outdir)
        return SurveyTruth(outdir=self.outdir, frames=frames, nights=self.night_names,
                           night_indices=self.night_index, telescopes=self.telescopes,
                           filters={t: self.filters[t] for t in self.telescopes}, cameras=cameras,
                           field_name=self.field_name,
                           field_center=(float(self.field_center[0]), float(self.field_center[1])),
                           catalog=self.catalog, refcat_path=refcat_path, frames_csv=frames_csv,
                           ps_night=self.ps_name, seed=int(self.seed))

    def _write_telescope(self, tel: str) -> Camera:
        """Every night of one telescope; returns its camera."""
        filt = self.filters[tel]
        tmodel = replace(self.base, telescope=tel, filter=filt)
        camera = make_camera(tmodel, _camera_seed(self.seed, tel))
        mag_col = f"mag_{filt}" if f"mag_{filt}" in self.catalog.colnames else "mag"
        stars = {"ra": np.asarray(self.catalog["ra"], float), "dec": np.asarray(self.catalog["dec"], float),
                 "mag": np.asarray(self.catalog[mag_col], float)}
        tel_code = zlib.crc32(tel.encode()) % 100000
        for name, evening in zip(self.night_names, self.night_dates):
            _Night(self, tel, tmodel, camera, stars, tel_code, name, evening, self.night_index[name]).write()
        if self.write_truth_maps:
            _write_truth_maps(camera, self.outdir / "truth")
        if self.base.npix > _SMALL_NPIX:
            camera.clear_cache()  # bounded memory: maps are rebuilt identically on demand
        return camera


@dataclass
class _Night:
    """One telescope's night of a :class:`_Survey`, written frame by frame in time order.

    Every frame draws from its own generator (:meth:`rng`); only the timestamps share the
    night's jitter generator, so the steps must run in the order of :meth:`write`.
    """

    survey: _Survey
    tel: str
    tmodel: CameraModel
    camera: Camera
    stars: dict[str, np.ndarray]
    tel_code: int
    name: str
    evening: date
    nidx: int

    def __post_init__(self) -> None:
        self.folder = self.survey.outdir / self.name
        # Small per-frame time jitter gives realistic non-round timestamps.
        self.jit = np.random.default_rng([self.survey.seed, self.tel_code, self.nidx, 0])

    def rng(self, kind: str, i: int) -> np.random.Generator:
        """The generator of frame ``i`` of one kind."""
        return np.random.default_rng([self.survey.seed, self.tel_code, self.nidx, _KIND_CODE[kind], i])

    def emit(self, data: np.ndarray, truth: FrameTruth, kind: str, fname: str, when: datetime,
             sequence: str = "nightly", ra: float | None = None, dec: float | None = None,
             object_name: str | None = None, airmass: float | None = None, wcs=None) -> None:
        """Write one frame with its header and record its truth."""
        s = self.survey
        if ra is None:
            ra, dec = zenith_radec(when, SITE["lat"], SITE["lon"])
        trng = np.random.default_rng([s.seed, self.tel_code, self.nidx, 77, len(s.frames)])
        header = fits_header(self.tmodel, kind, when, truth.exptime, object_name=object_name or kind,
                             ra=ra, dec=dec, ccd_temp=self.tmodel.ccd_temp_c + float(trng.normal(0, 0.05)),
                             airmass=airmass, wcs=wcs, imagetyp_style=s.imagetyp_style)
        path = write_fits(self.folder / fname, data, header)
        truth.path, truth.night, truth.header = path, self.name, header
        truth.checksum = frame_checksum(data)
        truth.date_obs, truth.mjd_obs = header["DATE-OBS"], float(header["MJD-OBS"])
        truth.sequence, truth.object_name = sequence, header["OBJECT"]
        truth.night_index = self.nidx
        if not s.keep:
            truth.drop_maps()
            truth.stars = None
        s.frames.append(truth)

    def write(self) -> None:
        """The nightly routine: bias, twilight flats, science, darks, then the PS biases."""
        jit, evening = self.jit, self.evening
        t = self._biases(_local_to_utc(evening, 18 + 40 / 60) + timedelta(seconds=float(jit.uniform(0, 30))))
        t = self._flats(max(t, _local_to_utc(evening, 18.75)) + timedelta(seconds=float(jit.uniform(0, 20))))
        t = self._science(max(t, _local_to_utc(evening, 19.5)) + timedelta(seconds=float(jit.uniform(0, 10))))
        # Darks with the dust cap on, then the PS bias sequence.
        t = self._darks(t + timedelta(minutes=10))
        if self.name == self.survey.ps_name:
            self._ps_biases(t + timedelta(minutes=5))

    def _biases(self, t: datetime) -> datetime:
        for i in range(self.survey.n_bias):
            data, truth = self.camera.bias(self.rng("bias", i))
            self.emit(data, truth, "bias", f"{self.tel}_bias_{i + 1:04d}.fits", t)
            t += timedelta(seconds=3.0 + float(self.jit.uniform(0, 0.5)))
        return t

    def _flats(self, t: datetime) -> datetime:
        """Twilight flats: levels scatter around flat_level as the sky fades."""
        s = self.survey
        levels = list(s.flat_level * np.clip(np.exp(self.jit.normal(0.0, 0.1, s.n_flat)), 0.7, 1.4))
        levels += [2500.0 if k % 2 == 0 else 55000.0 for k in range(s.n_bad_flats)]
        for i, level in enumerate(levels):
            fexp = round(float(self.jit.uniform(1.0, 6.0)), 3)
            data, truth = self.camera.flat(level, self.nidx, self.rng("flat", i), exptime=fexp, masks=s.keep)
            self.emit(data, truth, "flat", f"{self.tel}_flat_{i + 1:04d}.fits", t)
            t += timedelta(seconds=fexp + 6.0 + float(self.jit.uniform(0, 1)))
        return t

    def _science(self, t: datetime) -> datetime:
        """Science through the night: pointing, seeing, transparency, sky and tracks vary."""
        s, tmodel, (ra0, dec0) = self.survey, self.tmodel, self.survey.field_center
        for i in range(s.n_science):
            frng = self.rng("science", i)
            cosd = np.cos(np.deg2rad(dec0))
            ra = ra0 + frng.normal(0.0, s.pointing_jitter_arcsec) / 3600.0 / max(cosd, 1e-3)
            dec = dec0 + frng.normal(0.0, s.pointing_jitter_arcsec) / 3600.0
            seeing = tmodel.seeing_arcsec * float(np.exp(frng.normal(0.0, s.seeing_scatter)))
            transp = float(np.clip(1.0 - abs(frng.normal(0.0, s.transparency_scatter)), 0.3, 1.0))
            sky = tmodel.sky_brightness + float(frng.normal(0.0, 0.1))
            _, airmass = airmass_at(ra, dec, t, SITE["lat"], SITE["lon"])
            n_tracks = int(frng.random() < s.track_probability) + int(frng.random() < s.track_probability * 0.1)
            data, truth = self.camera.science(s.exptime, ra, dec, self.stars, frng, night_index=self.nidx,
                                              tracks=n_tracks, cosmic_rays=s.cosmic_rays, seeing_arcsec=seeing,
                                              transparency=transp, airmass=max(airmass, 1.0), sky_mag=sky,
                                              masks=s.keep)
            truth.header_pointing = (float(ra0), float(dec0))
            self.emit(data, truth, "science", f"{self.tel}_sci_{i + 1:04d}.fits", t, ra=ra0, dec=dec0,
                      object_name=s.field_name, airmass=max(airmass, 1.0), wcs=truth.wcs if s.write_wcs else None)
            t += timedelta(seconds=s.exptime + s.overhead + float(self.jit.uniform(0, 2)))
        return t

    def _darks(self, t: datetime) -> datetime:
        s = self.survey
        for i in range(s.n_dark):
            data, truth = self.camera.dark(s.dark_exptime, self.rng("dark", i), cosmic_rays=s.cosmic_rays,
                                           masks=s.keep)
            self.emit(data, truth, "dark", f"{self.tel}_dark_{i + 1:04d}.fits", t)
            t += timedelta(seconds=s.dark_exptime + 5.0 + float(self.jit.uniform(0, 1)))
        return t

    def _ps_biases(self, t: datetime) -> datetime:
        for i in range(self.survey.n_ps_bias):
            data, truth = self.camera.bias(self.rng("ps", i))
            self.emit(data, truth, "bias", f"{self.tel}_psbias_{i + 1:04d}.fits", t, sequence="ps")
            t += timedelta(seconds=12.0 + float(self.jit.uniform(0, 0.5)))
        return t


def write_survey(
    outdir: str | os.PathLike, nights: int | Sequence[str] = 2, start_night: str = "2023-01-18",
    shape: tuple[int, int] = (640, 960), *, n_bias: int = 10, n_flat: int = 20, n_dark: int = 3,
    dark_exptime: float = 300.0, n_science: int = 4, exptime: float = 300.0, overhead: float = 30.0,
    ps_bias_night: int | bool | None = 0, n_ps_bias: int = 100, telescopes: Sequence[str] = ("MST2",),
    filters: dict[str, str] | None = None, field: str = "f02", field_center: tuple[float, float] = DEFAULT_FIELD,
    model: CameraModel | None = None, catalog: Table | None = None, star_density: float = 10000.0,
    mag_range: tuple[float, float] = (10.0, 20.0), flat_level: float = 20000.0, n_bad_flats: int = 0,
    track_probability: float = 0.25, cosmic_rays: bool | float = True, pointing_jitter_arcsec: float = 3.0,
    seeing_scatter: float = 0.1, transparency_scatter: float = 0.03, keep_maps: bool | None = None,
    write_wcs: bool = False, imagetyp_style: str = "maxim", write_truth_maps: bool = False, seed: int = 0,
) -> SurveyTruth:
    """Simulate and write MST observing nights.

    Each night folder ``outdir/YYYYMMDD/`` (local evening date) holds, per telescope::

        {TEL}_bias_NNNN.fits     n_bias bias frames          ~18:40 local
        {TEL}_flat_NNNN.fits     n_flat twilight flats       ~18:45 local (dusk)
        {TEL}_sci_NNNN.fits      n_science light frames      from 19:30, every exptime+overhead
        {TEL}_dark_NNNN.fits     n_dark darks (dust cap)     after the science
        {TEL}_psbias_NNNN.fits   n_ps_bias bias, PS night only, after the darks

    Xinglong is UTC+8, so the evening of night D starts ~D 10:40 UTC; frames after local
    midnight still belong to night D. ``outdir/refcat.csv`` holds the reference catalogue
    (``ra, dec, mag`` with ``mag`` in the first telescope's filter, plus ``mag_<filter>``
    per filter) and ``outdir/truth_frames.csv`` one row of scalar truth per frame.

    Parameters
    ----------
    outdir : path-like
        Output root (created).
    nights : int or sequence of str
        Number of consecutive nights from ``start_night``, or explicit night dates.
    start_night : str
        First night, ``YYYY-MM-DD`` or ``YYYYMMDD``.
    shape : (int, int)
        Frame shape ``(ny, nx)``; ``(6388, 9576)`` for the real sensor.
    n_bias, n_flat, n_dark, n_science : int
        Frames per night and telescope.
    dark_exptime, exptime : float
        Dark and science exposure times (s).
    overhead : float
        Seconds between the end of one science exposure and the next start.
    ps_bias_night : int, bool or None
        Index (into the night list) of the night with the PS bias sequence; True means
        the first night, None or False none.
    n_ps_bias : int
        Length of the PS bias sequence.
    telescopes : sequence of str
        Telescope names (MST1, MST2, MST3 or others with ``filters`` given).
    filters : dict, optional
        Filter per telescope; default MST1 i, MST2 g, MST3 r.
    field, field_center : str, (float, float)
        Science field name and commanded pointing (degrees).
    model : CameraModel, optional
        Base camera model; its telescope, filter and shape are replaced per telescope.
    catalog : astropy.table.Table, optional
        Own star catalogue (``ra, dec, mag`` and optionally ``mag_<filter>``); default a
        random one (:func:`make_star_catalog`) covering the field with margin.
    star_density, mag_range : float, (float, float)
        Parameters of the random catalogue.
    flat_level : float
        Mean twilight-flat level in ADU; each flat scatters by ~10 %.
    n_bad_flats : int
        Additionally make this many flats per night that are under- (2500 ADU) or
        over-exposed (55000 ADU), alternately, for testing flat rejection.
    track_probability : float
        Chance that a science frame has a satellite track.
    cosmic_rays : bool or float
        Cosmic rays in darks, flats and science frames (float: events/px/s).
    pointing_jitter_arcsec : float
        Rms pointing error per axis.
    seeing_scatter, transparency_scatter : float
        Log-normal seeing scatter and half-normal transparency loss per frame.
    keep_maps : bool, optional
        Keep per-frame truth maps and star tables in memory; default only for frames of
        at most 1 Mpx.
    write_wcs : bool
        Write the true TAN-SIP WCS into science headers (raw cameras do not).
    imagetyp_style : {'maxim', 'nina'}
        IMAGETYP spelling.
    write_truth_maps : bool
        Also write the static camera maps to ``outdir/truth/``.
    seed : int
        Master seed: the same seed writes identical files.

    Returns
    -------
    SurveyTruth
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    night_dates = _night_list(nights, start_night)
    if isinstance(ps_bias_night, bool):  # bool is an int: True must not mean night 1
        ps_bias_night = 0 if ps_bias_night else None
    _check_survey_options(night_dates, ps_bias_night, dict(n_bias=n_bias, n_flat=n_flat, n_dark=n_dark,
                          n_science=n_science, n_ps_bias=n_ps_bias, n_bad_flats=n_bad_flats),
                          exptime, dark_exptime, overhead, track_probability)
    telescopes, filt = _telescope_filters(telescopes, filters)
    base = replace(model if model is not None else CameraModel(), shape=tuple(shape))
    catalog = _survey_catalog(catalog, base, field_center, pointing_jitter_arcsec, star_density, mag_range,
                              tuple(dict.fromkeys(filt[t] for t in telescopes)), seed)
    return _Survey(
        outdir=outdir, seed=seed, night_dates=night_dates, telescopes=telescopes, filters=filt, base=base,
        catalog=catalog, keep_maps=keep_maps, imagetyp_style=imagetyp_style, write_truth_maps=write_truth_maps,
        ps_bias_night=ps_bias_night, n_ps_bias=n_ps_bias, n_bias=n_bias, n_flat=n_flat, flat_level=flat_level,
        n_bad_flats=n_bad_flats, n_science=n_science, exptime=exptime, overhead=overhead, field_name=field,
        field_center=field_center, pointing_jitter_arcsec=pointing_jitter_arcsec, seeing_scatter=seeing_scatter,
        transparency_scatter=transparency_scatter, track_probability=track_probability, cosmic_rays=cosmic_rays,
        write_wcs=write_wcs, n_dark=n_dark, dark_exptime=dark_exptime,
    ).write()


# --------------------------------------------------------------------------- lab set

def _arange(lo: float, hi: float, step: float) -> list[float]:
    n = int(round((hi - lo) / step)) + 1
    return [round(lo + i * step, 6) for i in range(n)]


#: Flat exposure ladder of Table 2 of the camera paper (seconds), one list per row.
LAB_FLAT_ROWS: tuple[list[float], ...] = (
    _arange(0.01, 0.10, 0.01), _arange(0.1, 0.9, 0.1), _arange(0.9, 0.99, 0.01),
    _arange(0.99, 0.999, 0.001), [1.0], _arange(1.001, 1.010, 0.001), _arange(1.01, 4.00, 0.01),
    _arange(4.0, 8.1, 0.1),
)

#: Dark exposure times of Table 2 of the camera paper (seconds), one list per row.
LAB_DARK_ROWS: tuple[list[float], ...] = (
    _arange(0.01, 0.1, 0.01), _arange(0.1, 1.0, 0.1), [1.0], [1.001], [1.002], [2.0], [5.0], [10.0], [20.0],
    _arange(50.0, 600.0, 50.0),
)


def _thin(values: Sequence[float], scale: float, min_n: int) -> list[float]:
    """Evenly spaced subset of about ``scale * len(values)`` (at least ``min_n``) items."""
    n = len(values)
    k = min(n, max(int(min_n), int(round(n * scale))))
    if k == 0:
        return []
    picks = np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))
    return [values[i] for i in picks]


@dataclass
class _Lab:
    """One :func:`write_lab_set` call: the camera, the clock and every frame written so far.

    Frames draw from their own generators; only the timestamps share ``jit``, so the
    sequences must run in the order of :func:`write_lab_set` (Table 2's order).
    """

    outdir: Path
    tmodel: CameraModel
    camera: Camera
    keep: bool
    imagetyp_style: str
    seed: int
    cosmic_rays: bool | float
    t: datetime
    frames: list[FrameTruth] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tel = self.tmodel.telescope
        self.jit = np.random.default_rng([self.seed, 4242])

    def emit(self, data: np.ndarray, truth: FrameTruth, kind: str, fname: str, sequence: str) -> None:
        """Write one frame at the current time and record its truth."""
        header = fits_header(self.tmodel, kind, self.t, truth.exptime, object_name=f"lab {kind}",
                             imagetyp_style=self.imagetyp_style, observatory="NAOC detector lab")
        path = write_fits(self.outdir / fname, data, header)
        truth.path, truth.header, truth.sequence = path, header, sequence
        truth.checksum = frame_checksum(data)
        truth.date_obs, truth.mjd_obs = header["DATE-OBS"], float(header["MJD-OBS"])
        truth.object_name = header["OBJECT"]
        if not self.keep:
            truth.drop_maps()
        self.frames.append(truth)

    def advance(self, seconds: float) -> None:
        """Move the clock on by ``seconds`` plus up to 0.3 s of jitter."""
        self.t += timedelta(seconds=seconds + float(self.jit.uniform(0, 0.3)))

    def biases(self, n: int) -> None:
        for i in range(n):
            data, truth = self.camera.bias(np.random.default_rng([self.seed, 1, i]))
            self.emit(data, truth, "bias", f"{self.tel}_bias_{i + 1:04d}.fits", "lab")
            self.advance(12.0)

    def _flat(self, frng: np.random.Generator, rate_adu_per_s: float, texp: float) -> tuple[np.ndarray, FrameTruth]:
        """A flat from the sphere (no vignetting, 0.05 % source stability)."""
        level = rate_adu_per_s * texp * (1.0 + 0.0005 * frng.standard_normal())
        # A tiny fixed non-uniformity of the sphere port; the camera sits 10 cm from it.
        return self.camera.flat(level, 0, frng, exptime=texp, gradient=(0.003, -0.002), vignetting=False,
                                cosmic_rays=self.cosmic_rays, masks=self.keep)

    def ladder(self, exptimes: list[float], flats_per_level: int, rate_adu_per_s: float) -> None:
        k = 0
        for level_i, texp in enumerate(exptimes):
            for rep in range(flats_per_level):
                data, truth = self._flat(np.random.default_rng([self.seed, 2, level_i, rep]), rate_adu_per_s, texp)
                k += 1
                self.emit(data, truth, "flat", f"{self.tel}_flat_{k:04d}.fits", "lab-ladder")
                self.advance(texp + 3.0)

    def series(self, n: int, texp: float, rate_adu_per_s: float) -> None:
        for i in range(n):
            data, truth = self._flat(np.random.default_rng([self.seed, 3, i]), rate_adu_per_s, texp)
            self.emit(data, truth, "flat", f"{self.tel}_flat2s_{i + 1:04d}.fits", "lab-series")
            self.advance(texp + 3.0)

    def darks(self, exptimes: list[float]) -> None:
        for i, texp in enumerate(exptimes):
            data, truth = self.camera.dark(texp, np.random.default_rng([self.seed, 4, i]),
                                           cosmic_rays=self.cosmic_rays, masks=self.keep)
            self.emit(data, truth, "dark", f"{self.tel}_dark_{i + 1:04d}.fits", "lab")
            self.advance(texp + 3.0)


def write_lab_set(
    outdir: str | os.PathLike, shape: tuple[int, int] = (200, 300), scale: float = 0.05, seed: int = 0, *,
    model: CameraModel | None = None, telescope: str = "MST3", rate_adu_per_s: float = 12500.0,
    flats_per_level: int = 2, n_bias: int = 100, n_series: int = 144, series_exptime: float = 2.0,
    min_bias: int = 10, min_series: int = 8, start: str = "2024-03-05T06:00:00",
    cosmic_rays: bool | float = True, imagetyp_style: str = "maxim", keep_maps: bool | None = None,
) -> LabTruth:
    """Write the detector lab exposure plan (camera paper Table 2), optionally thinned.

    Files in ``outdir``::

        {TEL}_bias_NNNN.fits     bias frames (100 x scale, >= min_bias), 12 s apart (~20 min for 100)
        {TEL}_flat_NNNN.fits     flat ladder 0.01-8.1 s, flats_per_level per exposure time
        {TEL}_flat2s_NNNN.fits   series of identical flats at series_exptime (144 x scale, >= min_series)
        {TEL}_dark_NNNN.fits     darks 0.01-600 s

    The light is an integrating sphere (no vignetting, 0.05 % source stability) giving
    ``rate_adu_per_s`` at the centre, i.e. 25000 ADU at 2 s by default (paper: 20000-40000);
    long ladder flats saturate at the 16-bit ADC as in the real test.

    Parameters
    ----------
    outdir : path-like
        Output folder (created).
    shape : (int, int)
        Frame shape.
    scale : float
        Fraction of each Table 2 row to keep (1 = the full plan); every row keeps at least
        one exposure time.
    seed : int
        Master seed.
    model : CameraModel, optional
        Base camera model (telescope and shape replaced).
    telescope : str
        Camera identity (the paper's 144-flat series was taken with MST3's camera).
    rate_adu_per_s : float
        Light-source level in ADU/s.
    flats_per_level : int
        Flats per ladder exposure time (>= 2 gives pairs for the photon transfer curve).
    n_bias, n_series : int
        Unthinned numbers of bias frames and series flats.
    series_exptime : float
        Exposure time of the series (2 s in the paper).
    min_bias, min_series : int
        Floors after thinning.
    start : str
        UTC ISO time of the first frame.
    cosmic_rays : bool or float
        Cosmic rays in flats and darks.
    imagetyp_style : {'maxim', 'nina'}
        IMAGETYP spelling.
    keep_maps : bool, optional
        Keep per-frame truth maps; default for frames of at most 1 Mpx.

    Returns
    -------
    LabTruth
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale={scale} must be in (0, 1]")
    if flats_per_level < 1:
        raise ValueError(f"flats_per_level={flats_per_level} must be >= 1")
    if rate_adu_per_s <= 0:
        raise ValueError(f"rate_adu_per_s={rate_adu_per_s} must be positive")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    base = model if model is not None else CameraModel()
    tmodel = replace(base, shape=tuple(shape), telescope=telescope,
                     filter=DEFAULT_FILTERS.get(telescope, base.filter))
    lab = _Lab(outdir, tmodel, make_camera(tmodel, _camera_seed(seed, telescope)),
               keep=tmodel.npix <= _SMALL_NPIX if keep_maps is None else bool(keep_maps),
               imagetyp_style=imagetyp_style, seed=seed, cosmic_rays=cosmic_rays, t=datetime.fromisoformat(start))
    ladder = [t for row in LAB_FLAT_ROWS for t in _thin(row, scale, 1)]
    darks = [t for row in LAB_DARK_ROWS for t in _thin(row, scale, 1)]
    lab.biases(min(n_bias, max(min_bias, int(round(n_bias * scale)))))
    lab.ladder(ladder, flats_per_level, rate_adu_per_s)
    lab.series(min(n_series, max(min_series, int(round(n_series * scale)))), series_exptime, rate_adu_per_s)
    lab.darks(darks)
    frames_csv = _write_frames_csv(outdir / "truth_frames.csv", lab.frames, outdir)
    return LabTruth(outdir=outdir, frames=lab.frames, camera=lab.camera, rate_adu_per_s=float(rate_adu_per_s),
                    flat_exptimes=ladder, series_exptime=float(series_exptime), dark_exptimes=darks,
                    frames_csv=frames_csv)
