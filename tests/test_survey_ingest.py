"""A simulated multi-night, multi-telescope survey ingested: every coordinate matches the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mstdask.config import IngestConfig, SiteConfig
from mstdask.jobs import ingest
from mstdask.store import describe, open_store
from mstdask.testing import frame_checksum, write_survey


def test_survey_ingest_matches_truth(client, tmp_path):
    truth = write_survey(tmp_path / "raw", nights=2, shape=(60, 90), telescopes=("MST2", "MST3"),
                         n_bias=3, n_flat=4, n_dark=2, n_science=3, n_ps_bias=12, seed=7)
    report = ingest([tmp_path / "raw"], tmp_path / "s.zarr", client, progress=False)
    assert report.ok and len(report.written) == len(truth.frames)
    ds = open_store(tmp_path / "s.zarr")
    by_path = {str(Path(f.path).resolve()): f for f in truth.frames}
    for i in range(ds.sizes["frame"]):
        f = by_path[str(ds.path.values[i])]
        assert ds.imagetyp.values[i] == f.kind
        assert ds.night.values[i] == f"{f.night[:4]}-{f.night[4:6]}-{f.night[6:]}"
        assert ds.telescope.values[i] == f.telescope and ds["filter"].values[i] == f.filter
        assert ds.exptime.values[i] == f.exptime
        assert frame_checksum(ds.raw[i].values) == f.checksum
    info = describe(tmp_path / "s.zarr")
    assert info["telescopes"] == ["MST2", "MST3"] and info["filters"] == ["g", "r"]
    night0 = info["nights"]["2023-01-18"]
    # per telescope: 3 bias + 12 PS bias on the PS night, 4 flats, 2 darks, 3 science
    assert (night0["bias"], night0["flat"], night0["dark"], night0["science"]) == (30, 8, 4, 6)


def test_night_depends_on_site(client, tmp_path):
    truth = write_survey(tmp_path / "raw", nights=1, shape=(40, 60), n_bias=2, n_flat=2, n_dark=1,
                         n_science=2, ps_bias_night=None, seed=3)
    # the same frames seen from a site 12 h west of Xinglong fall on other nights
    ingest([tmp_path / "raw"], tmp_path / "west.zarr", client,
           IngestConfig(site=SiteConfig(name="west", utc_offset_hours=-4)), progress=False)
    ds = open_store(tmp_path / "west.zarr")
    assert set(ds.night.values.tolist()) == {"2023-01-17"}
    assert len(truth.frames) == ds.sizes["frame"]


def test_calibrate_identical_for_one_and_two_workers(tmp_path):
    """Calibration products do not depend on the number of workers."""
    from astropy.io import fits
    from distributed import Client, LocalCluster

    from mstdask.jobs import calibrate

    write_survey(tmp_path / "raw", nights=2, shape=(60, 90), n_bias=4, n_flat=4, n_dark=3, n_science=1,
                 n_ps_bias=30, seed=5)
    products = {}
    for n in (1, 2):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
                Client(cl) as c:
            assert ingest([tmp_path / "raw"], tmp_path / f"s{n}.zarr", c, progress=False).ok
            rep = calibrate(tmp_path / f"s{n}.zarr", tmp_path / f"cal{n}", c, progress=False)
            assert rep.ok, rep.summary()
            products[n] = {p["path"]: fits.getdata(tmp_path / f"cal{n}" / p["path"]) for p in rep.products}
    assert sorted(products[1]) == sorted(products[2]) and len(products[1]) == 7  # 2 bias, 2 bad, 2 flat, 1 PS
    for path, data in products[1].items():
        np.testing.assert_array_equal(data, products[2][path], err_msg=path)
