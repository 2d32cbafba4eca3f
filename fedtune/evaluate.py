"""Held-out loss and perplexity of a (LoRA-adapted) causal LM."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedtune.data.encoding import Example, collate, token_losses


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int = 32) -> EvalResult:
    """Token-weighted mean NLL over the target tokens of ``examples``, and exp of it."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_id)
            nll, scored = token_losses(model, batch)
            total += float(nll.sum())
            count += float(scored.sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1.0)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=int(count))
