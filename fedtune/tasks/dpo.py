"""Direct preference optimisation (Rafailov et al. 2023) of the LM on preference pairs, under DP-SGD.

The privacy unit is one pair (prompt, chosen, rejected): its loss is
``-log σ(β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])``, and
DP-SGD clips the gradient of that loss, the pair's two answers together.

How the two answers become *one* per-sample gradient: a batch of B pairs is two padded
row sets of B rows each, the chosen answers and the rejected ones, and the policy runs
one forward pass over each.  Opacus' hooks accumulate the per-sample gradients of
several forward passes of equal batch size row by row (``_current_grad_sample += ...``),
so row i of the grad sample is exactly the gradient of pair i's loss, chosen and rejected
summed, *before* the optimiser clips it to C.  The alternative, one forward over 2B rows,
would give 2B grad samples that Opacus' DPOptimizer clips row by row: each answer clipped
alone, the pair's sensitivity 2C, not C.  Two passes cost the same arithmetic as one of
2B rows, and pad each answer set only to its own longest answer.

Padding never couples pairs: rows are right-padded, a padded position is never scored,
and every log-probability is a sum over one row's own answer tokens.

The reference policy is the frozen starting point of the run: the base model with the
adapter disabled (peft's ``disable_adapter``), which is also the adapter's own starting
state (LoRA's B starts at zero).  Its log-probabilities are computed on the site, from
the site's own pairs, inside the loss, under ``no_grad``: nothing of them is sent, and they
carry no gradient, so Opacus sees only the policy's two passes.  (A run that continues from
a trained adapter, DPO after an SFT version, would need that adapter as its reference; the
reference here is always the base model, so such a run is DPO against the base.)
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedtune.config import DataConfig, ModelConfig
from fedtune.data.demo_preferences import demo_preference_corpus
from fedtune.data.encoding import Batch, Example, collate
from fedtune.data.preferences import PreferenceRecord, parse_preference
from fedtune.data.records import DataError, Record, RecordSchema
from fedtune.errors import require
from fedtune.evaluate import EvalResult, eval_batches, perplexity_of
from fedtune.tasks import Task, TrainingDefaults
from fedtune.tasks.causal_lm import CausalLM, prompt_response_ids, token_losses

# DPO's β: how far from the reference the policy may move for a given margin (TRL's default).
BETA = 0.1


@dataclass(frozen=True)
class PreferenceExample:
    chosen: Example
    rejected: Example


@dataclass
class PreferenceBatch:
    """B pairs as two row sets: ``chosen`` row i and ``rejected`` row i are pair i."""

    chosen: Batch
    rejected: Batch

    def __len__(self) -> int:
        return len(self.chosen)

    def to(self, device: torch.device) -> "PreferenceBatch":
        return PreferenceBatch(self.chosen.to(device), self.rejected.to(device))


def answer_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """[B]: each row's log-probability of its own answer tokens (a sum, as DPO's log π(y|x))."""
    nll, _ = token_losses(model, batch)
    return -nll.sum(dim=1)


def _pad_to(batch: Batch, length: int) -> Batch:
    """``batch`` right-padded to ``length`` positions; the new positions are masked out and never scored."""
    extra = length - batch.input_ids.shape[1]
    if extra == 0:
        return batch
    return Batch(*(F.pad(t, (0, extra)) for t in (batch.input_ids, batch.attention_mask, batch.target_mask)))


@contextlib.contextmanager
def reference_policy(model: torch.nn.Module) -> Iterator[None]:
    """The frozen reference: the adapter disabled, eval mode (no dropout), no gradient."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():  # type: ignore[operator]
            yield
    finally:
        model.train(was_training)


def reference_logps(model: torch.nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) log-probabilities under the reference, in one forward pass of 2B rows.

    No gradient flows here, so the two answer sets may share a pass (per-sample gradients
    are not involved); right padding to the longer set changes no row's value.
    """
    length = max(batch.chosen.input_ids.shape[1], batch.rejected.input_ids.shape[1])
    chosen, rejected = _pad_to(batch.chosen, length), _pad_to(batch.rejected, length)
    both = Batch(*(torch.cat([getattr(chosen, f.name), getattr(rejected, f.name)])
                   for f in dataclasses.fields(Batch)))
    with reference_policy(model):
        logps = answer_logps(model, both)
    return logps[:len(batch)], logps[len(batch):]


def dpo_margins(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """The implicit reward margin β·[(π_c − ref_c) − (π_r − ref_r)] of each pair (log-probabilities)."""
    return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))


def dpo_loss(margins: torch.Tensor) -> torch.Tensor:
    """DPO's per-pair loss −log σ(margin)."""
    return -F.logsigmoid(margins)


