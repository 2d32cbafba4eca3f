"""The global adapter, version by version: the current state, its checkpoint and its records.

Committing a round makes a new version: the strategy's new state, an adapter record
naming its parent's record hash, and the checkpoint (peft-keyed weights with round and
record in one atomic file).  The per-round copy ``adapters/round_NNN/`` (weights, peft
config, ``adapter_record.json``) is written later by the evaluator thread from the
version's snapshot, so the sites need not wait for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fedtune import adapters, governance
from fedtune.checkpoint import (
    adapter_config_json,
    checkpoint_record,
    load_checkpoint,
    peft_key_map,
    save_adapter_dir,
    save_checkpoint,
    to_peft_keys,
)
from fedtune.models import lora_parameter_names

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
ADAPTERS_DIR = "adapters"


@dataclass(frozen=True)
class AdapterVersion:
    """One committed version: a snapshot of its state (model-keyed) and its record."""

    round: int
    state: adapters.State
    record: dict[str, Any]


class GlobalAdapter:
    """The run's global adapter; its model is read once, here, before the evaluator owns it."""

    def __init__(self, model: Any, run_dir: Path, identity: dict[str, Any]) -> None:
        self.key_map = peft_key_map(model)
        self.adapter_config = adapter_config_json(model)
        self.identity = identity
        self.run_dir = run_dir
        self.state = adapters.lora_state(model, lora_parameter_names(model))
        self.round = 0
        self.record: Optional[dict[str, Any]] = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def adapter_dir(self, round_number: int) -> Path:
        return self.run_dir / ADAPTERS_DIR / f"round_{round_number:03d}"

    def resume(self) -> int:
        """Load the checkpoint, if there is one; returns the round it holds (0: none)."""
        loaded = load_checkpoint(self.checkpoint_dir, self.key_map)
        if loaded is None:
            return 0
        self.round, self.state = loaded
        self.record = checkpoint_record(self.checkpoint_dir)
        if self.record is None:
            log.info("the checkpoint of round %d predates adapter records; the next version has no parent",
                     self.round)
        log.info("resuming from the checkpoint of round %d", self.round)
        return self.round

    def commit(self, round_number: int, state: adapters.State, sites: list[str]) -> AdapterVersion:
        """Make ``state`` the global adapter of ``round_number`` and checkpoint it atomically."""
        parent = governance.record_hash(self.record) if self.record is not None else None
        record = governance.adapter_record(round_number, parent, self.identity, sites)
        save_checkpoint(self.checkpoint_dir, round_number, to_peft_keys(self.key_map, state), self.adapter_config,
                        record)
        self.state, self.round, self.record = state, round_number, record
        return AdapterVersion(round_number, {n: v.copy() for n, v in state.items()}, record)

    def current(self, sites: list[str]) -> AdapterVersion:
        """The checkpointed version, e.g. to write the round directory a stopped server still owed."""
        record = self.record or governance.adapter_record(self.round, None, self.identity, sites)
        return AdapterVersion(self.round, {n: v.copy() for n, v in self.state.items()}, record)

    def save(self, version: AdapterVersion) -> None:
        """``adapters/round_NNN/``: a peft adapter directory with its record, moved into place whole."""
        save_adapter_dir(self.adapter_dir(version.round), to_peft_keys(self.key_map, version.state),
                         self.adapter_config, {governance.RECORD_FILE: governance.record_text(version.record)})
