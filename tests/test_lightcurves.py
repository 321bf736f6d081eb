"""Light-curve cube, precision vs magnitude, catalogue stacks and variability
(Xiao et al. 2025, sections 4.3-4.5): statistical recovery of injected noise and
variables on synthetic catalogues, the Eqs. 1-5 theory against an independent closed
form, chunking invariance, laziness, appends, and the CLI on a simulated night."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from mstdask.lightcurves import _lc_kernels as K
from mstdask.config import LightcurveConfig, PrecisionConfig
from mstdask.lightcurves import CubeStore, open_cube, precision_table, source_statistics, stacking_table
from mstdask.jobs import lightcurves, precision
from mstdask.testing import zero_point_e
from mstdask.testing import write_catalogs

N_SRC, N_EP = 1500, 100


def _cube_to_truth(ds, truth) -> np.ndarray:
    """Cube row of every simulated star (nearest within 1"), -1 for none."""
    tree = cKDTree(K.unit_vectors(ds["ra"].values, ds["dec"].values))
    idx, _ = K.match_nearest(tree, K.unit_vectors(truth.ra, truth.dec), 1.0, unique=False)
    return idx


@pytest.fixture(scope="module")
def survey(client, tmp_path_factory):
    """Synthetic catalogues (constant stars with theory noise, 8 variables, 20 % of the
    stars not in the reference catalogue), the cube and the precision products."""
    root = tmp_path_factory.mktemp("lc")
    truth = write_catalogs(root / "cat", N_SRC, N_EP, seed=3, n_variables=8, amplitude=(0.1, 0.3),
                           mag_range=(11.0, 18.5), refcat_fraction=0.8, detect_fraction=0.95)
    rep = lightcurves(root / "cat", root / "lc" / "LC.zarr", client,
                      LightcurveConfig(source_chunk=512, epoch_chunk=32), progress=False)
    prep = precision(root / "lc" / "LC.zarr", root / "prec", client, PrecisionConfig(min_epochs=10), progress=False)
    return root, truth, rep, prep


def test_theory_matches_independent_closed_form():
    cfg = PrecisionConfig()
    mag = np.array([10.0, 13.0, 16.0, 18.5, 21.0])
    th = K.snr_theory(mag, cfg)
    # independent: the simulator's AB zero point (e-/s) and the CCD equation by hand
    zp = zero_point_e(cfg.wavelength_aa, cfg.bandwidth_aa, cfg.efficiency, cfg.diameter_cm)
    n_star = 10 ** (-0.4 * (mag - zp)) * cfg.exptime_s
    n_sky = 10 ** (-0.4 * (cfg.sky_mag - zp)) * cfg.exptime_s * cfg.pixel_scale_arcsec**2
    n_pix = math.pi * (cfg.seeing_arcsec / cfg.pixel_scale_arcsec) ** 2
    np.testing.assert_allclose(th["n_star"], n_star, rtol=1e-10)
    snr = n_star / np.sqrt(n_star + n_sky * n_pix)
    scint = 0.09 * 30 ** (-2 / 3) * math.exp(-960 / 8000) / math.sqrt(600)
    expected = np.hypot(1.0857362 / snr, 1.0857362 * scint)
    np.testing.assert_allclose(th["total"], expected, rtol=1e-6)
    np.testing.assert_allclose(th["photon"], 1.0857362 / np.sqrt(n_star), rtol=1e-6)
    # the regimes: photon-limited bright end (slope 0.2 dex/mag), sky-limited faint end (0.4)
    assert th["photon"][1] > th["sky"][1] and th["sky"][-1] > th["photon"][-1]
    slope = np.diff(np.log10(th["sky"])) / np.diff(mag)
    np.testing.assert_allclose(slope, 0.4, rtol=1e-9)
    # the paper's headline: ~4 mmag at G 13 is systematics, the theory is below it; ~40 mmag at G 18
    assert th["total"][1] < 0.004 and 0.02 < K.snr_theory(np.array([18.0]), cfg)["total"][0] < 0.06


def test_cube_matches_catalogues(survey):
    root, truth, rep, _ = survey
    assert rep.ok and len(rep.added) == N_EP and rep.already == 0
    ds = open_cube(root / "lc" / "LC.zarr")
    assert ds.sizes["epoch"] == N_EP and ds.sizes["source"] == N_SRC  # one source per star, no extras
    row = _cube_to_truth(ds, truth)
    assert (row >= 0).all() and len(np.unique(row)) == N_SRC
    # reference stars keep their refcat row; the others are new sources
    ref_id = ds["ref_id"].values[row]
    assert ((ref_id >= 0) == truth.in_refcat).all()
    assert rep.new_sources == int((~truth.in_refcat).sum())
    # one exposure's catalogue lands exactly in its column
    cat = pd.read_parquet(next((root / "cat" / "sources").rglob(f"{truth.exposures[17]}.parquet")))
    e = int(np.flatnonzero(ds["exposure"].values == truth.exposures[17])[0])
    idx, _ = K.match_nearest(cKDTree(K.unit_vectors(ds["ra"].values, ds["dec"].values)),
                             K.unit_vectors(cat["ra"], cat["dec"]), 1.0)
    col = ds["mag"][:, e].values
    np.testing.assert_array_equal(col[idx], cat["mag_aper"].to_numpy())
    assert np.isnan(np.delete(col, idx)).all()
    assert ds["mag"].dtype == np.float32 and ds["flags"].dims == ("source", "epoch")
    assert str(ds["time"].dtype).startswith("datetime64")


def test_scatter_follows_injected_noise_and_theory(survey):
    root, truth, _, prep = survey
    var = pd.read_parquet(root / "prec" / "variability.parquet")
    for col in ("source", "ra", "dec", "n_epochs", "mean_mag", "std", "robust_std", "chi2_dof"):
        assert col in var
    ds = open_cube(root / "lc" / "LC.zarr")
    row = _cube_to_truth(ds, truth)
    by_source = var.set_index("source")
    const = ~truth.variable
    ratio = by_source.loc[row[const], "std"].to_numpy() / truth.sigma[const]
    rratio = by_source.loc[row[const], "robust_std"].to_numpy() / truth.sigma[const]
    # ~95 epochs: the std of a std is ~7 %, the median over 1500 stars is good to <1 %
    assert abs(np.median(ratio) - 1) < 0.02 and abs(np.median(rratio) - 1) < 0.04
    assert abs(np.median(by_source.loc[row[const], "chi2_dof"]) - 1) < 0.03
    # binned medians follow the theory curve the simulator used (Eqs. 1-5)
    prec = pd.read_parquet(root / "prec" / "precision.parquet")
    full = prec[prec["count"] >= 30]
    assert len(full) >= 10
    np.testing.assert_allclose(full["std_median"], full["theory_total"], rtol=0.08)
    np.testing.assert_allclose(full["robust_std_median"], full["theory_total"], rtol=0.12)
    assert 0.0005 < prep.best_precision_mag < 0.003


def test_stacking_scatter_falls_as_inverse_sqrt_n(survey):
    root, truth, _, _ = survey
    stack = pd.read_parquet(root / "prec" / "stacking.parquet")
    single = stack[stack["n_stack"] == 1].set_index("mag_center")["scatter_median"]
    for n in (4, 9, 16):  # at least 5 runs of N epochs per star
        g = stack[(stack["n_stack"] == n) & (stack["count"] >= 50)].set_index("mag_center")["scatter_median"]
        assert len(g) >= 5
        r = (g * np.sqrt(n) / single.loc[g.index]).to_numpy()
        assert abs(np.median(r) - 1) < 0.08, (n, r)
    # N=100 of ~95 epochs: fewer than two runs, no scatter
    assert stack[stack["n_stack"] == 100]["scatter_median"].isna().all()


def test_injected_variables_ranked_top(survey):
    root, truth, _, prep = survey
    var = pd.read_parquet(root / "prec" / "variability.parquet")
    ds = open_cube(root / "lc" / "LC.zarr")
    row = _cube_to_truth(ds, truth)
    injected = set(row[truth.variable].tolist())
    assert set(var["source"].iloc[:len(injected)]) == injected
    chi2 = var["chi2_dof"].dropna()
    assert var["rank"].iloc[0] == 1 and chi2.is_monotonic_decreasing and chi2.index.max() < len(chi2)
    assert set(prep.top_variables) <= injected
    for f in ("fig12_precision.png", "fig14_stacking.png", "fig15_lightcurves.png"):
        assert (root / "prec" / f).stat().st_size > 10_000
    kinds = {p["kind"] for p in __import__("json").loads((root / "prec" / "manifest.json").read_text())["products"]}
    assert {"precision_curve", "stacking_curve", "variability_table", "light_curves", "figure"} <= kinds


def test_identical_statistics_under_other_chunkings(survey, client):
    root, *_ = survey
    cfg = PrecisionConfig(min_epochs=10, stack_n=(1, 4, 9))
    a = source_statistics(open_cube(root / "lc" / "LC.zarr"), cfg).compute()
    ds = open_cube(root / "lc" / "LC.zarr", source_chunk=1024).chunk({"source": 700, "epoch": 17})
    b = source_statistics(ds, cfg).compute()
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    # and the compiled kernel agrees with the NumPy formulation
    sub = open_cube(root / "lc" / "LC.zarr").isel(source=slice(0, 300)).load()
    fast = K.block_statistics_fast(sub["mag"].values, sub["magerr"].values, sub["flags"].values, min_epochs=10,
                                   stack_n=(1, 4, 9))
    ref = K.block_statistics(sub["mag"].values, sub["magerr"].values, sub["flags"].values, min_epochs=10,
                             stack_n=(1, 4, 9))
    for name, x, y in zip((*K.STAT_NAMES, "stacked"), fast, ref):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6, err_msg=name)
    with pytest.raises(Exception, match="multiple of the cube's on-disk"):
        open_cube(root / "lc" / "LC.zarr", source_chunk=700)