def pair_margins(model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """[B] margins: the reference pass, then one policy pass per answer set."""
    ref_chosen, ref_rejected = reference_logps(model, batch)
    return dpo_margins(answer_logps(model, batch.chosen), answer_logps(model, batch.rejected),
                       ref_chosen, ref_rejected)


def _pair_ids(record: Record, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen answer, rejected answer) token ids, special tokens placed as for SFT."""
    if not isinstance(record, PreferenceRecord):
        raise TypeError("a DPO record is a PreferenceRecord (data.format=preference)")
    prompt_ids, chosen_ids = prompt_response_ids(record, tokenizer)
    _, rejected_ids = prompt_response_ids(dataclasses.replace(record, response=record.rejected), tokenizer)
    return prompt_ids, chosen_ids, rejected_ids


class DPO(Task[PreferenceExample, PreferenceBatch]):
    """Preference pairs; held-out preference accuracy, mean margin, and the SFT loss on chosen answers."""

    name = "dpo"
    record_formats = ("preference",)
    peft_task_type = "CAUSAL_LM"
    # Adam at the causal LM's step size: the same adapter, a loss of comparable gradient scale.
    training_defaults = TrainingDefaults(optimizer="adam", learning_rate=0.01)
    lm = CausalLM()

    def check_config(self, model: ModelConfig, data: DataConfig) -> None:
        require(data.format in self.record_formats, "data.format", f"'{data.format}' records are not preference pairs",
                'Set data.format=preference for model.task=dpo (records like {"prompt": "...", "chosen": "...", '
                '"rejected": "..."}, or {"chosen": "...", "rejected": "..."}).')

    def parse_record(self, obj: dict[str, Any], schema: RecordSchema, where: str) -> Record:
        return parse_preference(obj, schema, where)

    def demo_records(self, data: DataConfig) -> list[Record]:
        return list(demo_preference_corpus(data.demo_records, seed=data.seed))

    def pretrained_model(self, path: Path, model: ModelConfig, tokenizer: PreTrainedTokenizerBase
                         ) -> PreTrainedModel:
        return self.lm.pretrained_model(path, model, tokenizer)

    def tiny_model(self, config: LlamaConfig, model: ModelConfig) -> PreTrainedModel:
        return self.lm.tiny_model(config, model)

    def encode(self, record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PreferenceExample:
        """Both answers after the same prompt, cut to ``max_length``.

        A prompt that fills the window keeps its last ``max_length // 2`` tokens rather than
        fail: :meth:`check_encodable` refuses such a pair before any work, and inside a
        round an error caused by one record's content would itself tell the server about
        that record (it reaches it as a failure code), outside ε.
        """
        prompt_ids, chosen_ids, rejected_ids = _pair_ids(record, tokenizer)
        if len(prompt_ids) >= max_length:
            prompt_ids = prompt_ids[len(prompt_ids) - max_length // 2:]
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        prompt_mask = [0] * len(prompt_ids)
        return PreferenceExample(Example(tuple(prompt_ids + chosen_ids), tuple(prompt_mask + [1] * len(chosen_ids))),
                                 Example(tuple(prompt_ids + rejected_ids),
                                         tuple(prompt_mask + [1] * len(rejected_ids))))

    def check_encodable(self, records: Sequence[Record], tokenizer: Callable[[], PreTrainedTokenizerBase],
                        max_length: int) -> None:
        """Every pair's prompt leaves room for its answers, which differ within the window; DataError names the line."""
        loaded = tokenizer()
        for record in records:
            prompt_ids, chosen_ids, rejected_ids = _pair_ids(record, loaded)
            where = getattr(record, "where", "") or "a preference pair"
            room = max_length - len(prompt_ids)
            if room < 1:
                raise DataError(f"{where}: the prompt is {len(prompt_ids)} tokens, so no answer token fits in "
                                f"data.max_length={max_length}. Raise data.max_length or shorten the prompt.")
            if chosen_ids[:room] == rejected_ids[:room]:
                raise DataError(f"{where}: the two answers differ only after data.max_length={max_length} tokens, "
                                "so the pair expresses no preference there. Raise data.max_length.")

    def collate(self, examples: Sequence[PreferenceExample], pad_id: int) -> PreferenceBatch:
        return PreferenceBatch(collate([e.chosen for e in examples], pad_id),
                               collate([e.rejected for e in examples], pad_id))

    def per_record_loss(self, model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        """Each pair's DPO loss (the reference pass carries no gradient)."""
        return dpo_loss(pair_margins(model, batch))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: Sequence[PreferenceExample], pad_id: int,
                 batch_size: int) -> EvalResult:
        """Mean DPO loss; preference accuracy (margin > 0: a tie, such as an untrained adapter's, is not a win).

        Also the mean margin, and the SFT loss on the chosen answers (token-weighted NLL,
        its exp the perplexity), which shows whether the policy still writes the chosen text.
        """
        margins, nll_sum, tokens = [], 0.0, 0.0
        for batch in eval_batches(model, examples, self.collate, pad_id, batch_size):
            ref_chosen, ref_rejected = reference_logps(model, batch)
            nll, scored = token_losses(model, batch.chosen)
            nll_sum, tokens = nll_sum + float(nll.sum()), tokens + float(scored.sum())
            margins.append(dpo_margins(-nll.sum(dim=1), answer_logps(model, batch.rejected), ref_chosen,
                                       ref_rejected))
        margin = torch.cat(margins) if margins else torch.zeros(0)
        chosen_loss = nll_sum / max(tokens, 1.0)
        return EvalResult(loss=float(dpo_loss(margin).mean()) if len(margin) else float("nan"),
                          perplexity=perplexity_of(chosen_loss), tokens=int(tokens),
                          accuracy=float((margin > 0).float().mean()) if len(margin) else None,
                          task_metrics={"margin": float(margin.mean()) if len(margin) else float("nan"),
                                        "chosen_loss": chosen_loss})
