"""The command line end to end: demo (simulate + main job), run on real frames, info, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import xarray as xr
from astropy.io import fits

import mstdask
from mstdask.cli import main

from conftest import SHEFFIELD, need_shared


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--shape", "96x144", "--nights", "2", "--science", "2",
               "--workers", "2", "--quiet"])
    # every exposure is flagged (below): done, but not everything asked was made, so exit status 1
    printed = capsys.readouterr()
    assert rc == 1, printed
    assert printed.err.count("FLAGGED ") >= 4 and "Traceback" not in printed.err  # step summaries: stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (store,) = [p for p in manifest["products"] if p["kind"] == "raw_store"]
    fits_files = sorted((out / "raw_fits").rglob("*.fits"))
    assert store["n_inputs"] == len(fits_files) == store["frames"]
    assert store["path"] == "raw.zarr" and store["night"] == ["2023-01-18", "2023-01-19"]
    assert store["telescope"] == ["MST2"] and store["filter"] == ["g"]
    for key in ("kind", "telescope", "filter", "night", "path", "n_inputs", "inputs", "config"):
        assert key in store
    assert manifest["runs"][-1]["command"].startswith("mstdask demo")
    ds = mstdask.open_store(out / "raw.zarr")
    i = int(np.flatnonzero(ds.imagetyp.values == "science")[0])
    assert np.array_equal(ds.raw[i].values, fits.getdata(str(ds.path.values[i])))
    # the night calibrations and the per-frame reduction ran as part of the main job
    later = ("catalog", "coadd", "lightcurves", "precision")  # the steps after the photometry
    kinds = sorted(p["kind"] for p in manifest["products"] if not p["path"].startswith(later))
    assert kinds == ["bad_pixel_mask", "bad_pixel_mask", "master_bias", "master_bias", "master_flat", "master_flat",
                     "ps_mask", "raw_store", "reduced_store"]
    # ... and STATIC photometry with the simulator's reference catalogue: on 96 x 144 px (2 arcmin)
    # frames a handful of stars is too few to solve, so every exposure is flagged with its reason
    # (listed in the summary; the products that could be made are all there)
    (table,) = [p for p in manifest["products"] if p["kind"] == "exposure_table"]
    assert table["path"] == "catalog/exposures.parquet"
    exp = pd.read_parquet(out / table["path"])
    assert len(exp) == 4 and set(exp["status"]) == {"flagged"} and exp["reason"].str.len().min() > 10
    # nothing to stack or to follow: no coadd, no precision, and the run still finishes
    assert not any(p["path"].startswith(("coadd", "precision")) for p in manifest["products"])
    (red,) = [p for p in manifest["products"] if p["kind"] == "reduced_store"]
    assert red["n_inputs"] == red["frames"] == 4 and red["night"] == ["2023-01-18", "2023-01-19"]
    rds = xr.open_zarr(out / red["path"])
    assert rds["data"].dtype == np.float32 and rds["mask"].dtype == np.uint8 and rds.sizes["frame"] == 4
    for p in manifest["products"]:
        if p["kind"] in ("raw_store", "reduced_store") or p["path"].startswith(later):
            continue
        hdr = fits.getheader(out / p["path"])
        assert hdr["PRODTYPE"] == p["kind"] and hdr["TELESCOP"] == "MST2" and hdr["NIGHT"] == p["night"]
        assert hdr["NCOMBINE"] == p["n_inputs"] and hdr["SOFTWARE"].startswith("mstdask")
        assert xr.open_zarr(out / "calib.zarr", group=p["zarr_group"].split("/", 1)[1])[p["kind"]].shape == (96, 144)
    (ps,) = [p for p in manifest["products"] if p["kind"] == "ps_mask"]
    assert ps["n_inputs"] == 100 and abs(ps["ps_fraction"] - 0.03) < 0.01 and min(ps["group_agreement"]) > 0.8
    # info, human and JSON
    assert main(["info", str(out / "raw.zarr")]) == 0
    text = capsys.readouterr().out
    assert "2023-01-18" in text and "bias" in text
    assert main(["info", str(out / "raw.zarr"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] == len(fits_files) and set(info["nights"]) == {"2023-01-18", "2023-01-19"}
    assert info["imagetyp_counts"]["science"] == 4


def test_run_on_real_frames_reports_rejects(tmp_path):
    src = need_shared(SHEFFIELD)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mstdask.cli", "run", str(src), "--out", str(out),
                           "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # dark1.fit (float32) is rejected, the rest is done
    assert "REJECTED" in proc.stdout and "dark1.fit" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["path"].endswith("dark1.fit") for r in manifest["rejected"]] == [True]
    assert manifest["products"][0]["n_inputs"] == 26


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2
    assert "no Zarr store" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: nonsense\n")
    assert main(["ingest", str(tmp_path), "--store", str(tmp_path / "s.zarr"), "--cluster", str(bad)]) == 2
    assert "kind" in capsys.readouterr().err