def test_reductions_are_lazy(survey):
    import dask

    root, *_ = survey

    def forbidden(*args, **kwargs):
        raise AssertionError("computed before asked")

    with dask.config.set(scheduler=forbidden):
        ds = open_cube(root / "lc" / "LC.zarr")
        st = source_statistics(ds)
        prec, stack = precision_table(st), stacking_table(st)
    assert st["std"].chunks is not None and hasattr(prec, "dask") and hasattr(stack, "dask")
    # both curves share one statistics task per source chunk (the kernel is never fused into
    # each column and run again)
    graph = {**dict(prec.__dask_graph__()), **dict(stack.__dask_graph__())}
    kernel_tasks = [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("source-statistics-")]
    assert len(kernel_tasks) == len(ds.chunks["source"])
    df = prec.compute(scheduler="synchronous")
    assert {"mag_center", "std_median", "theory_total"} <= set(df.columns)


def _chunk_files(cube: Path, col: int) -> dict[str, tuple[int, int]]:
    out = {}
    for var in ("mag", "magerr", "flags"):
        for f in (cube / var / "c").glob(f"*/{col}"):
            st = f.stat()
            out[str(f)] = (st.st_mtime_ns, st.st_size)
    return out


def test_append_adds_epochs_without_rewriting_chunks(client, tmp_path):
    cat, cube = tmp_path / "cat", tmp_path / "LC.zarr"
    truth = write_catalogs(cat, 400, 40, seed=5, n_variables=0, refcat_fraction=0.9)
    cfg = LightcurveConfig(source_chunk=128, epoch_chunk=16)
    r1 = lightcurves(cat, cube, client, cfg, progress=False)
    assert r1.ok and r1.epochs == 40
    full = {**_chunk_files(cube, 0), **_chunk_files(cube, 1)}  # columns 0-15 and 16-31 are complete
    assert len(full) >= 3 * 4 * 2
    before = open_cube(cube).load()
    # later exposures of the same field, with some one-off detections (new sources)
    write_catalogs(cat, 400, 25, seed=5, first_epoch=40, truth=truth, spurious_per_epoch=3)
    r2 = lightcurves(cat, cube, client, progress=False)  # config read back from the cube
    assert r2.ok and len(r2.added) == 25 and r2.already == 40 and r2.new_sources > 0
    assert {**_chunk_files(cube, 0), **_chunk_files(cube, 1)} == full  # not rewritten
    after = open_cube(cube)
    assert after.sizes["epoch"] == 65 and after.sizes["source"] == before.sizes["source"] + r2.new_sources
    old = after.isel(source=slice(0, before.sizes["source"]), epoch=slice(0, 40))
    np.testing.assert_array_equal(old["mag"].values, before["mag"].values)
    assert np.isnan(after["mag"].values[before.sizes["source"]:, :40]).all()
    assert np.isfinite(after["mag"].values[:, 40:]).sum() > 0.9 * 25 * 400
    # a killed run: epochs 48-63 not marked written are redone in place, the rest skipped
    store = CubeStore.open(cube)
    store.group["written"][48:64] = False
    store.group["mag"][:, 48:64] = np.nan
    r3 = lightcurves(cat, cube, client, progress=False)
    assert len(r3.added) == 16 and r3.already == 49
    np.testing.assert_array_equal(open_cube(cube)["mag"].values, after["mag"].values)
    r4 = lightcurves(cat, cube, client, progress=False)
    assert not r4.added and r4.already == 65


