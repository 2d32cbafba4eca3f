from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.config import ConfigError, FedtuneConfig, validate, validate_against_data
from fedtune.simulation import check_data


def _fails(cfg: FedtuneConfig, field: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.field == field
    return str(info.value)


def test_defaults_are_valid() -> None:
    validate(FedtuneConfig())


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan")])
def test_epsilon_must_be_positive(eps: float) -> None:
    cfg = FedtuneConfig()
    cfg.privacy.target_epsilon = eps
    assert "positive" in _fails(cfg, "privacy.target_epsilon")


def test_clipping_must_be_positive() -> None:
    cfg = FedtuneConfig()
    cfg.privacy.max_grad_norm = 0.0
    assert "clipping" in _fails(cfg, "privacy.max_grad_norm")


@pytest.mark.parametrize("q", [0.0, 1.5, -0.1])
def test_sampling_rate_in_unit_interval(q: float) -> None:
    cfg = FedtuneConfig()
    cfg.privacy.sample_rate = q
    assert "(0, 1]" in _fails(cfg, "privacy.sample_rate")


def test_delta_must_be_below_one_over_records(tiny_cfg: FedtuneConfig) -> None:
    tiny_cfg.privacy.delta = 0.05
    with pytest.raises(ConfigError) as info:
        check_data(tiny_cfg)
    assert info.value.field == "privacy.delta"
    assert "1/records" in str(info.value)


def test_more_sites_than_records(tiny_cfg: FedtuneConfig) -> None:
    with pytest.raises(ConfigError) as info:
        validate_against_data(tiny_cfg, site_sizes=[1, 1], total_records=2)
    assert info.value.field == "federation.num_sites"
    assert "at most 2 sites" in str(info.value)


def test_unknown_model_path(tmp_path: Path) -> None:
    cfg = FedtuneConfig()
    cfg.model.path = str(tmp_path / "nope")
    assert "config.json" in _fails(cfg, "model.path")


def test_missing_empty_and_malformed_data(tmp_path: Path, tiny_cfg: FedtuneConfig) -> None:
    tiny_cfg.data.path = str(tmp_path / "missing.jsonl")
    assert "not a file" in _fails(tiny_cfg, "data.path")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    tiny_cfg.data.path = str(empty)
    assert "empty" in _fails(tiny_cfg, "data.path")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    tiny_cfg.data.path = str(bad)
    tiny_cfg.data.partition = "iid"
    validate(tiny_cfg)
    from fedtune.data import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        check_data(tiny_cfg)


def test_dora_and_embedding_targets_rejected() -> None:
    cfg = FedtuneConfig()
    cfg.model.lora.use_dora = True
    assert "use_dora=false" in _fails(cfg, "model.lora.use_dora")
    cfg = FedtuneConfig()
    cfg.model.lora.target_modules = ["q_proj", "embed_tokens"]
    assert "embeddings" in _fails(cfg, "model.lora.target_modules")


@pytest.mark.parametrize(
    "section,name,value",
    [("federation", "strategy", "median"), ("privacy", "accountant", "gdp"), ("data", "partition", "shards"),
     ("train", "local_steps", 0), ("federation", "num_sites", 0), ("data", "eval_fraction", 1.0),
     ("data", "dirichlet_alpha", 0.0)],
)
def test_other_fields(section: str, name: str, value: object) -> None:
    cfg = FedtuneConfig()
    setattr(getattr(cfg, section), name, value)
    _fails(cfg, f"{section}.{name}")


def test_private_run_needs_noise() -> None:
    cfg = FedtuneConfig()
    cfg.privacy.noise_multiplier = 0.0
    assert "privacy.enabled=false" in _fails(cfg, "privacy.noise_multiplier")


def test_secagg_fields() -> None:
    cfg = FedtuneConfig()
    cfg.secagg.threshold = 9  # 5 sites: at most 4 neighbours
    assert "between 2 and neighbours=4" in _fails(cfg, "secagg.threshold")
    cfg = FedtuneConfig()
    cfg.secagg.bits = 16
    cfg.secagg.clip_range = 10.0
    cfg.secagg.max_weight = 1000
    assert "could wrap a 16-bit ring" in _fails(cfg, "secagg.bits")
    cfg = FedtuneConfig()
    cfg.federation.num_sites = 2
    assert "at least 3 sites" in _fails(cfg, "secagg.enabled")
    cfg.secagg.enabled = False
    validate(cfg)
