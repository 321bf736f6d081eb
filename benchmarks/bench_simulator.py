"""One full-size simulated MST science frame (9576 x 6388, > 10 000 stars, a satellite track):
how long the simulator takes once the camera's static maps exist, beside the time of numpy
drawing the frame's Poisson noise alone (the floor any simulator of this frame pays).

This used to be a timed test (``test_full_size_science_frame_is_fast``, target < 20 s);
timings belong here. Run by hand (never in CI)::

    python benchmarks/bench_simulator.py --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, med  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="timed frames (median quoted)")
    args = p.parse_args(argv)

    from mstdask.testing import CameraModel, make_camera, make_star_catalog

    cam = make_camera(CameraModel(), seed=0)
    cat = make_star_catalog(115.0, 40.0, 2.4, 1.6, rng=1)
    cam.science(300.0, 115.0, 40.0, cat, rng=0, masks=False)  # builds the static maps once
    ours, floor = [], []
    for i in range(args.repeat):
        t0 = time.perf_counter()
        data, truth = cam.science(300.0, 115.0, 40.0, cat, rng=1 + i, tracks=1, masks=False)
        ours.append(time.perf_counter() - t0)
        sky = np.full(data.shape, 400.0, dtype=np.float32)
        t0 = time.perf_counter()
        np.random.default_rng(i).poisson(sky)
        floor.append(time.perf_counter() - t0)
    print(f"CPU: {cpu_model()}; frame {data.shape[1]}x{data.shape[0]}, {len(truth.stars)} stars")
    print(f"mstdask.testing Camera.science: median {med(ours):.1f} s ({', '.join(f'{t:.1f}' for t in ours)})")
    print(f"numpy Poisson draw of the frame alone: median {med(floor):.1f} s; ratio {med(ours) / med(floor):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
