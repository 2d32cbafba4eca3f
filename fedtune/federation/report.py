"""What the server reports: each round's metrics line, the privacy report, the run's summary.

ε figures come from the server's own ledger, charged from the σ, q and steps it
dictated; a site's own report of its spend is never used.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from fedtune import reporting
from fedtune.checkpoint import atomic_write_text
from fedtune.config import FedtuneConfig
from fedtune.evaluate import EvalResult
from fedtune.federation.rounds import RoundOutcome
from fedtune.privacy.calibration import noise_multiplier
from fedtune.privacy.ledger import PrivacyLedger

if TYPE_CHECKING:
    from fedtune.federation.membership import SiteInfo

log = logging.getLogger(__name__)


@dataclass
class ServerSummary:
    run_dir: Path
    rounds_completed: int
    stop_reason: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    # The rounds this run set out to play (0: a resumed run that was already complete), and
    # how many of them changed the global adapter.
    rounds_to_play: int = 0
    rounds_aggregated: int = 0

    @property
    def failure(self) -> Optional[str]:
        """Why the run trained nothing it was asked to, or None: a run that trained nothing failed.

        Exiting 0 after "no site connected" or a budget spent before the first round made a
        script, a sweep or a scheduler take an untrained adapter for a result.
        """
        if self.rounds_to_play == 0 or self.rounds_aggregated > 0:
            return None
        if self.stop_reason == "all rounds completed":
            return f"every one of the {self.rounds_to_play} round(s) was abandoned: no usable sum of updates"
        return self.stop_reason


def round_row(round_number: int, outcome: RoundOutcome, sites: list["SiteInfo"], ledger: PrivacyLedger,
              private: bool) -> dict[str, Any]:
    """The round's metrics line before its timings and held-out evaluation are known."""
    epsilons = [ledger.epsilon(s.name, s.delta) for s in sites] if private else [math.inf]
    return {
        "round": round_number,
        "participants": outcome.participants,
        "refusals": outcome.refusals,
        "failures": outcome.failures,
        "train_loss": float(np.mean(outcome.train_losses)) if outcome.train_losses else None,
        "max_epsilon": reporting.json_number(max(epsilons)),
        "local_train_seconds": outcome.local_train_seconds,
        **outcome.extra,
    }


def privacy_report(cfg: FedtuneConfig, ledger: PrivacyLedger, sites: list["SiteInfo"]) -> dict[str, Any]:
    """Each site's ε over its whole history in ``ledger``: every run that charged it, not only this one.

    ``runs`` lists those runs oldest first (``null``: charges from before runs were named);
    ``run`` is this one.
    """
    site_runs = {s.name: ledger.runs(s.name) for s in sites}
    covered = {run for runs in site_runs.values() for run in runs}
    report: dict[str, Any] = {"accountant": cfg.privacy.accountant, "delta": cfg.privacy.delta, "run": ledger.run,
                              "runs": [r for r in ledger.runs() if r in covered], "ledger": str(ledger.path),
                              "sites": {}}
    for site in sites:
        history = ledger.history(site.name)
        eps = ledger.epsilon(site.name, site.delta) if cfg.privacy.enabled else (math.inf if history else 0.0)
        report["sites"][site.name] = {
            "runs": site_runs[site.name],
            "epsilon": reporting.json_number(eps),
            "budget_epsilon": site.budget_epsilon,
            "delta": site.delta,
            "rounds": len(history),
            "steps": sum(c.steps for c in history),
            "noise_multiplier": noise_multiplier(cfg),
            "sample_rate": cfg.privacy.sample_rate,
            # The site budgets each data cohort itself: ε here bounds every cohort's from above.
            "per_cohort_budget": site.per_cohort_budget,
        }
    return report


def write_failed_summary(summary: ServerSummary, run_id: Optional[str]) -> None:
    """``summary.json`` of a run that stopped before its first round (no site connected)."""
    atomic_write_text(summary.run_dir / "summary.json", json.dumps({
        "rounds_completed": 0, "rounds_aggregated": 0, "stop_reason": summary.stop_reason,
        "failed": summary.failure, "initial_eval_loss": None, "final_eval_loss": None, "sites": [],
        "run_id": run_id,
    }, indent=2))
    log.error("%s: the run trained nothing", summary.stop_reason)


def write_final_outputs(cfg: FedtuneConfig, summary: ServerSummary, ledger: PrivacyLedger, sites: list["SiteInfo"],
                        baseline: Optional[EvalResult]) -> None:
    """The privacy report, ``summary.json`` and the plots, once the rounds are over.

    The held-out losses are null when the server had no held-out set.
    """
    run_dir, rows = summary.run_dir, summary.rows
    reporting.write_privacy_report(run_dir, privacy_report(cfg, ledger, sites))
    initial = baseline.loss if baseline is not None else None
    atomic_write_text(run_dir / "summary.json", json.dumps({
        "rounds_completed": summary.rounds_completed,
        "rounds_aggregated": summary.rounds_aggregated,
        "stop_reason": summary.stop_reason,
        # Why the run trained nothing (fedtune simulate and fedtune server then exit 1); null if it did.
        "failed": summary.failure,
        "initial_eval_loss": initial,
        "final_eval_loss": rows[-1].get("eval_loss") if rows else initial,
        "sites": [s.name for s in sites],
        "run_id": ledger.run,
    }, indent=2))
    reporting.write_plots(run_dir, rows)
    log.info("%s after %d rounds; outputs in %s", summary.stop_reason, summary.rounds_completed, run_dir)
