"""Causal language modelling: plain texts, or prompt/response pairs scored on the response.

Two details keep one record's gradient independent of its batch-mates, which the
per-record sensitivity argument of DP-SGD relies on:

* the loss is a mean over *that record's* target tokens, then a mean over records.
  Hugging Face's ``labels=`` loss averages over all tokens of the batch, so a
  record's gradient would be scaled by the other records' lengths;
* batches are right-padded and the first real token is never a target, so padding
  never enters a real token's causal context and is never scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fedtune.config import DataConfig, ModelConfig
from fedtune.data.demo import demo_corpus
from fedtune.data.encoding import Batch, Example, collate
from fedtune.data.records import DataError, Record, RecordSchema, record_group
from fedtune.errors import require
from fedtune.evaluate import EvalResult, eval_batches, perplexity_of
from fedtune.tasks import Task

# A random frozen head with the usual std of 0.02 caps every logit near ±1.3, so no
# adapter could make the tiny model confident (loss floor ~4.5 nats/byte).  A wider head
# gives LoRA the range that a pretrained head would.
TINY_HEAD_STD = 0.3


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


def _text_record(obj: dict[str, Any], schema: RecordSchema, where: str) -> Record:
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f'{where}: missing or empty "text" field. '
                        'Plain-text records look like {"text": "..."}; instruction records like '
                        '{"prompt": "...", "response": "..."} (set data.format accordingly).')
    return Record(prompt="", response=text, group=record_group(obj, schema))


def _instruction_record(obj: dict[str, Any], schema: RecordSchema, where: str) -> Record:
    prompt, response = obj.get("prompt"), obj.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
        raise DataError(f'{where}: instruction records need string "prompt" and non-empty "response" fields, '
                        'e.g. {"prompt": "Summarise: ...", "response": "..."}.')
    return Record(prompt=prompt, response=response, group=record_group(obj, schema))


class CausalLM(Task[Example, Batch]):
    """Fine-tune the LM itself; held-out loss is nats per target token, with its perplexity."""

    name = "causal_lm"
    record_formats = ("auto", "text", "instruction")
    peft_task_type = "CAUSAL_LM"

    def check_config(self, model: ModelConfig, data: DataConfig) -> None:
        require(data.format in self.record_formats, "data.format", "labelled records need a classification head",
                "Set model.task=classification (and model.num_labels), or use text/instruction records.")

    def parse_record(self, obj: dict[str, Any], schema: RecordSchema, where: str) -> Record:
        fmt = schema.fmt
        if fmt == "auto":
            fmt = "instruction" if "prompt" in obj or "response" in obj else "text"
        return _text_record(obj, schema, where) if fmt == "text" else _instruction_record(obj, schema, where)

    def demo_records(self, data: DataConfig) -> list[Record]:
        return demo_corpus(data.demo_records, seed=data.seed)

    def pretrained_model(self, path: Path, model: ModelConfig, tokenizer: PreTrainedTokenizerBase
                         ) -> PreTrainedModel:
        # safetensors weights are memory-mapped by from_pretrained; float32 because DP noise
        # added to low-precision gradients is rounded away.
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def tiny_model(self, config: LlamaConfig, model: ModelConfig) -> PreTrainedModel:
        built = LlamaForCausalLM(config)
        with torch.no_grad():
            built.lm_head.weight.normal_(0.0, TINY_HEAD_STD)
        return built

    def encode(self, record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Example:
        """BOS, prompt, response, EOS; only the response (and EOS) are targets."""
        prompt_ids = tokenizer(record.prompt, add_special_tokens=False)["input_ids"] if record.prompt else []
        response_ids = tokenizer(record.response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        full = bos + prompt_ids + response_ids
        full_mask = [0] * (len(bos) + len(prompt_ids)) + [1] * len(response_ids)
        ids, mask = full[:max_length], full_mask[:max_length]
        if sum(mask[1:]) == 0:
            # A prompt that fills the window leaves nothing to learn; keep the tail instead.
            ids, mask = full[-max_length:], full_mask[-max_length:]
        return Example(tuple(ids), tuple(mask))

    def collate(self, examples: Sequence[Example], pad_id: int) -> Batch:
        return collate(examples, pad_id)

    def per_record_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Mean NLL over each record's own target tokens."""
        nll, scored = token_losses(model, batch)
        return nll.sum(dim=1) / scored.sum(dim=1).clamp(min=1.0)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: Sequence[Example], pad_id: int,
                 batch_size: int) -> EvalResult:
        """Token-weighted mean NLL over the target tokens of ``examples``, and exp of it."""
        total, count = 0.0, 0.0
        for batch in eval_batches(model, examples, self.collate, pad_id, batch_size):
            nll, scored = token_losses(model, batch)
            total += float(nll.sum())
            count += float(scored.sum())
        loss = total / max(count, 1.0)
        return EvalResult(loss=loss, perplexity=perplexity_of(loss), tokens=int(count))
