"""STATIC on one full MST frame (issue 6): mstdask's ``measure_exposure`` beside SExtractor.

Simulates a full 9576 x 6388 reduced frame (~50 000 stars, Moffat PSF growing towards the
corners, 4th-order distortion, known zero point), writes it as float32 FITS, then times on
one core, on the same frame and in the same run:

* mstdask: everything of ``mstdask photometry`` for one exposure (background, sources,
  25-aperture choice, aperture correction, blind astrometry + TPV, PSF model + PSF fluxes,
  zero point), in-process;
* SExtractor (``source-extractor``, 1 thread) with the same background mesh, threshold and
  the same 25 apertures measured for every source;
* optionally (``--psfex``) the classical PSF chain: SExtractor (LDAC) -> PSFEx ->
  SExtractor with ``MAG_PSF``.

It then cross-matches the two catalogues and reports how the best-aperture magnitudes agree.

Run by hand (never in CI)::

    python benchmarks/bench_photometry.py --repeat 3 [--psfex] [--workdir /tmp/mstdask_bench_phot]
"""

from __future__ import annotations

import os

# one core per measurement: no BLAS/OpenMP threads behind numpy's back
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, med  # noqa: E402

RA0, DEC0 = 30.0, 40.0


def simulate(work: Path, seed: int, shape: tuple[int, int] | None = None) -> dict:
    """A full reduced frame, its mask, the reference catalogue and the truth."""
    from astropy.io import fits

    from mstdask.masks import saturated
    from mstdask.testing import CameraModel, make_camera, make_star_catalog

    model = CameraModel(sip_corner_px=4.0) if shape is None else CameraModel(sip_corner_px=4.0, shape=shape)
    cam = make_camera(model, seed=seed)
    ny, nx = cam.shape
    side = cam.model.pixel_scale_arcsec / 3600 * 1.1
    cat = make_star_catalog(RA0, DEC0, nx * side, ny * side, density_per_deg2=16000, mag_range=(10, 20.5),
                            rng=seed + 1)
    t = time.perf_counter()
    data, truth = cam.science(300.0, RA0, DEC0, {"ra": cat["ra"], "dec": cat["dec"], "mag": cat["mag"]},
                              rng=seed + 2, tracks=0)
    red = ((data.astype(np.float32) - cam.expected_bias_map) / cam.flat_response(0)).astype(np.float32)
    mask = saturated(data, 50000.0)
    print(f"simulated in {time.perf_counter() - t:.0f} s: {int(np.sum(truth.stars['in_frame']))} stars in the "
          f"frame, zero point {truth.zero_point_adu:.4f}, FWHM {truth.fwhm_px:.2f} px", flush=True)
    hdr = fits.Header({"EXPTIME": 300.0, "GAIN": 0.25, "SATURATE": 50000.0})
    fits.PrimaryHDU(red, hdr).writeto(work / "reduced.fits", overwrite=True)
    # SExtractor's FLAG_IMAGE: the mask bits (its IMAFLAGS_ISO is the OR under the isophote)
    fits.PrimaryHDU(mask.astype(np.int16)).writeto(work / "mask.fits", overwrite=True)
    cat.write(work / "refcat.csv", overwrite=True)
    return {"red": red, "mask": mask, "truth": truth}


def run_mstdask(sim: dict, work: Path) -> tuple[float, dict]:
    from mstdask.static.photometry import measure_exposure
    from mstdask.static.refcat import load_refcat

    ref = load_refcat(work / "refcat.csv", None, "g")
    t = time.perf_counter()
    res = measure_exposure(sim["red"], sim["mask"], ref, exptime=300.0, ra0=RA0 + 0.02, dec0=DEC0 + 0.03,
                           gain=0.25)
    return time.perf_counter() - t, res


def sextractor_params(path: Path, extra: tuple[str, ...] = ()) -> None:
    path.write_text("\n".join(("NUMBER", "X_IMAGE", "Y_IMAGE", "XWIN_IMAGE", "YWIN_IMAGE", "FLUX_APER(25)",
                               "FLUXERR_APER(25)", "MAG_APER(25)", "MAGERR_APER(25)", "FWHM_IMAGE", "FLAGS",
                               "IMAFLAGS_ISO") + extra) + "\n")


def run_sextractor(work: Path, radii: np.ndarray, catalog: str, catalog_type: str = "FITS_1.0",
                   params: tuple[str, ...] = (), psf: str | None = None) -> float:
    """One SExtractor run on ``reduced.fits`` with mstdask's settings; returns the wall time."""
    pfile = work / f"{catalog}.param"
    sextractor_params(pfile, params)
    cmd = ["source-extractor", str(work / "reduced.fits"), "-c", "/usr/share/source-extractor/default.sex",
           "-CATALOG_NAME", str(work / catalog), "-CATALOG_TYPE", catalog_type, "-PARAMETERS_NAME", str(pfile),
           "-FILTER_NAME", "/usr/share/source-extractor/default.conv",
           "-STARNNW_NAME", "/usr/share/source-extractor/default.nnw",
           "-DETECT_THRESH", "3.0", "-ANALYSIS_THRESH", "3.0", "-DETECT_MINAREA", "5",
           "-BACK_SIZE", "128", "-BACK_FILTERSIZE", "3",
           "-PHOT_APERTURES", ",".join(f"{2 * r:g}" for r in radii),
           "-GAIN", str(300.0 * 0.25), "-SATUR_LEVEL", "50000", "-MAG_ZEROPOINT", "0",
           "-PIXEL_SCALE", "0.862", "-SEEING_FWHM", "2.0",
           "-FLAG_IMAGE", str(work / "mask.fits"), "-NTHREADS", "1", "-VERBOSE_TYPE", "QUIET"]
    if psf:
        cmd += ["-PSF_NAME", psf]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def run_psfex(work: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["psfex", str(work / "sex.ldac"), "-c", "/usr/share/psfex/default.psfex", "-PSFVAR_DEGREES", "2",
                    "-PSF_DIR", str(work), "-CHECKPLOT_TYPE", "NONE", "-CHECKIMAGE_TYPE", "NONE",
                    "-NTHREADS", "1", "-VERBOSE_TYPE", "QUIET", "-WRITE_XML", "N"], check=True)
    return time.perf_counter() - t


