"""Records to token tensors, batches, and the per-record loss.

Two details keep one record's gradient independent of its batch-mates, which the
per-record sensitivity argument of DP-SGD relies on:

* the loss is a mean over *that record's* target tokens, then a mean over records.
  Hugging Face's ``labels=`` loss averages over all tokens of the batch, so a
  record's gradient would be scaled by the other records' lengths;
* batches are right-padded and the first real token is never a target, so padding
  never enters a real token's causal context and is never scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data.records import Record


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    # 1 where the token is a prediction target (response tokens), else 0.
    target_mask: tuple[int, ...]
    # The class index of a labelled record (classification); None for language modelling.
    label: Optional[int] = None


def encode(record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Example:
    if record.label is not None:
        return encode_labelled(record, tokenizer, max_length)
    prompt_ids = tokenizer(record.prompt, add_special_tokens=False)["input_ids"] if record.prompt else []
    response_ids = tokenizer(record.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + prompt_ids + response_ids
    mask = [0] * (len(bos) + len(prompt_ids)) + [1] * len(response_ids)
    ids, mask = ids[:max_length], mask[:max_length]
    if sum(mask[1:]) == 0:
        # A prompt that fills the window leaves nothing to learn; keep the tail instead.
        ids, mask = (bos + prompt_ids + response_ids)[-max_length:], ([0] * len(bos + prompt_ids) + [1] * len(response_ids))[-max_length:]
    return Example(tuple(ids), tuple(mask))


def encode_labelled(record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Example:
    """The text, cut to fit, then EOS: the classifier reads the last real token."""
    ids = tokenizer(record.response, add_special_tokens=False)["input_ids"][:max_length - 2]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + ids + eos
    return Example(tuple(ids), tuple([0] * len(ids)), label=int(record.label))  # type: ignore[arg-type]


def encode_all(records: list[Record], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Example]:
    return [encode(r, tokenizer, max_length) for r in records]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    # [B] class indices for classification batches, else None.
    labels: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(examples: list[Example], pad_id: int) -> Batch:
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
    labels = None
    if examples[0].label is not None:
        labels = torch.tensor([int(e.label) for e in examples], dtype=torch.long)  # type: ignore[arg-type]
    return Batch(ids, attn, target, labels)


def token_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihoods [B, T-1] and the mask of scored positions."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1, :].float()
    targets = batch.input_ids[:, 1:]
    scored = (batch.target_mask[:, 1:] * batch.attention_mask[:, 1:]).to(logits.dtype)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(scored)
    return nll * scored, scored


def class_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """[B, num_labels] logits of a sequence classifier (pooled at each record's last real token)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()


def per_record_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Each record's own loss, shape [B]: mean NLL over its target tokens, or, for a
    labelled batch, the cross-entropy of its class."""
    if batch.labels is not None:
        return torch.nn.functional.cross_entropy(class_logits(model, batch), batch.labels, reduction="none")
    nll, scored = token_losses(model, batch)
    return nll.sum(dim=1) / scored.sum(dim=1).clamp(min=1.0)
