from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.config import FedtuneConfig, LoraSettings
from fedtune.models import build_lora_model, load_base_model, lora_parameter_names, target_modules_for


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
