"""The per-frame STIR kernels against simulator truth: reduction, tracks, cosmic rays.

Small (600 x 900) seeded frames from ``mstdask.testing``: stars from a catalogue, pepper &
salt and bad pixels, cosmic rays at the simulator's default rate (~100x the ground-level
rate, so a small frame has a few hundred), satellite tracks given explicitly or drawn by
``random_track``. Track amplitudes are in sky-noise sigma per pixel at the frame centre.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from astropy.table import Table, vstack
from scipy import ndimage as ndi

from mstdask.stir._stir_kernels import detect_cosmic_rays, detect_tracks, estimate_background, reduce_frame
from mstdask.config import StirConfig
from mstdask.errors import ConfigError
from mstdask.testing import CameraModel, SatelliteTrack, make_camera, make_star_catalog, random_track

SHAPE = (600, 900)
RA, DEC = 115.0, 40.0
GAIN, READ_NOISE_E = 0.25, 1.0


def simulate(seed: int, *, tracks=0, bright: list[tuple[float, float, float]] = (), seeing: float = 2.0,
             density: float = 10000.0, cosmic_rays: bool = True, catalog_seed: int | None = None,
             mag_range: tuple[float, float] = (10.0, 20.0)):
    """A reduced science frame, its mask (bad | PS | saturated) and the truth.

    ``bright`` adds stars ``(x, y, mag)`` to the catalogue (mag 9 saturates, 7.5 has a
    ~50 px halo). The calibration is the camera's truth: expected bias and the small-scale
    flat (PRNU and gain, no vignetting, as the master flat), so the sky keeps its vignetting.
    """
    cam = make_camera(CameraModel(shape=SHAPE, seeing_arcsec=seeing), seed=seed)
    scale = cam.model.pixel_scale_arcsec / 3600.0
    cat = make_star_catalog(RA, DEC, SHAPE[1] * scale * 1.1, SHAPE[0] * scale * 1.1,
                            rng=seed + 100 if catalog_seed is None else catalog_seed,
                            density_per_deg2=density, mag_range=mag_range)
    if bright:
        x, y, mag = (np.array(c, dtype=float) for c in zip(*bright))
        ra, dec = cam.wcs(RA, DEC).all_pix2world(x, y, 0)
        cat = vstack([cat, Table({"ra": ra, "dec": dec, "mag": mag})])
    data, truth = cam.science(300.0, RA, DEC, cat, rng=seed, tracks=tracks, cosmic_rays=cosmic_rays)
    reduced = reduce_frame(data, cam.expected_bias_map, cam.flat_response(0, vignetting=False))
    mask = cam.bad_pixel_map | cam.ps_map | truth.saturated_mask
    sigma = math.sqrt(truth.sky_e + cam.model.read_noise_e**2) / cam.model.gain
    return reduced, mask, truth, sigma


def line_distance(track: SatelliteTrack, shape=SHAPE) -> np.ndarray:
    """Distance of every pixel centre from the track's (infinite) centre line."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    dx, dy = track.x1 - track.x0, track.y1 - track.y0
    return np.abs((yy - track.y0) * dx - (xx - track.x0) * dy) / math.hypot(dx, dy)


# ----------------------------------------------------------------------------- reduction
def test_reduce_frame_is_raw_minus_bias_over_flat():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 65536, SHAPE, dtype=np.uint16)
    raw[0, 0], raw[-1, -1] = 0, 65535
    bias = (500 + rng.normal(0, 3, SHAPE)).astype(np.float32)
    flat = (1 + rng.normal(0, 0.02, SHAPE)).astype(np.float32)
    flat[1, 1], flat[2, 2], flat[3, 3] = 0.0, -0.5, np.nan
    out = reduce_frame(raw, bias, flat)
    assert out.dtype == np.float32 and out.shape == SHAPE
    bad = np.zeros(SHAPE, dtype=bool)
    bad[1, 1] = bad[2, 2] = bad[3, 3] = True
    assert np.isnan(out[bad]).all() and np.isfinite(out[~bad]).all()
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = (raw.astype(np.float64) - bias.astype(np.float64)) / flat.astype(np.float64)
    np.testing.assert_allclose(out[~bad], ref[~bad], rtol=2e-7, atol=1e-4)
    # bit-for-bit the float32 expression, and scalars broadcast
    expect = (raw.astype(np.float32) - bias) / np.where(bad, np.float32(1), flat)
    np.testing.assert_array_equal(out[~bad], expect[~bad])
    np.testing.assert_array_equal(reduce_frame(raw, 500.0, 1.0), raw.astype(np.float32) - np.float32(500))


