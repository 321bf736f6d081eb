"""Running-median benchmark: mstdask.stir._median.running_median against scipy.ndimage.median_filter.

Times the exact 51 x 51 running median (the large-scale-flat smoothing of the MST pipeline) on
one full-size simulated twilight flat (6388 x 9576 float32: 20000 ADU x smooth vignetting x
(1 + 1 % Gaussian noise)):

* ``running_median(workers=1)``: one thread (the target is <= 10 s per frame on one core);
* ``running_median(workers=2)``: two threads over tiles (numba kernels are ``nogil`` and numpy's
  sort releases the GIL);
* ``scipy.ndimage.median_filter(size=51)`` on a 400 x 400 cut-out, extrapolated to the full
  frame by pixel count (scipy's cost per pixel does not depend on the image size, and the full
  frame would take ~30 minutes).

The cut-out result of ``running_median`` is also checked for equality with scipy's, and the
numba kernels are compiled (or loaded from cache) before any timing.

Usage::

    python benchmarks/bench_median.py [--repeat 3] [--size 51] [--cutout 400] [--shape 6388 9576]

Prints a JSON record and a Markdown table row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import numpy as np
from _common import cpu_model

FULL = (6388, 9576)


def simulated_flat(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A bias-subtracted twilight flat: 20000 ADU x vignetting x (1 + 0.01 noise), float32."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    y = (np.arange(ny, dtype=np.float32) - ny / 2) / max(ny, nx)
    x = (np.arange(nx, dtype=np.float32) - nx / 2) / max(ny, nx)
    vignetting = 1.0 - 0.6 * (y[:, None] ** 2 + x[None, :] ** 2)  # ~15 % fall-off at corners
    noise = rng.standard_normal(shape, dtype=np.float32)
    return (np.float32(20000.0) * vignetting * (np.float32(1.0) + np.float32(0.01) * noise)).astype(np.float32)




def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--size", type=int, default=51, help="window side (odd)")
    parser.add_argument("--cutout", type=int, default=400, help="side of the scipy cut-out")
    parser.add_argument("--shape", type=int, nargs=2, default=FULL, metavar=("NY", "NX"))
    parser.add_argument("--mode", default="reflect")
    args = parser.parse_args(argv)

    import numba
    import scipy
    import scipy.ndimage as ndi

    from mstdask.stir._median import _DEFAULT_TILE, running_median

    shape = tuple(args.shape)
    npix = shape[0] * shape[1]
    image = simulated_flat(shape)

    # Compile / load the numba kernels outside the timings.
    running_median(image[:64, :64], args.size, args.mode)

    # scipy on a cut-out from the middle of the frame; the same cut-out checks exactness.
    cy, cx = shape[0] // 2, shape[1] // 2
    c = args.cutout
    cut = np.ascontiguousarray(image[cy - c // 2:cy - c // 2 + c, cx - c // 2:cx - c // 2 + c])
    t0 = time.perf_counter()
    ref = ndi.median_filter(cut, size=args.size, mode=args.mode)
    scipy_cut_s = time.perf_counter() - t0
    exact = bool(np.array_equal(running_median(cut, args.size, args.mode), ref))
    scipy_full_s = scipy_cut_s * npix / cut.size

    out = np.empty_like(image)
    results = {}
    for workers in (1, 2):
        times = timed(lambda: running_median(image, args.size, args.mode, out=out, workers=workers),
                      args.repeat)
        results[workers] = {"seconds": statistics.median(times), "all_seconds": [round(t, 3) for t in times]}

    one = results[1]["seconds"]
    two = results[2]["seconds"]
    record = {
        "benchmark": "running_median",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "numba": numba.__version__,
        },
        "image": {"shape": list(shape), "dtype": "float32", "kind": "simulated twilight flat"},
        "size": args.size,
        "mode": args.mode,
        "tile": _DEFAULT_TILE,
        "repeat": args.repeat,
        "exact_on_cutout": exact,
        "running_median_1_thread_s": round(one, 3),
        "running_median_1_thread_ns_per_pixel": round(one / npix * 1e9, 1),
        "running_median_1_thread_runs_s": results[1]["all_seconds"],
        "running_median_2_threads_s": round(two, 3),
        "running_median_2_threads_runs_s": results[2]["all_seconds"],
        "speedup_2_threads": round(one / two, 2),
        "scipy_cutout_shape": list(cut.shape),
        "scipy_cutout_s": round(scipy_cut_s, 3),
        "scipy_full_frame_extrapolated_s": round(scipy_full_s, 1),
        "ratio_scipy_over_running_median_1_thread": round(scipy_full_s / one, 1),
        "target_1_thread_s": 10.0,
        "target_met": bool(one <= 10.0),
    }
    print(json.dumps(record, indent=2))
    print()
    print("| date | frame | size | running_median, 1 thread | 2 threads | scipy (extrapolated) | scipy ÷ 1 thread | exact |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {record['date'][:10]} | {shape[0]} × {shape[1]} float32 | {args.size} | {one:.2f} s "
          f"({record['running_median_1_thread_ns_per_pixel']} ns/px) | {two:.2f} s | {scipy_full_s:.0f} s "
          f"| {scipy_full_s / one:.0f} × | {'yes' if exact else 'NO'} |")
    return record


if __name__ == "__main__":
    main()
