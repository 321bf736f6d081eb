"""Digests of a folder of products, to show that two runs made the same products.

:func:`product_digest` walks an output folder (``mstdask demo --out DIR``, or any command's)
and hashes, per product, what a user reads from it:

* FITS: the data of every HDU (bytes as stored) and its header cards, less those that say
  when or where the file was written (``DATE``, ``HISTORY``, ``COMMENT``, paths);
* Parquet: every column less timing columns (``seconds``...), in row order;
* Zarr stores: every array's values and every group's and array's attributes;
* JSON products (``characterization.json``): the content less timings and paths.

Paths under the folder itself are written as ``<ROOT>`` before hashing, so two runs into
different folders compare equal. PNG figures and manifests are left out (they record times).
:func:`compare_digests` lists what differs. ``scripts/compare_products.py`` uses both to check
that a refactoring leaves the products of ``mstdask demo`` byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

#: Parquet columns and JSON keys that measure time taken, not results.
TIMING = ("seconds", "frame_seconds", "exposure_seconds", "created", "time_s", "wall_s")
#: FITS header keywords that say when or where a file was written.
VOLATILE_CARDS = ("DATE", "HISTORY", "COMMENT", "CHECKSUM", "DATASUM", "MSTDVER")


def _text(value, root: str) -> str:
    return str(value).replace(root, "<ROOT>")


def _h(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:20]


def _fits(path: Path, root: str) -> dict:
    from astropy.io import fits

    out = {}
    with fits.open(path, do_not_scale_image_data=True, memmap=False) as hdus:
        for i, hdu in enumerate(hdus):
            cards = [(c.keyword, _text(c.value, root)) for c in hdu.header.cards
                     if c.keyword not in VOLATILE_CARDS and not c.keyword.startswith("DATE")]
            data = b"" if hdu.data is None else np.ascontiguousarray(hdu.data).tobytes()
            out[f"{path.name}[{i}]"] = {"data": _h(data), "header": _h(json.dumps(cards))}
    return out


def _parquet(path: Path, root: str) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    cols = {}
    for name in table.column_names:
        if name in TIMING:
            continue
        col = table.column(name).to_pylist()
        cols[name] = _h(json.dumps([_text(v, root) if isinstance(v, str) else v for v in col], default=str))
    return cols


def _zarr(path: Path, root: str) -> dict:
    import zarr

    out = {}
    group = zarr.open_group(str(path), mode="r")

    def attrs(node) -> str:
        a = {k: v for k, v in dict(node.attrs).items() if k not in TIMING}
        return _h(_text(json.dumps(a, sort_keys=True, default=str), root))

    out["/"] = {"attrs": attrs(group)}
    for name, arr in sorted(group.arrays(), key=lambda kv: kv[0]):
        values = arr[...]
        if values.dtype.kind in "OUT":
            blob = json.dumps([_text(v, root) for v in np.asarray(values).ravel().tolist()])
        else:
            blob = np.ascontiguousarray(values).tobytes()
        out[name] = {"data": _h(blob, values.shape, values.dtype), "attrs": attrs(arr)}
    for name, sub in sorted(group.groups(), key=lambda kv: kv[0]):
        for k, v in _zarr(path / name, root).items():
            out[f"{name}/{k}"] = v
    return out


def _json(path: Path, root: str) -> dict:
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if k not in TIMING}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return _text(obj, root) if isinstance(obj, str) else obj

    return {"content": _h(json.dumps(clean(json.loads(path.read_text())), sort_keys=True))}


def product_digest(folder: str | Path) -> dict[str, dict]:
    """``{relative path: {part: hash}}`` of every FITS, Parquet, Zarr and JSON product under
    ``folder`` (raw FITS inputs in ``raw_fits`` and hidden temporaries are left out)."""
    folder = Path(folder).resolve()
    root = str(folder)
    out: dict[str, dict] = {}
    paths = sorted(p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    zarrs = [p for p in paths if p.is_dir() and p.suffix == ".zarr" and (p / "zarr.json").exists()]
    for p in paths:
        rel = str(p.relative_to(folder))
        if rel.startswith("raw_fits") or any(z in p.parents for z in zarrs):
            continue
        if p in zarrs:
            out[rel] = _zarr(p, root)
        elif p.suffix in (".fits", ".fit") and p.is_file():
            out[rel] = _fits(p, root)
        elif p.suffix == ".parquet" and p.is_file():
            out[rel] = _parquet(p, root)
        elif p.suffix == ".json" and p.is_file() and p.name != "manifest.json":
            out[rel] = _json(p, root)
    return out


def compare_digests(a: dict, b: dict) -> list[str]:
    """What differs between two digests, one line each (empty when the products are the same)."""
    lines = []
    for rel in sorted(set(a) | set(b)):
        if rel not in a or rel not in b:
            lines.append(f"{rel}: only in the {'second' if rel not in a else 'first'}")
            continue
        for part in sorted(set(a[rel]) | set(b[rel])):
            if a[rel].get(part) != b[rel].get(part):
                lines.append(f"{rel} {part}: {a[rel].get(part)} != {b[rel].get(part)}")
    return lines
