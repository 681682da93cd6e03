"""Merge the raw benchmark results and write ``results.csv``, ``summary.md`` and figures (generated, never edited)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._methods import CELLULAR_METHODS, CELLULAR_VARIANTS, METHODS

KEYS = ["task", "dataset", "fold", "seed", "method", "metric"]
SCIB_AGGREGATES = ["Bio conservation", "Batch correction", "Total"]
BASELINES_FOR_TARGETS = ("scanvi", "scvi_knn")


def merge(out: Path) -> pd.DataFrame:
    files = sorted((out / "raw").glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no raw results under {out / 'raw'}; run the benchmark first")
    frames = [pd.read_csv(path, dtype={"fold": str}) for path in files if path.stat().st_size > 1]
    results = pd.concat(frames, ignore_index=True).drop_duplicates(KEYS, keep="last")
    return results.sort_values(KEYS, kind="stable").reset_index(drop=True)


def label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def per_seed(results: pd.DataFrame, tasks, metric: str) -> pd.DataFrame:
    """Mean over folds: rows (column name, method, seed) -> value; the column name is the dataset (or the map fold)."""
    part = results[results["task"].isin(tasks) & (results["metric"] == metric)].copy()
    if part.empty:
        return part
    part["column"] = np.where(part["task"] == "map", part["fold"], part["dataset"])
    return part.groupby(["column", "method", "seed"], as_index=False)["value"].mean()


def mean_sd_table(results: pd.DataFrame, tasks, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean, sd over seeds) tables of methods x columns, plus a "mean" column over columns (per seed first)."""
    seeds = per_seed(results, tasks, metric)
    if seeds.empty:
        return pd.DataFrame(), pd.DataFrame()
    wide = seeds.pivot_table(index=["method", "seed"], columns="column", values="value")
    columns = list(wide.columns)
    if len(columns) > 1:
        wide["mean"] = wide[columns].mean(axis=1, skipna=False)
    grouped = wide.groupby(level="method")
    return grouped.mean(), grouped.std(ddof=1)


def _order(methods) -> list[str]:
    known = [key for key in METHODS if key in methods]
    return known + sorted(set(methods) - set(known))


def markdown_table(mean: pd.DataFrame, sd: pd.DataFrame, higher_is_better: bool = True, digits: int = 3) -> str:
    if mean.empty:
        return "_no results_"
    mean = mean.loc[_order(mean.index)]
    best = mean.max() if higher_is_better else mean.min()
    lines = ["| method | " + " | ".join(map(str, mean.columns)) + " |", "|---|" + "---|" * len(mean.columns)]
    for method, row in mean.iterrows():
        cells = []
        for column, value in row.items():
            if pd.isna(value):
                cells.append("–")
                continue
            spread = sd.loc[method, column] if method in sd.index and column in sd.columns else np.nan
            text = f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if pd.notna(spread) else "")
            cells.append(f"**{text}**" if np.isclose(value, best[column]) else text)
        lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resources_table(results: pd.DataFrame) -> str:
    part = results[results["task"].isin(["lobo", "map", "novel"])]
    metrics = {
        "fit_seconds": ("median fit s", "{:.1f}", "median"),
        "predict_seconds": ("median predict s", "{:.2f}", "median"),
        "fit_cells_per_second": ("median training cells / fit s", "{:,.0f}", "median"),
        "predict_cells_per_second": ("median predict cells/s", "{:,.0f}", "median"),
        "peak_rss_mb": ("max peak process RSS MB", "{:,.0f}", "max"),
    }
    rows = []
    for method in _order(part["method"].unique()):
        cells = [label(method)]
        for metric, (_, fmt, how) in metrics.items():
            values = part[(part["method"] == method) & (part["metric"] == metric)]["value"]
            cells.append(fmt.format(getattr(values, how)()) if len(values) else "–")
        rows.append("| " + " | ".join(cells) + " |")
    header = "| method | " + " | ".join(name for name, _, _ in metrics.values()) + " |"
    return "\n".join([header, "|---|" + "---|" * len(metrics), *rows])


def per_type_tables(results: pd.DataFrame) -> str:
    part = results[(results["task"] == "lobo") & results["metric"].str.startswith("f1:")].copy()
    sections = []
    for dataset, frame in part.groupby("dataset"):
        frame = frame.assign(cell_type=frame["metric"].str[3:])
        wide = frame.groupby(["cell_type", "method"])["value"].mean().unstack("method")
        wide = wide[_order(wide.columns)]
        best = wide.max(axis=1)
        lines = [
            "| cell type | " + " | ".join(label(m) for m in wide.columns) + " |",
            "|---|" + "---|" * len(wide.columns),
        ]
        for cell_type, row in wide.iterrows():
            cells = [
                "–" if pd.isna(v) else (f"**{v:.2f}**" if np.isclose(v, best[cell_type]) else f"{v:.2f}")
                for v in row.to_numpy()
            ]
            lines.append(f"| {cell_type} | " + " | ".join(cells) + " |")
        sections.append(f"#### {dataset}\n\n" + "\n".join(lines))
    return "\n\n".join(sections) if sections else "_no results_"


