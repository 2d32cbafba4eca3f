"""PNG figures of an experiment: utility against ε, against rounds, canary score histograms."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedtune.experiments.tables import epsilon_value, epsilons_in_order, groups_in_order, summarise


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _utility_metric(rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """Accuracy for classification runs, held-out loss for language modelling."""
    if any(r.get("final_eval_accuracy") is not None for r in rows):
        return "final_eval_accuracy", "held-out accuracy"
    return "final_eval_loss", "held-out loss (nats/token)"


def _epsilon_positions(epsilons: Sequence[float]) -> dict[float, float]:
    """log2 positions for finite ε; ∞ one step to the right of the largest."""
    finite = [e for e in epsilons if math.isfinite(e)]
    top = max((math.log2(e) for e in finite), default=0.0)
    return {e: (math.log2(e) if math.isfinite(e) else top + 1.0) for e in epsilons}


def plot_utility_vs_epsilon(rows: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    metric, label = _utility_metric(rows)
    stats = summarise(rows, metric)
    epsilons = epsilons_in_order(rows)
    pos = _epsilon_positions(epsilons)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for group in groups_in_order(rows):
        xs, ys, es = [], [], []
        for eps in epsilons:
            mean, std, n = stats.get((group, eps), (math.nan, math.nan, 0))
            if n:
                xs.append(pos[eps])
                ys.append(mean)
                es.append(std)
        style = {"linestyle": "--", "color": "black"} if group.startswith("centralised") else {}
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=group, **style)
    ax.set_xticks([pos[e] for e in epsilons], ["∞" if math.isinf(e) else f"{e:g}" for e in epsilons])
    ax.set_xlabel("ε per site (δ fixed; ∞ = non-private)")
    ax.set_ylabel(label)
    ax.set_title("Utility against privacy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_utility_vs_round(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per setting; one line per ε, the mean curve over seeds."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    accuracy = any(r.get("final_eval_accuracy") is not None for r in rows)
    curve_key = "eval_accuracy_by_round" if accuracy else "eval_loss_by_round"
    groups = groups_in_order(rows)
    epsilons = epsilons_in_order(rows)
    cols = min(4, len(groups))
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False, sharey=True)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(epsilons)))
    for ax, group in zip(axes.flat, groups):
        for colour, eps in zip(colours, epsilons):
            curves = [r[curve_key] for r in rows if r["group"] == group and epsilon_value(r["epsilon_target"]) == eps]
            curves = [[math.nan if v is None else v for v in c] for c in curves if c]
            if not curves:
                continue
            length = max(len(c) for c in curves)
            padded = np.array([c + [math.nan] * (length - len(c)) for c in curves], dtype=float)
            mean = np.nanmean(padded, axis=0)
            start = 0 if not accuracy else 1  # loss curves start at round 0 (before training)
            ax.plot(range(start, start + length), mean, marker=".", color=colour,
                    label=f"ε={'∞' if math.isinf(eps) else f'{eps:g}'}")
        ax.set_title(group, fontsize=8)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out accuracy" if accuracy else "held-out loss")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_score_histograms(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Per audited run: the canary scores of included vs excluded canaries."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 3.6), squeeze=False)
    for ax, run in zip(axes.flat, runs):
        scores = np.asarray(run["scores"], dtype=float)
        included = np.asarray(run["included"], dtype=bool)
        bins = np.histogram_bin_edges(scores, bins=20)
        ax.hist(scores[included], bins=bins, alpha=0.6, label="included (trained on)")
        ax.hist(scores[~included], bins=bins, alpha=0.6, label="excluded")
        claimed = run["claimed_epsilon"]
        ax.set_title(f"claimed ε={claimed if isinstance(claimed, str) else f'{claimed:.2f}'}; "
                     f"audit ε ≥ {run['epsilon_lower_bound']:.2f}", fontsize=9)
        ax.set_xlabel("canary loss under the final adapter (nats/token)")
        ax.set_ylabel("canaries")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["plot_score_histograms", "plot_utility_vs_epsilon", "plot_utility_vs_round"]
