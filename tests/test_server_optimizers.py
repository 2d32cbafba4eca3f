"""Server optimisers: each rule against steps worked out by hand, FFA's frozen A, config checks,
and moments that survive a server restart."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.server import strategy as flower

from fedtune import config, governance
from fedtune.apps import make_client_app
from fedtune.checkpoint import load_checkpoint, peft_key_map
from fedtune.config import FederationConfig, FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.experiments.engine import run_inprocess
from fedtune.federation.server import run_server
from fedtune.federation.versions import GlobalAdapter
from fedtune.models import build_fingerprinted_model
from fedtune.server_optimizers import (
    REGISTRY,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    make_server_optimizer,
)
from fedtune.strategies import FedAvgLoRA, FFALoRA
from fedtune.validation import validate

from conftest import InProcessGrid, tiny_config

# Two rounds' mean deltas of one two-coordinate tensor.  The second coordinate's second delta is
# small, so Yogi's v (which shrinks additively) and Adam's (which decays) part ways.
DELTA_1 = [0.2, -0.4]
DELTA_2 = [-0.1, 0.01]


def _two_steps(optimizer: ServerOptimizer) -> tuple[np.ndarray, np.ndarray]:
    first = optimizer.update({"w": np.array(DELTA_1, np.float32)})["w"]
    second = optimizer.update({"w": np.array(DELTA_2, np.float32)})["w"]
    return first, second


def _close(actual: np.ndarray, expected: list[float]) -> None:
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-9)


def test_fedavg_scales_the_mean_delta_and_keeps_no_state() -> None:
    first, second = _two_steps(FedAvg(server_learning_rate=0.5))
    _close(first, [0.1, -0.2])
    _close(second, [-0.05, 0.005])
    assert FedAvg().learning_rate == 1.0 and FedAvg().state_dict() == {}


def test_fedavgm_adds_momentum() -> None:
    opt = FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    first, second = _two_steps(opt)
    _close(first, [0.2, -0.4])  # m1 = Δ1
    _close(second, [0.9 * 0.2 - 0.1, 0.9 * -0.4 + 0.01])  # m2 = 0.9 m1 + Δ2 = [0.08, -0.35]
    _close(opt.state_dict()["m/w"], [0.08, -0.35])


def test_fedadam_with_bias_correction() -> None:
    opt = FedAdam(server_learning_rate=0.1, server_beta_1=0.9, server_beta_2=0.99, server_tau=1e-3)
    first, second = _two_steps(opt)
    # t=1: m = 0.1 Δ1 = [0.02, -0.04]; v = 0.01 Δ1² = [0.0004, 0.0016], √v = [0.02, 0.04];
    # correction √(1 − 0.99) / (1 − 0.9) = 1.
    _close(first, [0.1 * 0.02 / 0.021, 0.1 * -0.04 / 0.041])
    # t=2: m = 0.9 m + 0.1 Δ2 = [0.008, -0.035]; v = 0.99 v + 0.01 Δ2² = [0.000496, 0.001585];
    # correction √(1 − 0.9801) / (1 − 0.81).
    correction = math.sqrt(0.0199) / 0.19
    _close(second, [0.1 * correction * 0.008 / (math.sqrt(0.000496) + 1e-3),
                    0.1 * correction * -0.035 / (math.sqrt(0.001585) + 1e-3)])
    _close(opt.state_dict()["m/w"], [0.008, -0.035])
    _close(opt.state_dict()["v/w"], [0.000496, 0.001585])
    assert opt.steps == 2


def test_fedyogi_shrinks_v_additively() -> None:
    opt = FedYogi(server_learning_rate=0.01, server_beta_1=0.9, server_beta_2=0.99, server_tau=1e-3)
    first, second = _two_steps(opt)
    # t=1: v = 0 − 0.01 Δ1² sign(0 − Δ1²) = [0.0004, 0.0016], as Adam's.
    _close(first, [0.01 * 0.02 / 0.021, 0.01 * -0.04 / 0.041])
    # t=2: Δ2² = [0.01, 0.0001]; v − Δ2² is [−, +]: v = [0.0004 + 0.0001, 0.0016 − 0.000001].
    _close(opt.state_dict()["v/w"], [0.0005, 0.001599])
    _close(second, [0.01 * 0.008 / (math.sqrt(0.0005) + 1e-3), 0.01 * -0.035 / (math.sqrt(0.001599) + 1e-3)])


def test_fedadagrad_accumulates_squares() -> None:
    opt = FedAdagrad(server_learning_rate=0.1, server_tau=1e-3)
    first, second = _two_steps(opt)
    # v1 = Δ1² = [0.04, 0.16]; the first moment is the delta itself (β1 = 0).
    _close(first, [0.1 * 0.2 / 0.201, 0.1 * -0.4 / 0.401])
    # v2 = [0.05, 0.1601].
    _close(second, [0.1 * -0.1 / (math.sqrt(0.05) + 1e-3), 0.1 * 0.01 / (math.sqrt(0.1601) + 1e-3)])
    assert set(opt.state_dict()) == {"v/w"}


def test_defaults_are_flowers() -> None:
    """Null settings take Flower's defaults (eta, beta_1, beta_2, tau), FedAvgM's momentum aside."""
    pairs = {"server_learning_rate": "eta", "server_beta_1": "beta_1", "server_beta_2": "beta_2",
             "server_tau": "tau"}
    for ours, theirs in ((FedAdam, flower.FedAdam), (FedYogi, flower.FedYogi), (FedAdagrad, flower.FedAdagrad)):
        params = inspect.signature(theirs.__init__).parameters
        made = make_server_optimizer(FederationConfig(server_optimizer=ours.name))
        assert made.hyper == {name: params[pairs[name]].default for name in ours.settings}
    params = inspect.signature(flower.FedAvgM.__init__).parameters
    assert FedAvgM().learning_rate == params["server_learning_rate"].default
    assert FedAvgM().hyper["server_momentum"] == 0.9  # Flower's 0 would be plain FedAvg
    assert isinstance(make_server_optimizer(FederationConfig()), FedAvg)


def test_config_table_matches_the_classes() -> None:
    assert config.SERVER_OPTIMIZER_FIELDS == {name: rule.settings for name, rule in REGISTRY.items()}
    made = make_server_optimizer(FederationConfig(server_optimizer="fedavgm", server_momentum=0.5))
    assert made.hyper == {"server_learning_rate": 1.0, "server_momentum": 0.5}


def test_ffa_leaves_a_untouched_and_keeps_no_moments_for_it() -> None:
    a, b, head = "m.q_proj.lora_A.default.weight", "m.q_proj.lora_B.default.weight", "score.weight"
    state = {a: np.full((2, 3), 0.5, np.float32), b: np.zeros((3, 2), np.float32), head: np.ones(2, np.float32)}
    mean_delta = FFALoRA().aggregate({b: np.full((3, 2), 0.6, np.float32), head: np.full(2, -0.3, np.float32)}, 3.0)
    assert set(mean_delta) == {b, head}
    opt = FedAdam(server_learning_rate=0.01, server_tau=1e-3)
    new = FFALoRA().apply(state, opt.update(mean_delta))
    assert new[a] is state[a]
    # Mean deltas 0.6 / 3 = 0.2 and -0.1; Adam's first step is η·0.1Δ / (√(0.01Δ²) + τ).
    np.testing.assert_allclose(new[b], np.full((3, 2), 0.01 * 0.02 / 0.021), rtol=2e-5)
    np.testing.assert_allclose(new[head], 1 + np.full(2, 0.01 * -0.01 / 0.011), rtol=2e-5)
    assert set(opt.state_dict()) == {f"m/{b}", f"v/{b}", f"m/{head}", f"v/{head}"}
    # FedAvg-LoRA with the default optimiser is exactly the rule's own apply, as before.
    full = {a: np.full((2, 3), 0.1, np.float32), b: np.full((3, 2), 0.2, np.float32)}
    mean_all = FedAvgLoRA().aggregate(full, 2.0)
    for name, value in FedAvgLoRA().apply(state, FedAvg().update(mean_all)).items():
        np.testing.assert_array_equal(value, FedAvgLoRA().apply(state, mean_all)[name])


def test_state_restores_exactly_and_refuses_foreign_moments() -> None:
    opt = FedYogi()
    _two_steps(opt)
    again = FedYogi()
    again.load_state_dict(opt.state_dict(), opt.steps, {"w": (2,)})
    for key, value in opt.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[key], value)
    np.testing.assert_array_equal(again.update({"w": np.array(DELTA_1, np.float32)})["w"],
                                  opt.update({"w": np.array(DELTA_1, np.float32)})["w"])
    with pytest.raises(ValueError, match="not a moment"):
        FedYogi().load_state_dict(opt.state_dict(), 2, {"w": (3,)})
    with pytest.raises(ValueError, match="not a moment"):
        FedAvgM().load_state_dict({"v/w": np.zeros(2, np.float32)}, 1, {"w": (2,)})


def _fails(cfg: FedtuneConfig, field: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.field == field
    return str(info.value)


@pytest.mark.parametrize("name,value,needs", [
    ("server_optimizer", "sgd", "fedavg, fedavgm, fedadam, fedyogi, fedadagrad"),
    ("server_learning_rate", 0.0, "positive"), ("server_learning_rate", float("nan"), "positive"),
    ("server_tau", 0.0, "divide 0 by 0"), ("server_beta_1", 1.0, "[0, 1)"), ("server_beta_2", -0.1, "[0, 1)"),
    ("server_beta_1", float("nan"), "[0, 1)"),
])
def test_bad_settings_are_refused(name: str, value: object, needs: str) -> None:
    cfg = FedtuneConfig()
    cfg.federation.server_optimizer = "fedadam"
    setattr(cfg.federation, name, value)
    assert needs in _fails(cfg, f"federation.{name}")


def test_a_setting_the_optimiser_ignores_is_refused() -> None:
    cfg = FedtuneConfig()
    cfg.federation.server_momentum = 0.9  # with the default fedavg
    assert "choose an optimiser that uses it (fedavgm)" in _fails(cfg, "federation.server_momentum")
    cfg.federation.server_optimizer = "fedavgm"
    cfg.federation.server_momentum = 1.0
    assert "[0, 1)" in _fails(cfg, "federation.server_momentum")
    cfg.federation.server_momentum = 0.0
    validate(cfg)


def _adapter(cfg: FedtuneConfig, optimizer: ServerOptimizer) -> GlobalAdapter:
    built = build_fingerprinted_model(cfg.model)
    identity = governance.run_identity(built.model, None, built.fingerprint, cfg.model.task, "fedavg")
    return GlobalAdapter(built.model, Path(cfg.run_dir), identity, optimizer)


def _round(adapter: GlobalAdapter, round_number: int, scale: float) -> None:
    delta = {n: np.full(v.shape, scale, np.float32) for n, v in adapter.state.items()}
    adapter.commit(round_number, FedAvgLoRA().apply(adapter.state, adapter.optimizer.update(delta)), ["site-00"])


def test_a_crash_before_the_checkpoint_resumes_with_the_previous_rounds_moments(tiny_cfg: FedtuneConfig,
                                                                                monkeypatch) -> None:
    adapter = _adapter(tiny_cfg, FedAdam())
    _round(adapter, 1, 0.01)
    after_one = adapter.optimizer.state_dict()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped between the moments and the checkpoint")

    monkeypatch.setattr("fedtune.federation.versions.save_checkpoint", stopped)
    with pytest.raises(KeyboardInterrupt):
        _round(adapter, 2, -0.02)
    assert adapter.optimizer_path(2).is_file()
    monkeypatch.undo()

    resumed = _adapter(tiny_cfg, FedAdam())
    assert resumed.resume() == 1 and resumed.optimizer.steps == 1
    assert resumed.optimizer.state_dict().keys() == after_one.keys()
    for key, value in after_one.items():
        np.testing.assert_array_equal(resumed.optimizer.state_dict()[key], value)
    _round(resumed, 2, -0.02)
    assert sorted(p.name for p in resumed.checkpoint_dir.glob("server_optimizer_*")) == ["server_optimizer_002"
                                                                                          ".safetensors"]
    with pytest.raises(ConfigError, match="server_optimizer=fedadam") as info:
        _adapter(tiny_cfg, FedAvg()).resume()
    assert info.value.field == "federation.server_optimizer"


def test_fedadam_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """End to end, in process, with the tiny model: the moments carry over a server restart."""
    whole = tiny_config(tmp_path / "whole", federation__server_optimizer="fedadam",
                        federation__server_learning_rate=0.01, federation__server_tau=1e-3)
    summary = run_inprocess(whole)
    assert summary.rounds_completed == 2 and all(math.isfinite(r["eval_loss"]) for r in summary.rows)
    parted = tiny_config(tmp_path / "parted", federation__server_optimizer="fedadam",
                         federation__server_learning_rate=0.01, federation__server_tau=1e-3, federation__num_rounds=1)
    run_server(InProcessGrid(make_client_app(parted), 3), parted, Path(parted.run_dir), show_progress=False)
    parted.federation.num_rounds = 2
    resumed = run_server(InProcessGrid(make_client_app(parted), 3), parted, Path(parted.run_dir), show_progress=False)
    assert [r["round"] for r in resumed.rows] == [2]

    key_map = peft_key_map(build_fingerprinted_model(whole.model).model)
    initial = build_fingerprinted_model(whole.model)
    start = {n: p.detach().numpy() for n, p in initial.model.named_parameters() if n in key_map}
    round_w, state_w = load_checkpoint(Path(whole.run_dir) / "checkpoint", key_map)  # type: ignore[misc]
    round_p, state_p = load_checkpoint(Path(parted.run_dir) / "checkpoint", key_map)  # type: ignore[misc]
    assert round_w == round_p == 2
    moved = 0
    for name, value in state_w.items():
        np.testing.assert_array_equal(state_p[name], value)
        moved += int(not np.array_equal(value, start[name]))
    assert moved > 0  # the optimiser changed the adapter


def test_the_hydra_config_reaches_the_server_optimizer() -> None:
    """``fedtune simulate federation.server_optimizer=fedadam ...`` composes to a valid typed config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedtune.config import register_configs

    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        default = OmegaConf.to_object(compose("config"))
        chosen = OmegaConf.to_object(compose("config", overrides=["federation.server_optimizer=fedadam",
                                                                  "federation.server_learning_rate=0.01"]))
    assert isinstance(default, FedtuneConfig) and default.federation == FederationConfig()
    assert isinstance(chosen, FedtuneConfig)
    validate(chosen)
    assert make_server_optimizer(chosen.federation).hyper["server_learning_rate"] == 0.01


def test_fedyogi_under_secure_aggregation_with_ffa_moves_only_what_was_aggregated(tmp_path: Path) -> None:
    """Under SecAgg+ the optimiser acts on the unmasked sum; FFA's A stays at its initialisation."""
    cfg = tiny_config(tmp_path / "run", federation__server_optimizer="fedyogi", federation__strategy="ffa",
                      federation__num_rounds=1, secagg__enabled=True)
    summary = run_inprocess(cfg)
    assert summary.rounds_completed == 1
    built = build_fingerprinted_model(cfg.model)
    key_map = peft_key_map(built.model)
    start = {n: p.detach().numpy() for n, p in built.model.named_parameters() if n in key_map}
    _, state = load_checkpoint(Path(cfg.run_dir) / "checkpoint", key_map)  # type: ignore[misc]
    trained = set(FFALoRA().trainable_names(built.model))
    for name, value in state.items():
        assert np.array_equal(value, start[name]) == (name not in trained), name
    adapter = _adapter(cfg, FedYogi())
    assert adapter.resume() == 1
    assert {key.partition("/")[2] for key in adapter.optimizer.state_dict()} == trained