def standings(results: pd.DataFrame) -> list[str]:
    """The project's targets, each with where CELLULAR stands (best of its classifier and kNN paths)."""
    lines = []
    mean, _ = mean_sd_table(results, ["lobo", "map"], "macro_f1")
    lines += _against_best_baseline(mean, "Annotation macro-F1")
    scib, _ = mean_sd_table(results, ["integration"], "Total")
    batch, _ = mean_sd_table(results, ["integration"], "Batch correction")
    if not scib.empty and "cellular" in scib.index:
        for rival in BASELINES_FOR_TARGETS:
            if rival in scib.index:
                ours, theirs, shared = _shared_means(scib, "cellular", rival)
                ok = ours >= theirs
                lines.append(
                    f"- scIB overall (mean over {shared}): CELLULAR {ours:.3f} vs "
                    f"{label(rival)} {theirs:.3f}: **{'met' if ok else 'not met'}**."
                )
        if "scvi_knn" in batch.index:
            ours, theirs, shared = _shared_means(batch, "cellular", "scvi_knn")
            lines.append(
                f"- Batch correction (mean over {shared}): CELLULAR {ours:.3f} vs 0.9 × scVI = {0.9 * theirs:.3f}: "
                f"**{'met' if ours >= 0.9 * theirs else 'not met'}**."
            )
    novelty, _ = mean_sd_table(results, ["novel"], "auroc")
    lines += _against_best_baseline(novelty, "Novelty AUROC")
    if not novelty.empty:
        column = "mean" if "mean" in novelty.columns else novelty.columns[0]
        for method in [m for m in CELLULAR_METHODS if m in novelty.index]:
            value = novelty.loc[method, column]
            lines.append(
                f"- Novelty AUROC ({label(method)}, mean over datasets): {value:.3f} vs target 0.95: "
                f"**{'met' if value >= 0.95 else 'not met'}**."
            )
    fit = results[(results["task"] == "lobo") & (results["metric"] == "fit_seconds")]
    medians = fit.groupby("method")["value"].median()
    if "cellular" in medians and "scanvi" in medians:
        ok = medians["cellular"] <= medians["scanvi"]
        lines.append(
            f"- Training wall time (median lobo fold): CELLULAR {medians['cellular']:.1f} s vs scANVI "
            f"{medians['scanvi']:.1f} s: **{'met' if ok else 'not met'}**."
        )
    return lines


def _against_best_baseline(mean: pd.DataFrame, what: str) -> list[str]:
    """For each column (dataset or pair) of ``mean``, the better CELLULAR path against the best baseline."""
    if mean.empty:
        return []
    ours = mean.loc[mean.index.intersection(CELLULAR_METHODS)]
    others = mean.loc[mean.index.difference([*CELLULAR_METHODS, *CELLULAR_VARIANTS])]
    if ours.empty or others.empty:
        return []
    lines = []
    for column in [c for c in mean.columns if c != "mean"]:
        best_ours, best_other = ours[column].max(), others[column].max()
        if pd.isna(best_ours) or pd.isna(best_other):
            continue
        rival = label(others[column].idxmax())
        verdict = "met" if best_ours >= best_other - 1e-9 else "not met"
        lines.append(
            f"- {what} on {column}: CELLULAR {best_ours:.3f} vs best baseline {best_other:.3f} ({rival}): "
            f"**{verdict}**."
        )
    return lines


