"""The task seam: the registry, and a new task plugged in as one class.

The toy task reads its own record format (pairs of a better and a worse text) and has a
pairwise loss, the shape a preference-pair task (DPO) needs: one record encodes into two
sequences, and its loss, one value per record, combines both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedtune import config, tasks
from fedtune.apps import make_client_app
from fedtune.config import DataConfig, FedtuneConfig, ModelConfig
from fedtune.data.encoding import Batch, Example, collate
from fedtune.data.records import DataError, Record, RecordSchema, record_group
from fedtune.errors import ConfigError, require
from fedtune.evaluate import EvalResult, eval_batches, perplexity_of
from fedtune.federation import protocol
from fedtune.federation.server import run_server
from fedtune.models import build_lora_model, lora_parameter_names, set_trainable
from fedtune.privacy.dpsgd import DPSGDParams, DPSGDTrainer
from fedtune.tasks.causal_lm import CausalLM, token_losses

from conftest import InProcessGrid, tiny_config


def test_config_lists_exactly_the_registered_tasks_and_formats() -> None:
    """config.py is a leaf and cannot import the registry, so this keeps the lists equal."""
    assert tuple(tasks.REGISTRY) == config.TASKS
    assert tasks.record_formats() == config.DATA_FORMATS
    assert tasks.task_for_format("labelled").name == "classification"
    with pytest.raises(ConfigError, match="model.task"):
        tasks.get_task("regression")
    with pytest.raises(ConfigError, match="data.format"):
        tasks.task_for_format("csv")


@dataclass(frozen=True)
class PairRecord(Record):
    """``response`` is the better text; ``worse`` the text it should be preferred to."""

    worse: str = ""


@dataclass(frozen=True)
class PairExample:
    better: Example
    worse: Example


@dataclass
class PairBatch:
    better: Batch
    worse: Batch

    def __len__(self) -> int:
        return len(self.better)

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(self.better.to(device), self.worse.to(device))


class PreferBetter(tasks.Task[PairExample, PairBatch]):
    """Toy preference task: a Bradley-Terry loss on the LM's log-likelihoods of the two texts."""

    name = "toy-pairs"
    record_formats = ("pairs",)
    peft_task_type = "CAUSAL_LM"
    lm = CausalLM()

    def check_config(self, model: ModelConfig, data: DataConfig) -> None:
        require(data.format in self.record_formats, "data.format", "not pairs", "Set data.format=pairs.")

    def parse_record(self, obj: dict[str, Any], schema: RecordSchema, where: str) -> Record:
        better, worse = obj.get("better"), obj.get("worse")
        if not isinstance(better, str) or not isinstance(worse, str):
            raise DataError(f'{where}: pairs need string "better" and "worse" fields')
        return PairRecord(prompt="", response=better, worse=worse, group=record_group(obj, schema))

    def demo_records(self, data: DataConfig) -> list[Record]:
        return [PairRecord("", "a" * (1 + i % 7), worse="xq" * (1 + i % 5)) for i in range(data.demo_records)]

    def pretrained_model(self, path: Path, model: ModelConfig, tokenizer: PreTrainedTokenizerBase
                         ) -> PreTrainedModel:
        return self.lm.pretrained_model(path, model, tokenizer)

    def tiny_model(self, config: LlamaConfig, model: ModelConfig) -> PreTrainedModel:
        return self.lm.tiny_model(config, model)

    def encode(self, record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PairExample:
        assert isinstance(record, PairRecord)
        return PairExample(self.lm.encode(Record("", record.response), tokenizer, max_length),
                           self.lm.encode(Record("", record.worse), tokenizer, max_length))

    def collate(self, examples: Sequence[PairExample], pad_id: int) -> PairBatch:
        return PairBatch(collate([e.better for e in examples], pad_id), collate([e.worse for e in examples], pad_id))

    def margins(self, model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
        """log p(better) - log p(worse) per record: two forward passes over the same records."""
        better, _ = token_losses(model, batch.better)
        worse, _ = token_losses(model, batch.worse)
        return worse.sum(dim=1) - better.sum(dim=1)

    def per_record_loss(self, model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
        return -torch.nn.functional.logsigmoid(self.margins(model, batch))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: Sequence[PairExample], pad_id: int,
                 batch_size: int) -> EvalResult:
        margins = torch.cat([self.margins(model, b) for b in eval_batches(model, examples, self.collate, pad_id,
                                                                          batch_size)])
        loss = float(-torch.nn.functional.logsigmoid(margins).mean())
        return EvalResult(loss=loss, perplexity=perplexity_of(loss), tokens=0,
                          accuracy=float((margins > 0).float().mean()))


def _pairs_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **changes: object) -> FedtuneConfig:
    monkeypatch.setitem(tasks.REGISTRY, PreferBetter.name, PreferBetter())
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"better": "ab" * (1 + i % 6), "worse": f"zq{i}"}) + "\n" for i in range(45)))
    return tiny_config(tmp_path / "run", model__task=PreferBetter.name, data__format="pairs",
                       data__path=str(data), data__partition="iid", **changes)


def test_a_pairwise_loss_is_per_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two forward passes per batch still give each record the gradient of its own loss alone."""
    cfg = _pairs_config(tmp_path, monkeypatch)
    task = tasks.get_task(cfg.model.task)
    torch.manual_seed(0)
    model, tokenizer = build_lora_model(cfg.model)
    with torch.no_grad():  # B non-zero, so that A has a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    set_trainable(model, lora_parameter_names(model))
    records = [PairRecord("", "ab", worse="zzzz"), PairRecord("", "abab ab", worse="q"),
               PairRecord("", "a", worse="zq zq zq")]
    examples = task.encode_all(records, tokenizer, cfg.data.max_length)
    model.train()
    expected = []
    for example in examples:
        model.zero_grad(set_to_none=True)
        task.per_record_loss(model, task.collate([example], tokenizer.pad_token_id)).sum().backward()
        expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    params = DPSGDParams(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=0.5, steps=1, learning_rate=0.1)
    with DPSGDTrainer(task, model, params, num_records=len(examples)) as trainer:
        got = trainer.per_record_gradients(task.collate(examples, tokenizer.pad_token_id))
    for i, grads in enumerate(expected):
        for name, grad in grads.items():
            torch.testing.assert_close(got[name][i], grad, atol=2e-6, rtol=1e-4)


def test_a_new_task_is_one_class_trained_at_the_sites_and_evaluated(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _pairs_config(tmp_path, monkeypatch, federation__num_rounds=1)
    grid = InProcessGrid(make_client_app(cfg), 3)
    summary = run_server(grid, cfg, Path(cfg.run_dir), show_progress=False)
    assert summary.rounds_completed == 1
    # Each site read its pairs, trained with the pairwise loss under DP-SGD and sent an update.
    replies = [m for m in grid.received if m.metadata.message_type == protocol.TRAIN]
    assert len(replies) == 3
    assert all(m.content[protocol.STATUS]["status"] == protocol.STATUS_OK for m in replies)
    # The server evaluated with the task's own metrics, under the usual names.
    row = json.loads((Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["eval_loss"]) and 0.0 <= row["eval_accuracy"] <= 1.0
