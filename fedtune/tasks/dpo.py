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

The reference policy is the frozen starting point of the run.  A run that starts from a
fresh LoRA starts at the base model (LoRA's B is zero), so its reference is the base with
the adapter disabled (peft's ``disable_adapter``), computed inside the loss under
``no_grad``: Opacus' hooks record nothing without grad mode, so it sees only the policy's
two passes.  A run that starts from a trained adapter (``train.start_adapter``, or a version
whose parent is an SFT version) has that adapter, frozen, as its reference.

How such a reference reaches a site, and why so.  A site cannot compute it from what it
already holds: from round 2 on it holds only the current global adapter, and a site that
missed round 1 never saw the start (keeping one would be state the server could still
contradict).  So the server sends the reference adapter beside the global one in every
round, as tensors that the site validates exactly as it validates the global adapter
(exact key set and shapes, float32, finite, bounded by its policy's ``max_adapter_value``),
never as a path or code.  A crafted reference cannot weaken the guarantee: it is a
constant of each pair's loss, and DP-SGD clips each pair's gradient whatever the loss
(a non-finite one is zeroed); it can only spoil utility, as a crafted global adapter can.

The site then computes each of its pairs' reference log-probabilities once per round,
with the reference adapter loaded, in eval mode under ``no_grad``, *before* it loads the
global adapter and before Opacus' hooks are attached (:meth:`DPO.with_reference`); they
ride in the pairs' examples (:attr:`PreferenceExample.reference`) and never leave the site.
So the DP step holds only the policy's two passes: the reference pass can record no
per-sample gradient and cannot disturb the hooks, and the model holds one adapter (a
second peft adapter's tensors would join the LoRA key set that is sent and checked).  The
values depend on the pair alone, so padding them into another batch changes nothing.  It
costs one forward pass over each of the site's pairs per round, as many as the in-step
passes at the defaults (q · steps ≈ 1 pass).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedtune.config import DEFAULT_DPO_BETA, DataConfig, ModelConfig
from fedtune.data.demo_preferences import demo_preference_corpus
from fedtune.data.encoding import Batch, Example, collate
from fedtune.data.preferences import PreferenceRecord, parse_preference
from fedtune.data.records import DataError, Record, RecordSchema
from fedtune.errors import require
from fedtune.evaluate import EvalResult, eval_batches, perplexity_of
from fedtune.tasks import LossSettings, Task, TrainingDefaults
from fedtune.tasks.causal_lm import CausalLM, prompt_response_ids, scored_positions, token_losses

# DPO's β when the round config does not set it (train.dpo_beta's default; TRL's).
BETA = DEFAULT_DPO_BETA


@dataclass(frozen=True)
class PreferenceExample:
    chosen: Example
    rejected: Example
    # (log π_ref(y_c|x), log π_ref(y_r|x)) under a reference adapter (DPO.with_reference);
    # None: the reference is the base model, computed in the loss.
    reference: Optional[tuple[float, float]] = None


@dataclass
class PreferenceBatch:
    """B pairs as two row sets: ``chosen`` row i and ``rejected`` row i are pair i."""

    chosen: Batch
    rejected: Batch
    # [B] reference log-probabilities of the chosen and the rejected answers, or None (base reference).
    reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.chosen)

    def to(self, device: torch.device) -> "PreferenceBatch":
        reference = None if self.reference is None else (self.reference[0].to(device), self.reference[1].to(device))
        return PreferenceBatch(self.chosen.to(device), self.rejected.to(device), reference)


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
def frozen(model: torch.nn.Module, adapter: bool) -> Iterator[None]:
    """A frozen policy: eval mode (no dropout), no gradient, and the adapter on or (the base) off."""
    was_training = model.training
    model.eval()
    switch = contextlib.nullcontext() if adapter else model.disable_adapter()  # type: ignore[operator]
    try:
        with torch.no_grad(), switch:
            yield
    finally:
        model.train(was_training)


def frozen_logps(model: torch.nn.Module, batch: PreferenceBatch, adapter: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) log-probabilities of a frozen policy, in one forward pass of 2B rows.

    No gradient flows here, so the two answer sets may share a pass (per-sample gradients
    are not involved); right padding to the longer set changes no row's value.
    """
    length = max(batch.chosen.input_ids.shape[1], batch.rejected.input_ids.shape[1])
    chosen, rejected = _pad_to(batch.chosen, length), _pad_to(batch.rejected, length)
    both = Batch(*(torch.cat([getattr(chosen, f.name), getattr(rejected, f.name)])
                   for f in dataclasses.fields(Batch)))
    with frozen(model, adapter):
        logps = answer_logps(model, both)
    return logps[:len(batch)], logps[len(batch):]


def reference_logps(model: torch.nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) under the reference: the batch's own values, else the base model's."""
    if batch.reference is not None:
        return batch.reference
    return frozen_logps(model, batch, adapter=False)


def dpo_margins(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """The implicit reward margin β·[(π_c − ref_c) − (π_r − ref_r)] of each pair (log-probabilities)."""
    return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))


def dpo_loss(margins: torch.Tensor) -> torch.Tensor:
    """DPO's per-pair loss −log σ(margin)."""
    return -F.logsigmoid(margins)


def pair_margins(model: torch.nn.Module, batch: PreferenceBatch, beta: float = BETA) -> torch.Tensor:
    """[B] margins: the reference values (or the base pass), then one policy pass per answer set."""
    ref_chosen, ref_rejected = reference_logps(model, batch)
    return dpo_margins(answer_logps(model, batch.chosen), answer_logps(model, batch.rejected),
                       ref_chosen, ref_rejected, beta)


def _stacked_reference(examples: Sequence[PreferenceExample]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The examples' reference values as two [B] tensors; None if they have none (all or none must)."""
    given = [e.reference for e in examples if e.reference is not None]
    if not given:
        return None
    if len(given) != len(examples):
        raise ValueError("a DPO batch mixes pairs with and without reference values")
    values = torch.tensor(given, dtype=torch.float32)
    return values[:, 0], values[:, 1]


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
    uses_reference = True

    def __init__(self, beta: float = BETA) -> None:
        self.beta = beta

    def with_loss(self, settings: LossSettings) -> "DPO":
        """DPO with the round's β (already validated: the round config's parser, or train.dpo_beta's)."""
        return self if settings.dpo_beta == self.beta else DPO(settings.dpo_beta)

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
                               collate([e.rejected for e in examples], pad_id), _stacked_reference(examples))

    def with_reference(self, model: torch.nn.Module, examples: Sequence[PreferenceExample], pad_id: int,
                       batch_size: int) -> list[PreferenceExample]:
        """Each pair with its log-probabilities under ``model``'s current adapter, frozen (the reference)."""
        device = next(model.parameters()).device
        out: list[PreferenceExample] = []
        for start in range(0, len(examples), batch_size):
            chunk = [dataclasses.replace(e, reference=None) for e in examples[start:start + batch_size]]
            batch = self.collate(chunk, pad_id).to(device)
            # One pass per answer set, as evaluate's policy passes: batched alike, an unmoved policy ties exactly.
            with frozen(model, adapter=True):
                chosen, rejected = answer_logps(model, batch.chosen), answer_logps(model, batch.rejected)
            out += [dataclasses.replace(e, reference=(float(c), float(r)))
                    for e, c, r in zip(chunk, chosen.tolist(), rejected.tolist())]
        return out

    def per_record_loss(self, model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        """Each pair's DPO loss (the reference values carry no gradient)."""
        return dpo_loss(pair_margins(model, batch, self.beta))

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
            # The policy's values in the reference's own pass shape: floating-point sums depend on
            # the batch's shape, and a tie (the untrained adapter's) must come out exactly 0.
            chosen, rejected = frozen_logps(model, batch, adapter=True)
            # The chosen answers' summed NLL is minus their log-probability: no third pass.
            nll_sum, tokens = nll_sum - float(chosen.sum()), tokens + float(scored_positions(batch.chosen).sum())
            margins.append(dpo_margins(chosen, rejected, ref_chosen, ref_rejected, self.beta))
        margin = torch.cat(margins) if margins else torch.zeros(0)
        chosen_loss = nll_sum / max(tokens, 1.0)
        return EvalResult(loss=float(dpo_loss(margin).mean()) if len(margin) else float("nan"),
                          perplexity=perplexity_of(chosen_loss), tokens=int(tokens),
                          accuracy=float((margin > 0).float().mean()) if len(margin) else None,
                          task_metrics={"margin": float(margin.mean()) if len(margin) else float("nan"),
                                        "chosen_loss": chosen_loss})