def test_cli_end_to_end_on_a_simulated_night(static_night, client, tmp_path):
    from mstdask.cli import main

    root, truth, rc = static_night
    assert rc == 0
    cat = tmp_path / "cat"
    shutil.copytree(root / "cat", cat)  # the fixture is shared: work on a copy
    exps = pd.read_parquet(cat / "exposures.parquet")
    n_ok = int((exps["status"] == "ok").sum())
    addr = ["--quiet", "--cluster", client.scheduler.address]
    lc = tmp_path / "out" / "LC.zarr"
    assert main(["lightcurves", str(cat), "--out", str(lc), *addr]) == 0
    ds = open_cube(lc)
    assert ds.sizes["epoch"] == n_ok >= 3 and ds.sizes["source"] > 50
    # unsaturated bright reference stars are seen in every exposure, at their catalogue magnitude
    ref = ds["ref_id"].values >= 0
    flags = np.nan_to_num(ds["flags"].values, nan=2).astype(int)
    n = (np.isfinite(ds["mag"].values) & ((flags & 2) == 0)).sum(axis=1)
    rmag = ds["ref_mag"].values
    bright = ref & (rmag > 14.5) & (rmag < 16.5) & (n == n_ok)
    assert bright.sum() > 10
    dm = np.nanmedian(ds["mag"].values[bright], axis=1) - ds["ref_mag"].values[bright]
    assert abs(np.median(dm)) < 0.05
    manifest = __import__("json").loads((lc.parent / "manifest.json").read_text())
    assert manifest["products"][0]["kind"] == "lightcurve_cube"
    out = tmp_path / "prec"
    assert main(["precision", str(lc), "--out", str(out), "--min-epochs", "3", *addr]) == 0
    var = pd.read_parquet(out / "variability.parquet")
    assert len(var) == ds.sizes["source"] and (var["n_epochs"] <= n_ok).all()
    assert (out / "fig12_precision.png").exists() and (out / "precision.parquet").exists()
    # the second run adds nothing; a wrong input is one clear error
    assert main(["lightcurves", str(cat), "--out", str(lc), *addr]) == 0
    assert open_cube(lc).sizes["epoch"] == n_ok
    assert main(["precision", str(cat), "--out", str(out), *addr]) == 2


def test_one_bad_catalogue_is_reported_not_fatal(client, tmp_path):
    cat = tmp_path / "cat"
    truth = write_catalogs(cat, 200, 12, seed=9, n_variables=0)
    bad = next((cat / "sources").rglob(f"{truth.exposures[5]}.parquet"))
    bad.write_bytes(b"not a parquet file")
    rep = lightcurves(cat, tmp_path / "LC.zarr", client, LightcurveConfig(epoch_chunk=4), progress=False)
    assert not rep.ok and [e for e, _ in rep.failed] == [truth.exposures[5]] and "cannot read" in rep.failed[0][1]
    assert len(rep.added) == 11 and open_cube(tmp_path / "LC.zarr").sizes["epoch"] == 11
