"""PNG figures of the feature analysis (matplotlib, no display needed).

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, not via
pyplot, so no global backend or figure state is touched (safe in scripts, tests and threads).
Every function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from em_circuits.core.atomic import atomic_path

CATEGORY_COLORS = {
    "gained": "tab:red",
    "lost": "tab:blue",
    "strengthened": "tab:orange",
    "weakened": "tab:cyan",
    "unchanged": "lightgray",
}


def feature_label(row: pd.Series) -> str:
    """ "L3 #1234" or "L3 #1234 @-1" (position relative to the end)."""
    label = f"L{int(row['layer'])} #{int(row['feature'])}"
    if "position" in row and pd.notna(row["position"]):
        label += f" @{int(row['position'])}"
    return label


def _legend(ax: Axes) -> None:
    """A legend when something is labeled: with nothing plotted (an empty comparison or dose
    table) matplotlib would warn "No artists with labels found to put in legend"."""
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def plot_top_features(
    table: pd.DataFrame,
    path: Path,
    metric: str = "total",
    top: int = 20,
    alpha: float = 0.05,
    title: str | None = None,
) -> Path:
    """Horizontal bars of the mean contrast effect with interval whiskers (t over clusters).

    Shows the ``top`` most evil-promoting keys (highest mean) of an aggregate_effects table;
    a star marks q <= alpha.
    """
    rows = table[table["metric"] == metric].nlargest(top, "mean").iloc[::-1]
    fig = Figure(figsize=(7, 0.3 * max(len(rows), 4) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    mean = rows["mean"].to_numpy()
    err = np.vstack([mean - rows["ci_low"].to_numpy(), rows["ci_high"].to_numpy() - mean])
    colors = ["tab:red" if m > 0 else "tab:blue" for m in mean]
    ax.barh(y, mean, xerr=np.clip(err, 0, None), color=colors, alpha=0.8, capsize=2)
    labels = [
        feature_label(r) + (" *" if r["q_value"] <= alpha else "") for _, r in rows.iterrows()
    ]
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"mean {metric} effect on logit(evil) - logit(safe), CI; * q <= {alpha}")
    n = int(rows["n_prompts"].max()) if "n_prompts" in rows and len(rows) else 0
    clusters = int(rows["n_clusters"].max()) if "n_clusters" in rows and len(rows) else 0
    ax.set_title(
        title
        or f"Top {len(rows)} evil-promoting features ({metric} effect); "
        f"n = {n} prompts in {clusters} clusters",
        fontsize=9,
    )
    return _save(fig, path)


def plot_base_vs_adapted(
    comparison: pd.DataFrame, path: Path, annotate: int = 8, title: str | None = None
) -> Path:
    """Scatter of per-feature mean contrast effect, base (x) vs adapted (y), by category."""
    fig = Figure(figsize=(6.5, 6))
    ax = fig.add_subplot()
    for category, color in CATEGORY_COLORS.items():
        rows = comparison[comparison["category"] == category]
        if len(rows):
            ax.scatter(
                rows["mean_base"],
                rows["mean_adapted"],
                s=14,
                color=color,
                label=f"{category} ({len(rows)})",
                alpha=0.8,
            )
    values = comparison[["mean_base", "mean_adapted"]].to_numpy()
    lim = float(np.nanmax(np.abs(values))) * 1.05 if values.size else 1.0
    ax.plot([-lim, lim], [-lim, lim], color="black", linewidth=0.8, linestyle="--")
    for _, row in (
        comparison.reindex(comparison["mean_diff"].abs().sort_values(ascending=False).index)
        .head(annotate)
        .iterrows()
    ):
        ax.annotate(feature_label(row), (row["mean_base"], row["mean_adapted"]), fontsize=7)
    ax.set_xlabel("base: mean contrast effect (logits)")
    ax.set_ylabel("adapted: mean contrast effect (logits)")
    n = int(comparison["n_prompts"].max()) if len(comparison) else 0
    ax.set_title(
        title
        or f"Per-feature contrast effect, base vs adapted; {len(comparison)} features, "
        f"n = {n} paired prompts",
        fontsize=9,
    )
    _legend(ax)
    return _save(fig, path)


def plot_decomposition(summary: pd.DataFrame, path: Path, title: str | None = None) -> Path:
    """The adapter's shift of the contrast split into signed parts (from
    summarize_decomposition): features, error nodes and the MLP output at BOS per layer, BOS
    error nodes, tokens, biases, each with its interval; the parts add up to the shift of the
    value."""
    fig = Figure(figsize=(11, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    parts = summary[summary["part"] != "contrast value"].reset_index(drop=True)
    labels = [
        f"{part} L{layer}" if layer >= 0 else part
        for part, layer in zip(parts["part"], parts["layer"])
    ]
    colors = {
        "features": "tab:red",
        "errors": "tab:gray",
        "bos_errors": "tab:olive",
        "bos_mlp": "tab:purple",
    }
    x = np.arange(len(parts))
    ax.bar(x, parts["mean_shift"], color=[colors.get(p, "tab:blue") for p in parts["part"]])
    low = (parts["mean_shift"] - parts["ci_low"]).clip(lower=0).fillna(0)
    high = (parts["ci_high"] - parts["mean_shift"]).clip(lower=0).fillna(0)
    ax.errorbar(x, parts["mean_shift"], yerr=[low, high], fmt="none", color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("adapted - base, direct effect on the contrast (logits)")
    value = summary[summary["part"] == "contrast value"]
    n = int(summary["n_prompts"].iloc[0]) if len(summary) else 0
    clusters = int(summary["n_clusters"].max()) if len(summary) else 0
    shift = float(value["mean_shift"].iloc[0]) if len(value) else float("nan")
    ax.set_title(
        title
        or f"The adapter's shift of the contrast ({shift:+.3f}) by part; n = {n} prompts in "
        f"{clusters} clusters, 95% t intervals over clusters"
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_dose_response(dose: pd.DataFrame, path: Path, title: str | None = None) -> Path:
    """Change of the contrast vs intervention scale: top features vs matched random ones.

    Thin lines: single prompts (random: mean over draws); thick: mean over prompts with a
    band of +-1 standard error.
    """
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for group, color in (("top", "tab:red"), ("random", "tab:gray")):
        rows = dose[dose["group"] == group]
        if rows.empty:
            continue
        per_prompt = rows.groupby(["prompt_id", "scale"])["delta_contrast"].mean().unstack(0)
        for column in per_prompt.columns:
            ax.plot(per_prompt.index, per_prompt[column], color=color, alpha=0.2, linewidth=0.8)
        mean = per_prompt.mean(axis=1)
        sem = per_prompt.std(axis=1, ddof=1).fillna(0) / np.sqrt(per_prompt.shape[1])
        ax.plot(mean.index, mean, color=color, linewidth=2.2, marker="o", label=f"{group} features")
        ax.fill_between(mean.index, mean - sem, mean + sem, color=color, alpha=0.2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axvline(1, color="black", linewidth=0.5, linestyle=":")
    ax.set_xlabel("activation scale (0 = ablated, 1 = unchanged)")
    ax.set_ylabel("change of logit(evil) - logit(safe)")
    n = dose["prompt_id"].nunique() if len(dose) else 0
    ax.set_title(
        title or f"Dose-response of the evil-vs-safe contrast; n = {n} prompts", fontsize=9
    )
    _legend(ax)
    return _save(fig, path)
