"""Peak memory per worker of the PS map on a 100-frame full-size bias sequence, for both ways
of opening the store (``open_store(path, chunks=None)``, what ``mstdask calibrate`` uses, and
``open_store(path)``, Dask arrays with one frame per chunk).

Simulates 103 full 9576 x 6388 bias frames (``write_survey``: 3 nightly bias + the 100-frame
PS sequence), ingests them on 2 workers, then computes ``calib.ps_map`` on a fresh
LocalCluster (2 workers x 1 thread, 4 GiB) for each opening, sampling the workers' RSS.
~13 GB of FITS while ingesting and ~7 GB of store; the work folder is removed at the end
unless --keep::

    python benchmarks/bench_ps_memory.py [--workdir /tmp/mstdask_bench_ps] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cluster, mb, sampled  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/mstdask_bench_ps")
    ap.add_argument("--keep", action="store_true", help="keep the store (a later run reuses it)")
    args = ap.parse_args()

    from mstdask.stir import calib
    from mstdask.jobs import ingest
    from mstdask.store import open_store
    from mstdask.testing import write_survey

    work = Path(args.workdir)
    store = work / "ps.zarr"
    try:
        if not store.exists():
            write_survey(work / "fits", nights=1, shape=(6388, 9576), n_bias=3, n_flat=0, n_dark=0, n_science=0,
                         ps_bias_night=0, n_ps_bias=100, seed=3)
            with cluster(2) as (client, _):
                assert ingest([work / "fits"], store, client, progress=False).ok
            shutil.rmtree(work / "fits")
        result = {}
        for name, chunks in (("open_store(chunks=None)", None), ("open_store() (Dask)", "auto")):
            ds = open_store(store, chunks=chunks)
            bias = ds.raw.isel(frame=(ds.imagetyp == "bias").values.nonzero()[0])
            with cluster(2) as (client, pids), sampled(pids) as peak:
                ps = calib.ps_map(bias)
                t0 = time.perf_counter()
                found, _ = client.gather(client.compute([ps["ps"].data, ps["std"].data]))
                result[name] = {"frames": int(ps.attrs["nframes"]), "seconds": round(time.perf_counter() - t0, 1),
                                "peak_worker_rss_MB": [mb(v) for v in peak.values()],
                                "ps_fraction": round(float(found.mean()), 5)}
            print(name, result[name], flush=True)
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
