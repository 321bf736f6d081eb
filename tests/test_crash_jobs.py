"""Crash-safe ``calibrate`` and ``run`` (issue 20): the driver killed at many instants.

Every write of the driver is an instant: a Zarr write into the output folder (a product's
group of ``calib.zarr``, the raw and reduced stores' skeletons and slot reservations), a
calibration FITS file (killed half-written: its temporary stays behind) and a manifest
write. In-process, the patched write raises where the process would die (the driver's
writes run in this process, the pixels in the workers'), and so does every later write.
The rerun must finish the job and give products identical to those of an uninterrupted
run (:func:`mstdask.testing._digest.product_digest`: FITS data and headers, every Zarr
array and attribute), with a manifest that lists every product once.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mstdask.jobs import calibrate, ingest, run_pipeline
from mstdask.testing import write_survey
from mstdask.testing._digest import compare_digests, product_digest

SHAPE = (64, 96)
N_SCIENCE = 3


class Killed(Exception):
    """Where the driver dies (an Exception, not a BaseException: Zarr's event loop must live on)."""


@contextlib.contextmanager
def driver_writes(out: Path, die_at: int = 0):
    """Record the driver's writes into ``out`` (Zarr writes, calibration FITS files, manifest
    writes) as ``kind:path`` strings; with ``die_at``, the ``die_at``-th and every later one
    raises Killed. A FITS file killed is left half-written under its temporary name."""
    import zarr.storage._local as local

    import mstdask.io as mio
    from mstdask.manifest import Manifest

    real_put, real_product, real_manifest = local._put, mio.write_product, Manifest.write
    seen: list[str] = []
    root = str(out)

    def hit(what: str) -> bool:
        seen.append(what)
        return bool(die_at) and len(seen) >= die_at

    def put(path, value, exclusive=False):
        if root in str(path) and hit(f"zarr:{path}"):
            raise Killed(f"write {len(seen)}: {path}")
        return real_put(path, value, exclusive=exclusive)

    def write_product(path, data, **kw):
        if hit(f"fits:{path}"):
            Path(path).with_name(f".{Path(path).name}.tmp").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
            raise Killed(f"write {len(seen)}: {path}")
        return real_product(path, data, **kw)

    def write_manifest(self):
        if hit(f"manifest:{self.path}"):
            raise Killed(f"write {len(seen)}: {self.path}")
        return real_manifest(self)

    local._put, mio.write_product, Manifest.write = put, write_product, write_manifest
    try:
        yield seen
    finally:
        local._put, mio.write_product, Manifest.write = real_put, real_product, real_manifest


def pick(writes: list[str], spread: int, *critical) -> list[int]:
    """Write numbers (1-based) to die at: ``spread`` evenly over ``writes``, the last one, and
    for each ``(predicate, offsets)`` in ``critical`` the first write matching it plus offsets."""
    picks = {len(writes)} | {int(round(x)) for x in np.linspace(1, len(writes), spread)}
    for match, offsets in critical:
        first = next(i for i, w in enumerate(writes, 1) if match(w))
        picks |= {first + o for o in offsets}
    return sorted(p for p in picks if 1 <= p <= len(writes))


def listed_once(out: Path) -> list[str]:
    """The product paths of ``out/manifest.json``, checked to be listed once each."""
    paths = [p["path"] for p in json.loads((out / "manifest.json").read_text())["products"]]
    assert not [p for p, n in Counter(paths).items() if n > 1], paths
    return sorted(paths)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp") or ".creating-" in p.name
                  or p.name.startswith(".manifest."))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def survey(client, tmp_path_factory):
    """One small simulated night (bias, PS bias, flats, darks, science) and its raw store."""
    root = tmp_path_factory.mktemp("crash_jobs")
    write_survey(root / "raw", nights=1, shape=SHAPE, n_bias=5, n_flat=5, n_dark=3, n_science=N_SCIENCE,
                 n_ps_bias=30, track_probability=0.0, seed=5)
    assert ingest([root / "raw"], root / "raw.zarr", client, progress=False).ok
    return root