# ----------------------------------------------------------------------------- tracks
# Near-horizontal, near-vertical, diagonal and shallow tracks, 3-6 px wide, all 4 sigma per
# pixel at their peak; two cross a saturated star (mag 9) half way along.
TRACKS_4SIGMA = {
    "near-horizontal": (SatelliteTrack(-0.5, 300.3, 899.5, 305.1, width=3.0, amplitude_sigma=4.0), False),
    "near-vertical": (SatelliteTrack(450.2, -0.5, 446.0, 599.5, width=6.0, amplitude_sigma=4.0), False),
    "diagonal-over-star": (SatelliteTrack(100.0, -0.5, 800.0, 599.5, width=5.0, amplitude_sigma=4.0), True),
    "shallow-over-star": (SatelliteTrack(-0.5, 100.0, 899.5, 400.0, width=4.0, amplitude_sigma=4.0), True),
    "corner": (SatelliteTrack(-0.5, 420.0, 260.0, 599.5, width=3.5, amplitude_sigma=4.0), False),
}


@pytest.mark.parametrize("name", list(TRACKS_4SIGMA))
def test_faint_track_is_flagged(name):
    track, over_star = TRACKS_4SIGMA[name]
    bright = [((track.x0 + track.x1) / 2, (track.y0 + track.y1) / 2, 9.0)] if over_star else []
    reduced, mask, truth, _ = simulate(11 + len(name), tracks=[track], bright=bright)
    flagged, lines = detect_tracks(reduced, mask)
    (drawn,) = truth.tracks
    recall = (flagged & truth.track_mask).sum() / truth.track_mask.sum()
    assert recall >= 0.95, f"{name}: {recall:.3f} of the track's pixels flagged"
    assert len(lines) == 1
    (line,) = lines
    turn = abs((line["direction_deg"] - drawn.angle_deg + 90) % 180 - 90)
    assert turn < 0.5
    # Hough convention: the centre line is x cos(angle) + y sin(angle) = dist
    t = np.linspace(0, 1, 5)
    xs, ys = drawn.x0 + t * (drawn.x1 - drawn.x0), drawn.y0 + t * (drawn.y1 - drawn.y0)
    assert np.abs(xs * np.cos(line["angle"]) + ys * np.sin(line["angle"]) - line["dist"]).max() < 2.0
    assert line["peak_sigma"] == pytest.approx(4.0, abs=1.2)
    # the flags hug the track: within the paper's band or the track's measured width
    far = flagged & (line_distance(drawn) > max(5.0, line["halfwidth_px"]) + 1.0)
    assert far.sum() == 0
    assert flagged.sum() < 2.5 * truth.track_mask.sum()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_tracks(seed):
    """1-3 random tracks per frame (edge to edge, any angle, 3-6 px, 4-40 sigma)."""
    rng = np.random.default_rng(seed)
    tracks = [random_track(SHAPE, rng, amplitude_range=(4.0, 40.0)) for _ in range(int(rng.integers(1, 4)))]
    reduced, mask, truth, _ = simulate(20 + seed, tracks=tracks)
    flagged, lines = detect_tracks(reduced, mask)
    assert len(lines) == len(tracks)
    for t in truth.tracks:
        m = t.mask(SHAPE)
        assert (flagged & m).sum() / m.sum() >= 0.95, t
    near = np.zeros(SHAPE, dtype=bool)
    for t in truth.tracks:
        near |= line_distance(t) <= 15
    assert (flagged & ~near).sum() == 0


@pytest.mark.parametrize("seed", [9, 12])
def test_track_past_saturated_star_in_dense_field(seed):
    """A 4-sigma track over a saturated star among 40000 stars per square degree: the halo
    next to the track must not give a second, spurious line."""
    track = SatelliteTrack(357.1, 599.5, 899.5, 337.5, width=4.09, amplitude_sigma=4.0)
    mid = ((track.x0 + track.x1) / 2, (track.y0 + track.y1) / 2, 9.0)
    reduced, mask, truth, _ = simulate(seed, tracks=[track], bright=[mid], density=40000.0, catalog_seed=seed,
                                       mag_range=(8.0, 20.0))
    flagged, lines = detect_tracks(reduced, mask)
    assert len(lines) == 1
    assert (flagged & truth.track_mask).sum() / truth.track_mask.sum() >= 0.95
    assert (flagged & (line_distance(truth.tracks[0]) > 15)).sum() == 0


