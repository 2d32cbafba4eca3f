"""The adapter a run starts from, and the frozen reference policy it gives a task that has one (DPO).

A run starts from a fresh LoRA, from ``train.start_adapter`` (an adapter directory an
earlier run wrote), or, with ``versions.enabled``, from its parent version's checkpoint.
DPO's reference policy is that start, frozen for the whole run: the SFT adapter of an
SFT → DPO pipeline, whether the DPO run names it or is the next version of the SFT one.
A fresh LoRA is the base model (its B is zero), which every site computes itself with
the adapter disabled, so nothing is sent; any other start is sent to the sites beside the
global adapter in every round (:mod:`fedtune.tasks.dpo` says why, and how they check it).

The start is read here, on the server, once per run: a resumed run finds the same start
(the parent version, or the same ``train.start_adapter``), so its reference does not
drift to the checkpoint it resumes from.  Sites never receive a path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from fedtune import adapters, governance
from fedtune.checkpoint import WEIGHTS_FILE, checkpoint_record, from_peft_keys, load_tensors
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError, require
from fedtune.federation.lineage import VersionPlan, version_name
from fedtune.tasks import get_task

log = logging.getLogger(__name__)

# The checkpoint directory of a version (fedtune.federation.versions.CHECKPOINT_DIR).
CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class StartAdapter:
    """An adapter a run starts from: its tensors (model-keyed) and its record, if it has one."""

    state: adapters.State
    record: Optional[dict[str, Any]]

    @property
    def record_sha256(self) -> Optional[str]:
        return governance.record_hash(self.record) if self.record is not None else None


def load_adapter_dir(directory: Path, key_map: Mapping[str, str], field: str) -> StartAdapter:
    """The adapter of a fedtune adapter directory (``adapters/round_NNN/`` or ``checkpoint/``).

    Its tensors must be exactly this model's adapter tensors (peft's keys), else a
    ConfigError names ``field``: an adapter of another base model, LoRA shape or task.
    """
    weights = directory / WEIGHTS_FILE
    require(weights.is_file(), field, f"'{directory}' holds no {WEIGHTS_FILE}",
            "Point it at an earlier run's adapters/round_NNN/ or checkpoint/ directory.")
    try:
        _, tensors = load_tensors(weights)
        state = from_peft_keys(key_map, tensors, str(weights))
    except ValueError as exc:
        raise ConfigError(field, str(exc).split(". Resume")[0],
                          "Start from an adapter of this model.path, model.lora and model.task.") from None
    record_file = directory / governance.RECORD_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else checkpoint_record(directory)
    return StartAdapter({n: v.astype("float32", copy=True) for n, v in state.items()}, record)


def run_start(cfg: FedtuneConfig, plan: Optional[VersionPlan], key_map: Mapping[str, str]) -> Optional[StartAdapter]:
    """The adapter this run (or version) starts from; None: a fresh LoRA."""
    if plan is not None:
        require(cfg.train.start_adapter is None, "train.start_adapter",
                "is set with versions.enabled=true, where each version starts from its parent version",
                "Set train.start_adapter=null (the next version starts from the current one), or run without "
                "versions.")
        if plan.parent_dir is None:
            return None
        return load_adapter_dir(plan.parent_dir / CHECKPOINT_DIR, key_map, "versions.enabled")
    if cfg.train.start_adapter is None:
        return None
    start = load_adapter_dir(Path(cfg.train.start_adapter), key_map, "train.start_adapter")
    log.info("starting from the adapter in %s (record %s)", cfg.train.start_adapter,
             (start.record_sha256 or "none")[:12])
    return start


def reference_state(cfg: FedtuneConfig, start: Optional[StartAdapter]) -> Optional[adapters.State]:
    """The reference adapter the sites receive: the start, for a task with a reference policy; else None."""
    if start is None or not get_task(cfg.model.task).uses_reference:
        return None
    return start.state


def reference_identity(cfg: FedtuneConfig, start: Optional[StartAdapter], plan: Optional[VersionPlan]
                       ) -> dict[str, Any]:
    """What every adapter record of the run states about its start and, for DPO, its β and reference policy."""
    identity: dict[str, Any] = {}
    if start is not None and plan is None:
        identity["start_adapter"] = {"record_sha256": start.record_sha256}
    if get_task(cfg.model.task).uses_reference:
        if start is None:
            policy: dict[str, Any] = {"kind": "base model"}
        else:
            parent = plan.parent if plan is not None else None
            policy = {"kind": "start adapter", "record_sha256": start.record_sha256,
                      "version": None if parent is None else version_name(parent)}
        identity["dpo"] = {"beta": float(cfg.train.dpo_beta), "reference_policy": policy}
    return identity
