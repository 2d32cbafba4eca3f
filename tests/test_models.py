from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune import adapters
from fedtune.config import FedtuneConfig, LoraSettings, ModelConfig, validate_model
from fedtune.data.records import Record
from fedtune.errors import ConfigError
from fedtune.models import (
    base_fingerprint,
    build_fingerprinted_model,
    build_lora_model,
    load_base_model,
    lora_parameter_names,
    target_modules_for,
)
from fedtune.privacy.dpsgd import DPSGDParams, DPSGDTrainer, train_locally
from fedtune.tasks import get_task


def test_tiny_model_is_identical_for_every_party(tiny_cfg: FedtuneConfig) -> None:
    a, _ = load_base_model(tiny_cfg.model)
    torch.manual_seed(999)  # the global RNG state must not matter
    b, _ = load_base_model(tiny_cfg.model)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert not any(p.requires_grad for p in a.parameters())


def test_lora_is_attached_to_the_family_default(tiny_cfg: FedtuneConfig) -> None:
    model, tok = build_lora_model(tiny_cfg.model)
    names = lora_parameter_names(model)
    assert names and all(p.requires_grad for n, p in model.named_parameters() if n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in names)
    assert any("o_proj.lora_A" in n for n in names)
    assert tok.decode(tok("abc")["input_ids"], skip_special_tokens=True) == "abc"


def test_local_model_directory_round_trip(tiny_cfg: FedtuneConfig, tmp_path: Path) -> None:
    """A saved Hugging Face directory loads through model.path like any local model."""
    base, tok = load_base_model(tiny_cfg.model)
    base.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = FedtuneConfig()
    cfg.model.path = str(tmp_path / "m")
    loaded, _ = load_base_model(cfg.model)
    torch.testing.assert_close(loaded.lm_head.weight, base.lm_head.weight)


def test_unknown_family_needs_explicit_targets(tiny_cfg: FedtuneConfig) -> None:
    model, _ = load_base_model(tiny_cfg.model)
    model.config.model_type = "made-up"
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        target_modules_for(model, LoraSettings())
    assert target_modules_for(model, LoraSettings(target_modules=["q_proj"])) == ["q_proj"]


LM = get_task("causal_lm")
TEXTS = ["a", "short note", "a somewhat longer clinical note about chest pain", "mid length text here"]


def _dp(steps: int = 1) -> DPSGDParams:
    return DPSGDParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=steps, learning_rate=0.05,
                       optimizer="sgd")


def test_bfloat16_base_trains_a_float32_adapter_with_dp_sgd(tiny_cfg: FedtuneConfig) -> None:
    """Noise added to bfloat16 gradients would round away: only the frozen base is low precision."""
    tiny_cfg.model.dtype = "bfloat16"
    built = build_fingerprinted_model(tiny_cfg.model)
    model, tok = built.model, built.tokenizer
    trained = lora_parameter_names(model)
    frozen = [p for n, p in model.named_parameters() if n not in trained]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trained)
    assert built.fingerprint == base_fingerprint(*load_base_model(tiny_cfg.model))
    tiny_cfg.model.dtype = "float32"
    assert built.fingerprint != base_fingerprint(*load_base_model(tiny_cfg.model))

    examples = LM.encode_all([Record("", t) for t in TEXTS], tok, max_length=64)
    batch = LM.collate(examples, tok.pad_token_id)
    with DPSGDTrainer(LM, model, _dp(), num_records=len(examples), noise_seed=0) as trainer:
        per_record = trainer.per_record_gradients(batch)
        noised, _ = trainer.privatized_gradient(batch)
    assert all(g.dtype == torch.float32 and g.shape[0] == len(examples) for g in per_record.values())
    assert all(g.dtype == torch.float32 for g in noised.values())

    before = adapters.lora_state(model, trained)
    train_locally(LM, model, examples, _dp(steps=2), tok.pad_token_id, seed=0, noise_seed=1)
    delta = adapters.subtract(adapters.lora_state(model, trained), before)
    assert math.isfinite(adapters.l2_norm(delta)) and adapters.l2_norm(delta) > 0
    wire = adapters.from_array_record(adapters.to_array_record(delta))
    assert all(wire[n].dtype == np.float32 and np.array_equal(wire[n], delta[n]) for n in delta)


def test_trained_head_stays_float32_over_a_bfloat16_base(tiny_cfg: FedtuneConfig) -> None:
    """peft's trained copy of a classifier head is a copy of the base's module: it is upcast, its input cast."""
    cls = get_task("classification")
    tiny_cfg.model.task, tiny_cfg.model.num_labels, tiny_cfg.model.dtype = "classification", 3, "bfloat16"
    model, tok = build_lora_model(tiny_cfg.model)
    head = [n for n in lora_parameter_names(model) if ".modules_to_save." in n]
    params = dict(model.named_parameters())
    assert head and all(params[n].dtype == torch.float32 for n in head)
    examples = cls.encode_all([Record("", t, label=i % 3) for i, t in enumerate(TEXTS)], tok, max_length=64)
    with DPSGDTrainer(cls, model, _dp(), num_records=len(examples), noise_seed=0) as trainer:
        grads = trainer.per_record_gradients(cls.collate(examples, tok.pad_token_id))
    assert all(grads[n].dtype == torch.float32 and grads[n].abs().sum() > 0 for n in head)


def test_model_dtype_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="model.dtype"):
        validate_model(ModelConfig(dtype="float64"))
    validate_model(ModelConfig(dtype="bfloat16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="model.dtype.*bfloat16"):
        validate_model(ModelConfig(dtype="float16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate_model(ModelConfig(dtype="float16"))