def test_no_track_no_flags():
    """Stars (dense field, a 7.5 mag halo, a saturated 9 mag star), cosmic rays, pepper &
    salt, an unmasked bad column, a masked one, a hot row and the frame edges: no track."""
    frames = [
        simulate(31, bright=[(300.0, 250.0, 7.5), (700.0, 420.0, 9.0)]),
        simulate(32, density=40000.0, seeing=1.4),
        simulate(33, seeing=2.8, bright=[(20.0, 580.0, 8.0)]),
    ]
    total = 0
    for k, (reduced, mask, _, sigma) in enumerate(frames):
        reduced = reduced.copy()
        mask = mask.copy()
        reduced[150:, 123] += [10, 100, 3][k] * sigma  # a bad column the bad-pixel map missed
        reduced[100:, 302] += [100, 10, 30][k] * sigma  # another, through a halo in frame 0
        reduced[:, 611] += 200 * sigma  # and one it has
        mask[:, 611] = True
        if k == 2:
            reduced[377, :] += 2 * sigma  # a hot row
        flagged, lines = detect_tracks(reduced, mask)
        assert lines == [], lines
        total += int(flagged.sum())
    assert total == 0


def test_no_track_in_a_crowded_field():
    """40000 stars per square degree down to mag 7 on a 1500 x 2000 frame: stars strung
    along a line (the mean of its core is 14 sigma there, the median 0.6) are no track."""
    shape = (1500, 2000)
    cam = make_camera(CameraModel(shape=shape, seeing_arcsec=1.8), seed=53)
    scale = cam.model.pixel_scale_arcsec / 3600.0
    cat = make_star_catalog(RA, DEC, shape[1] * scale * 1.1, shape[0] * scale * 1.1, rng=3,
                            density_per_deg2=40000.0, mag_range=(7.0, 20.0))
    data, truth = cam.science(300.0, RA, DEC, cat, rng=3)
    reduced = reduce_frame(data, cam.expected_bias_map, cam.flat_response(0, vignetting=False))
    flagged, lines = detect_tracks(reduced, cam.bad_pixel_map | cam.ps_map | truth.saturated_mask)
    assert lines == [] and not flagged.any()


def test_track_detection_can_be_switched_off_by_its_thresholds():
    """The tests above can fail: a 4-sigma track is lost when the verification asks for
    more than it has, and a track too faint for the detection map is not invented."""
    track = TRACKS_4SIGMA["shallow-over-star"][0]
    reduced, mask, truth, _ = simulate(40, tracks=[track])
    strict = StirConfig(track_min_core_sigma=6.0)
    assert detect_tracks(reduced, mask, strict)[1] == []
    faint = dataclasses.replace(track, amplitude_sigma=0.5)
    reduced, mask, truth, _ = simulate(40, tracks=[faint])
    flagged, lines = detect_tracks(reduced, mask)
    assert lines == [] and not flagged.any()


def test_background_follows_vignetting():
    reduced, mask, truth, sigma = simulate(5, cosmic_rays=False)
    bkg = estimate_background(reduced, mask)
    centre = bkg.at(np.array([300.0]), np.array([450.0]))[0]
    corner = bkg.at(np.array([5.0]), np.array([5.0]))[0]
    assert centre == pytest.approx(truth.sky_adu, rel=0.03)
    assert corner < 0.92 * centre  # 15 % vignetting at the corners
    # binned 2 x 2: half the per-pixel noise
    assert np.median(bkg.sigma_binned) == pytest.approx(sigma / 2, rel=0.1)
    rows = bkg.rows(0, 600)
    assert rows.shape == SHAPE and rows[300, 450] == pytest.approx(centre, rel=1e-5)