# ----------------------------------------------------------------------------- calibrate
def test_calibrate_killed_at_any_instant(survey, client, tmp_path):
    raw = survey / "raw.zarr"
    ref = tmp_path / "ref"
    with driver_writes(ref) as writes:
        rep = calibrate(raw, ref, client, progress=False)
    assert rep.ok, rep.summary()
    kinds = {p["kind"] for p in rep.products}
    assert kinds == {"master_bias", "ps_mask", "bad_pixel_mask", "master_flat"}, kinds
    want, products = product_digest(ref), listed_once(ref)
    assert len(products) == 4
    picks = pick(writes, 6,
                 (lambda w: w.startswith("zarr:"), (0, 1)),  # the first product's group
                 (lambda w: w.startswith("fits:"), (0, 1)),  # its FITS file, then its listing
                 (lambda w: "small_scale_flat" in w, (0,)),  # the intermediate
                 (lambda w: "master_flat" in w, (0,)))
    assert len(picks) >= 8 and any(writes[p - 1].startswith("manifest:") for p in picks), picks
    for n in picks:
        out = tmp_path / f"k{n}"
        with driver_writes(out, die_at=n), pytest.raises(Killed):
            calibrate(raw, out, client, progress=False)
        rep = calibrate(raw, out, client, progress=False)
        where = f"killed at write {n} ({writes[n - 1]}): {rep.summary()}"
        assert rep.ok and len(rep.products) + len(rep.already) == 4, where
        assert compare_digests(want, product_digest(out)) == [], where
        assert listed_once(out) == products, where
        assert leftovers(out) == [], where


# ----------------------------------------------------------------------------- run
def test_run_killed_while_ingesting_calibrating_and_reducing(survey, client, tmp_path):
    folder = survey / "raw"
    ref = tmp_path / "ref"
    with driver_writes(ref) as writes:
        rep, _ = run_pipeline([folder], ref, client, progress=False)
    assert rep.ok and all(s.ok for s in rep.steps), [s.summary() for s in rep.steps]
    want, products = product_digest(ref), listed_once(ref)
    assert {"raw.zarr", "reduced.zarr", "calib.zarr"} <= set(want) and "reduced.zarr" in products
    picks = pick(writes, 0,
                 (lambda w: "raw.zarr.creating-" in w, (0,)),  # the raw store's skeleton
                 (lambda w: "/raw.zarr/frame_key/" in w, (0,)),  # its first reservation: grown,
                 (lambda w: "/raw.zarr/frame_key/c/" in w, (0,)),  # its keys written,
                 (lambda w: "/raw.zarr/ingested/c/" in w, (0,)),  # its frames recorded
                 (lambda w: w.startswith("fits:"), (0,)),  # the first calibration product
                 (lambda w: "reduced.zarr.creating-" in w, (0,)),  # the reduced store's skeleton
                 (lambda w: "/reduced.zarr/frame_key/" in w, (0,)),  # its first reservation
                 (lambda w: "/reduced.zarr/frame_key/c/" in w, (0,)),
                 (lambda w: "/reduced.zarr/reduced/c/" in w, (0,)))  # the reduced frames recorded
    assert len(picks) == 10, picks
    for n in picks:
        out = tmp_path / f"k{n}"
        with driver_writes(out, die_at=n), pytest.raises(Killed):
            run_pipeline([folder], out, client, progress=False)
        rep, _ = run_pipeline([folder], out, client, progress=False)
        where = f"killed at write {n} ({writes[n - 1]}): " + " | ".join(s.summary() for s in rep.steps)
        assert rep.ok and all(s.ok for s in rep.steps), where
        assert compare_digests(want, product_digest(out)) == [], where
        assert listed_once(out) == products, where
        assert leftovers(out) == [], where
