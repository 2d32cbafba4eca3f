from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import fedtune.config
from fedtune.config import FedtuneConfig, load_structured
from fedtune.errors import ConfigError
from fedtune.simulation import check_data
from fedtune.validation import validate, validate_against_data


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


def test_config_is_a_leaf() -> None:
    """config.py imports nothing of fedtune but its errors, at module or function level."""
    tree = ast.parse(Path(fedtune.config.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name and name.startswith("fedtune")} == {"fedtune.errors"}


def test_load_structured_names_the_full_key(tmp_path: Path) -> None:
    source = tmp_path / "server.yaml"
    source.write_text("federation:\n  num_rounds: 3\n")
    cfg = load_structured(FedtuneConfig, source, {"train": {"learning_rate": 0.5}}, overrides=["federation.seed=4"])
    assert (cfg.federation.num_rounds, cfg.train.learning_rate, cfg.federation.seed) == (3, 0.5, 4)
    base = load_structured(cfg, overrides=["privacy.delta=1e-6"])  # an instance is the base, not the defaults
    assert base.federation.num_rounds == 3 and base.privacy.delta == 1e-6 and cfg.privacy.delta == 1e-5
    for overrides, key in [(["federation.num_rondz=1"], "federation.num_rondz"),
                           (["federation.num_rounds=many"], "federation.num_rounds"),
                           (["federation.sites_per_round"], "federation.sites_per_round")]:
        with pytest.raises(ConfigError) as err:
            load_structured(FedtuneConfig, overrides=overrides, fix="Check the key.")
        assert err.value.field == key
    assert str(err.value).endswith("is not an override of the form key=value. Write e.g. federation.num_rounds=5 "
                                   "(dotted keys reach nested fields).")
    source.write_text("secagg:\n  bits: lots\n")
    with pytest.raises(ConfigError) as err:
        load_structured(FedtuneConfig, source)
    assert err.value.field == "secagg.bits"