# ----------------------------------------------------------------------------- cosmic rays
def star_cores(truth, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Centres (y, x) of unsaturated stars with a peak above 5 sigma and no cosmic ray near."""
    st = truth.stars
    ok = np.asarray(st["in_frame"] & ~st["saturated"] & (st["peak_adu"] > 5 * sigma))
    iy = np.rint(np.asarray(st["y"])[ok]).astype(int)
    ix = np.rint(np.asarray(st["x"])[ok]).astype(int)
    keep = (iy >= 3) & (iy < SHAPE[0] - 3) & (ix >= 3) & (ix < SHAPE[1] - 3)
    iy, ix = iy[keep], ix[keep]
    cr_near = ndi.binary_dilation(truth.cosmic_ray_mask, iterations=3)
    clean = ~cr_near[iy, ix]
    return iy[clean], ix[clean]


def flagged_cores(crmask, truth, iy, ix) -> int:
    """Stars with a cosmic-ray flag that is not a true cosmic ray within 1 px of the centre."""
    false = ndi.binary_dilation(crmask & ~truth.cosmic_ray_mask, iterations=1)
    return int(false[iy, ix].sum())


def event_recall(crmask, truth, mask) -> float:
    """Fraction of cosmic-ray events (8-connected truth pieces) with a flagged pixel, among
    those not entirely on masked pixels (a masked pixel is never flagged)."""
    labels, n = ndi.label(truth.cosmic_ray_mask, structure=np.ones((3, 3), dtype=bool))
    visible = np.unique(labels[truth.cosmic_ray_mask & ~mask])
    hit = np.unique(labels[crmask & truth.cosmic_ray_mask])
    return len(np.intersect1d(hit, visible)) / len(visible)


@pytest.mark.parametrize("seeing", [2.0, 1.4])
def test_cosmic_rays_found_star_cores_kept(seeing):
    reduced, mask, truth, sigma = simulate(50, seeing=seeing, bright=[(400.0, 300.0, 8.5)])
    crmask = detect_cosmic_rays(reduced, mask, GAIN, READ_NOISE_E)
    assert crmask.dtype == bool and crmask.shape == SHAPE
    assert not (crmask & mask).any()
    assert event_recall(crmask, truth, mask) >= 0.97
    visible = truth.cosmic_ray_mask & ~mask
    assert (crmask & visible).sum() / visible.sum() >= 0.93
    iy, ix = star_cores(truth, sigma)
    assert iy.size > 200
    assert flagged_cores(crmask, truth, iy, ix) <= 0.01 * iy.size
    if seeing == 1.4:  # FWHM 1.6 px: astroscrappy's defaults take star cores for cosmic rays
        import astroscrappy

        default, _ = astroscrappy.detect_cosmics(np.nan_to_num(reduced), inmask=mask, gain=GAIN,
                                                 readnoise=READ_NOISE_E, satlevel=np.inf)
        assert flagged_cores(default, truth, iy, ix) > 5 * max(1, flagged_cores(crmask, truth, iy, ix))


def test_cosmic_rays_on_candidates_equal_full_frame(monkeypatch):
    """astroscrappy on cut-outs around candidates gives the whole-frame answer, also near
    the frame edges and on a track (and with the mosaic run in several bands)."""
    import mstdask.stir._stir_kernels as kernels

    track = SatelliteTrack(-0.5, 40.0, 899.5, 560.0, width=4.0, amplitude_sigma=20.0)
    reduced, mask, truth, _ = simulate(60, tracks=[track])
    bkg = estimate_background(reduced, mask)
    monkeypatch.setattr(kernels, "_MOSAIC_BAND_PX", 60_000)
    fast = detect_cosmic_rays(reduced, mask, GAIN, READ_NOISE_E, background=bkg)
    full = detect_cosmic_rays(reduced, mask, GAIN, READ_NOISE_E, StirConfig(cr_region="full"))
    assert full.sum() > 300
    np.testing.assert_array_equal(fast, full)
    assert (fast & truth.track_mask).sum() <= 0.002 * truth.track_mask.sum()  # a track is no cosmic ray


def test_no_cosmic_rays_no_flags():
    reduced, mask, truth, sigma = simulate(70, cosmic_rays=False)
    crmask = detect_cosmic_rays(reduced, mask, GAIN, READ_NOISE_E)
    assert crmask.sum() <= 1e-4 * crmask.size


# ----------------------------------------------------------------------------- config
def test_stir_config_defaults_and_validation():
    cfg = StirConfig()
    assert (cfg.track_binning, cfg.track_band_px, cfg.track_nsigma) == (2, 10.0, 3.0)
    for bad in ({"track_binning": 0}, {"track_band_px": -1.0}, {"track_min_coverage": 1.5},
                {"cr_region": "tiles"}, {"cr_cleantype": "mean"}, {"cr_candidate_slack": (0.8, 2.0)},
                {"cr_niter": 0}, {"cr_sigfrac": 0.0}):
        with pytest.raises(ConfigError):
            StirConfig(**bad)
    with pytest.raises(ValueError, match="mask shape"):
        detect_tracks(np.zeros((64, 64), np.float32), np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="gain"):
        detect_cosmic_rays(np.zeros((64, 64), np.float32), None, 0.0, 1.0)