def write_report(out: Path, *, command: str, machine: str, figures: bool = True) -> Path:
    out = Path(out)
    results = merge(out)
    results.to_csv(out / "results.csv", index=False)
    seeds = sorted(results["seed"].unique())
    failed = results[results["metric"] == "failed"]
    sections = [
        "<!-- generated by benchmarks/run.py from results.csv; do not edit -->",
        f"Command (reruns missing results, then writes this report): `{command}`  \n"
        f"Machine: {machine}.  \nSeeds: {', '.join(map(str, seeds))} "
        "(values are means over folds, then mean ± sd over seeds when there are several; best per column in bold).",
    ]
    coverage = []
    for task, part in results.groupby("task", sort=False):
        columns = part["fold"] if task == "map" else part["dataset"]
        coverage.append(f"{task}: {', '.join(sorted(columns.unique()))} ({part['method'].nunique()} methods)")
    sections.append("Results present: " + "; ".join(coverage) + ".")
    standing = standings(results)
    if standing:
        sections.append("### Targets\n\n" + "\n".join(standing))
    for title, tasks, metric in [
        ("Annotation macro-F1 (lobo: leave one batch out; map: query onto reference)", ["lobo", "map"], "macro_f1"),
        ("Annotation accuracy", ["lobo", "map"], "accuracy"),
        ("Annotation balanced accuracy", ["lobo", "map"], "balanced_accuracy"),
        ("Annotation weighted F1", ["lobo", "map"], "weighted_f1"),
        (
            "Hierarchical F1 on the lineage maps (Kiritchenko; a parent label earns partial credit)",
            ["lobo", "map"],
            "hierarchical_f1",
        ),
        ("Hierarchical precision", ["lobo", "map"], "hierarchical_precision"),
        ("Novel cell-type detection AUROC (leave one cell type out)", ["novel"], "auroc"),
        ("Novel cell-type detection AUPRC", ["novel"], "auprc"),
        ("scIB overall (0.6 bio conservation + 0.4 batch correction), lobo folds", ["integration"], "Total"),
        ("scIB bio conservation", ["integration"], "Bio conservation"),
        ("scIB batch correction", ["integration"], "Batch correction"),
    ]:
        mean, sd = mean_sd_table(results, tasks, metric)
        if not mean.empty:
            sections.append(f"### {title}\n\n" + markdown_table(mean, sd))
    if results["metric"].eq("fit_seconds").any():
        sections.append(
            "### Time and memory (all folds; fit includes shared steps such as the scVI model under scANVI)\n\n"
            + resources_table(results)
        )
    if results["metric"].str.startswith("f1:").any():
        title = "### Per-type F1, leave one batch out (mean over folds and seeds)"
        sections.append(f"{title}\n\n{per_type_tables(results)}")
    if not failed.empty:
        sections.append(
            "### Failed runs\n\n" + "\n".join(f"- {r.method} on {r.dataset} / {r.fold}" for r in failed.itertuples())
        )
    if figures:
        names = write_figures(results, out)
        if names:
            sections.append("### Figures\n\n" + "\n".join(f"![{name}]({name})" for name in names))
    summary = out / "summary.md"
    summary.write_text("\n\n".join(sections) + "\n")
    print(summary.read_text(), flush=True)
    return summary


def write_figures(results: pd.DataFrame, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, tasks, metric, title in [
        ("annotation_macro_f1.png", ["lobo", "map"], "macro_f1", "Annotation macro-F1"),
        ("novelty_auroc.png", ["novel"], "auroc", "Novel cell-type AUROC"),
    ]:
        mean, sd = mean_sd_table(results, tasks, metric)
        if mean.empty:
            continue
        mean = mean.loc[_order(mean.index)]
        sd = sd.reindex_like(mean)
        columns = list(mean.columns)
        width = 0.8 / len(mean)
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns) + 2), 4))
        for number, method in enumerate(mean.index):
            positions = np.arange(len(columns)) + (number - (len(mean) - 1) / 2) * width
            ax.bar(positions, mean.loc[method], width, yerr=sd.loc[method].fillna(0), label=label(method))
        ax.set_xticks(np.arange(len(columns)), [c.replace(" onto ", "\nonto ") for c in columns], fontsize=8)
        low = np.nanmin(mean.to_numpy())
        ax.set_ylim(max(0.0, low - 0.1), 1.0)
        ax.set_ylabel(metric)
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2, loc="lower left")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)
    tables = {metric: mean_sd_table(results, ["integration"], metric)[0] for metric in SCIB_AGGREGATES}
    if not tables["Total"].empty:
        column = "mean" if "mean" in tables["Total"].columns else tables["Total"].columns[0]
        datasets = [c for c in tables["Total"].columns if c != "mean"]
        frame = pd.DataFrame({metric: table[column] for metric, table in tables.items()})
        for dataset in datasets:
            frame[f"Total: {dataset}"] = tables["Total"][dataset]
        frame = frame.sort_values("Total", ascending=False)
        fig, ax = plt.subplots(figsize=(1.3 * frame.shape[1] + 3, 0.5 * len(frame) + 1.5))
        ax.imshow(frame.to_numpy(), cmap="PRGn", vmin=0.3, vmax=1.0, aspect="auto")
        for (i, j), value in np.ndenumerate(frame.to_numpy()):
            ax.text(j, i, "–" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(np.arange(frame.shape[1]), [c.replace(": ", ":\n") for c in frame.columns], fontsize=7)
        ax.set_yticks(np.arange(len(frame)), [label(m) for m in frame.index], fontsize=8)
        ax.set_title("scIB metrics on held-out batches (mean over datasets)")
        fig.tight_layout()
        fig.savefig(out / "scib_table.png", dpi=120)
        plt.close(fig)
        written.append("scib_table.png")
    return written


def _shared_means(table, ours: str, theirs: str) -> tuple[float, float, str]:
    """Both methods' mean over the datasets where both have a value, and those datasets' names."""
    columns = [
        c for c in table.columns if c != "mean" and pd.notna(table.loc[ours, c]) and pd.notna(table.loc[theirs, c])
    ]
    return float(table.loc[ours, columns].mean()), float(table.loc[theirs, columns].mean()), ", ".join(columns)
