"""Aggregation rules: FedAvg-LoRA, FFA-LoRA, and the seam a new rule plugs into."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pytest
from peft import PeftModel

from fedtune import adapters, config, strategies
from fedtune.apps import make_client_app
from fedtune.checkpoint import load_checkpoint, peft_key_map
from fedtune.config import FedtuneConfig
from fedtune.federation import protocol
from fedtune.federation.server import run_server
from fedtune.models import build_lora_model, lora_parameter_names
from fedtune.strategies import FedAvgLoRA, FFALoRA

from conftest import InProcessGrid


def test_fedavg_of_weighted_deltas_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    deltas = [{"a": rng.normal(size=(3, 2)).astype(np.float32)} for _ in range(3)]
    sizes = [10.0, 30.0, 60.0]
    updates = [(adapters.scale(d, n), n) for d, n in zip(deltas, sizes)]
    weighted_sum, total = adapters.sum_updates(updates)
    mean = FedAvgLoRA().aggregate(weighted_sum, total)
    by_hand = (10 * deltas[0]["a"] + 30 * deltas[1]["a"] + 60 * deltas[2]["a"]) / 100
    np.testing.assert_allclose(mean["a"], by_hand, rtol=1e-5, atol=1e-6)
    new = FedAvgLoRA().apply({"a": np.ones((3, 2), np.float32)}, mean)
    np.testing.assert_allclose(new["a"], 1 + by_hand, rtol=1e-5)


def test_ffa_lora_keeps_a_fixed_and_trains_b(tiny_cfg: FedtuneConfig) -> None:
    tiny_cfg.federation.strategy = "ffa"
    tiny_cfg.federation.num_rounds = 1
    model, _ = build_lora_model(tiny_cfg.model)
    initial = adapters.lora_state(model, lora_parameter_names(model))
    run_server(InProcessGrid(make_client_app(tiny_cfg), 3), tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    _, final = load_checkpoint(Path(tiny_cfg.run_dir) / "checkpoint", peft_key_map(model))
    a_names = [n for n in initial if ".lora_A." in n]
    b_names = [n for n in initial if ".lora_B." in n]
    assert a_names and b_names
    for n in a_names:
        np.testing.assert_array_equal(final[n], initial[n])
    assert any(np.abs(final[n]).sum() > 0 for n in b_names)  # B starts at zero and moved


def test_ffa_aggregates_only_b(tiny_cfg: FedtuneConfig) -> None:
    model, _ = build_lora_model(tiny_cfg.model)
    names = FFALoRA().trainable_names(model)
    assert names and all(".lora_B." in n for n in names)
    assert len(FedAvgLoRA().trainable_names(model)) == 2 * len(names)


def test_config_lists_exactly_the_registered_strategies() -> None:
    """config.py is a leaf and cannot import the registry, so this keeps the two lists equal."""
    assert tuple(strategies.REGISTRY) == config.STRATEGIES
    assert all(strategies.make_strategy(name).name == name for name in config.STRATEGIES)
    with pytest.raises(ValueError, match="federation.strategy"):
        strategies.make_strategy("fedprox")


class FirstLayerHalfStep(FedAvgLoRA):
    """A toy rule: sites train only layer 0's B tensors; the server takes half the mean step."""

    name = "toy-half-step"
    title = "toy half step"

    def trainable_names(self, model: PeftModel) -> list[str]:
        return [n for n in super().trainable_names(model) if ".layers.0." in n and ".lora_B." in n]

    def aggregate(self, weighted_sum: Mapping[str, np.ndarray], total_weight: float) -> adapters.State:
        return {n: (0.5 * v / total_weight).astype(np.float32) for n, v in weighted_sum.items()}


def test_a_new_rule_is_one_class_used_by_server_and_site(tiny_cfg: FedtuneConfig,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(strategies.REGISTRY, FirstLayerHalfStep.name, FirstLayerHalfStep)
    # The site checks the server's round config against the rules it knows (config.STRATEGIES,
    # kept equal to the registry by the test above); a real new rule is listed there too.
    monkeypatch.setattr(protocol, "STRATEGIES", (*protocol.STRATEGIES, FirstLayerHalfStep.name))
    tiny_cfg.federation.strategy = FirstLayerHalfStep.name
    tiny_cfg.federation.num_rounds = 1
    model, _ = build_lora_model(tiny_cfg.model)
    initial = adapters.lora_state(model, lora_parameter_names(model))
    trained = FirstLayerHalfStep().trainable_names(model)
    assert trained and len(trained) < len(initial)

    grid = InProcessGrid(make_client_app(tiny_cfg), 3)
    summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    assert summary.rounds_completed == 1
    # Site side: each update holds exactly the rule's tensors.
    updates = [(adapters.from_array_record(m.content[protocol.UPDATE]), float(m.content[protocol.METRICS]["weight"]))
               for m in grid.received if protocol.UPDATE in m.content.array_records]
    assert len(updates) == 3 and all(set(state) == set(trained) for state, _ in updates)
    # Server side: the rule's own aggregate (half the weighted mean) moved only those tensors.
    _, final = load_checkpoint(Path(tiny_cfg.run_dir) / "checkpoint", peft_key_map(model))
    total = sum(weight for _, weight in updates)
    for name in initial:
        if name in trained:
            step = 0.5 * sum(state[name].astype(np.float64) for state, _ in updates) / total
            np.testing.assert_allclose(final[name], initial[name] + step, rtol=1e-5, atol=1e-7)
            assert np.abs(step).sum() > 0
        else:
            np.testing.assert_array_equal(final[name], initial[name])
