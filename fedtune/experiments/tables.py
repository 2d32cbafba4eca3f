"""Result rows to CSV, and CSV to Markdown tables of mean ± std over seeds.

The CSV holds every run (one row each, per-round curves as JSON lists), so tables and
plots can be regenerated from it alone: ``fedtune experiment table DIR``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from fedtune.checkpoint import atomic_write_text
from fedtune.experiments.search_cost import search_cost_section

CSV_FIELDS = [
    "key", "group", "centralised", "partition", "dirichlet_alpha", "strategy", "num_sites", "seed",
    "epsilon_target", "epsilon_spent", "delta", "noise_multiplier", "sample_rate", "num_rounds", "local_steps",
    "rounds_completed", "max_site_steps", "stop_reason", "initial_eval_loss", "final_eval_loss", "final_eval_perplexity",
    "final_eval_accuracy", "eval_loss_by_round", "eval_accuracy_by_round", "wall_seconds", "run_dir",
]
_JSON_FIELDS = ("eval_loss_by_round", "eval_accuracy_by_round")
_FLOAT_FIELDS = ("dirichlet_alpha", "delta", "noise_multiplier", "sample_rate", "initial_eval_loss",
                 "final_eval_loss", "final_eval_perplexity", "final_eval_accuracy", "wall_seconds")
_INT_FIELDS = ("num_sites", "seed", "num_rounds", "local_steps", "rounds_completed")

METRICS = {
    "final_eval_loss": ("Held-out loss (nats/token)", ".3f"),
    "final_eval_perplexity": ("Held-out perplexity", ".2f"),
    "final_eval_accuracy": ("Held-out accuracy", ".3f"),
}


def epsilon_value(raw: Any) -> float:
    return math.inf if str(raw) in ("inf", "∞") else float(raw)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(row[k]) if k in _JSON_FIELDS else
                                 ("" if row.get(k) is None else row[k])) for k in CSV_FIELDS})
    tmp.replace(path)


def read_csv(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = dict(raw)
            for k in _JSON_FIELDS:
                row[k] = json.loads(row[k]) if row.get(k) else []
            for k in _FLOAT_FIELDS:
                row[k] = float(row[k]) if row.get(k) not in (None, "") else None
            for k in _INT_FIELDS:
                row[k] = int(row[k])
            # Absent from a results.csv written before it was recorded.
            row["max_site_steps"] = int(row["max_site_steps"]) if row.get("max_site_steps") else None
            row["centralised"] = row["centralised"] == "True"
            rows.append(row)
    return rows


def mean_std(values: Iterable[Optional[float]]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for a single value) and count, ignoring None."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def groups_in_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Centralised references first, then the federated settings in grid order."""
    seen: list[str] = []
    for row in sorted(rows, key=lambda r: not r["centralised"]):
        if row["group"] not in seen:
            seen.append(row["group"])
    return seen


def epsilons_in_order(rows: Sequence[dict[str, Any]]) -> list[float]:
    return sorted({epsilon_value(r["epsilon_target"]) for r in rows})


def summarise(rows: Sequence[dict[str, Any]], metric: str) -> dict[tuple[str, float], tuple[float, float, int]]:
    cells: dict[tuple[str, float], list[Optional[float]]] = {}
    for row in rows:
        cells.setdefault((row["group"], epsilon_value(row["epsilon_target"])), []).append(row.get(metric))
    return {key: mean_std(values) for key, values in cells.items()}


def _fmt_eps(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:g}"


def markdown_table(rows: Sequence[dict[str, Any]], metric: str) -> str:
    title, spec = METRICS[metric]
    if metric == "final_eval_loss" and has_metric(rows, "final_eval_accuracy"):
        title = "Held-out cross-entropy (nats/record)"
    stats = summarise(rows, metric)
    epsilons = epsilons_in_order(rows)
    lines = [f"| setting | {' | '.join(f'ε={_fmt_eps(e)}' for e in epsilons)} |",
             f"| --- | {' | '.join('---:' for _ in epsilons)} |"]
    for group in groups_in_order(rows):
        cells = []
        for eps in epsilons:
            mean, std, n = stats.get((group, eps), (math.nan, math.nan, 0))
            cells.append("–" if n == 0 else f"{mean:{spec}} ± {std:{spec}}")
        lines.append(f"| {group} | {' | '.join(cells)} |")
    return f"### {title}\n\n" + "\n".join(lines) + "\n"


def has_metric(rows: Sequence[dict[str, Any]], metric: str) -> bool:
    return any(r.get(metric) is not None for r in rows)


def write_tables(rows: Sequence[dict[str, Any]], path: Path, provenance: str = "") -> str:
    """Markdown: one table per metric, settings × ε, mean ± std over seeds."""
    seeds = sorted({r["seed"] for r in rows})
    rounds = sorted({r["num_rounds"] for r in rows})
    head = (f"Mean ± sample std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), held-out set after "
            f"{'/'.join(map(str, rounds))} round(s). ε is each site's record-level budget at "
            f"δ={rows[0]['delta']:g} (σ calibrated to spend it over the whole run); ε=∞ is non-private. "
            "Centralised = one site holding all training data.")
    parts = ["# Utility against privacy", "", head, ""]
    if provenance:
        parts += [provenance, ""]
    classification = has_metric(rows, "final_eval_accuracy")
    for metric in METRICS:
        # Perplexity is a language-modelling measure; a classifier reports accuracy instead.
        if has_metric(rows, metric) and not (classification and metric == "final_eval_perplexity"):
            parts.append(markdown_table(rows, metric))
    parts.append(search_cost_section(rows))
    text = "\n".join(parts)
    atomic_write_text(path, text)
    return text
