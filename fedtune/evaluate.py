"""Held-out loss and perplexity of a (LoRA-adapted) causal LM; loss and accuracy of a classifier."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from fedtune.data.encoding import Batch, Example, class_logits, collate, token_losses


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    # Share of records whose most likely class is their label (classification only).
    accuracy: Optional[float] = None


def _eval_batches(model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int) -> Iterator[Batch]:
    """The examples in padded batches, with ``model`` in eval mode until the last one is done."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            yield collate(examples[start:start + batch_size], pad_id)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int = 32) -> EvalResult:
    """Token-weighted mean NLL over the target tokens of ``examples``, and exp of it.

    Labelled examples (a classifier) give the mean cross-entropy per record, exp of it,
    and the accuracy.
    """
    if examples and examples[0].label is not None:
        return evaluate_classifier(model, examples, pad_id, batch_size)
    total, count = 0.0, 0.0
    for batch in _eval_batches(model, examples, pad_id, batch_size):
        nll, scored = token_losses(model, batch)
        total += float(nll.sum())
        count += float(scored.sum())
    loss = total / max(count, 1.0)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=int(count))


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, examples: list[Example], pad_id: int,
                        batch_size: int = 32) -> EvalResult:
    total, correct = 0.0, 0
    for batch in _eval_batches(model, examples, pad_id, batch_size):
        logits = class_logits(model, batch)
        total += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == batch.labels).sum())
    n = max(len(examples), 1)
    loss = total / n
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=sum(len(e.input_ids) for e in examples),
                      accuracy=correct / n)