def compare(res, work: Path, radii: np.ndarray) -> dict:
    """Best-aperture instrumental magnitudes of mstdask against SExtractor's same aperture."""
    from astropy.table import Table
    from scipy.spatial import cKDTree

    sx = Table.read(work / "sex.fits", hdu=1)
    src = res.sources
    k = int(np.argmin(np.abs(radii - res.record["best_aperture_px"])))
    # SExtractor pixels are 1-based; mstdask's 0-based
    d, j = cKDTree(np.column_stack([sx["XWIN_IMAGE"] - 1, sx["YWIN_IMAGE"] - 1])).query(
        np.column_stack([src["x"], src["y"]]))
    m_sx = np.asarray(sx["MAG_APER"][:, k], float)[j] + 2.5 * np.log10(300.0)  # per second, like mag_*_inst
    # mstdask's instrumental best-aperture magnitude: the catalogue's less the aperture correction
    x, y = np.asarray(src["x"], float), np.asarray(src["y"], float)
    m_md = np.asarray(src["mag_aper_inst"], float) - res.diagnostics["aperture_correction"]["poly"](x, y)
    ok = (d < 0.3) & (np.asarray(src["magerr_aper"]) < 0.01) & (np.asarray(src["flags"]) == 0) \
        & (np.asarray(sx["FLAGS"])[j] == 0) & np.isfinite(m_sx)
    dm = m_md[ok] - m_sx[ok]
    return {"n_sextractor": len(sx), "n_mstdask": len(src["x"]), "matched_bright": int(ok.sum()),
            "median_dmag": float(np.median(dm)), "robust_scatter_dmag": float(1.4826 * np.median(np.abs(dm - np.median(dm)))),
            "best_radius": float(radii[k])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--psfex", action="store_true", help="also time SExtractor -> PSFEx -> SExtractor MAG_PSF")
    ap.add_argument("--workdir", default="/tmp/mstdask_bench_phot")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=2, metavar=("NY", "NX"), help="a smaller frame (to try the script)")
    args = ap.parse_args()
    from mstdask.config import PhotometryConfig

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    radii = np.asarray(PhotometryConfig().aperture_radii_px, float)
    try:
        sim = simulate(work, args.seed, tuple(args.shape) if args.shape else None)
        t_md, t_sx, t_chain = [], [], []
        res = None
        for i in range(args.repeat):
            t, res = run_mstdask(sim, work)
            t_md.append(t)
            t_sx.append(run_sextractor(work, radii, "sex.fits"))
            print(f"repeat {i}: mstdask {t:.1f} s, SExtractor (25 apertures) {t_sx[-1]:.1f} s", flush=True)
        if args.psfex:
            t1 = run_sextractor(work, radii, "sex.ldac", "FITS_LDAC", ("VIGNET(35,35)", "SNR_WIN", "ELONGATION",
                                                                        "FLUX_RADIUS"))
            t2 = run_psfex(work)
            t3 = run_sextractor(work, radii, "sexpsf.fits", params=("MAG_PSF", "MAGERR_PSF"),
                                psf=str(work / "sex.psf"))
            t_chain = [t1, t2, t3]
            print(f"SExtractor LDAC {t1:.1f} s + PSFEx {t2:.1f} s + SExtractor MAG_PSF {t3:.1f} s", flush=True)
        rec = res.record
        cmp_ = compare(res, work, radii)
        truth = sim["truth"]
        print()
        print(f"machine: {cpu_model()}, {os.cpu_count()} cores; date {time.strftime('%Y-%m-%d')}")
        print(f"mstdask measure_exposure, 1 core: median {med(t_md):.1f} s  {['%.1f' % v for v in t_md]}")
        print(f"SExtractor 2.25, 1 thread, 25 apertures: median {med(t_sx):.1f} s  {['%.1f' % v for v in t_sx]}")
        print(f"ratio mstdask / SExtractor: {med(t_md) / med(t_sx):.2f}")
        if t_chain:
            print(f"SExtractor + PSFEx + SExtractor(PSF): {sum(t_chain):.1f} s; "
                  f"ratio mstdask / chain {med(t_md) / sum(t_chain):.2f}")
        print(f"sources: mstdask {cmp_['n_mstdask']}, SExtractor {cmp_['n_sextractor']}; best aperture "
              f"{rec['best_aperture_px']:.1f} px, reference {rec['reference_aperture_px']:.1f} px")
        print(f"mstdask - SExtractor best-aperture magnitude over {cmp_['matched_bright']} bright stars: median "
              f"{cmp_['median_dmag'] * 1000:+.1f} mmag, robust scatter {cmp_['robust_scatter_dmag'] * 1000:.1f} mmag")
        print(f"zero point {rec['zero_point']:.4f} vs injected {truth.zero_point_adu:.4f} "
              f"({(rec['zero_point'] - truth.zero_point_adu) * 1000:+.1f} mmag); astrometry {rec['astrometric_rms_mas']:.0f} mas "
              f"({rec['astrometric_rms_mas_before']:.0f} linear) over {rec['n_astrometric']} stars; "
              f"PSF zero point {rec['zero_point_psf']:.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
