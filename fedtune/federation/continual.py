"""Continuous fine-tuning on the server: open the version a run writes, and close it through the gate.

:func:`open_version` picks the version (:mod:`.lineage`: resume an unfinished one, else the
next from the current), moves the run's outputs into its directory and keeps the server
ledger in the federation's root, so every version's privacy report covers all versions.
:func:`close_version` compares the version's held-out loss with its parent's
(:mod:`.gate`), records the decision in version.json, promotes it when it passes, and
leaves the run's ``summary.json`` in the root too (an operator's ``fedtune server`` reads it there).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

from fedtune.checkpoint import atomic_write_text
from fedtune.config import FedtuneConfig
from fedtune.federation import gate, lineage

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


def close_version(opened: OpenVersion, cfg: FedtuneConfig, adapter_round: int, last_round: int) -> None:
    """Gate, record and (maybe) promote the version; copy its summary.json to the root.

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
                rounds_trained=trained, promoted=decision.promoted, gate_reason=decision.reason)
    if decision.promoted:
        lineage.promote(plan.root, plan.number)
        log.info("version %s promoted to current: %s", plan.name, decision.reason)
    else:
        log.warning("version %s kept but not promoted: %s", plan.name, decision.reason)
    summary.update(version=plan.name, promoted=decision.promoted, gate_reason=decision.reason)
    atomic_write_text(plan.root / "summary.json", json.dumps(summary, indent=2))
