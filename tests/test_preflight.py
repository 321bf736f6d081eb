"""Up-front checks (exit status 2, before a cluster is used): a reference catalogue that does
not cover the field the frames point at, and too little free space for what a command
writes. Small simulated frames, the session's cluster, the command line called in-process."""

from __future__ import annotations

import shutil
from collections import namedtuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mstdask.cli import main
from mstdask.errors import BadInputError
from mstdask.static.refcat import check_coverage, refcat_coordinates

_Usage = namedtuple("_Usage", "total used free")


@pytest.fixture(scope="module")
def tiny_reduced(client, tmp_path_factory):
    """One simulated night of 96 x 144 px frames, ingested, calibrated and reduced:
    ``(root, truth, pointings)`` with the reduced frames' header pointings (RA, Dec)."""
    from mstdask.jobs import calibrate, ingest, reduce
    from mstdask.store import ReducedStore
    from mstdask.testing import write_survey

    root = tmp_path_factory.mktemp("preflight")
    truth = write_survey(root / "raw", nights=1, shape=(96, 144), n_bias=5, n_flat=5, n_dark=3, n_science=2,
                         n_ps_bias=30, track_probability=0.0, seed=7)
    assert ingest([root / "raw"], root / "raw.zarr", client, progress=False).ok
    assert calibrate(root / "raw.zarr", root / "cal", client, progress=False).ok
    red = reduce(root / "raw.zarr", root / "cal", root / "reduced.zarr", client, progress=False)
    assert red.ok and len(red.reduced) == 2, red.summary()
    store = ReducedStore.open(root / "reduced.zarr", mode="r")
    done = store.coord("reduced").astype(bool)
    pointings = np.column_stack([store.coord("ra")[done], store.coord("dec")[done]]).astype(float)
    assert np.isfinite(pointings).all() and len(pointings) == 2
    return root, truth, pointings


def _addr(client) -> list[str]:
    return ["--quiet", "--cluster", client.scheduler.address]


def _catalogue(path, ra, dec):
    """A Parquet catalogue with the simulator's column names."""
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    pq.write_table(pa.table({"ra": ra, "dec": dec, "mag": np.full(len(ra), 14.0),
                             "mag_g": np.full(len(ra), 14.0)}), path)
    return path


def test_catalogue_of_another_field_fails_up_front(tiny_reduced, client, tmp_path, capsys, monkeypatch):
    root, truth, pointings = tiny_reduced
    ra0, dec0 = pointings[0]
    # plenty of stars, all 20 degrees away from where the frames point
    rng = np.random.default_rng(1)
    far = _catalogue(tmp_path / "far.parquet", (ra0 + 20 + rng.uniform(0, 1, 5000)) % 360,
                     np.clip(dec0 - 20 + rng.uniform(0, 1, 5000), -90, 90))
    out = tmp_path / "cat"
    rc = main(["photometry", str(root / "reduced.zarr"), "--refcat", str(far), "--out", str(out), *_addr(client)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("error:") == 1 and str(far) in err and "does not cover the field" in err, err
    assert f"({ra0:.3f}, {dec0:+.3f})" in err, err  # where the frames point
    assert "5000 stars" in err and "RA/DEC in the raw headers" in err, err
    assert not out.exists()  # found before anything is measured or written
    # the job checks it too, before any exposure is submitted
    import mstdask.static.photometry as sp
    from mstdask.jobs import photometry

    def no_task(*args, **kwargs):
        raise AssertionError("an exposure was measured")

    monkeypatch.setattr(sp, "photometry_task", no_task)
    with pytest.raises(BadInputError, match="does not cover the field"):
        photometry(root / "reduced.zarr", far, out, client, progress=False)
    assert not (out / "exposures.parquet").exists() and not (out / "sources").exists()


def test_catalogue_of_the_field_passes(tiny_reduced):
    from mstdask.config import AstrometryConfig
    from mstdask.jobs.photometry import check_refcat_coverage
    from mstdask.store import ReducedStore

    root, truth, pointings = tiny_reduced
    red = ReducedStore.open(root / "reduced.zarr", mode="r")
    # the simulator's own catalogue covers its field (CSV)
    check_refcat_coverage(red, truth.refcat_path, None, AstrometryConfig())
    # one star 1 arcmin from a pointing among 200 000 elsewhere (Parquet): covered; without it: not
    (ra0, dec0), n = pointings[0], 200_000
    rng = np.random.default_rng(2)
    ra, dec = rng.uniform(0, 360, n), rng.uniform(-89, 89, n)
    keep = np.degrees(np.arccos(np.clip(np.sin(np.radians(dec)) * np.sin(np.radians(dec0)) + np.cos(np.radians(dec))
                                        * np.cos(np.radians(dec0)) * np.cos(np.radians(ra - ra0)), -1, 1))) > 2
    ra, dec = ra[keep], dec[keep]
    far = _catalogue(root / "far_cov.parquet", ra, dec)
    with pytest.raises(BadInputError, match="does not cover the field"):
        check_refcat_coverage(red, far, None, AstrometryConfig())
    near = _catalogue(root / "near_cov.parquet", np.append(ra, ra0 + 1 / 60 / np.cos(np.radians(dec0))),
                      np.append(dec, dec0))
    check_refcat_coverage(red, near, None, AstrometryConfig())
    r, d = refcat_coordinates(near)
    assert len(r) == len(ra) + 1 and np.isclose(d[-1], dec0)
    # the radius is the frame's: the star 1 arcmin away is outside a 0.5 arcmin circle
    with pytest.raises(BadInputError, match="within 0.008 deg"):
        check_coverage(near, pointings[:1], 0.5 / 60)
    # frames without a pointing: nothing to check (they are flagged one by one)
    assert check_coverage(far, [(np.nan, np.nan)], 1.0) == 0


def test_too_little_free_space_fails_up_front(frames, client, tmp_path, capsys, monkeypatch):
    from mstdask.jobs import plan_ingest

    folder, _ = frames
    store = tmp_path / "deep" / "s.zarr"
    need = plan_ingest([folder], store).bytes_written
    assert need == 8 * 64 * 96 * 2
    real = shutil.disk_usage
    asked = []

    def little(path):
        asked.append(str(path))
        return _Usage(10**12, 10**12 - free, free)

    free = int(0.4 * need)  # below half the estimate: refused
    monkeypatch.setattr(shutil, "disk_usage", little)
    rc = main(["ingest", str(folder), "--store", str(store), *_addr(client)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("error:") == 1 and str(store) in err and "free" in err, err
    assert f"{free / 1e9:.2f} GB free" in err and f"{need / 1e9:.2f} GB" in err, err
    assert asked and not store.exists()  # nothing written
    # at least half the estimate (compression): the ingest runs
    free = int(0.6 * need)
    assert main(["ingest", str(folder), "--store", str(store), *_addr(client)]) == 0
    monkeypatch.setattr(shutil, "disk_usage", real)


def test_calibrate_and_reduce_check_free_space(tiny_reduced, client, tmp_path, capsys, monkeypatch):
    root, _, _ = tiny_reduced
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(10**12, 10**12 - 1000, 1000))
    for cmd in (["calibrate", str(root / "raw.zarr"), "--out", str(tmp_path / "cal")],
                ["reduce", str(root / "raw.zarr"), "--calib", str(root / "cal"), "--out",
                 str(tmp_path / "red" / "reduced.zarr")]):
        rc = main([*cmd, *_addr(client)])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.count("error:") == 1 and cmd[-1] in err and "0.00 GB free" in err, err
    assert not list((tmp_path / "cal").iterdir()) and not (tmp_path / "red" / "reduced.zarr").exists()
