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

import logging
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
from fedtune.tasks import Task, TrainingDefaults

# A random frozen head with the usual std of 0.02 caps every logit near ±1.3, so no
# adapter could make the tiny model confident (loss floor ~4.5 nats/byte).  A wider head
# gives LoRA the range that a pretrained head would.
TINY_HEAD_STD = 0.3

log = logging.getLogger(__name__)


def scored_positions(batch: Batch) -> torch.Tensor:
    """[B, T-1]: 1 where position t+1 is an answer token to be predicted from position t."""
    return batch.target_mask[:, 1:] * batch.attention_mask[:, 1:]


def token_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihoods [B, T-1] and the mask of scored positions."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1, :].float()
    targets = batch.input_ids[:, 1:]
    scored = scored_positions(batch).to(logits.dtype)
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


def uses_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_turns(record: Record, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(ids of the user turn up to the assistant's start, ids of the assistant turn).

    The assistant's ids are the template's rendering of the whole chat minus its rendering
    up to the generation prompt, so they include the template's end-of-turn tokens (the
    model learns to stop).  A template whose full chat does not start with the prompt
    rendering cannot be split that way and is refused rather than mis-masked.
    """
    user = [{"role": "user", "content": record.prompt}]
    prompt_ids = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True)["input_ids"])
    whole = user + [{"role": "assistant", "content": record.response}]
    full_ids = list(tokenizer.apply_chat_template(whole, tokenize=True)["input_ids"])
    if full_ids[:len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        raise DataError("the tokenizer's chat template does not render a chat as its prompt followed by the "
                        "assistant's turn, so the response tokens cannot be found. Use data.format=text, or a "
                        "tokenizer whose template extends the generation prompt.")
    return prompt_ids, full_ids[len(prompt_ids):]


def prompt_response_ids(record: Record, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a record, special tokens placed; the response is the target.

    An instruction record for a tokenizer with a chat template (an instruct model) is one
    user turn and one assistant turn of that template, the form the model was tuned on;
    otherwise BOS, prompt, then response, EOS.  Preference pairs (fedtune.tasks.dpo) encode
    each answer the same way.
    """
    if record.prompt and uses_chat_template(tokenizer):
        return chat_turns(record, tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + (tokenizer(record.prompt, add_special_tokens=False)["input_ids"] if record.prompt else [])
    response_ids = tokenizer(record.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, list(response_ids)


class CausalLM(Task[Example, Batch]):
    """Fine-tune the LM itself; held-out loss is nats per target token, with its perplexity."""

    name = "causal_lm"
    record_formats = ("auto", "text", "instruction")
    peft_task_type = "CAUSAL_LM"
    # Adam, as DP fine-tuning of LMs usually is (dp-transformers); not yet tuned on a real LM.
    training_defaults = TrainingDefaults(optimizer="adam", learning_rate=0.01)

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
        """Prompt and response (:func:`prompt_response_ids`); only the response (with its end token) is a target."""
        prompt_ids, response_ids = prompt_response_ids(record, tokenizer)
        full = prompt_ids + response_ids
        full_mask = [0] * len(prompt_ids) + [1] * len(response_ids)
        ids, mask = full[:max_length], full_mask[:max_length]
        if sum(mask[1:]) == 0:
            # A prompt that fills the window leaves nothing to learn; keep the tail instead.
            ids, mask = full[-max_length:], full_mask[-max_length:]
        return Example(tuple(ids), tuple(mask))

    def encode_all(self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_length: int
                   ) -> list[Example]:
        if uses_chat_template(tokenizer) and any(r.prompt for r in records):
            log.info("instruction records are formatted with the tokenizer's chat template; the loss covers the "
                     "assistant turn only")
        return [self.encode(r, tokenizer, max_length) for r in records]

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
