"""Per-cohort accounting on a site: each cohort against its own budget, retired when spent."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from fedtune.config import FedtuneConfig
from fedtune.data import Record, load_federated_data
from fedtune.data.cohorts import CohortedRecords, cohorted
from fedtune.federation import client as site
from fedtune.federation import protocol
from fedtune.federation.server import round_config
from fedtune.privacy.accounting import Charge, epsilon
from fedtune.privacy.cohorts import CohortBudget, check_disjoint, cohort_epsilons, decide_cohorts, record_fingerprint
from fedtune.privacy.ledger import PrivacyLedger
from tests.test_client import _train_message

DELTA = 1e-5


def _two_cohorts(cfg: FedtuneConfig) -> tuple[list[Record], list[Record]]:
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    records = site.site_records(ctx, load_federated_data(cfg.data, cfg.federation.num_sites))
    half = len(records) // 2
    return records[:half], records[half:]


def _settings(cfg: FedtuneConfig, cohorts: tuple[CohortBudget, ...]) -> site.SiteSettings:
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return dataclasses.replace(site.site_settings(ctx, cfg, Path(cfg.run_dir)), cohorts=cohorts)


def _opacus_epsilon(rounds: int, rc: protocol.RoundConfig) -> float:
    """An Opacus accountant stepped once per DP-SGD step of ``rounds`` rounds."""
    accountant = RDPAccountant()
    for _ in range(rounds * rc.local_steps):
        accountant.step(noise_multiplier=rc.noise_multiplier, sample_rate=rc.sample_rate)
    return accountant.get_epsilon(delta=DELTA)


def _status(reply: Message) -> tuple[str, str]:
    status = reply.content[protocol.STATUS]
    return status["status"], status.get("reason", "")


def test_each_cohort_is_accounted_over_exactly_its_rounds_and_retires_while_a_new_one_trains(
        tiny_cfg: FedtuneConfig) -> None:
    """Cohort A affords two rounds; B arrives at round 3, when A retires; B then trains alone."""
    rc = round_config(tiny_cfg, 1, "0" * 64)
    two, three = _opacus_epsilon(2, rc), _opacus_epsilon(3, rc)
    budgets = (CohortBudget("2026-01", (two + three) / 2, DELTA), CohortBudget("2026-02", 100.0, DELTA))
    first, second = _two_cohorts(tiny_cfg)
    settings = _settings(tiny_cfg, budgets)
    weights = []
    for round_number in range(1, 5):
        arrived = [("2026-01", first)] + ([("2026-02", second)] if round_number >= 3 else [])
        reply = site.train(_train_message(tiny_cfg, round_number), settings, tiny_cfg, CohortedRecords.of(arrived))
        assert _status(reply)[0] == protocol.STATUS_OK
        weights.append(float(reply.content[protocol.METRICS]["weight"]))
    # Rounds 1-2 sampled A only, rounds 3-4 B only (A retired): the weight is the sampled union's size.
    assert weights == [len(first), len(first), len(second), len(second)]
    ledger = PrivacyLedger(settings.ledger_path)
    assert [c.round for c in ledger.cohort_history("2026-01")] == [1, 2]
    assert [c.round for c in ledger.cohort_history("2026-02")] == [3, 4]
    spent = cohort_epsilons(budgets, ledger, "rdp")
    assert spent["2026-01"] == pytest.approx(two, rel=1e-3) and spent["2026-01"] <= budgets[0].epsilon
    assert spent["2026-02"] == pytest.approx(_opacus_epsilon(2, rc), rel=1e-3)
    # The site's ε in its metrics is its largest active cohort's, never the sum over cohorts.
    assert float(reply.content[protocol.METRICS]["epsilon"]) == pytest.approx(spent["2026-02"], rel=1e-6)


def test_a_site_whose_cohorts_are_all_spent_refuses_and_is_not_charged(tiny_cfg: FedtuneConfig) -> None:
    rc = round_config(tiny_cfg, 1, "0" * 64)
    one = _opacus_epsilon(1, rc)
    budgets = (CohortBudget("a", one * 1.2, DELTA), CohortBudget("b", one * 1.2, DELTA))
    first, second = _two_cohorts(tiny_cfg)
    data = CohortedRecords.of([("a", first), ("b", second)])
    settings = _settings(tiny_cfg, budgets)
    assert _status(site.train(_train_message(tiny_cfg, 1), settings, tiny_cfg, data))[0] == protocol.STATUS_OK
    ledger = PrivacyLedger(settings.ledger_path)
    rows = len(ledger.history(None))
    assert rows == 2  # one row per sampled cohort
    reply = site.train(_train_message(tiny_cfg, 2), settings, tiny_cfg, data)
    assert _status(reply) == (protocol.STATUS_REFUSED, protocol.REFUSED_BUDGET)
    assert protocol.UPDATE not in reply.content.array_records
    # Nothing charged for the refusal, and a restarted site (a new ledger object) decides the same.
    restarted = PrivacyLedger(settings.ledger_path)
    assert len(restarted.history(None)) == rows
    assert decide_cohorts(budgets, rc.charge(), restarted, "rdp").active == ()


def test_whole_site_rows_count_toward_every_cohort_and_old_ledgers_migrate(tmp_path: Path) -> None:
    """A ledger from before cohorts: its rows charged the whole site, so every cohort carries them."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE charges (id INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL, round INTEGER"
                     " NOT NULL, noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,"
                     " accountant TEXT NOT NULL, recorded_at TEXT NOT NULL)")
        conn.execute("INSERT INTO charges (site, round, noise_multiplier, sample_rate, steps, accountant,"
                     " recorded_at) VALUES ('s', 1, 1.0, 0.1, 10, 'rdp', 'then')")
    ledger = PrivacyLedger(path)
    ledger.charge("s", Charge(2, 1.0, 0.1, 10), cohorts=("a", "b"))
    ledger.charge("s", Charge(3, 1.0, 0.1, 10), cohorts=("b",))
    assert [c.round for c in ledger.cohort_history("a")] == [1, 2]
    assert [c.round for c in ledger.cohort_history("b")] == [1, 2, 3]
    assert [c.round for c in ledger.cohort_history("new")] == [1]
    assert ledger.cohorts() == ["a", "b"]
    assert epsilon(ledger.cohort_history("b"), DELTA) > epsilon(ledger.cohort_history("a"), DELTA)
    with pytest.raises(ValueError):
        ledger.charge("s", Charge(4, 1.0, 0.1, 10), cohorts=())
    with pytest.raises(ValueError):
        ledger.charge("s", Charge(4, 1.0, 0.1, 10), cohorts=("",))


