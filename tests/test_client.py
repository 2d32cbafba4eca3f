from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.data import load_federated_data
from fedtune.federation import client as site
from fedtune.federation import protocol
from fedtune.federation.server import round_config
from fedtune.models import build_fingerprinted_model, lora_parameter_names
from fedtune.privacy.accounting import epsilon
from fedtune.privacy.ledger import PrivacyLedger


def _train_message(cfg: FedtuneConfig, round_number: int = 1) -> Message:
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    built = build_fingerprinted_model(cfg.model)
    state = adapters.lora_state(built.model, lora_parameter_names(built.model))
    content = RecordDict({protocol.GLOBAL_ADAPTER: adapters.to_array_record(state),
                          protocol.ROUND_CONFIG: round_config(cfg, round_number, built.fingerprint).to_record()})
    return Message(content, dst_node_id=7, message_type=protocol.TRAIN)


def _site(cfg: FedtuneConfig) -> site.SiteSettings:
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return site.site_settings(ctx, cfg, Path(cfg.run_dir))


def _records(cfg: FedtuneConfig):
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return site.site_records(ctx, load_federated_data(cfg.data, cfg.federation.num_sites))


def test_site_trains_and_charges_before_release(tiny_cfg: FedtuneConfig) -> None:
    settings = _site(tiny_cfg)
    reply = site.train(_train_message(tiny_cfg), settings, tiny_cfg, _records(tiny_cfg))
    assert reply.content[protocol.STATUS]["status"] == protocol.STATUS_OK
    weight = float(reply.content[protocol.METRICS]["weight"])
    assert weight == len(_records(tiny_cfg))
    update = adapters.from_array_record(reply.content[protocol.UPDATE])
    assert adapters.l2_norm(update) > 0
    ledger = PrivacyLedger(settings.ledger_path)
    assert len(ledger.history(settings.name)) == 1


def test_private_site_keeps_its_train_loss_unless_it_opts_in(tiny_cfg: FedtuneConfig, tmp_path: Path) -> None:
    """The mean DP-SGD batch loss is un-noised: a membership signal outside ε."""
    def sent_metrics(cfg: FedtuneConfig) -> dict:
        reply = site.train(_train_message(cfg), _site(cfg), cfg, _records(cfg))
        assert reply.content[protocol.STATUS]["status"] == protocol.STATUS_OK
        return dict(reply.content[protocol.METRICS])

    assert "train_loss" not in sent_metrics(tiny_cfg)
    tiny_cfg.privacy.release_train_loss = True
    tiny_cfg.run_dir = str(tmp_path / "opted-in")
    assert sent_metrics(tiny_cfg)["train_loss"] > 0
    tiny_cfg.privacy.release_train_loss = False
    tiny_cfg.privacy.enabled = False  # a non-private run claims nothing, so it reports everything
    tiny_cfg.privacy.noise_multiplier = 0.0
    tiny_cfg.run_dir = str(tmp_path / "non-private")
    assert sent_metrics(tiny_cfg)["train_loss"] > 0


def test_site_refuses_a_round_past_its_budget(tiny_cfg: FedtuneConfig) -> None:
    rc = round_config(tiny_cfg, 1, "0" * 64)
    from fedtune.privacy.accounting import Charge

    one_round = epsilon([Charge(1, rc.noise_multiplier, rc.sample_rate, rc.local_steps)], tiny_cfg.privacy.delta)
    tiny_cfg.privacy.target_epsilon = one_round * 1.2  # room for one round, not two
    settings = _site(tiny_cfg)
    first = site.train(_train_message(tiny_cfg, 1), settings, tiny_cfg, _records(tiny_cfg))
    assert first.content[protocol.STATUS]["status"] == protocol.STATUS_OK
    second = site.train(_train_message(tiny_cfg, 2), settings, tiny_cfg, _records(tiny_cfg))
    status = second.content[protocol.STATUS]
    assert status["status"] == protocol.STATUS_REFUSED
    assert status["reason"] == protocol.REFUSED_BUDGET
    assert protocol.UPDATE not in second.content.array_records
    # The refusal itself costs nothing, and a fresh process (restart) sees the same ledger.
    assert len(PrivacyLedger(settings.ledger_path).history(settings.name)) == 1


def test_charge_is_kept_when_training_crashes(tiny_cfg: FedtuneConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(site, "train_locally", crash)
    settings = _site(tiny_cfg)
    with pytest.raises(RuntimeError, match="power cut"):
        site.train(_train_message(tiny_cfg), settings, tiny_cfg, _records(tiny_cfg))
    assert len(PrivacyLedger(settings.ledger_path).history(settings.name)) == 1


def test_private_site_refuses_a_non_private_round(tiny_cfg: FedtuneConfig) -> None:
    server_cfg = FedtuneConfig()
    server_cfg.model = tiny_cfg.model
    server_cfg.privacy.enabled = False
    reply = site.train(_train_message(server_cfg), _site(tiny_cfg), tiny_cfg, _records(tiny_cfg))
    assert reply.content[protocol.STATUS]["status"] == protocol.STATUS_REFUSED
    assert reply.content[protocol.STATUS]["reason"] == protocol.REFUSED_POLICY


def test_a_site_builds_its_model_and_partitions_its_data_once_per_process(tiny_cfg: FedtuneConfig,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds × sites messages, one build: a real base model takes seconds to minutes to load."""
    from fedtune import apps, models
    from fedtune.federation.server import run_server

    from conftest import InProcessGrid

    builds, loads = [], []
    real_build, real_load = models.build_fingerprinted_model, apps.load_federated_data
    monkeypatch.setattr(models, "_SITE_MODELS", {})
    monkeypatch.setattr(models, "build_fingerprinted_model", lambda cfg: builds.append(1) or real_build(cfg))
    monkeypatch.setattr(apps, "load_federated_data", lambda *a: loads.append(1) or real_load(*a))
    tiny_cfg.federation.num_rounds = 3
    grid = InProcessGrid(apps.make_client_app(tiny_cfg), tiny_cfg.federation.num_sites)
    summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    assert summary.rounds_completed == 3 and all(len(r["participants"]) == 3 for r in summary.rows)
    assert len(builds) == 1 and len(loads) == 1


def test_bfloat16_base_site_sends_a_float32_update(tiny_cfg: FedtuneConfig) -> None:
    """model.dtype=bfloat16 lowers the frozen base only: the site's update is float32, finite and non-zero."""
    tiny_cfg.model.dtype = "bfloat16"
    reply = site.train(_train_message(tiny_cfg), _site(tiny_cfg), tiny_cfg, _records(tiny_cfg))
    assert reply.content[protocol.STATUS]["status"] == protocol.STATUS_OK
    update = adapters.from_array_record(reply.content[protocol.UPDATE])
    assert all(v.dtype == np.float32 for v in update.values())
    assert math.isfinite(adapters.l2_norm(update)) and adapters.l2_norm(update) > 0
