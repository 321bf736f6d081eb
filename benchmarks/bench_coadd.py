"""Coadd benchmark at full MST frame size (9576 x 6388): ``mstdask`` beside SWarp, same frames, same run.

Simulated reduced frames (``--frames``, default 4): sky 200 ADU with Gaussian noise, Gaussian
stars of a random catalogue (pixel-integrated, FWHM 2.3 px) drawn through a TPV WCS with a
cubic distortion (about 4 px at the corners, the MST's), dithers of a few hundred pixels and
small rotations, 0.1 % masked pixels. Each frame is written twice: into a Zarr store laid out
like ``mstdask reduce``'s (for mstdask) and as FITS + a weight map (0 on masked pixels; for
SWarp). Both programs resample onto the *same* TAN grid (mstdask's, given to SWarp as
``coadd.head``) and combine with inverse-variance weights:

* ``mstdask``: :func:`mstdask.stacks.coadd.coadd` (bilinear, mean), on a LocalCluster of 1 worker x 1
  thread (``--workers``), written to Zarr; peak RSS of the worker sampled every 50 ms;
* ``SWarp`` (``/usr/bin/SWarp``): ``RESAMPLING_TYPE BILINEAR`` and ``LANCZOS3``,
  ``COMBINE_TYPE WEIGHTED``, ``WEIGHT_TYPE MAP_WEIGHT``, ``NTHREADS 1``, ``SUBTRACT_BACK N``;
  peak RSS from ``getrusage(RUSAGE_CHILDREN)``;
* optionally (``--adaptive-frames 1``) mstdask with reproject's adaptive kernel on one frame.

Flux agreement: sums in 6 px apertures (local sky from a 10-14 px annulus) of isolated
injected stars (no neighbour within 20 px) fully covered in every coadd, compared with each
other and with the injected flux.

Usage (~10 min with 4 frames; ~3 GB of temporary files, deleted at the end)::

    flock /tmp/helpers/bench.lock python benchmarks/bench_coadd.py [--frames 4] [--workers 1] [--tmp DIR] \
        [--memory-n 1,2,4,8] [--adaptive-frames 1]

Prints a JSON record and a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # one thread per process for the per-core comparison, before numpy loads
    for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_v] = "1"

import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cluster, cpu_model, mb, sampled  # noqa: E402

SHAPE = (6388, 9576)
SCALE = 0.862
RA0, DEC0 = 150.0, 30.0


def tpv_header(ra: float, dec: float, rot_deg: float, dx: float, dy: float):
    """A TPV header: 0.862"/px, rotation ``rot_deg``, the frame centre ``(dx, dy)`` px off, and a
    cubic radial distortion of ~4 px at the corners."""
    from astropy.io import fits

    ny, nx = SHAPE
    s = SCALE / 3600
    t = math.radians(rot_deg)
    h = fits.Header()
    h["WCSAXES"] = 2
    h["CTYPE1"], h["CTYPE2"] = "RA---TPV", "DEC--TPV"
    h["CRPIX1"], h["CRPIX2"] = nx / 2 + 0.5 + dx, ny / 2 + 0.5 + dy
    h["CRVAL1"], h["CRVAL2"] = ra, dec
    h["CD1_1"], h["CD1_2"] = -s * math.cos(t), s * math.sin(t)
    h["CD2_1"], h["CD2_2"] = s * math.sin(t), s * math.cos(t)
    h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    # xi' = xi + k xi r^2 (TPV terms 7 and 9: xi^3 and xi eta^2), the same for eta
    rc = math.hypot(nx, ny) / 2 * s  # corner radius in degrees
    k = 4 * s / rc**3  # 4 px at the corners
    for axis in (1, 2):
        h[f"PV{axis}_0"], h[f"PV{axis}_1"], h[f"PV{axis}_2"] = 0.0, 1.0, 0.0
        h[f"PV{axis}_7"], h[f"PV{axis}_9"] = k, k
    return h


def render(wcs, ra, dec, flux, sigma, rng, sky=200.0, noise=15.0):
    """A frame: sky + noise + pixel-integrated Gaussian stars (15 x 15 stamps)."""
    from scipy.special import erf

    ny, nx = SHAPE
    img = rng.normal(sky, noise, SHAPE).astype(np.float32)
    x, y = wcs.all_world2pix(ra, dec, 0)
    inside = (x > 8) & (x < nx - 9) & (y > 8) & (y < ny - 9)
    h = 7
    off = np.arange(-h, h + 2) - 0.5
    for xi, yi, f in zip(x[inside], y[inside], flux[inside]):
        ix, iy = int(round(xi)), int(round(yi))
        ex = 0.5 * np.diff(erf((ix + off - xi) / (math.sqrt(2) * sigma)))
        ey = 0.5 * np.diff(erf((iy + off - yi) / (math.sqrt(2) * sigma)))
        img[iy - h:iy + h + 1, ix - h:ix + h + 1] += (f * np.outer(ey, ex)).astype(np.float32)
    return img


def make_frames(tmp: Path, n: int, seed: int = 0):
    """Simulate ``n`` frames into ``tmp/red.zarr`` and ``tmp/fits/``; returns the star truth and
    the frame records."""
    import warnings

    import zarr
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    rng = np.random.default_rng(seed)
    ny, nx = SHAPE
    half = math.hypot(nx, ny) / 2 * SCALE / 3600 * 1.15
    nstar = int(30000 * ny * nx / (6388 * 9576))
    # uniform on the tangent plane around the field
    u, v = rng.uniform(-half, half, (2, nstar))
    ra = RA0 + u / math.cos(math.radians(DEC0))
    dec = DEC0 + v
    flux = 10 ** rng.uniform(2.5, 5.3, nstar)
    group = zarr.open_group(str(tmp / "red.zarr"), mode="w", zarr_format=3)
    tile = (1, min(ny, 1597), min(nx, 1368))  # the reduced store's tiles
    data = group.create_array("data", shape=(n, *SHAPE), chunks=tile, dtype="float32")
    mask = group.create_array("mask", shape=(n, *SHAPE), chunks=tile, dtype="uint8")
    (tmp / "fits").mkdir()
    frames = []
    for i in range(n):
        t0 = time.perf_counter()
        dith = 0.03 * min(SHAPE)  # ~200 px at full size
        hdr = tpv_header(RA0, DEC0, rng.uniform(-0.05, 0.05), rng.uniform(-dith, dith), rng.uniform(-dith, dith))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(hdr)
        img = render(w, ra, dec, flux, 2.3 / 2.3548, rng)
        m = np.zeros(SHAPE, np.uint8)
        m.ravel()[rng.choice(m.size, m.size // 1000, replace=False)] = 1
        data[i] = img
        mask[i] = m
        f = tmp / "fits" / f"frame{i:02d}.fits"
        fits.PrimaryHDU(img, hdr).writeto(f)
        fits.PrimaryHDU((m == 0).astype(np.float32), hdr).writeto(tmp / "fits" / f"frame{i:02d}.weight.fits")
        frames.append({"file": str(f), "header": hdr.tostring(sep="\n"), "sky": 200.0, "noise": 15.0})
        print(f"  frame {i}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return {"ra": ra, "dec": dec, "flux": flux}, frames


def swarp_config(path: Path, resampling: str, out: Path) -> None:
    path.write_text(f"""IMAGEOUT_NAME {out}