def test_a_rounds_cohort_rows_are_one_transaction_that_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "site.sqlite"
    script = textwrap.dedent(f"""
        import os, signal
        from fedtune.privacy.accounting import Charge
        from fedtune.privacy.ledger import PrivacyLedger
        PrivacyLedger({str(path)!r}).charge("s", Charge(1, 1.0, 0.1, 10), cohorts=("a", "b", "c"))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60).returncode == -9
    reopened = PrivacyLedger(path)
    assert {name: len(reopened.cohort_history(name)) for name in ("a", "b", "c")} == {"a": 1, "b": 1, "c": 1}


def test_cohorts_must_be_disjoint_and_a_plain_list_is_the_whole_site() -> None:
    one, two = Record("", "note one"), Record("", "note two")
    prints = {"a": [record_fingerprint((one.prompt, one.response, one.label))],
              "b": [record_fingerprint((two.prompt, two.response, two.label)),
                    record_fingerprint((one.prompt, one.response, one.label))]}
    assert check_disjoint(prints) == ("a", "b")
    assert check_disjoint({"a": prints["a"], "b": prints["b"][:1]}) is None
    whole = cohorted([one, two])
    assert whole.names() == () and whole.select(site.WHOLE_SITE) == [one, two]
    data = CohortedRecords.of([("a", [one]), ("b", [two])])
    assert data.select(("b",)) == [two] and data.count("a") == 1 and data.names() == ("a", "b")


def _site_yaml(tmp_path: Path, cohorts: str) -> Path:
    (tmp_path / "site.yaml").write_text(f"site_id: hosp-a\nbudget: {{epsilon: 4.0, delta: 1.0e-3}}\n"
                                        f"data:\n  cohorts:\n{cohorts}")
    return tmp_path / "site.yaml"


def _jsonl(path: Path, texts: list[str]) -> None:
    import json

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_site_yaml_cohorts_load_with_their_own_budgets_and_bad_ones_are_refused(tmp_path: Path) -> None:
    from fedtune.deploy.site_config import load_site_config
    from fedtune.deploy.site_data import cohort_budgets, load_site_records
    from fedtune.errors import ConfigError

    _jsonl(tmp_path / "jan.jsonl", [f"january note {i}" for i in range(600)])
    _jsonl(tmp_path / "feb.jsonl", [f"february note {i}" for i in range(900)])
    config = load_site_config(_site_yaml(tmp_path, "    - {name: jan, path: jan.jsonl, epsilon: 2.0}\n"
                                                   "    - {name: feb, path: feb.jsonl}\n"), check_files=False)
    assert cohort_budgets(config) == (CohortBudget("jan", 2.0, 1e-3), CohortBudget("feb", 4.0, 1e-3))
    data = load_site_records(config)
    assert isinstance(data, CohortedRecords) and data.names() == ("jan", "feb") and data.count("feb") == 900
    # Each cohort's δ is below 1/(its own records): 1e-3 is not, for a cohort of 1200.
    _jsonl(tmp_path / "feb.jsonl", [f"february note {i}" for i in range(1200)])
    with pytest.raises(ConfigError, match="budget.delta"):
        load_site_records(config)
    # A record in two cohorts would be charged by both: refused at start.
    _jsonl(tmp_path / "feb.jsonl", [f"february note {i}" for i in range(899)] + ["january note 7"])
    with pytest.raises(ConfigError, match="data.cohorts"):
        load_site_records(config)
    for bad, field in (("    - {name: '../x', path: jan.jsonl}\n", r"data.cohorts\[0\].name"),
                       ("    - {name: a, path: jan.jsonl}\n    - {name: a, path: feb.jsonl}\n",
                        r"data.cohorts\[1\].name"),
                       ("    - {name: a, path: jan.jsonl, epsilon: -1}\n", r"data.cohorts\[0\].epsilon"),
                       ("    - {name: a, path: missing.jsonl}\n", r"data.cohorts\[0\].path")):
        with pytest.raises(ConfigError, match=field):
            load_site_config(_site_yaml(tmp_path, bad), check_files="missing" in bad)


def test_the_server_keeps_scheduling_a_site_with_cohort_budgets_past_its_whole_site_epsilon(
        tmp_path: Path, tiny_cfg: FedtuneConfig) -> None:
    """Its whole-site ε only bounds its cohorts' from above; the site refuses when all are spent."""
    from fedtune.federation.membership import SiteInfo
    from fedtune.federation.scheduling import affordable

    rc = round_config(tiny_cfg, 2, "0" * 64)
    ledger = PrivacyLedger(tmp_path / "server.sqlite")
    ledger.charge("a", rc.charge())
    ledger.charge("b", rc.charge())
    one = ledger.epsilon("a", DELTA)
    sites = [SiteInfo(1, "a", one * 1.2, DELTA), SiteInfo(2, "b", one * 1.2, DELTA, per_cohort_budget=True)]
    assert [s.name for s in affordable(sites, rc, ledger)] == ["b"]
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    reply = site.describe(Message(RecordDict(), dst_node_id=7, message_type=protocol.DESCRIBE),
                          _settings(tiny_cfg, (CohortBudget("jan", 1.0, DELTA),)))
    assert reply.content[protocol.SITE]["per_cohort_budget"] is True
