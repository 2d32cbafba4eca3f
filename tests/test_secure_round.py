"""Secure aggregation wired into the round loop (in-process grid, real ClientApps)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from fedtune.apps import make_client_app
from fedtune.checkpoint import load_checkpoint
from fedtune.config import FedtuneConfig
from fedtune.federation import secure_server
from fedtune.federation.server import run_server
from fedtune.privacy.ledger import PrivacyLedger

from conftest import InProcessGrid, tiny_config


def _run(cfg: FedtuneConfig, drop: set[int] | None = None,
         offline_once: set[int] | None = None) -> tuple[InProcessGrid, object]:
    grid = InProcessGrid(make_client_app(cfg), cfg.federation.num_sites, drop=drop, offline_once=offline_once)
    return grid, run_server(grid, cfg, Path(cfg.run_dir), show_progress=False)


def test_secure_and_plain_rounds_give_the_same_adapter(tmp_path: Path) -> None:
    plain = tiny_config(tmp_path / "plain")
    secure = tiny_config(tmp_path / "secure")
    secure.secagg.enabled = True
    _, plain_summary = _run(plain)
    grid, secure_summary = _run(secure)
    _, a = load_checkpoint(tmp_path / "plain" / "checkpoint")
    _, b = load_checkpoint(tmp_path / "secure" / "checkpoint")
    bound = sum(r["quantization_error_bound"] for r in secure_summary.rows)
    assert 0 < bound < 1e-4
    worst = max(float(np.max(np.abs(a[n] - b[n]))) for n in a)
    assert worst <= bound * 1.01 + 1e-6  # float32 storage of the adapter
    assert any(float(np.max(np.abs(a[n]))) > 1e-3 for n in a)  # the adapter did move
    # The server never held a site's plain update: every update it received was masked uint32.
    updates = [m for m in grid.received if "update" in m.content.array_records]
    assert updates and all(m.content["update"]["masked"].dtype == "uint32" for m in updates)
    # Nothing per site but the masked vector: no loss, no ε, no training time (it grows with n_i).
    assert all(not m.content.metric_records for m in updates)


def test_site_dropping_out_is_recovered_and_charged(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", federation__num_sites=5, federation__num_rounds=1)
    cfg.secagg.enabled = True
    grid, summary = _run(cfg, drop={101})
    row = summary.rows[0]
    assert row["failures"] == ["site-01"]
    assert row["participants"] == ["site-00", "site-02", "site-03", "site-04"]
    assert (Path(cfg.run_dir) / "adapters" / "round_001").is_dir()
    assert len(PrivacyLedger(Path(cfg.run_dir) / "server_ledger.sqlite").history("site-01")) == 1
    # Never both shares of one site: seed shares only for survivors, key shares only for the dropped one.
    seed_for, key_for = set(), set()
    for m in grid.received:
        if "seed_shares" in m.content.config_records:
            seed_for |= set(m.content["seed_shares"].keys())
            key_for |= set(m.content["key_shares"].keys())
    assert key_for == {"2"} and "2" not in seed_for and seed_for


def test_round_abandoned_when_too_many_drop(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", federation__num_sites=4, federation__num_rounds=1)
    cfg.secagg.enabled = True
    cfg.secagg.threshold = 3
    _, summary = _run(cfg, drop={100, 101})
    assert summary.rows[0]["participants"] == []
    assert not (Path(cfg.run_dir) / "adapters").exists()
    ledger = PrivacyLedger(Path(cfg.run_dir) / "server_ledger.sqlite")
    assert all(len(ledger.history(f"site-0{i}")) == 1 for i in range(4))  # charges stay
    assert json.loads((Path(cfg.run_dir) / "summary.json").read_text())["rounds_completed"] == 1


def test_site_the_superlink_reports_offline_at_key_advertisement_is_asked_again(tmp_path: Path, monkeypatch,
                                                                                caplog) -> None:
    """After a SuperLink restart a polling site can look offline for a moment; one blip must not abandon a round."""
    monkeypatch.setattr(secure_server, "ADVERTISE_RETRY_S", 0.0)
    cfg = tiny_config(tmp_path / "run", federation__num_sites=3, federation__num_rounds=1)
    cfg.secagg.enabled = True
    with caplog.at_level(logging.WARNING):
        grid, summary = _run(cfg, offline_once={101})
    assert summary.rows[0]["participants"] == ["site-00", "site-01", "site-02"]
    assert summary.rows[0]["failures"] == []
    advertised = [m for m in grid.sent if m.metadata.dst_node_id == 101
                  and m.content.config_records.get("secagg", {}).get("stage") == "advertise"]
    assert len(advertised) == 2
    # The log names the site, not the SuperLink that answered for it.
    assert "site-01 failed the advertise stage of round 1" in caplog.text


class _LateGrid(InProcessGrid):
    """Drops one site's unmask message (a dropout after the consistency check), or forges a signature in it."""

    def __init__(self, *args, late: int, forge: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.late, self.forge = late, forge

    def _deliver(self, msg):  # type: ignore[no-untyped-def]
        stage = msg.content.config_records.get("secagg", {}).get("stage")
        if stage == "unmask" and msg.metadata.dst_node_id == self.late:
            if not self.forge:
                return None
            signatures = msg.content.config_records["survivor_signatures"]
            first = sorted(signatures.keys())[0]
            signatures[first] = bytes(signatures[sorted(signatures.keys())[-1]])
        return super()._deliver(msg)


def test_a_dropout_after_the_consistency_check_is_recovered(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", federation__num_sites=5, federation__num_rounds=1)
    cfg.secagg.enabled = True
    grid = _LateGrid(make_client_app(cfg), 5, late=102)
    summary = run_server(grid, cfg, Path(cfg.run_dir), show_progress=False)
    # Site 2's masked input is in the sum: its neighbours reveal its self-mask, nobody its mask key.
    assert summary.rows[0]["participants"] == [f"site-0{i}" for i in range(5)]
    assert (Path(cfg.run_dir) / "adapters" / "round_001").is_dir()
    asked = [m for m in grid.sent if m.content.config_records.get("secagg", {}).get("stage") == "consistency"]
    assert len(asked) == 5


def test_a_site_that_aborts_is_a_failure_and_the_round_is_abandoned(tmp_path: Path, caplog) -> None:
    cfg = tiny_config(tmp_path / "run", federation__num_sites=4, federation__num_rounds=1)
    cfg.secagg.enabled = True
    grid = _LateGrid(make_client_app(cfg), 4, late=101, forge=True)
    with caplog.at_level(logging.ERROR):
        summary = run_server(grid, cfg, Path(cfg.run_dir), show_progress=False)
    assert "aborted at the unmask stage: neighbour" in caplog.text
    assert summary.rows[0]["participants"] == [] and "site-01" in summary.rows[0]["failures"]
    assert not (Path(cfg.run_dir) / "adapters").exists()
    ledger = PrivacyLedger(Path(cfg.run_dir) / "server_ledger.sqlite")
    assert all(len(ledger.history(f"site-0{i}")) == 1 for i in range(4))  # the charges stay
