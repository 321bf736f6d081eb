"""One exit-status rule for every command (README, "Exit status"): 0 only when everything
asked was made, 1 when inputs, frames or exposures were rejected, skipped or flagged (listed),
2 when the command could not run (found up front). Small simulated frames, the session's
cluster, the command line called in-process."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mstdask.cli import main
from mstdask.errors import BadInputError
from mstdask.static.refcat import check_refcat, refcat_columns

from conftest import write_frame


@pytest.fixture(scope="module")
def tiny_night(client, tmp_path_factory):
    """One simulated night of 96 x 144 px frames, ingested, calibrated and reduced: on 2 arcmin
    frames a handful of stars is too few to solve, so `photometry` flags every exposure."""
    from mstdask.jobs import calibrate, ingest, reduce
    from mstdask.testing import write_survey

    root = tmp_path_factory.mktemp("tiny")
    truth = write_survey(root / "raw", nights=1, shape=(96, 144), n_bias=5, n_flat=5, n_dark=3, n_science=2,
                         n_ps_bias=30, track_probability=0.0, seed=5)
    assert ingest([root / "raw"], root / "raw.zarr", client, progress=False).ok
    cal = calibrate(root / "raw.zarr", root / "cal", client, progress=False)
    assert cal.ok, cal.summary()
    red = reduce(root / "raw.zarr", root / "cal", root / "reduced.zarr", client, progress=False)
    assert red.ok and len(red.reduced) == 2, red.summary()
    return root, truth


def _addr(client) -> list[str]:
    return ["--quiet", "--cluster", client.scheduler.address]


def test_calibrate_without_calibration_frames_is_not_a_success(client, tmp_path, capsys):
    folder = tmp_path / "raw"
    folder.mkdir()
    rng = __import__("numpy").random.default_rng(3)
    for i in range(3):  # science frames only: nothing to calibrate with
        write_frame(folder / f"s{i}.fits", rng.integers(400, 2000, size=(64, 96), dtype="uint16"),
                    **{"DATE-OBS": f"2023-01-18T13:{10 * i:02d}:00.000000"})
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(folder), "--store", str(store), *_addr(client)]) == 0
    capsys.readouterr()
    rc = main(["calibrate", str(store), "--out", str(tmp_path / "cal"), *_addr(client)])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "nothing made" in out and "SKIPPED calibrations: no bias, flat or dark frames in the store" in out, out
    # the dry run says so too
    assert main(["calibrate", str(store), "--out", str(tmp_path / "cal2"), "--dry-run"]) == 1
    assert "would exit with status 1" in capsys.readouterr().out


def test_photometry_with_flagged_exposures_exits_1(tiny_night, client, tmp_path, capsys):
    root, truth = tiny_night
    rc = main(["photometry", str(root / "reduced.zarr"), "--refcat", str(truth.refcat_path),
               "--out", str(tmp_path / "cat"), *_addr(client)])
    out = capsys.readouterr().out
    exp = pd.read_parquet(tmp_path / "cat" / "exposures.parquet")
    assert len(exp) == 2 and set(exp["status"]) == {"flagged"}, exp
    assert rc == 1, out
    # every flagged exposure is listed with its reason
    for name, reason in zip(exp["exposure"], exp["reason"]):
        assert f"FLAGGED {name}: {reason}" in out, out


def test_refcat_missing_a_column_fails_once_up_front(tiny_night, client, tmp_path, capsys, monkeypatch):
    root, truth = tiny_night
    bad = tmp_path / "ref.csv"
    from mstdask.store import ReducedStore

    red = ReducedStore.open(root / "reduced.zarr", mode="r")
    # one star in the field: the catalogue covers it (else the coverage check refuses it up front)
    bad.write_text(f"RA,DEC,G\n{float(red.coord('ra')[0])},{float(red.coord('dec')[0])},3\n")
    out = tmp_path / "cat"
    rc = main(["photometry", str(root / "reduced.zarr"), "--refcat", str(bad), "--out", str(out), *_addr(client)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("error:") == 1 and str(bad) in err, err
    assert "no RA column 'ra'" in err and "no Dec column 'dec'" in err and "'mag_g'" in err, err
    assert "RA, DEC, G" in err and "--refcat-columns" in err, err
    assert not out.exists()  # found before anything is measured or written
    # the job checks it too, before any exposure is submitted
    import mstdask.static.photometry as sp
    from mstdask.jobs import photometry

    def no_task(*args, **kwargs):
        raise AssertionError("an exposure was measured")

    monkeypatch.setattr(sp, "photometry_task", no_task)
    with pytest.raises(BadInputError, match="no RA column 'ra'"):
        photometry(root / "reduced.zarr", bad, out, client, progress=False)
    assert not (out / "exposures.parquet").exists() and not (out / "sources").exists()
    # the fix the message gives works: the columns named, the check passes
    rc = main(["photometry", str(root / "reduced.zarr"), "--refcat", str(bad), "--refcat-columns",
               "ra=RA,dec=DEC,mag=G", "--out", str(out), *_addr(client)])
    assert rc == 1  # runs (the tiny frames' exposures are flagged), no longer refused


def test_refcat_columns_from_the_header_only(tmp_path):
    from astropy.table import Table

    pq.write_table(pa.table({"raj2000": [1.0], "dej2000": [2.0], "g_psf": [15.0]}), tmp_path / "r.parquet")
    Table({"ra": [1.0], "dec": [2.0], "mag": [15.0]}).write(tmp_path / "r.fits")
    assert refcat_columns(tmp_path / "r.parquet") == ["raj2000", "dej2000", "g_psf"]
    assert refcat_columns(tmp_path / "r.fits") == ["ra", "dec", "mag"]
    from mstdask.static.refcat import parse_columns

    check_refcat(tmp_path / "r.parquet", parse_columns("ra=raj2000,dec=dej2000,mag={filter}_psf"), {"g"})
    with pytest.raises(BadInputError, match="'r_psf' for filter 'r'"):
        check_refcat(tmp_path / "r.parquet", parse_columns("ra=raj2000,dec=dej2000,mag={filter}_psf"), {"g", "r"})
    check_refcat(tmp_path / "r.fits", None, {"g"})  # mag_g missing, the fallback 'mag' is there
    # filters unknown (run, before the ingest): a magnitude column for some filter
    check_refcat(tmp_path / "r.parquet", parse_columns("ra=raj2000,dec=dej2000,mag={filter}_psf"), None)
    with pytest.raises(BadInputError, match="for any filter"):
        check_refcat(tmp_path / "r.parquet", parse_columns("ra=raj2000,dec=dej2000,mag={filter}_mag"), None)


def test_run_refuses_a_refcat_without_columns_before_starting(tmp_path, capsys):
    bad = tmp_path / "ref.csv"
    bad.write_text("x,y\n1,2\n")
    rc = main(["run", str(tmp_path), "--out", str(tmp_path / "out"), "--refcat", str(bad),
               "--cluster", "tcp://127.0.0.1:1"])  # never reached: the preflight fails first
    assert rc == 2 and "no RA column 'ra'" in capsys.readouterr().err


def test_dry_run_of_missing_input_says_so(tmp_path, capsys):
    missing = tmp_path / "MISSING"
    rc = main(["run", str(missing), "--out", str(tmp_path / "x"), "--dry-run"])
    out = capsys.readouterr()
    assert rc == 1, out
    assert "Traceback" not in out.err and f"REJECTED {missing}" in out.out, out
    assert "every input would be rejected" in out.out and "tasks: 0" in out.out, out.out
    assert not (tmp_path / "x").exists()
    assert main(["ingest", str(missing), "--store", str(tmp_path / "s.zarr"), "--dry-run"]) == 1
