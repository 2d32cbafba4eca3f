"""Gradient checkpointing under DP-SGD: the same per-record gradients, in less memory."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fedtune.config import FedtuneConfig, LoraSettings
from fedtune.data.records import Record
from fedtune.errors import ConfigError
from fedtune.models import attach_lora, build_lora_model, enable_gradient_checkpointing, lora_parameter_names
from fedtune.privacy.dpsgd import DPSGDParams, DPSGDTrainer, train_locally
from fedtune.tasks import get_task
from tests.test_encoders import bert_tokenizer
from tests.test_pooling import build, sentence_folder

LM = get_task("causal_lm")
CLASSIFY = get_task("classification")
TEXTS = ["a", "short note", "a somewhat longer clinical note about chest pain", "mid length text here"]
EXACT = DPSGDParams(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=0.5, steps=1, learning_rate=0.1,
                    optimizer="sgd")


def _lm(tiny_cfg: FedtuneConfig, checkpointing: bool):
    torch.manual_seed(0)
    cfg = copy.deepcopy(tiny_cfg.model)
    cfg.gradient_checkpointing = checkpointing
    model, tok = build_lora_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # non-zero B, so lora_A's gradients are non-zero too
    return model, tok


def _per_record(task, model, batches) -> list[dict[str, torch.Tensor]]:
    with DPSGDTrainer(task, model, EXACT, num_records=4) as trainer:
        return [trainer.per_record_gradients(b) for b in batches]


def _stale_activations(model: torch.nn.Module) -> int:
    return sum(len(m.activations) for m in model.modules() if getattr(m, "activations", None))


def _assert_same(expected, got) -> None:
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for name in e:
            torch.testing.assert_close(g[name], e[name], atol=1e-6, rtol=1e-5)


def test_checkpointed_per_record_gradients_equal_the_plain_ones(tiny_cfg: FedtuneConfig) -> None:
    plain, tok = _lm(tiny_cfg, checkpointing=False)
    checkpointed, _ = _lm(tiny_cfg, checkpointing=True)
    assert checkpointed.get_base_model().is_gradient_checkpointing
    examples = LM.encode_all([Record("", t) for t in TEXTS], tok, max_length=64)
    # Batches of different sizes in a row: a stale input left by one batch would size the next.
    batches = [LM.collate(b, tok.pad_token_id) for b in (examples, examples[:2], examples[1:])]
    _assert_same(_per_record(LM, plain, batches), _per_record(LM, checkpointed, batches))
    assert _stale_activations(checkpointed) == 0


def test_checkpointing_changes_no_dp_sgd_update(tiny_cfg: FedtuneConfig) -> None:
    """Same sampling seed and noise seed: bit-for-bit the same adapter after private steps."""
    tok = _lm(tiny_cfg, False)[1]
    examples = LM.encode_all([Record("", t) for t in TEXTS * 4], tok, max_length=64)
    params = DPSGDParams(noise_multiplier=1.0, max_grad_norm=0.5, sample_rate=0.5, steps=3, learning_rate=0.1,
                         optimizer="sgd")
    adapters = []
    for checkpointing in (False, True):
        model, _ = _lm(tiny_cfg, checkpointing)
        train_locally(LM, model, examples, params, tok.pad_token_id, seed=3, noise_seed=11)
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    _assert_same([adapters[0]], [adapters[1]])


def test_transformers_default_checkpointing_would_break_opacus(tiny_cfg: FedtuneConfig) -> None:
    """Why the reentrant mode: the default one leaves Opacus a stale input per layer."""
    model, tok = _lm(tiny_cfg, checkpointing=False)
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    examples = LM.encode_all([Record("", t) for t in TEXTS], tok, max_length=64)
    batch = LM.collate(examples, tok.pad_token_id)
    with DPSGDTrainer(LM, model, EXACT, num_records=4) as trainer:
        trainer.optimizer.zero_grad(set_to_none=True)
        LM.per_record_loss(model, batch).mean().backward()
        samples = [p.grad_sample for p in trainer.trainable]
        broken = _stale_activations(model) > 0 or any(s is None for s in samples)
    assert broken


def test_a_pooled_encoder_is_checkpointed_inside_its_wrapper(tmp_path: Path) -> None:
    folder = sentence_folder(tmp_path / "enc")
    tok = bert_tokenizer(folder)
    examples = [CLASSIFY.encode(Record("", t, label=i % 3), tok, max_length=16)
                for i, t in enumerate(["great film", "a very long and boring story fine plot", "dull"])]
    batch = [CLASSIFY.collate(examples, tok.pad_token_id)]
    grads = []
    for checkpointing in (False, True):
        model = attach_lora(build(folder), LoraSettings(rank=2, alpha=4.0), seed=0,
                            task_type=CLASSIFY.peft_task_type)
        torch.manual_seed(1)
        with torch.no_grad():
            for name in lora_parameter_names(model):
                if "lora_B" in name or "classifier" in name:
                    model.get_parameter(name).normal_(0, 0.1)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.get_base_model().body.is_gradient_checkpointing
        grads.append(_per_record(CLASSIFY, model, batch))
    _assert_same(grads[0], grads[1])


def test_a_model_without_checkpointing_support_is_refused_by_name(tiny_cfg: FedtuneConfig,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _lm(tiny_cfg, checkpointing=False)
    monkeypatch.setattr(type(model.get_base_model()), "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        enable_gradient_checkpointing(model)
