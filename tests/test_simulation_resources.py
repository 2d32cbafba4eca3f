"""What a simulation asks of Ray: each site's CPUs and GPUs, its training device, and which Ray.

``flwr.simulation.run_simulation`` is replaced by a recorder, so these run without Ray or a
GPU: they check the backend config fedtune hands Flower (whose Ray backend passes
``client_resources`` to each actor and ``init_args`` to ``ray.init`` unchanged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flwr.simulation
import pytest
import torch
from flwr.app import Context, RecordDict

from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.federation.client import site_settings
from fedtune.simulation import check_config, simulate
from fedtune.validation import validate


class Recorded(Exception):
    """Stops the run once run_simulation's arguments are recorded."""


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    calls: dict[str, Any] = {}

    def record(**kwargs: Any) -> None:
        calls.update(kwargs)
        raise Recorded

    monkeypatch.setattr(flwr.simulation, "run_simulation", record)
    return calls


def _backend(cfg: FedtuneConfig, recorded: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(Recorded):
        simulate(cfg)
    return recorded["backend_config"]


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_local_ray_by_default(tiny_cfg: FedtuneConfig, recorded: dict[str, Any]) -> None:
    backend = _backend(tiny_cfg, recorded)
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    init = backend["init_args"]
    assert "address" not in init
    assert init["num_cpus"] >= 1 and init["include_dashboard"] is False
    assert init["log_to_driver"] is True
    assert recorded["num_supernodes"] == 3


def test_ray_address_reaches_ray_init_alone(tiny_cfg: FedtuneConfig, recorded: dict[str, Any]) -> None:
    tiny_cfg.federation.ray_address = "ray://head.example:10001"
    init = _backend(tiny_cfg, recorded)["init_args"]
    assert init["address"] == "ray://head.example:10001"
    # ray.init raises "When connecting to an existing cluster, num_cpus and num_gpus must not be provided."
    assert "num_cpus" not in init and "num_gpus" not in init and "include_dashboard" not in init


def test_gpus_per_site_reach_the_actors(tiny_cfg: FedtuneConfig, recorded: dict[str, Any],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 1)
    tiny_cfg.federation.gpus_per_site = 0.5
    tiny_cfg.federation.cpus_per_site = 2.0
    assert _backend(tiny_cfg, recorded)["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}


def test_a_simulated_site_trains_where_its_reservation_says(tmp_path: Path, tiny_cfg: FedtuneConfig) -> None:
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    assert site_settings(context, tiny_cfg, tmp_path).device == "cpu"
    tiny_cfg.federation.gpus_per_site = 0.25
    assert site_settings(context, tiny_cfg, tmp_path).device == "cuda"  # null follows the reservation
    tiny_cfg.federation.site_device = "cpu"
    assert site_settings(context, tiny_cfg, tmp_path).device == "cpu"


@pytest.mark.parametrize("changes, field", [
    ({"gpus_per_site": -1.0}, "federation.gpus_per_site"),
    ({"gpus_per_site": float("nan")}, "federation.gpus_per_site"),
    ({"site_device": "tpu"}, "federation.site_device"),
    ({"site_device": "cuda:1", "gpus_per_site": 1.0}, "federation.site_device"),
    # Ray hides every GPU from an actor that reserves none.
    ({"site_device": "cuda"}, "federation.site_device"),
    ({"ray_address": " "}, "federation.ray_address"),
])
def test_bad_site_resources_name_their_field(tiny_cfg: FedtuneConfig, changes: dict[str, Any], field: str) -> None:
    for name, value in changes.items():
        setattr(tiny_cfg.federation, name, value)
    with pytest.raises(ConfigError) as raised:
        validate(tiny_cfg)
    assert raised.value.field == field


@pytest.mark.parametrize("changes, field", [
    ({"gpus_per_site": 1.0}, "federation.gpus_per_site"),
    ({"gpus_per_site": 0.5, "site_device": "cuda"}, "federation.gpus_per_site"),
])
def test_gpus_asked_for_on_a_machine_without_cuda(tiny_cfg: FedtuneConfig, recorded: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any],
                                                  field: str) -> None:
    _gpus(monkeypatch, 0)
    for name, value in changes.items():
        setattr(tiny_cfg.federation, name, value)
    with pytest.raises(ConfigError) as raised:
        simulate(tiny_cfg)
    assert raised.value.field == field
    assert "no CUDA device" in str(raised.value) and "gpus_per_site=0" in str(raised.value)
    assert not recorded  # stopped before Ray
    assert not Path(str(tiny_cfg.run_dir)).exists()


def test_more_gpus_per_site_than_the_machine_has(tiny_cfg: FedtuneConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 1)
    tiny_cfg.federation.gpus_per_site = 2.0
    with pytest.raises(ConfigError, match="has 1") as raised:
        check_config(tiny_cfg)
    assert raised.value.field == "federation.gpus_per_site"


def test_a_cluster_run_does_not_check_this_machines_gpus(tiny_cfg: FedtuneConfig, recorded: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0)
    tiny_cfg.federation.gpus_per_site = 1.0
    tiny_cfg.federation.ray_address = "auto"
    backend = _backend(tiny_cfg, recorded)
    assert backend["client_resources"]["num_gpus"] == 1.0 and backend["init_args"]["address"] == "auto"
