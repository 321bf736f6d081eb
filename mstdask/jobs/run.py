"""``mstdask run``: the main job, every step from raw FITS to light curves."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable

from ..config import IngestConfig, to_dict
from ..manifest import Manifest
from ..store import RawStore, describe
from ._job import check_writable, save_manifest, writing
from ._plan import Plan, _concat, _infos_table
from .calibrate import _calib_plan, _strs, calibrate
from .coadd import coadd
from .ingest import IngestReport, _ingest_plan, ingest
from .lightcurves import lightcurves
from .photometry import photometry
from .precision import precision
from .reduce import reduce


def run_pipeline(raw_inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, client,
                 config: IngestConfig | None = None, progress: bool = True,
                 argv: list[str] | None = None, refcat: str | os.PathLike | None = None,
                 refcat_config=None) -> tuple[IngestReport, Manifest]:
    """The main job: ingest raw frames into ``OUT/raw.zarr``, calibrate into ``OUT``, reduce
    the science frames into ``OUT/reduced.zarr``, then every later pipeline step: with a
    reference catalogue (``refcat``), STATIC photometry into ``OUT/catalog``, the image
    stacks into ``OUT/coadd``, the light-curve cube ``OUT/lightcurves.zarr`` and its
    precision, stacking and variability statistics into ``OUT/precision``.

    Writes ``OUT/manifest.json`` listing every product (also those of the steps that write
    into subfolders with manifests of their own). Every step is resumable: a run that was
    killed is finished by running it again, which does only the missing work. The reports
    of the steps after the ingest are in the returned report's ``steps``.

    Returns
    -------
    (IngestReport, Manifest)
    """
    config = config or IngestConfig()
    out = check_writable(Path(out_dir), "the output folder")
    store_path = out / "raw.zarr"
    report = ingest(raw_inputs, store_path, client, config, progress=progress)
    info, manifest = _list_raw_store(out, store_path, config, argv, report)
    if info is not None and info["frames"]:
        _reduction_steps(out, store_path, info, client, progress, argv, refcat, refcat_config, report)
        manifest = Manifest(out)  # with the products the steps listed
    return report, manifest


def _list_raw_store(out: Path, store_path: Path, config: IngestConfig, argv: list[str] | None,
                    report: IngestReport) -> tuple[dict | None, Manifest]:
    """List the raw store (when there is one) and the rejected files in ``OUT/manifest.json``.

    Returns the store's description (:func:`mstdask.store.describe`, None without a store)
    and the manifest."""
    manifest = Manifest(out)
    info = describe(store_path) if Path(store_path, "zarr.json").exists() else None
    if info is not None:
        store = RawStore.open(store_path, mode="r")
        done = store.coord("ingested")
        manifest.add(
            "raw_store", store_path,
            telescope=info.get("telescopes", []), filter=info.get("filters", []),
            night=sorted(info["nights"]), inputs=[str(p) for p in store.coord("path")[done]],
            config=to_dict(config), frames=info["frames"], frame_shape=info["frame_shape"],
            imagetyp_counts=info.get("imagetyp_counts", {}),
        )
    manifest.data["rejected"] = [{"path": p, "reason": r} for p, r in report.rejected]
    save_manifest(manifest, out, argv, frames_written=len(report.written), rejected=len(report.rejected))
    return info, manifest


def _reduction_steps(out: Path, store_path: Path, info: dict, client, progress: bool, argv: list[str] | None,
                     refcat, refcat_config, report: IngestReport) -> None:
    """The steps of the main job after the ingest: calibrate, reduce (when there are science
    frames) and, with a reference catalogue, the photometry and the steps after it. Each
    prints its summary; its report is added to ``report.steps``."""
    calib_report = calibrate(store_path, out, client, progress=progress, argv=argv)
    print(calib_report.summary(), file=sys.stderr)
    report.steps.append(calib_report)
    if not info.get("imagetyp_counts", {}).get("science"):
        return
    red_report = reduce(store_path, out, out / "reduced.zarr", client, progress=progress, argv=argv)
    print(red_report.summary(), file=sys.stderr)
    report.steps.append(red_report)
    if refcat is None:
        return
    phot = photometry(out / "reduced.zarr", refcat, out / "catalog", client,
                      refcat_config=refcat_config, progress=progress, argv=argv)
    print(phot.summary(), file=sys.stderr)
    report.steps.append(phot)
    _adopt_products(out, out / "catalog")
    _catalog_steps(out, client, progress, argv, report)


def _catalog_steps(out: Path, client, progress: bool, argv: list[str] | None, report: IngestReport) -> None:
    """The steps of the main job after the photometry: image stacks (``OUT/coadd``), the
    light-curve cube (``OUT/lightcurves.zarr``) and its statistics (``OUT/precision``).

    A step with too little to work on (every exposure flagged, a single epoch) is a note in
    the summary, not a failure of the run; the later steps still run when they can."""
    from ..errors import InsufficientDataError

    steps = (("coadd", lambda: coadd(out / "catalog", out / "coadd", client, progress=progress, argv=argv),
              out / "coadd"),
             ("lightcurves", lambda: lightcurves(out / "catalog", out / "lightcurves.zarr", client,
                                                 progress=progress, argv=argv), None),
             ("precision", lambda: precision(out / "lightcurves.zarr", out / "precision", client,
                                             progress=progress, argv=argv), out / "precision"))
    for name, step, folder in steps:
        try:
            rep = step()
        except InsufficientDataError as exc:
            print(f"{name}: not run: {exc}", file=sys.stderr)
            if name == "lightcurves":
                break  # no cube: no precision either
            continue
        print(rep.summary(), file=sys.stderr)
        report.steps.append(rep)
        if folder is not None:
            _adopt_products(out, folder)


def _adopt_products(out: Path, sub: Path) -> None:
    """List the products of a step that wrote into the subfolder ``sub`` (with its own
    manifest) in ``out``'s manifest too, with paths relative to ``out``."""
    if not (sub / "manifest.json").exists():
        return
    manifest = Manifest(out)
    for p in Manifest(sub).products:
        fields = {k: v for k, v in p.items() if k not in ("kind", "path", "n_inputs", "created")}
        manifest.add(p["kind"], sub / p["path"], **fields)
    with writing(out, "the manifest"):
        manifest.write()


