"""QLoRA (model.quantization=4bit): an NF4 base, float32 LoRA, exact per-record gradients, the same fingerprint."""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings

import pytest
import torch

from fedtune.config import FedtuneConfig, validate_model
from fedtune.data.records import Record
from fedtune.errors import ConfigError
from fedtune.models import base_fingerprint, build_fingerprinted_model, load_base_model
from fedtune.privacy.dpsgd import DPSGDParams, DPSGDTrainer, train_locally
from fedtune import quantization
from fedtune.quantization import MAX_NF4_ERROR, base_weight_bytes, check_backend, nf4_error, quantize_base
from fedtune.tasks import get_task

bnb = pytest.importorskip("bitsandbytes")

LM = get_task("causal_lm")
TEXTS = ["a", "short note", "a somewhat longer clinical note about chest pain", "mid length text here"]
EXACT = DPSGDParams(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=0.5, steps=1, learning_rate=0.1,
                    optimizer="sgd")


def _model_cfg(tiny_cfg: FedtuneConfig, quantization: str | None):
    cfg = copy.deepcopy(tiny_cfg.model)
    cfg.quantization = quantization
    return cfg


def _qlora(tiny_cfg: FedtuneConfig):
    built = build_fingerprinted_model(_model_cfg(tiny_cfg, "4bit"))
    with torch.no_grad():
        for name, p in built.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # non-zero B, so lora_A's gradients are non-zero too
    return built


def _linear4bit(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_the_fingerprint_is_the_full_precision_bases(tiny_cfg: FedtuneConfig) -> None:
    """A 4-bit site and a full-precision server agree they hold the same checkpoint."""
    plain = build_fingerprinted_model(_model_cfg(tiny_cfg, None))
    quantised = build_fingerprinted_model(_model_cfg(tiny_cfg, "4bit"))
    assert quantised.fingerprint == plain.fingerprint
    assert not _linear4bit(plain.model)
    assert _linear4bit(quantised.model), "no layer was quantised"


def test_every_frozen_projection_is_nf4_and_the_trained_tensors_float32(tiny_cfg: FedtuneConfig) -> None:
    base, _ = load_base_model(tiny_cfg.model)
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in base.modules()
                       if type(m) is torch.nn.Linear and m is not base.lm_head)
    before = base_weight_bytes(base)
    replaced = quantize_base(base)
    assert replaced == 7 * tiny_cfg.model.tiny.num_layers  # q, k, v, o, gate, up, down per layer
    assert type(base.lm_head) is torch.nn.Linear  # the output layer stays full precision
    for layer in _linear4bit(base):
        assert layer.weight.quant_type == "nf4" and layer.weight.dtype == torch.uint8
    # 4 bits a weight plus one float32 absmax per 64: under a seventh of float32's bytes.
    assert before - base_weight_bytes(base) > 0.8 * linear_bytes
    model = _qlora(tiny_cfg).model
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)


def test_a_quantised_layer_computes_with_its_dequantised_weights(tiny_cfg: FedtuneConfig) -> None:
    """The forward pass is exactly the NF4 weights' product, and within NF4's rounding of the float one."""
    base, _ = load_base_model(tiny_cfg.model)
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    quantize_base(base)
    layer = base.model.layers[0].self_attn.q_proj
    weights = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(3, original.shape[1])
    torch.testing.assert_close(layer(x), x @ weights.t(), atol=1e-5, rtol=1e-5)
    # NF4 levels are at most ~0.3 of the block's absmax apart: rounding moves a weight by ≤ half that.
    absmax = original.abs().reshape(-1, 64).amax(dim=1, keepdim=True)
    error = (weights - original).abs().reshape(-1, 64)
    assert torch.all(error <= 0.17 * absmax + 1e-6)
    assert error.mean() > 0  # it is quantised, not a copy


