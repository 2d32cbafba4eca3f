"""What choosing among a sweep's runs costs in privacy: all of them, composed.

Each cell of a utility table is one run's ε: what releasing that run's adapters costs a
record.  A researcher who runs the grid on private records and then picks the setting
with the best held-out score has used every run's output, and the choice itself leaks:
Papernot & Steinke (ICLR 2022, "Hyperparameter tuning with Renyi differential privacy")
show the best of several DP runs can reveal far more than one run's ε.  For a fixed grid
the bound that holds is adaptive composition: every record took part in every run, so
its privacy loss is that of all runs' DP-SGD steps together.  (Their tighter bounds need
a *random* number of runs, drawn from a distribution chosen in advance; a fixed grid is
not such a search.)

The bound per run is its worst-placed record's: a record sits at one site, so it is
charged at most the steps of the site that trained most (``max_site_steps``, from the
run's privacy report), at the run's σ and q.  A non-private run (ε = ∞) makes every
choice it is part of non-private.  The cure is the one the table's note names: tune on
public or synthetic proxy data, and train the chosen setting once on the private data.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from fedtune.privacy.accounting import Charge, epsilon


def run_charge(row: dict[str, Any]) -> Optional[Charge]:
    """The DP-SGD steps one run charged its most-charged record; None if it trained none."""
    steps = row.get("max_site_steps")
    if steps in (None, ""):
        # A results.csv from before max_site_steps: every site trained every round at most.
        steps = int(row["rounds_completed"]) * int(row["local_steps"])
    if int(steps) == 0:
        return None
    sigma = 0.0 if math.isinf(_target(row)) else float(row["noise_multiplier"])
    return Charge(round=0, noise_multiplier=sigma, sample_rate=float(row["sample_rate"]), steps=int(steps))


def search_epsilon(rows: Sequence[dict[str, Any]], delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` of releasing every run in ``rows`` (all trained on the same records)."""
    charges = [c for c in (run_charge(r) for r in rows) if c is not None]
    return epsilon(charges, delta, accountant)


def _target(row: dict[str, Any]) -> float:
    raw = row["epsilon_target"]
    return math.inf if str(raw) in ("inf", "∞") else float(raw)


def _fmt(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:.2f}"


def search_cost_section(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: the ε of choosing among all runs, and among the runs of each target ε."""
    delta = float(rows[0]["delta"])
    targets = sorted({_target(r) for r in rows})
    lines = [
        "### What choosing among these runs costs",
        "",
        f"Each cell above is one run's ε. Picking a setting by its held-out score uses every run it is "
        f"chosen from, all trained on the same records: the choice is (ε, δ={delta:g})-DP only for the ε "
        "of those runs composed (RDP, each run charged its most-trained site's steps), and not DP at all "
        "if a non-private run is among them. Tune on public or synthetic proxy data and train the chosen "
        "setting once on the private data to pay only its own ε.",
        "",
        "| chosen among | runs | ε of the choice |",
        "| --- | ---: | ---: |",
        f"| every run | {len(rows)} | {_fmt(search_epsilon(rows, delta))} |",
    ]
    for target in targets:
        if math.isinf(target) or len(targets) == 1:
            continue
        chosen = [r for r in rows if _target(r) == target]
        lines.append(f"| the runs at ε={target:g} | {len(chosen)} | {_fmt(search_epsilon(chosen, delta))} |")
    return "\n".join(lines) + "\n"
