"""``fedtune experiment stream``: continuous fine-tuning with per-cohort budgets against one whole-site budget.

Each simulated site's data is split into K time-ordered cohorts (``versions.stream_cohorts``);
one cohort arrives per version, and each version is one ``run_server`` of the federation
(``versions.enabled``: it starts from the current version's adapter, one server ledger
covers them all, the regression gate promotes or keeps it).  Two arms run the same stream:

* ``per_cohort``: each cohort has its own ε (``versions.per_cohort_budget``): a cohort that
  spent its budget retires and the next version trains on the newly arrived one;
* ``whole_site``: one ε for all of a site's data, as without cohorts: once it is spent no
  site can take part, and versions stop changing the adapter.

σ is calibrated (``privacy.noise_multiplier=null``) so that one version's rounds spend one
budget; the table gives each version's held-out loss (the server's, on the same held-out
split in every version), the rounds it trained and whether it was promoted.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fedtune.config import FedtuneConfig
from fedtune.experiments.engine import run_federation
from fedtune.federation import lineage

log = logging.getLogger(__name__)

ARMS = ("per_cohort", "whole_site")
CSV_NAME = "stream.csv"
TABLE_NAME = "stream.md"
PLOT_NAME = "stream.png"


@dataclass
class StreamSpec:
    cohorts: int = 4
    engine: str = "inprocess"


def quick_base() -> FedtuneConfig:
    """A stream small enough for minutes on 2 cores: the utility harness's quick federation, 2 rounds a version."""
    from fedtune.experiments.utility import quick_base as utility_quick

    cfg = utility_quick()
    cfg.federation.num_rounds = 2
    cfg.privacy.noise_multiplier = None
    cfg.train.seed = 0
    return cfg


def _version_row(arm: str, root: Path, number: int, seconds: float) -> dict[str, Any]:
    info = lineage.read_version(root / lineage.VERSIONS_DIR / lineage.version_name(number))
    return {"arm": arm, "version": number, "eval_loss": info.get("eval_loss"),
            "start_eval_loss": info.get("start_eval_loss"),
            "rounds": info.get("rounds_trained", 0),
            "promoted": bool(info.get("promoted")), "gate_reason": info.get("gate_reason"),
            "seconds": round(seconds, 1)}


def run_arm(arm: str, spec: StreamSpec, base: FedtuneConfig, out: Path) -> list[dict[str, Any]]:
    """Every version of one arm, one cohort arriving per version; resumes finished versions."""
    root = out / arm
    rows = []
    for number in range(1, spec.cohorts + 1):
        done = lineage.list_versions(root)
        if number in done and lineage.read_version(root / lineage.VERSIONS_DIR / lineage.version_name(number)).get(
                "finished"):
            rows.append(_version_row(arm, root, number, 0.0))
            continue
        cfg = copy.deepcopy(base)
        cfg.run_dir = str(root)
        cfg.versions.enabled = True
        cfg.versions.stream_cohorts, cfg.versions.arrived_cohorts = spec.cohorts, number
        cfg.versions.per_cohort_budget = arm == "per_cohort"
        started = time.perf_counter()
        run_federation(cfg, spec.engine)
        rows.append(_version_row(arm, root, number, time.perf_counter() - started))
        log.info("stream %s version %d: %s", arm, number, rows[-1])
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """Held-out loss per version, one column per arm."""
    versions = sorted({r["version"] for r in rows})
    cell = {(r["arm"], r["version"]): r for r in rows}

    def show(row: Optional[dict[str, Any]]) -> str:
        if row is None or row["eval_loss"] is None:
            return "–"
        return f"{row['eval_loss']:.4f} ({row['rounds']} rounds{'' if row['promoted'] else ', kept'})"

    lines = ["| version | " + " | ".join(ARMS) + " |", "| --- | " + " | ".join("---" for _ in ARMS) + " |"]
    lines += [f"| v{v:04d} | " + " | ".join(show(cell.get((a, v))) for a in ARMS) + " |" for v in versions]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from fedtune.experiments.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm in ARMS:
        points = sorted((r["version"], r["eval_loss"]) for r in rows if r["arm"] == arm and r["eval_loss"] is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=arm.replace("_", "-") + " budget")
    ax.set_xlabel("adapter version (one new cohort each)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_stream(spec: StreamSpec, base: FedtuneConfig, out: Path) -> str:
    """Both arms, then stream.csv, stream.md and stream.png in ``out``; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for arm in ARMS for row in run_arm(arm, spec, base, out)]
    with (out / CSV_NAME).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "stream.json").write_text(json.dumps(rows, indent=2))
    text = markdown(rows)
    (out / TABLE_NAME).write_text(text)
    plot(rows, out / PLOT_NAME)
    return text
