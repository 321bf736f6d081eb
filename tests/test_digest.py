"""Product digests (``scripts/compare_products.py``): equal for the same products in another
folder, different when any pixel, table value or array value changes; timings ignored."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from astropy.io import fits

from mstdask.testing._digest import compare_digests, product_digest


def _products(root):
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    hdr = fits.Header({"MAGZERO": 25.1, "DATE": "2026-12-06T00:00:00", "INPUTDIR": str(root / "raw")})
    fits.PrimaryHDU(rng.normal(size=(20, 30)).astype(np.float32), header=hdr).writeto(root / "master.fits")
    pd.DataFrame({"exposure": ["a", "b"], "mag": [14.2, 15.3], "seconds": [0.5, 0.7],
                  "path": [str(root / "raw" / "a.fits"), str(root / "raw" / "b.fits")]}).to_parquet(root / "t.parquet")
    xr.Dataset({"mag": (("source", "epoch"), rng.normal(size=(4, 3)).astype(np.float32))},
               attrs={"config": {"radius": 1.0}}).to_zarr(root / "cube.zarr", zarr_format=3, consolidated=False)
    (root / "characterization.json").write_text(json.dumps({"gain": 0.8, "seconds": 3.0, "store": str(root)}))
    (root / "manifest.json").write_text(json.dumps({"runs": [{"created": "now"}]}))


@pytest.fixture
def two(tmp_path):
    a, b = tmp_path / "run_a", tmp_path / "elsewhere" / "run_b"
    _products(a)
    b.parent.mkdir()
    shutil.copytree(a, b)
    # the copy names its own folder wherever it names a path, as a second run would
    df = pd.read_parquet(b / "t.parquet")
    df["path"] = df["path"].str.replace(str(a), str(b))
    df.to_parquet(b / "t.parquet")
    with fits.open(b / "master.fits", mode="update") as h:
        h[0].header["INPUTDIR"] = str(b / "raw")
        h[0].header["DATE"] = "2026-12-07T00:00:00"
    (b / "characterization.json").write_text(json.dumps({"gain": 0.8, "seconds": 9.0, "store": str(b)}))
    return a, b


def test_same_products_elsewhere_are_identical(two):
    a, b = two
    da, db = product_digest(a), product_digest(b)
    assert set(da) == {"master.fits", "t.parquet", "cube.zarr", "characterization.json"}
    assert compare_digests(da, db) == []


def test_any_changed_value_is_found(two):
    a, b = two
    with fits.open(b / "master.fits", mode="update") as h:
        h[0].data[3, 4] += 1e-3
    df = pd.read_parquet(b / "t.parquet")
    df.loc[1, "mag"] += 1e-9
    df.loc[0, "seconds"] = 99.0  # a timing: not a difference
    df.to_parquet(b / "t.parquet")
    ds = xr.open_zarr(b / "cube.zarr", consolidated=False).load()
    ds["mag"][0, 0] = 0.0
    ds.to_zarr(b / "cube.zarr", mode="w", zarr_format=3, consolidated=False)
    diff = compare_digests(product_digest(a), product_digest(b))
    # exactly the pixel, the magnitude and the array value; the changed timing column is not a difference
    assert sorted(d.split(":")[0] for d in diff) == ["cube.zarr mag", "master.fits master.fits[0]", "t.parquet mag"]


def test_missing_product_is_found(two):
    a, b = two
    (b / "t.parquet").unlink()
    assert compare_digests(product_digest(a), product_digest(b)) == ["t.parquet: only in the first"]
