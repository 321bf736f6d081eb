"""Blind astrometry of a full MST frame with 50 000 sources (issue 6 target: under 3 s).

Simulates the positions of 50 000 catalogue stars on a full 9576 x 6388 frame seen through
a distorted camera (6 px of distortion in the corners, rotated by -70 deg, 0.03 px centroid
noise; the simulator's WCS is the truth), then times on one core, in the same run:

* mstdask: :func:`mstdask.static.astrometry.solve` from the header pointing (0.15 deg off):
  the blind pattern match against the reference catalogue, then the 4th-order TPV fit;
* astropy: :func:`astropy.wcs.utils.fit_wcs_from_points` with a 4th-order SIP, given the
  *true* star-to-catalogue pairs (the fit alone: no matching), the usual peer for the
  fitting half of the job.

Both solutions are checked against the true WCS on a grid over the frame. This used to be a
timed unit test (``test_fifty_thousand_sources_under_three_seconds``); timings belong here.

Run by hand (never in CI)::

    python benchmarks/bench_astrometry.py --repeat 5
"""

from __future__ import annotations

import os

# one core per measurement: no BLAS/OpenMP threads behind numpy's back
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, med  # noqa: E402

SHAPE = (6388, 9576)
SCALE = 0.862  # arcsec per pixel (MST)


def simulate(n: int = 50000, seed: int = 5):
    """Pixel positions (with centroid noise), fluxes, the catalogue and the true WCS."""
    from mstdask.testing import CameraModel, make_camera, make_star_catalog

    ra, dec = 100.0, -20.0
    cam = make_camera(CameraModel(shape=SHAPE, sip_corner_px=6.0, rotation_deg=-70.0), seed=seed)
    wcs = cam.wcs(ra, dec)
    s = SCALE / 3600.0
    cat = make_star_catalog(ra, dec, SHAPE[1] * s * 2.2, SHAPE[0] * s * 2.8, density_per_deg2=15000.0, rng=seed + 1)
    x, y = wcs.all_world2pix(cat["ra"], cat["dec"], 0)
    inside = np.flatnonzero((x >= 0) & (x <= SHAPE[1] - 1) & (y >= 0) & (y <= SHAPE[0] - 1))[:n]
    rng = np.random.default_rng(seed + 2)
    xs = x[inside] + rng.normal(0.0, 0.03, len(inside))
    ys = y[inside] + rng.normal(0.0, 0.03, len(inside))
    flux = 10 ** (-0.4 * cat["mag"][inside]) * rng.lognormal(0.0, 0.1, len(inside))
    return xs, ys, flux, cat, wcs, inside


def grid_error_px(fitted, true, n=(15, 20)) -> float:
    """Largest on-sky distance (pixels) between two WCS on a grid over the frame."""
    gx, gy = np.meshgrid(np.linspace(0, SHAPE[1] - 1, n[1]), np.linspace(0, SHAPE[0] - 1, n[0]))
    ra1, dec1 = true.all_pix2world(gx.ravel(), gy.ravel(), 0)
    ra2, dec2 = fitted.all_pix2world(gx.ravel(), gy.ravel(), 0)
    dra = ((ra2 - ra1 + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec1))
    return float(np.hypot(dra, dec2 - dec1).max() * 3600.0 / SCALE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each (median quoted)")
    args = p.parse_args(argv)

    from astropy.coordinates import SkyCoord
    from astropy.wcs.utils import fit_wcs_from_points

    from mstdask.static.astrometry import solve

    x, y, flux, cat, true_wcs, rows = simulate()
    print(f"{len(x)} sources on a {SHAPE[1]}x{SHAPE[0]} frame; CPU: {cpu_model()}", file=sys.stderr)
    ours, peer = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        sol = solve(x, y, flux, cat, SHAPE, 100.15, -19.9)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        world = SkyCoord(cat["ra"][rows], cat["dec"][rows], unit="deg")
        fitted = fit_wcs_from_points((x, y), world, projection="TAN", sip_degree=4)
        peer.append(time.perf_counter() - t0)
    print(f"mstdask solve (blind match + TPV 4): median {med(ours):.2f} s of {args.repeat} "
          f"({', '.join(f'{t:.2f}' for t in ours)}); matched {sol.n_matched}, rms {sol.rms_px:.3f} px, "
          f"max grid error {grid_error_px(sol.wcs, true_wcs):.3f} px")
    print(f"astropy fit_wcs_from_points (SIP 4, true pairs given): median {med(peer):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in peer)}); max grid error {grid_error_px(fitted, true_wcs):.3f} px")
    print(f"ratio mstdask / astropy fit: {med(ours) / med(peer):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
