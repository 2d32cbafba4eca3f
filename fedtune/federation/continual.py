"""Continuous fine-tuning on the server: open the version a run writes, and close it through the gate.

:func:`open_version` picks the version (:mod:`.lineage`: resume an unfinished one, else the
next from the current), moves the run's outputs into its directory and keeps the server
ledger in the federation's root, so every version's privacy report covers all versions.
:func:`close_version` compares the version's held-out loss with its parent's
(:mod:`.gate`), records the decision in version.json, promotes it when it passes, and
leaves the run's ``summary.json`` in the root too (an operator's ``fedtune server`` reads it there).
With ``versions.on_new_cohort``, :func:`skip_without_new_cohorts` discards a version that
no site's newly arrived cohort calls for (:mod:`.new_cohorts`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from fedtune.checkpoint import atomic_write_text
from fedtune.config import FedtuneConfig
from fedtune.federation import gate, lineage, new_cohorts

if TYPE_CHECKING:
    from fedtune.federation.membership import SiteInfo

log = logging.getLogger(__name__)

LEDGER_FILE = "server_ledger.sqlite"


@dataclasses.dataclass(frozen=True)
class OpenVersion:
    plan: Optional[lineage.VersionPlan]
    run_dir: Path
    ledger_path: Optional[Path]

    @property
    def first_round(self) -> int:
        return self.plan.first_round if self.plan is not None else 1


def open_version(cfg: FedtuneConfig, run_dir: Path, ledger_path: Optional[Path]) -> OpenVersion:
    """Where this run writes: ``run_dir`` itself, or with versions its next version's directory."""
    if not cfg.versions.enabled:
        return OpenVersion(None, run_dir, ledger_path)
    plan = lineage.plan_version(run_dir)
    return OpenVersion(plan, plan.dir, ledger_path or run_dir / LEDGER_FILE)


def version_identity(plan: lineage.VersionPlan) -> dict[str, Any]:
    """What every adapter record of the version states about its place in the lineage."""
    return {"name": plan.name, "parent": None if plan.parent is None else lineage.version_name(plan.parent)}


def note_start(opened: OpenVersion, start_round: int, start_loss: Optional[float]) -> None:
    """Record the held-out loss of the adapter the version starts from (its parent's), once."""
    plan = opened.plan
    if plan is not None and start_round == plan.first_round and "start_eval_loss" not in plan.info():
        plan.update(start_eval_loss=start_loss)


def skip_without_new_cohorts(opened: OpenVersion, cfg: FedtuneConfig, sites: list["SiteInfo"],
                             start_round: int) -> Optional[str]:
    """With ``versions.on_new_cohort``: why this new version is discarded untrained, or None to train it.

    Only a version that has not begun training is discarded (a resumed one goes on); the
    root's summary.json then says so, with no failure, so a schedule simply waits for its
    next check.
    """
    plan = opened.plan
    if plan is None or not cfg.versions.on_new_cohort or start_round != plan.first_round:
        return None
    train, reason = new_cohorts.should_train(sites, lineage.previous_info(plan))
    if train:
        log.info("version %s trains: %s", plan.name, reason)
        return None
    lineage.discard(plan)
    stop = f"{reason}; no version trained (versions.on_new_cohort)"
    log.info("%s", stop)
    atomic_write_text(plan.root / "summary.json", json.dumps({
        "rounds_completed": 0, "rounds_aggregated": 0, "stop_reason": stop, "failed": None, "version": None,
        "skipped": True}, indent=2))
    return stop


def close_version(opened: OpenVersion, cfg: FedtuneConfig, adapter_round: int, last_round: int,
                  sites: Optional[list["SiteInfo"]] = None) -> None:
    """Gate, record and (maybe) promote the version; copy its summary.json to the root.

    ``sites``: the run's described sites, whose arrived cohorts the version notes for the
    next one's ``versions.on_new_cohort`` check.

    ``adapter_round``: the round of the version's latest adapter (the parent's when no round
    of this version committed one); ``last_round``: the last round it began (the next
    version's rounds start after it, so no round number is used twice).
    """
    plan = opened.plan
    if plan is None:
        return
    summary = json.loads((plan.dir / "summary.json").read_text())
    trained = max(0, adapter_round - plan.first_round + 1)
    decision = gate.decide(summary.get("final_eval_loss"), plan.info().get("start_eval_loss"),
                           cfg.versions.gate_tolerance, plan.parent is not None, trained)
    plan.update(finished=True, last_round=max(last_round, adapter_round), eval_loss=summary.get("final_eval_loss"),
                rounds_trained=trained, promoted=decision.promoted, gate_reason=decision.reason,
                **{new_cohorts.SEEN_KEY: new_cohorts.cohorts_seen(sites or [])})
    if decision.promoted:
        lineage.promote(plan.root, plan.number)
        log.info("version %s promoted to current: %s", plan.name, decision.reason)
    else:
        log.warning("version %s kept but not promoted: %s", plan.name, decision.reason)
    summary.update(version=plan.name, promoted=decision.promoted, gate_reason=decision.reason)
    atomic_write_text(plan.root / "summary.json", json.dumps(summary, indent=2))
