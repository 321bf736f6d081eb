"""The house reads like the papers: jobs compute, library modules stay lazy, kernels stay
pure NumPy, no function or module grows past what a reader takes in, and the names users
and scripts import keep working."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mstdask"
#: Code that may compute: the jobs, the command line, the cluster client and the simulator.
COMPUTES = ("jobs", "cli.py", "cluster.py", "testing")
MAX_FUNCTION_LINES = 120
MAX_MODULE_LINES = 800


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(p: Path) -> str:
    return str(p.relative_to(PKG))


def test_paper_folders_hold_their_stages():
    for folder, modules in {"stir": ("calib", "frame", "_calib_kernels", "_stir_kernels", "_median"),
                            "static": ("astrometry", "photometry", "refcat"),
                            "stacks": ("coadd", "_coadd_kernels"),
                            "lightcurves": ("cube", "statistics", "_lc_kernels"),
                            "lab": ("detector", "_detector_kernels"),
                            "jobs": ("ingest", "calibrate", "reduce", "photometry", "coadd", "lightcurves",
                                     "precision", "characterize", "run", "_job", "_plan")}.items():
        for m in modules:
            assert (PKG / folder / f"{m}.py").is_file(), f"mstdask/{folder}/{m}.py missing"


def test_no_function_or_module_too_long():
    long_functions, long_modules = [], []
    for p in _modules():
        text = p.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{_rel(p)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{_rel(p)}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules, "split these modules: " + "; ".join(long_modules)
    assert not long_functions, "split these functions into named steps: " + "; ".join(long_functions)


def test_only_jobs_compute():
    """Library code builds lazy graphs: no ``.compute()``/``.persist()`` call outside the jobs,
    the command line, the cluster client and the simulator."""
    calls = []
    for p in _modules():
        if _rel(p).startswith(COMPUTES):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("compute", "persist"):
                calls.append(f"{_rel(p)}:{node.lineno}")
    assert not calls, f"library code computes at {calls}: return the lazy object and let a job compute it"


def test_kernels_are_pure_numpy():
    bad = []
    for p in _modules():
        if not p.name.endswith("kernels.py"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{_rel(p)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0] in ("dask", "xarray", "distributed")]
    assert not bad, bad


@pytest.mark.parametrize("old, new", [
    ("mstdask.calib", "mstdask.stir.calib"), ("mstdask._stir_kernels", "mstdask.stir._stir_kernels"),
    ("mstdask.photometry", "mstdask.static.photometry"), ("mstdask.astrometry", "mstdask.static.astrometry"),
    ("mstdask.coadd", "mstdask.stacks.coadd"), ("mstdask._lc_kernels", "mstdask.lightcurves._lc_kernels"),
    ("mstdask.detector", "mstdask.lab.detector"), ("mstdask.refcat", "mstdask.static.refcat")])
def test_old_module_names_are_the_same_modules(old, new):
    moved = importlib.import_module(new)
    assert importlib.import_module(old) is moved
    assert moved.__spec__.name == new  # the alias did not take over the module's identity
    parent, leaf = old.rsplit(".", 1)
    assert getattr(importlib.import_module(parent), leaf) is moved


def test_runner_names_keep_working():
    import mstdask.jobs as jobs
    import mstdask.runner as runner
    from mstdask.lightcurves import open_cube, source_statistics  # noqa: F401
    from mstdask.stir import find_calibrations, process_frame  # noqa: F401

    for name in ("ingest", "calibrate", "reduce", "photometry", "coadd", "lightcurves", "precision",
                 "characterize", "run_pipeline", "plan_ingest", "plan_calibrate", "plan_reduce", "plan_run",
                 "check_writable", "IngestReport", "CalibReport", "ReduceReport", "Plan"):
        assert getattr(runner, name) is getattr(jobs, name), name


def test_reports_share_the_skeleton():
    import mstdask.jobs as jobs
    from mstdask.jobs._job import JobReport

    for name in ("IngestReport", "CalibReport", "ReduceReport", "PhotometryReport", "CoaddReport",
                 "LightcurveReport", "PrecisionReport", "CharacterizeReport"):
        cls = getattr(jobs, name)
        assert issubclass(cls, JobReport), name
    rep = jobs.ReduceReport(out="x", failed=[("a.fits", "broken")])
    assert not rep.ok and rep.exit_status == 1 and "FAILED a.fits: broken" in rep.summary()
    assert jobs.ReduceReport(out="x").exit_status == 0
