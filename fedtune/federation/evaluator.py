"""The server's held-out evaluation, and the thread that finishes each round beside the next one.

Where the held-out set comes from: ``data.eval_path`` (a JSONL file the server holds),
else in a simulation the held-out split of the pooled data.  A deployment's server
holds no site data, so without ``data.eval_path`` it does not evaluate: its metrics
lines then carry no ``eval_*`` metrics.

The evaluation of round r runs while the sites train round r+1: with a real model it
takes minutes, and the sites would otherwise sit idle.  One thread owns the server's
model from then on, and at most one evaluation is outstanding, so the pending metrics
line on disk always belongs to the latest checkpoint.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.data import Record, load_federated_data, load_jsonl
from fedtune.evaluate import EvalResult
from fedtune.federation import run_files
from fedtune.federation.versions import AdapterVersion, GlobalAdapter
from fedtune.reporting import RoundTable
from fedtune.tasks import LossSettings, get_task

log = logging.getLogger(__name__)


def held_out_records(cfg: FedtuneConfig, pooled_data: bool) -> Optional[list[Record]]:
    """The server's held-out records, or None when it has none (a deployment without ``data.eval_path``)."""
    d = cfg.data
    if d.eval_path is not None:
        return load_jsonl(d.eval_path, fmt=d.format, group_field=d.group_field, label_field=d.label_field,
                          label_names=d.label_names)
    if pooled_data:
        return load_federated_data(d, cfg.federation.num_sites).eval_records()
    log.info("no data.eval_path: the server holds no held-out data and does not evaluate")
    return None


@dataclass(frozen=True)
class Evaluation:
    result: Optional[EvalResult]  # None: no held-out set
    seconds: float


class Evaluator:
    """Held-out metrics of an adapter state, on the server's copy of the model."""

    def __init__(self, model: Any, tokenizer: Any, cfg: FedtuneConfig, records: Optional[list[Record]],
                 reference: Optional[adapters.State] = None) -> None:
        self.model, self.task = model, get_task(cfg.model.task).with_loss(LossSettings.of(cfg))
        self.pad_id, self.batch_size = tokenizer.pad_token_id, cfg.train.eval_batch_size
        self.examples = (None if records is None else
                         self.task.encode_all(records, tokenizer, cfg.data.max_length))
        if reference is not None and self.examples is not None:
            # The held-out pairs' reference values, once: the reference is frozen for the whole run.
            adapters.load_lora_state(model, reference)
            self.examples = self.task.with_reference(model, self.examples, self.pad_id, self.batch_size)

    def evaluate(self, state: adapters.State) -> Evaluation:
        started = time.perf_counter()
        if self.examples is None:
            return Evaluation(None, 0.0)
        adapters.load_lora_state(self.model, state)
        result = self.task.evaluate(self.model, self.examples, self.pad_id, self.batch_size)
        return Evaluation(result, time.perf_counter() - started)


def log_baseline(evaluation: Evaluation, next_round: int) -> None:
    if evaluation.result is not None:
        log.info("held-out loss before round %d: %.4f (perplexity %.2f)", next_round, evaluation.result.loss,
                 evaluation.result.perplexity)


def finish_interrupted_round(run_dir: Path, adapter: GlobalAdapter, baseline: Evaluation,
                             table: RoundTable) -> None:
    """After a crash between a round's checkpoint and its metrics line, write what is missing.

    The resumed server has just evaluated the checkpointed adapter, which is exactly the
    evaluation the interrupted round still owed.
    """
    row = run_files.interrupted_row(run_dir, adapter.round)
    if row is None:
        return
    if not adapter.adapter_dir(adapter.round).is_dir():
        adapter.save(adapter.current(list(row.get("participants", []))))
    log.info("round %d was checkpointed before the server stopped; writing its metrics line now", adapter.round)
    done = run_files.complete_row(row, baseline.result, baseline.seconds, float(row.get("round_seconds", 0.0)))
    run_files.record_row(run_dir, done, table)


class RoundFinisher:
    """Saves each round's adapter directory, evaluates it and writes its metrics line, on one thread."""

    def __init__(self, evaluator: Evaluator, adapter: GlobalAdapter, run_dir: Path, table: RoundTable) -> None:
        self.evaluator, self.adapter = evaluator, adapter
        self.run_dir, self.table = run_dir, table
        self.rows: list[dict[str, Any]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedtune-eval")
        self._pending: Optional[Future] = None

    def wait(self) -> None:
        """Block until the outstanding round's line is written (raising its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def submit(self, row: dict[str, Any], version: Optional[AdapterVersion], state: adapters.State,
               round_seconds: float) -> None:
        """Finish ``row`` in the background; ``version`` (None: the adapter did not change) is saved first."""
        self.wait()
        self._pending = self._pool.submit(self._finish, row, version, state, round_seconds)

    def _finish(self, row: dict[str, Any], version: Optional[AdapterVersion], state: adapters.State,
                round_seconds: float) -> None:
        if version is not None:
            self.adapter.save(version)
        evaluation = self.evaluator.evaluate(state)
        if version is not None:
            self.adapter.write_card(version, evaluation.result)
        done = run_files.complete_row(row, evaluation.result, evaluation.seconds, round_seconds)
        run_files.record_row(self.run_dir, done, self.table)
        self.rows.append(done)

    def __enter__(self) -> "RoundFinisher":
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)
