"""Token sequences and their padded batches: the encoded form the built-in tasks share.

Which tokens a record becomes, which of them are targets and which special tokens
frame them is the task's decision (:mod:`fedtune.tasks`), so that a tokenizer-specific
fix is made in one place.  This module holds only the shapes and the padding rule, which
the per-record sensitivity argument of DP-SGD relies on: batches are right-padded, so
padding never enters a real token's causal context, and a padded position is never
scored (its attention mask is 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    # 1 where the token is a prediction target (response tokens), else 0.
    target_mask: tuple[int, ...]


BatchT = TypeVar("BatchT", bound="Batch")


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self: BatchT, device: torch.device) -> BatchT:
        """The same batch on ``device``; every tensor field moves, a subclass's too."""
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                 for f in dataclasses.fields(self)}
        return type(self)(**moved)


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example of the batch."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), length), dtype=torch.long)
    target = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        attn[row, :n] = 1
        target[row, :n] = torch.tensor(example.target_mask)
    return Batch(ids, attn, target)
