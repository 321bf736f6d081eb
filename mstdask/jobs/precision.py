"""``mstdask precision``: precision, catalogue stacks, variability and light curves of a cube."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..config import to_dict
from ..manifest import Manifest
from ._job import (
    JobReport,
    atomic_parquet,
    check_writable,
    clear_temporaries,
    progress_bar,
    save_manifest,
    write_png,
    writing,
)


@dataclass
class PrecisionReport(JobReport):
    """What ``precision`` wrote: the tables, figures and a few numbers.

    Always ``ok``: a finished reduction (missing inputs raise instead).
    """

    out_dir: str
    sources: int = 0
    epochs: int = 0
    measured: int = 0
    products: list[str] = field(default_factory=list)
    top_variables: list[int] = field(default_factory=list)
    best_precision_mag: float = float("nan")

    _NOTE: ClassVar[str] = "NOTE"

    def headline(self) -> str:
        """Sources measured, the best precision, the products; the top variables."""
        return (f"precision {self.out_dir}: {self.measured} of {self.sources} sources with statistics over "
                f"{self.epochs} epochs; best binned std {self.best_precision_mag * 1000:.1f} mmag; "
                f"{len(self.products)} products in {self.seconds:.1f} s\n"
                f"  top variables (chi2/dof): {self.top_variables}")


#: Manifest kind of each product of ``precision``.
_KINDS = {"precision": "precision_curve", "stacking": "stacking_curve", "variability": "variability_table",
          "lightcurves": "light_curves", "fig12": "figure", "fig14": "figure", "fig15": "figure"}


def _statistics(client, ds, config, progress: bool):
    """The per-source statistics (one task per source chunk, all epochs) and the tables
    binned from them: ``(precision table, stacking table, statistics without "stacked")``."""
    from distributed import as_completed, futures_of

    from ..lightcurves import precision_table, source_statistics, stacking_table

    stats = client.persist(source_statistics(ds, config))
    futs = futures_of(stats)
    with progress_bar(len(futs), "precision", progress, unit="chunk") as bar:
        for _ in as_completed(futs):
            bar.update()
    prec_f, stack_f = client.compute([precision_table(stats, config), stacking_table(stats, config)])
    st = client.compute(stats.drop_vars("stacked")).result()
    return prec_f.result(), stack_f.result(), st


def _variability_table(ds, st, prec, config):
    """One row per source (position, statistics, expected and relative scatter), highest
    ``chi2_dof`` first, with its ``rank``."""
    import numpy as np
    import pandas as pd

    from ..lightcurves import theory_curve

    table = pd.DataFrame({"source": ds["source"].values, "ra": ds["ra"].values, "dec": ds["dec"].values,
                          "ref_id": ds["ref_id"].values,
                          **{k: st[k].values for k in st.data_vars}})
    table["n_epochs"] = table["n_epochs"].fillna(0).astype("int32")
    table["expected_std"] = theory_curve(table["mean_mag"].to_numpy(), config)["total"]
    # ratio to the empirical precision at the source's magnitude: a variable stands out
    # even where the reported errors are off
    idx = np.clip(np.digitize(table["mean_mag"], np.r_[prec["mag_lo"].to_numpy(), prec["mag_hi"].iloc[-1]]) - 1,
                  0, len(prec) - 1)
    table["std_ratio"] = table["std"].to_numpy() / prec["std_median"].to_numpy()[idx]
    table = table.sort_values("chi2_dof", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1, dtype=np.int64)
    return table


def _light_curves(client, ds, pick):
    """The light curves of the sources picked (variables, then constants).

    Returns ``(chosen source indices, {source: "variable" or "constant"}, table of their
    finite measurements)``.
    """
    import numpy as np
    import pandas as pd

    chosen = np.r_[pick["variable"], pick["constant"]].astype(np.int64)
    lc = ds[["mag", "magerr", "flags"]].isel(source=chosen)
    lc = client.compute(lc).result()
    kind = {int(s): "variable" for s in pick["variable"]} | {int(s): "constant" for s in pick["constant"]}
    curves = lc.to_dataframe()[["mag", "magerr", "flags"]].reset_index()
    curves["time"] = pd.to_datetime(curves["epoch"].map(dict(zip(ds["epoch"].values, ds["time"].values))))
    curves["mjd_mid"] = curves["epoch"].map(dict(zip(ds["epoch"].values, ds["mjd_mid"].values)))
    curves["kind"] = curves["source"].map(kind)
    curves = curves[np.isfinite(curves["mag"])]
    return chosen, kind, curves


def _mag_limits(good):
    """The magnitude range the figures show (half a magnitude around the 0.5-99.5
    percentiles of the measured sources), None when none is measured."""
    import numpy as np

    if not len(good):
        return None
    lo, hi = np.nanpercentile(good["mean_mag"], [0.5, 99.5])
    return lo - 0.5, hi + 0.5


def _fig12(good, prec, config, report: PrecisionReport, xlim):
    """Fig. 12: precision vs magnitude and the theory of Eqs. 1-5."""
    import numpy as np
    from matplotlib.figure import Figure

    from ..lightcurves import theory_curve

    grid = np.linspace(*config.mag_range, 300)
    th = theory_curve(grid, config)
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    ax.scatter(good["mean_mag"], good["std"], s=1, c="0.6", alpha=0.3, rasterized=True, label="sources")
    ax.plot(prec["mag_center"], prec["std_median"], "k-", lw=2, label="median std")
    ax.plot(prec["mag_center"], prec["robust_std_median"], "C1--", label="median 1.4826 MAD")
    ax.plot(grid, th["total"], "k--", label="theory (Eqs. 1-5)")
    ax.plot(grid, th["photon"], "b-", lw=0.8, label="photon")
    ax.plot(grid, th["sky"], "g--", lw=0.8, label="sky")
    ax.plot(grid, th["scintillation"], "m-", lw=0.8, label="scintillation")
    ax.axhline(0.004, color="r", ls=":", label="4 mmag")
    ax.set(yscale="log", xlabel="mean magnitude", ylabel="std of magnitudes (mag)",
           title=f"{report.measured} sources, {report.epochs} epochs")
    if xlim is not None:
        ax.set_xlim(*xlim)
        ax.set_ylim(max(1e-4, np.nanpercentile(good["std"], 0.5) / 2), min(2.0, np.nanmax(good["std"]) * 2))
    ax.legend(fontsize=7, loc="upper left")
    return fig


def _fig14(stack, config, xlim):
    """Fig. 14: the scatter of catalogue stacks of N epochs vs magnitude."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for j, (n, g) in enumerate(stack.groupby("n_stack")):
        c = colormaps["viridis"](j / max(1, len(config.stack_n) - 1))
        ax.plot(g["mag_center"], g["scatter_median"], "-", color=c, label=f"N={n}")
        ax.plot(g["mag_center"], g["sqrt_n_expected"], ":", color=c, lw=0.8)
    ax.set(yscale="log", xlabel="mean magnitude", ylabel="std of N-epoch means (mag)",
           title="catalogue stacks (dotted: single epoch / sqrt(N))")
    if xlim is not None:
        ax.set_xlim(*xlim)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _fig15(table, chosen, kind: dict, curves):
    """Fig. 15: the light curves drawn, three a row; None when no source is drawn."""
    from matplotlib.figure import Figure

    n = len(chosen)
    if not n:
        return None
    ncol = 3
    fig = Figure(figsize=(11, 2.2 * -(-n // ncol)))
    axes = fig.subplots(-(-n // ncol), ncol, squeeze=False)
    info = table.set_index("source")
    for ax, s in zip(axes.ravel(), chosen):
        g = curves[curves["source"] == s]
        ax.errorbar(g["mjd_mid"], g["mag"], g["magerr"], fmt=".", ms=2, lw=0.5,
                    color="C3" if kind[int(s)] == "variable" else "C0")
        ax.invert_yaxis()
        row = info.loc[int(s)]
        ax.set_title(f"{kind[int(s)]} {int(s)}: {row['mean_mag']:.2f} mag, std {row['std'] * 1000:.1f} "
                     f"mmag, chi2/dof {row['chi2_dof']:.1f}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("MJD", fontsize=6)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _record(out: Path, lc_path, ds, config, products: dict, report: PrecisionReport,
            argv: list[str] | None) -> None:
    """List every product in ``DIR/manifest.json``, with this run."""
    manifest = Manifest(out)
    common = dict(telescope=sorted({str(v) for v in ds["telescope"].values}),
                  filter=sorted({str(v) for v in ds["filter"].values}),
                  night=sorted({str(v) for v in ds["night"].values}),
                  inputs=[str(Path(lc_path).resolve())], config=to_dict(config))
    for name, path in products.items():
        manifest.add(_KINDS[name], path, **common, sources=report.sources, epochs=report.epochs)
    save_manifest(manifest, out, argv, sources=report.sources, epochs=report.epochs)


def precision(lc_path: str | os.PathLike, out_dir: str | os.PathLike, client, config=None,
              progress: bool = True, argv: list[str] | None = None) -> PrecisionReport:
    """Precision vs magnitude (Fig. 12), catalogue stacks (Fig. 14), light curves and
    variability (Fig. 15) of a cube: ``DIR/precision.parquet``, ``DIR/stacking.parquet``,
    ``DIR/variability.parquet`` (one row per source, highest ``chi2_dof`` first),
    ``DIR/lightcurves.parquet`` (the drawn sources), PNG figures and ``DIR/manifest.json``.

    One parallel pass over the cube (one task per source chunk, all epochs), then the small
    per-source table is binned. A rerun recomputes everything (one pass).
    """
    import numpy as np

    from ..config import PrecisionConfig
    from ..errors import InsufficientDataError
    from ..lightcurves import open_cube, select_light_curves

    t0 = time.perf_counter()
    config = config or PrecisionConfig()
    out = check_writable(out_dir, "the precision products")
    clear_temporaries(out)
    ds = open_cube(lc_path)
    report = PrecisionReport(out_dir=str(out.resolve()), sources=int(ds.sizes["source"]),
                             epochs=int(ds.sizes["epoch"]))
    if report.epochs < 2:
        raise InsufficientDataError(f"{lc_path}: {report.epochs} written epochs; a scatter needs at least 2 "
                                    "(add exposures with `mstdask lightcurves`)")
    prec, stack, st = _statistics(client, ds, config, progress)
    table = _variability_table(ds, st, prec, config)
    report.measured = int(np.isfinite(table["std"]).sum())
    report.best_precision_mag = float(np.nanmin(prec["std_median"])) if prec["std_median"].notna().any() \
        else float("nan")
    pick = select_light_curves(table, config)
    report.top_variables = [int(s) for s in pick["variable"]]
    chosen, kind, curves = _light_curves(client, ds, pick)

    products = {}
    with writing(out, "the precision tables"):
        for name, df in (("precision", prec), ("stacking", stack), ("variability", table), ("lightcurves", curves)):
            atomic_parquet(df, out / f"{name}.parquet")
            products[name] = out / f"{name}.parquet"
        # each figure is written before the next is drawn
        good = table[np.isfinite(table["std"])]
        xlim = _mag_limits(good)
        figures = (("fig12", "fig12_precision.png", lambda: _fig12(good, prec, config, report, xlim)),
                   ("fig14", "fig14_stacking.png", lambda: _fig14(stack, config, xlim)),
                   ("fig15", "fig15_lightcurves.png", lambda: _fig15(table, chosen, kind, curves)))
        for name, file, draw in figures:
            if (fig := draw()) is not None:
                write_png(fig, out / file)
                products[name] = out / file

    _record(out, lc_path, ds, config, products, report, argv)
    report.products = [str(p) for p in products.values()]
    report.seconds = time.perf_counter() - t0
    return report
