"""Show that a change leaves the products of ``mstdask demo`` byte-identical.

Runs the main job on the embedded default (``mstdask demo``, then ``mstdask characterize``
on its raw store) twice: with the code of a git revision (checked out in a temporary
worktree) and with the working tree; then compares the digests of every product (FITS data
and headers, Parquet tables less timing columns, Zarr arrays and attributes, JSON; see
:mod:`mstdask.testing._digest`). Exit status 0 when everything is identical, 1 otherwise.

    python scripts/compare_products.py --ref HEAD~3          # before/after a refactoring
    python scripts/compare_products.py --ref main --keep out  # keep both product folders
    python scripts/compare_products.py --digest DIR           # print one folder's digest
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_demo(code: Path, out: Path, shape: str) -> None:
    """``mstdask demo`` and ``mstdask characterize`` with the package found in ``code``."""
    env = dict(os.environ, PYTHONPATH=str(code))
    # -m puts the working folder first on sys.path: run outside any checkout
    cmd = [sys.executable, "-m", "mstdask.cli"]
    out.mkdir(parents=True, exist_ok=True)
    run = dict(env=env, check=False, stdout=subprocess.DEVNULL, cwd=str(out))
    subprocess.run([*cmd, "demo", "--out", str(out), "--shape", shape, "--quiet"], **run)
    subprocess.run([*cmd, "characterize", str(out / "raw.zarr"), "--out", str(out / "lab"), "--quiet"], **run)
    probe = subprocess.run([sys.executable, "-c", "import mstdask; print(mstdask.__file__)"], env=env, cwd=str(out),
                           capture_output=True, text=True)
    print(f"  (mstdask from {probe.stdout.strip()})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="HEAD", help="git revision to compare the working tree with (default HEAD)")
    p.add_argument("--shape", default="600x900", help="demo frame shape (default 600x900)")
    p.add_argument("--keep", type=Path, help="keep both product folders here (ref/, work/)")
    p.add_argument("--digest", type=Path, help="only print the digest of this folder as JSON")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from mstdask.testing._digest import compare_digests, product_digest

    if args.digest:
        print(json.dumps(product_digest(args.digest), indent=1, sort_keys=True))
        return 0
    with tempfile.TemporaryDirectory(prefix="mstdask-compare-") as tmp:
        base = args.keep or Path(tmp)
        worktree = Path(tmp) / "ref-code"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.ref], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            digests = []
            for name, code in (("ref", worktree), ("work", REPO)):
                out = base / name
                print(f"{name}: mstdask demo with the code of {args.ref if name == 'ref' else 'the working tree'}"
                      f" -> {out}", file=sys.stderr)
                run_demo(code, out, args.shape)
                digests.append(product_digest(out))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
    diff = compare_digests(*digests)
    n = sum(len(v) for v in digests[1].values())
    if diff:
        print(f"{len(diff)} of {n} parts differ:\n" + "\n".join(diff))
        return 1
    print(f"identical: {len(digests[1])} products, {n} parts (FITS data and headers, Parquet columns less timings, "
          "Zarr arrays and attributes, JSON)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
