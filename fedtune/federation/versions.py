"""The global adapter, version by version: the current state, its checkpoint and its records.

Committing a round makes a new version: the strategy's new state, an adapter record
naming its parent's record hash, and the checkpoint (peft-keyed weights with round and
record in one atomic file) with, beside it, the server optimiser's moments of that round
(:mod:`fedtune.server_optimizers`), so a resumed run continues with the moments its adapter
was made with.  The per-round copy ``adapters/round_NNN/`` (weights, peft
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
    atomic_write_text,
    checkpoint_record,
    load_checkpoint,
    load_tensors,
    peft_key_map,
    save_adapter_dir,
    save_checkpoint,
    save_tensors,
    to_peft_keys,
)
from fedtune.errors import require
from fedtune.evaluate import EvalResult
from fedtune.transparency.card import CARD_FILE, render_card
from fedtune.transparency.digests import file_hashes
from fedtune.models import lora_parameter_names
from fedtune.server_optimizers import FedAvg, ServerOptimizer

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
ADAPTERS_DIR = "adapters"
# The server optimiser's state after round N, in the checkpoint directory.  One file per round,
# written before the checkpoint and pruned after it: the checkpoint's rename alone decides which
# round a resumed run is at, and that round's file is always there (see GlobalAdapter.commit).
OPTIMIZER_FILE = "server_optimizer_{:03d}.safetensors"


@dataclass(frozen=True)
class AdapterVersion:
    """One committed version: a snapshot of its state (model-keyed) and its record."""

    round: int
    state: adapters.State
    record: dict[str, Any]


class GlobalAdapter:
    """The run's global adapter; its model is read once, here, before the evaluator owns it.

    ``optimizer`` is the server optimiser whose moments are saved with every version
    (default: plain FedAvg, which has none).
    """

    def __init__(self, model: Any, run_dir: Path, identity: dict[str, Any],
                 optimizer: Optional[ServerOptimizer] = None) -> None:
        self.optimizer = optimizer or FedAvg()
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

    def optimizer_path(self, round_number: int) -> Path:
        return self.checkpoint_dir / OPTIMIZER_FILE.format(round_number)

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
        self._resume_optimizer()
        log.info("resuming from the checkpoint of round %d", self.round)
        return self.round

    def start_from(self, parent_checkpoint: Path, last_round: int) -> None:
        """Begin a new version at its parent's adapter and record (the chain's next link).

        The server optimiser's moments start afresh: they belong to the parent's run.
        ``last_round`` is the federation's latest round, so this version's first is the next.
        """
        loaded = load_checkpoint(parent_checkpoint, self.key_map)
        require(loaded is not None, "versions.enabled", f"the parent version's checkpoint {parent_checkpoint} is "
                "missing", "Restore the parent version's directory, or point versions/CURRENT at a version that has "
                "its checkpoint.")
        assert loaded is not None
        _, self.state = loaded
        self.record = checkpoint_record(parent_checkpoint)
        self.round = last_round
        log.info("starting from the parent version's adapter (%s)", parent_checkpoint)

    def begin_at(self, state: adapters.State) -> None:
        """Begin a new run at ``state`` (``train.start_adapter``) instead of a fresh LoRA.

        The records of this run form their own chain (its first names no parent, so
        ``fedtune record verify`` checks the run alone); they state the start's record hash
        in ``start_adapter`` instead (fedtune.federation.reference).
        """
        if set(state) != set(self.state):
            raise ValueError("the start adapter does not hold exactly this model's adapter tensors")
        self.state = {n: v.copy() for n, v in state.items()}
        log.info("starting from the given adapter (train.start_adapter)")

    def _resume_optimizer(self) -> None:
        """The server optimiser's moments of the checkpoint's round; refuses another optimiser's."""
        path = self.optimizer_path(self.round)
        # A checkpoint without the file predates server optimisers: its run was plain FedAvg.
        metadata, tensors = load_tensors(path) if path.is_file() else ({}, {})
        saved = metadata.get("server_optimizer", FedAvg.name)
        require(saved == self.optimizer.name, "federation.server_optimizer",
                f"the checkpoint of round {self.round} in {self.checkpoint_dir} was made with {saved}, "
                f"not {self.optimizer.name}, and its moments cannot be carried over",
                f"Resume with federation.server_optimizer={saved}, or move the run directory aside to start afresh.")
        self.optimizer.load_state_dict(tensors, int(metadata.get("steps", 0)),
                                       {n: v.shape for n, v in self.state.items()})
        if tensors:
            log.info("restored the %s moments of round %d (%d steps)", saved, self.round, self.optimizer.steps)

    def commit(self, round_number: int, state: adapters.State, sites: list[str],
               extra: Optional[dict[str, Any]] = None) -> AdapterVersion:
        """Make ``state`` the global adapter of ``round_number`` and checkpoint it atomically.

        ``extra``: the round's further record fields (fedtune.transparency.content); the
        record also states the digests of the files the round's directory will hold.
        """
        parent = governance.record_hash(self.record) if self.record is not None else None
        record = governance.adapter_record(round_number, parent, self.identity, sites)
        record.update(extra or {})
        record["files"] = file_hashes(to_peft_keys(self.key_map, state), self.adapter_config)
        # The optimiser's file first: a crash before the checkpoint's rename leaves the previous
        # checkpoint, whose own file is still there; the older files go only once this round is in.
        save_tensors(self.optimizer_path(round_number), self.optimizer.state_dict(),
                     {"server_optimizer": self.optimizer.name, "steps": str(self.optimizer.steps),
                      "round": str(round_number)})
        save_checkpoint(self.checkpoint_dir, round_number, to_peft_keys(self.key_map, state), self.adapter_config,
                        record)
        self._prune_optimizer_files(round_number)
        self.state, self.round, self.record = state, round_number, record
        return AdapterVersion(round_number, {n: v.copy() for n, v in state.items()}, record)

    def write_card(self, version: AdapterVersion, evaluation: Optional[EvalResult]) -> None:
        """``ADAPTER_CARD.md`` in the round's directory, once its evaluation is known."""
        card = render_card(version.record, governance.record_hash(version.record), evaluation)
        atomic_write_text(self.adapter_dir(version.round) / CARD_FILE, card)

    def _prune_optimizer_files(self, kept: int) -> None:
        for path in self.checkpoint_dir.glob(OPTIMIZER_FILE.replace("{:03d}", "*")):
            if path != self.optimizer_path(kept):
                path.unlink(missing_ok=True)

    def current(self, sites: list[str]) -> AdapterVersion:
        """The checkpointed version, e.g. to write the round directory a stopped server still owed."""
        record = self.record or governance.adapter_record(self.round, None, self.identity, sites)
        return AdapterVersion(self.round, {n: v.copy() for n, v in self.state.items()}, record)

    def save(self, version: AdapterVersion) -> None:
        """``adapters/round_NNN/``: a peft adapter directory with its record, moved into place whole."""
        save_adapter_dir(self.adapter_dir(version.round), to_peft_keys(self.key_map, version.state),
                         self.adapter_config, {governance.RECORD_FILE: governance.record_text(version.record)})