WEIGHTOUT_NAME {out.with_suffix('.weight.fits')}
HEADER_ONLY N
HEADER_SUFFIX .head
WEIGHT_TYPE MAP_WEIGHT
WEIGHT_SUFFIX .weight.fits
COMBINE Y
COMBINE_TYPE WEIGHTED
CELESTIAL_TYPE NATIVE
PROJECTION_TYPE TAN
RESAMPLE Y
RESAMPLING_TYPE {resampling}
OVERSAMPLING 0
INTERPOLATE N
FSCALASTRO_TYPE FIXED
FSCALE_KEYWORD NOFSCALE
FSCALE_DEFAULT 1.0
GAIN_DEFAULT 0.0
SUBTRACT_BACK N
RESAMPLE_DIR {out.parent}
DELETE_TMPFILES Y
COPY_KEYWORDS OBJECT
WRITE_FILEINFO N
WRITE_XML N
VERBOSE_TYPE QUIET
NTHREADS 1
""")


def run_swarp(tmp: Path, frames: list[dict], grid, resampling: str) -> dict:
    from astropy.io import fits

    out = tmp / f"swarp_{resampling.lower()}.fits"
    cfg = tmp / f"swarp_{resampling.lower()}.conf"
    swarp_config(cfg, resampling, out)
    head = fits.Header.fromstring(grid.header, sep="\n")
    head["NAXIS"] = 2
    head["NAXIS1"], head["NAXIS2"] = grid.shape[1], grid.shape[0]
    out.with_suffix(".head").write_text(head.tostring(sep="\n") + "\nEND\n")
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/SWarp", *[f["file"] for f in frames], "-c", str(cfg)], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with sampled([proc.pid]) as peak:
        _, err = proc.communicate()
    dt = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"SWarp failed: {err.decode()[-2000:]}")
    return {"seconds": dt, "per_frame_s": dt / len(frames), "peak_rss_mb": mb(max(peak.values())), "image": str(out)}


def run_mstdask(tmp: Path, frames: list[dict], grid, workers: int, resampling: str = "bilinear",
                name: str = "mstdask") -> dict:
    from mstdask.stacks.coadd import CoaddFrame, coadd
    from mstdask.config import CoaddConfig

    cfg = CoaddConfig(resampling=resampling)
    cf = [CoaddFrame(f"f{i}", f["header"], SHAPE, store=str(tmp / "red.zarr"), index=i, background=f["sky"],
                     noise=f["noise"], weight=1 / f["noise"] ** 2) for i, f in enumerate(frames)]
    ds = coadd(cf, grid, cfg)
    out = tmp / f"{name}.zarr"
    with cluster(workers) as (client, pids), sampled(pids) as peak:
        t0 = time.perf_counter()
        job = ds.to_zarr(str(out), mode="w", compute=False)
        client.compute(job).result()
        dt = time.perf_counter() - t0
    return {"seconds": dt, "per_frame_s": dt / len(frames), "per_frame_core_s": dt * workers / len(frames),
            "peak_rss_worker_mb": mb(max(peak.values())), "workers": workers, "tile": ds.attrs["tile"],
            "image": str(out)}


def aperture_fluxes(img: np.ndarray, wcs, ra, dec, r=6.0, r_in=10.0, r_out=14.0):
    """Annulus-subtracted aperture sums (photutils), NaN where any pixel is missing."""
    from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture, aperture_photometry

    x, y = wcs.all_world2pix(ra, dec, 0)
    pos = np.column_stack([x, y])
    ap, an = CircularAperture(pos, r), CircularAnnulus(pos, r_in, r_out)
    bkg = ApertureStats(img, an).median
    tab = aperture_photometry(img, ap)
    f = np.asarray(tab["aperture_sum"], float) - bkg * ap.area
    return np.where(np.isfinite(f), f, np.nan)


def _robust(r: np.ndarray) -> float:
    return round(float(1.4826 * np.nanmedian(np.abs(r - np.nanmedian(r)))), 5)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--adaptive-frames", type=int, default=0, help="also time reproject's adaptive kernel")
    ap.add_argument("--tmp", default=None, help="folder for the temporary files (default: a new one in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files")
    ap.add_argument("--shape", default=None, help="NYxNX instead of the full 6388x9576 (smoke tests)")
    ap.add_argument("--memory-n", default="", metavar="N,N,...",
                    help="also run mstdask alone on the first N frames for each N (peak worker memory versus N)")
    args = ap.parse_args(argv)
    global SHAPE
    if args.shape:
        SHAPE = tuple(int(v) for v in args.shape.lower().split("x"))

    import reproject
    import zarr
    from astropy.io import fits
    from scipy.spatial import cKDTree

    import mstdask
    from mstdask.stacks.coadd import CoaddFrame, output_grid

    tmp = Path(tempfile.mkdtemp(prefix="bench_coadd_", dir=args.tmp))
    rec: dict = {"frames": args.frames, "shape": list(SHAPE), "cpu": cpu_model(), "nproc": os.cpu_count(),
                 "mstdask": mstdask.__version__, "reproject": reproject.__version__,
                 "swarp": subprocess.run(["/usr/bin/SWarp", "-v"], capture_output=True, text=True).stdout.strip(),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        t0 = time.perf_counter()
        truth, frames = make_frames(tmp, args.frames)
        rec["simulate_s"] = round(time.perf_counter() - t0, 1)
        cf = [CoaddFrame(f"f{i}", f["header"], SHAPE, store="x", index=i) for i, f in enumerate(frames)]
        grid = output_grid(cf, SCALE)
        rec["grid"] = list(grid.shape)
        print(f"grid {grid.shape}", file=sys.stderr, flush=True)
        res = {"mstdask bilinear": run_mstdask(tmp, frames, grid, args.workers)}
        print(res, file=sys.stderr, flush=True)
        for kind in ("BILINEAR", "LANCZOS3"):
            res[f"SWarp {kind.lower()}"] = run_swarp(tmp, frames, grid, kind)
            print(res, file=sys.stderr, flush=True)
        for n in [int(v) for v in args.memory_n.split(",") if v.strip()]:
            r = run_mstdask(tmp, frames[:n], grid, args.workers, name=f"mem{n}")
            rec.setdefault("memory_vs_n", {})[n] = {"peak_rss_worker_mb": r["peak_rss_worker_mb"],
                                                    "per_frame_s": round(r["per_frame_s"], 2)}
            shutil.rmtree(r["image"], ignore_errors=True)
            print(rec["memory_vs_n"], file=sys.stderr, flush=True)
        if args.adaptive_frames:
            res["mstdask adaptive (reproject)"] = run_mstdask(tmp, frames[:args.adaptive_frames], grid, args.workers,
                                                              "adaptive", "adaptive")
        # flux agreement on isolated stars fully covered by every frame
        gw = grid.wcs
        imgs = {"mstdask bilinear": np.asarray(zarr.open_group(res["mstdask bilinear"]["image"])["image"][...])}
        cnt = np.asarray(zarr.open_group(res["mstdask bilinear"]["image"])["count"][...])
        for k in ("SWarp bilinear", "SWarp lanczos3"):
            d = fits.getdata(res[k]["image"]).astype(np.float32)
            imgs[k] = np.where(d == 0, np.nan, d)  # SWarp writes 0 where no frame covers
        x, y = gw.all_world2pix(truth["ra"], truth["dec"], 0)
        d, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
        xi, yi = np.round(x).astype(int), np.round(y).astype(int)
        ok = (d[:, 1] > 20) & (xi > 20) & (yi > 20) & (xi < grid.shape[1] - 20) & (yi < grid.shape[0] - 20)
        ok[ok] &= cnt[yi[ok], xi[ok]] == args.frames
        ok &= truth["flux"] > 3e3  # S/N > ~50 in one frame
        fl = {k: aperture_fluxes(v, gw, truth["ra"][ok], truth["dec"][ok]) for k, v in imgs.items()}
        tf = truth["flux"][ok]
        enc = 1 - math.exp(-6.0**2 / (2 * (2.3 / 2.3548) ** 2))  # Gaussian flux inside 6 px
        flux = {"stars": int(ok.sum())}
        for k, v in fl.items():
            rr = v / (tf * enc)
            flux[f"{k} / injected"] = {"median": round(float(np.nanmedian(rr)), 5),
                                       "robust_std": _robust(rr)}
        for k in ("SWarp bilinear", "SWarp lanczos3"):
            rr = fl["mstdask bilinear"] / fl[k]
            flux[f"mstdask / {k}"] = {"median": round(float(np.nanmedian(rr)), 5),
                                      "robust_std": _robust(rr)}
        rec["results"] = res
        rec["flux"] = flux
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(rec, indent=1, default=str))
    if rec.get("memory_vs_n"):
        print("\n| N frames (mstdask, 1 worker) | peak worker RSS | s per frame |\n|---|---|---|")
        for n, v in rec["memory_vs_n"].items():
            print(f"| {n} | {v['peak_rss_worker_mb']} MB | {v['per_frame_s']} |")
    print("\n| run | total s | s per input frame | per frame x cores | peak RSS per worker/process |")
    print("|---|---|---|---|---|")
    for k, v in rec.get("results", {}).items():
        core = v.get("per_frame_core_s", v["per_frame_s"])
        mem = v.get("peak_rss_worker_mb", v.get("peak_rss_mb"))
        print(f"| {k} | {v['seconds']:.1f} | {v['per_frame_s']:.1f} | {core:.1f} | {mem} MB |")
    return rec


if __name__ == "__main__":
    main()
