"""The server's privacy ledger outlives a run: a deployment keeps one per federation.

A site's ε is computed from every charge the server ever made for it, in any run; a new
run of the same federation must not give a site its budget back.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedtune.apps import LEDGER_KEY, make_client_app, make_server_app
from fedtune.config import FedtuneConfig
from fedtune.federation import protocol
from fedtune.federation.server import run_id_of, run_server
from fedtune.privacy.accounting import Charge, epsilon
from fedtune.privacy.ledger import PrivacyLedger

from conftest import InProcessGrid


def _epsilon_of_rounds(cfg: FedtuneConfig, rounds: int) -> float:
    charge = Charge(1, cfg.privacy.noise_multiplier, cfg.privacy.sample_rate, cfg.train.local_steps)
    return epsilon([charge] * rounds, cfg.privacy.delta)


def _run(cfg: FedtuneConfig, run_dir: Path, ledger: Path, rounds: int) -> tuple[InProcessGrid, object]:
    """One run of the federation in its own run directory (so the simulated sites' ledgers are new too)."""
    cfg.run_dir, cfg.federation.num_rounds = str(run_dir), rounds
    grid = InProcessGrid(make_client_app(cfg), 3)
    return grid, run_server(grid, cfg, run_dir, show_progress=False, ledger_path=ledger)


def test_a_second_run_refuses_a_site_whose_budget_the_first_run_spent(tiny_cfg: FedtuneConfig,
                                                                       tmp_path: Path) -> None:
    ledger = tmp_path / "operator" / "server_ledger.sqlite"
    # One round fits each site's budget, two do not.
    tiny_cfg.privacy.target_epsilon = (_epsilon_of_rounds(tiny_cfg, 1) + _epsilon_of_rounds(tiny_cfg, 2)) / 2
    _, first = _run(tiny_cfg, tmp_path / "run1", ledger, rounds=1)
    assert first.rounds_completed == 1
    # A new run: new run directory, sites whose own (simulated) ledgers are empty, round numbers from 1 again.
    grid, second = _run(tiny_cfg, tmp_path / "run2", ledger, rounds=2)
    assert second.rounds_completed == 0
    assert "no site has privacy budget left for round 1" in second.stop_reason
    assert not [m for m in grid.sent if m.metadata.message_type == protocol.TRAIN]  # nothing was asked of them
    assert not (tmp_path / "run2" / "server_ledger.sqlite").exists()
    report = json.loads((tmp_path / "run2" / "privacy_report.json").read_text())
    run1, run2 = run_id_of(tmp_path / "run1"), run_id_of(tmp_path / "run2")
    assert run1 != run2 and report["run"] == run2 and report["runs"] == [run1]
    assert report["sites"]["site-00"]["rounds"] == 1
    assert report["sites"]["site-00"]["epsilon"] == pytest.approx(_epsilon_of_rounds(tiny_cfg, 1))


def test_every_runs_charges_count_and_the_report_names_the_runs(tiny_cfg: FedtuneConfig, tmp_path: Path) -> None:
    ledger = tmp_path / "operator" / "server_ledger.sqlite"
    # The first run goes through the ServerApp, which takes the ledger from the run config (as `fedtune server` sets it).
    tiny_cfg.run_dir, tiny_cfg.federation.num_rounds = str(tmp_path / "run1"), 2
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={LEDGER_KEY: str(ledger)})
    make_server_app(tiny_cfg, wait_timeout_s=10)(InProcessGrid(make_client_app(tiny_cfg), 3), context)
    assert ledger.is_file() and not (tmp_path / "run1" / "server_ledger.sqlite").exists()
    _, second = _run(tiny_cfg, tmp_path / "run2", ledger, rounds=1)
    assert second.rounds_completed == 1
    run1, run2 = run_id_of(tmp_path / "run1"), run_id_of(tmp_path / "run2")
    report = json.loads((tmp_path / "run2" / "privacy_report.json").read_text())
    assert report["runs"] == [run1, run2] and report["run"] == run2 and report["ledger"] == str(ledger)
    for name, entry in report["sites"].items():
        # Rounds 1, 2 of the first run and round 1 of the second: three charges, none dropped as a repeat.
        assert entry["rounds"] == 3 and entry["runs"] == [run1, run2]
        assert entry["epsilon"] == pytest.approx(_epsilon_of_rounds(tiny_cfg, 3))
        assert [c.round for c in PrivacyLedger(ledger).history(name)] == [1, 2, 1]
    markdown = (tmp_path / "run2" / "privacy_report.md").read_text()
    assert f"`{run1}`, `{run2}` (this run)" in markdown and "2 runs" in markdown
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["run_id"] == run2


def test_a_resumed_run_keeps_its_name(tmp_path: Path) -> None:
    assert run_id_of(tmp_path / "a") == run_id_of(tmp_path / "a") != run_id_of(tmp_path / "b")


def test_a_ledger_from_before_runs_were_named_is_migrated_and_still_counts(tmp_path: Path) -> None:
    path = tmp_path / "server_ledger.sqlite"
    with sqlite3.connect(path) as conn:  # the schema of an older fedtune: no run column
        conn.execute("CREATE TABLE charges (id INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL, "
                     "round INTEGER NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, "
                     "steps INTEGER NOT NULL, accountant TEXT NOT NULL, recorded_at TEXT NOT NULL)")
        conn.execute("INSERT INTO charges (site, round, noise_multiplier, sample_rate, steps, accountant, recorded_at)"
                     " VALUES ('hosp-a', 1, 1.0, 0.1, 5, 'rdp', '2024-01-01T00:00:00+00:00')")
    ledger = PrivacyLedger(path, run="r2")
    PrivacyLedger(path, run="r3")  # opening a migrated file again is fine
    ledger.charge("hosp-a", Charge(1, 1.0, 0.1, 5))
    ledger.charge("hosp-b", Charge(1, 1.0, 0.1, 5))
    assert ledger.runs() == [None, "r2"] and ledger.runs("hosp-a") == [None, "r2"] and ledger.runs("hosp-b") == ["r2"]
    assert len(ledger.history("hosp-a")) == 2
    assert ledger.epsilon("hosp-a", 1e-5) == pytest.approx(epsilon([Charge(1, 1.0, 0.1, 5)] * 2, 1e-5))