def plan_run(raw_inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
             config: IngestConfig | None = None) -> Plan:
    """What ``run`` would do: the ingest, calibrate and reduce plans, from the headers and
    whatever an earlier run left in ``out_dir``; nothing is computed or written."""
    import numpy as np

    from ..config import CalibConfig
    from ..store import ReducedStore, _half_made

    config = config or IngestConfig()
    out = Path(out_dir)
    ing, jobs, stored, shape, tile = _ingest_plan(raw_inputs, out / "raw.zarr", config)
    table = _concat(stored, _infos_table(jobs))
    cal = _calib_plan(table, shape, tile, out, CalibConfig())
    red_path = out / "reduced.zarr"
    done_keys: set[str] = set()
    # a reduced store whose creation was killed holds nothing yet (reduce makes it anew)
    if red_path.exists() and any(red_path.iterdir()) and not _half_made(red_path):
        red = ReducedStore.open(red_path, mode="r")
        done_keys = set(map(str, red.coord("frame_key")[red.coord("reduced")]))
    types = _strs(table["imagetyp"])
    sci = [i for i, (t, k) in enumerate(zip(types, _strs(table["frame_key"]))) if t == "science" and k not in done_keys]
    n_sci = int((types == "science").sum())
    npix = int(np.prod(shape))
    red = Plan("reduce", str(red_path), tasks=len(sci), bytes_read=len(sci) * npix * 2,
               bytes_written=len(sci) * npix * 5,
               frames=Counter((str(table["night"][i]), str(table["telescope"][i]), "science") for i in sci))
    red.steps.append(f"{len(sci)} frames to reduce, {n_sci - len(sci)} already done; one task per frame, with "
                     "the calibrations above")
    parts = [ing, cal, red]
    all_frames = Counter(zip(_strs(table["night"]), _strs(table["telescope"]), types))
    return Plan("run", str(out), frames=all_frames, parts=parts, tasks=sum(p.tasks for p in parts),
                tasks_estimated=cal.tasks > 0, bytes_read=sum(p.bytes_read for p in parts),
                bytes_written=sum(p.bytes_written for p in parts))