def test_per_record_gradients_over_a_4bit_base_equal_one_record_backward_passes(tiny_cfg: FedtuneConfig) -> None:
    built = _qlora(tiny_cfg)
    model, tok = built.model, built.tokenizer
    examples = LM.encode_all([Record("", t) for t in TEXTS], tok, max_length=64)
    with DPSGDTrainer(LM, model, EXACT, num_records=4) as trainer:
        per_record = trainer.per_record_gradients(LM.collate(examples, tok.pad_token_id))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for i, example in enumerate(examples):
        loss = LM.per_record_loss(model, LM.collate([example], tok.pad_token_id)).sum()
        grads = torch.autograd.grad(loss, [p for _, p in trained])
        for (name, _), grad in zip(trained, grads):
            torch.testing.assert_close(per_record[name][i], grad, atol=1e-5, rtol=1e-4)


def test_dp_sgd_trains_the_adapter_over_a_4bit_base(tiny_cfg: FedtuneConfig) -> None:
    built = _qlora(tiny_cfg)
    model, tok = built.model, built.tokenizer
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples = LM.encode_all([Record("", t) for t in TEXTS * 4], tok, max_length=64)
    params = DPSGDParams(noise_multiplier=1.0, max_grad_norm=0.5, sample_rate=0.5, steps=2, learning_rate=0.1,
                         optimizer="sgd")
    result = train_locally(LM, model, examples, params, tok.pad_token_id, seed=3)
    assert result.records > 0
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], start[n]) for n in start)
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)


def test_quantization_is_validated_by_name(tiny_cfg: FedtuneConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _model_cfg(tiny_cfg, "8bit")
    with pytest.raises(ConfigError, match="model.quantization") as err:
        validate_model(cfg)
    assert "4bit" in str(err.value)
    validate_model(_model_cfg(tiny_cfg, "4bit"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="bitsandbytes") as err:
        validate_model(_model_cfg(tiny_cfg, "4bit"))
    assert err.value.field == "model.quantization"


def test_merge_and_export_read_the_full_precision_base(tiny_cfg: FedtuneConfig) -> None:
    """load_base_model (merge, export, evaluate's baseline) never quantises: adapters land on the float weights."""
    base, tok = load_base_model(_model_cfg(tiny_cfg, "4bit"))
    assert not _linear4bit(base)
    assert base_fingerprint(base, tok) == build_fingerprinted_model(_model_cfg(tiny_cfg, "4bit")).fingerprint


def _register_wrong_cpu_kernel() -> None:
    """A CPU dequantise kernel that returns wrong weights, as bitsandbytes 0.50.2's AVX512 one does on some CPUs."""
    def wrong(A, absmax, blocksize, quant_type, shape, dtype):  # type: ignore[no-untyped-def]
        return torch.zeros(shape, dtype=dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", wrong)


def test_a_wrong_cpu_4bit_kernel_is_caught_and_replaced_by_the_generic_one(
        tiny_cfg: FedtuneConfig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fedtune.quantization")
    base, _ = load_base_model(tiny_cfg.model)
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _register_wrong_cpu_kernel()
    quantize_base(base)
    assert "gave wrong weights for q_proj" in caplog.text and "generic implementation" in caplog.text
    assert nf4_error(base.model.layers[0].self_attn.q_proj, original) <= MAX_NF4_ERROR
    check_backend()


def test_4bit_weights_that_stay_wrong_stop_the_run_naming_the_field(tiny_cfg: FedtuneConfig,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "_use_generic_cpu_dequantize", lambda: None)
    _register_wrong_cpu_kernel()
    try:
        with pytest.raises(ConfigError, match="model.quantization.*off by 1.00 of their block's absmax"):
            check_backend()
        base, _ = load_base_model(tiny_cfg.model)
        with pytest.raises(ConfigError, match="model.quantization"):
            quantize_base(base)
    finally:
        monkeypatch.undo()
        quantization._use_generic_cpu_dequantize()  # leave this process a correct kernel
    check_backend()
