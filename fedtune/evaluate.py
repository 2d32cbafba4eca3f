"""Held-out metrics: what every task's evaluation reports, and the eval-mode batch loop they share.

The metrics themselves (loss and perplexity of a causal LM; loss and accuracy of a
classifier) are each task's own (``Task.evaluate`` in :mod:`fedtune.tasks`); their names
are fixed here because metrics.jsonl and the experiment tables are keyed by them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import torch

ExampleT = TypeVar("ExampleT")
BatchT = TypeVar("BatchT")


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    # Share of records whose most likely class is their label (classification), or of pairs
    # whose implicit reward prefers the chosen answer (dpo).
    accuracy: Optional[float] = None
    # A task's further held-out metrics, written to metrics.jsonl as eval_<name> (dpo: margin,
    # chosen_loss); the fixed names above stay what every table and plot reads.
    task_metrics: dict[str, float] = field(default_factory=dict)


def perplexity_of(loss: float) -> float:
    """exp(loss), capped so that an untrained model's loss cannot overflow it."""
    return math.exp(min(loss, 50.0))


def eval_batches(model: torch.nn.Module, examples: Sequence[ExampleT],
                 collate: Callable[[Sequence[ExampleT], int], BatchT], pad_id: int, batch_size: int
                 ) -> Iterator[BatchT]:
    """The examples in padded batches, with ``model`` in eval mode until the last one is done."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            yield collate(examples[start:start + batch_size], pad_id)
    finally:
        model.train(was_training)
