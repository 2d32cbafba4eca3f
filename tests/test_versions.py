"""Continuous fine-tuning: versions in a row, each from its parent, one ledger, and the regression gate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedtune import governance
from fedtune.apps import make_client_app
from fedtune.checkpoint import checkpoint_record
from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.federation import gate, lineage
from fedtune.federation.server import run_server
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.validation import validate

from conftest import InProcessGrid


def _version(cfg: FedtuneConfig, root: Path) -> dict:
    """One `fedtune server` run on the federation root (a fresh grid: the server restarted)."""
    grid = InProcessGrid(make_client_app(cfg), cfg.federation.num_sites)
    run_server(grid, cfg, root, show_progress=False)
    latest = lineage.list_versions(root)[-1]
    return lineage.read_version(root / lineage.VERSIONS_DIR / lineage.version_name(latest))


def _records(root: Path, name: str) -> list[dict]:
    folder = root / lineage.VERSIONS_DIR / name / "adapters"
    return [json.loads((d / governance.RECORD_FILE).read_text()) for d in sorted(folder.iterdir())]


def test_three_versions_in_a_row_each_from_its_parent_with_one_ledger(tiny_cfg: FedtuneConfig) -> None:
    root = Path(tiny_cfg.run_dir)
    tiny_cfg.versions.enabled = True
    tiny_cfg.federation.num_rounds = 1
    infos = [_version(tiny_cfg, root) for _ in range(3)]
    assert [i["version"] for i in infos] == ["v0001", "v0002", "v0003"]
    assert [i["parent_name"] for i in infos] == [None, "v0001", "v0002"]
    assert [(i["first_round"], i["last_round"]) for i in infos] == [(1, 1), (2, 2), (3, 3)]
    assert all(i["finished"] and i["promoted"] for i in infos), [i["gate_reason"] for i in infos]
    assert (root / lineage.VERSIONS_DIR / lineage.CURRENT_FILE).read_text().strip() == "v0003"
    # Each version starts from its parent's adapter: its starting loss is the parent's final one.
    for parent, child in zip(infos, infos[1:]):
        assert child["start_eval_loss"] == pytest.approx(parent["eval_loss"], rel=1e-6)
    # The records chain across versions, and each names its version and parent.
    chain = [r for name in ("v0001", "v0002", "v0003") for r in _records(root, name)]
    assert chain[0]["parent"] is None
    for parent, child in zip(chain, chain[1:]):
        assert child["parent"] == governance.record_hash(parent)
    assert [r["version"] for r in chain] == [{"name": "v0001", "parent": None}, {"name": "v0002", "parent": "v0001"},
                                              {"name": "v0003", "parent": "v0002"}]
    # One server ledger in the root covers every version: three runs, three rounds per site.
    ledger = PrivacyLedger(root / "server_ledger.sqlite")
    assert len(ledger.runs()) == 3 and len(ledger.history("site-00")) == 3
    report = json.loads((root / lineage.VERSIONS_DIR / "v0003" / "privacy_report.json").read_text())
    assert report["runs"] == ledger.runs() and report["sites"]["site-00"]["rounds"] == 3
    assert json.loads((root / "summary.json").read_text())["version"] == "v0003"


def test_the_gate_keeps_a_worse_version_unpromoted_and_the_next_starts_from_current(tiny_cfg: FedtuneConfig) -> None:
    root = Path(tiny_cfg.run_dir)
    tiny_cfg.versions.enabled = True
    tiny_cfg.federation.num_rounds = 1
    first = _version(tiny_cfg, root)
    tiny_cfg.train.learning_rate = 5.0  # Adam at 5: the adapter jumps, the held-out loss rises
    worse = _version(tiny_cfg, root)
    assert worse["eval_loss"] > worse["start_eval_loss"]
    assert not worse["promoted"] and "worse than the parent's" in worse["gate_reason"]
    assert (root / lineage.VERSIONS_DIR / lineage.CURRENT_FILE).read_text().strip() == "v0001"
    assert (root / lineage.VERSIONS_DIR / "v0002" / "checkpoint").is_dir()  # kept, not deleted
    tiny_cfg.train.learning_rate = None
    third = _version(tiny_cfg, root)
    assert third["parent_name"] == "v0001" and third["first_round"] == 3
    assert third["start_eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
    v3_first = _records(root, "v0003")[0]
    assert v3_first["parent"] == governance.record_hash(checkpoint_record(root / "versions" / "v0001" / "checkpoint"))


def test_gate_decisions() -> None:
    assert gate.decide(1.0, 1.1, 0.0, True, 1).promoted
    assert gate.decide(1.05, 1.0, 0.1, True, 1).promoted
    assert not gate.decide(1.2, 1.0, 0.1, True, 1).promoted
    assert not gate.decide(None, 1.0, 0.1, True, 1).promoted
    assert not gate.decide(math.nan, 1.0, 0.1, True, 1).promoted
    assert not gate.decide(1.0, 2.0, 0.1, True, 0).promoted  # nothing trained
    assert gate.decide(None, None, 0.0, False, 1).promoted  # the first version


def test_gate_tolerance_is_validated(tiny_cfg: FedtuneConfig) -> None:
    for bad in (-0.1, math.inf, math.nan):
        tiny_cfg.versions.gate_tolerance = bad
        with pytest.raises(ConfigError, match="versions.gate_tolerance"):
            validate(tiny_cfg)


def test_a_schedule_starts_versions_start_to_start_and_stops_on_a_failure(tiny_cfg: FedtuneConfig) -> None:
    import threading

    from fedtune.deploy.schedule import run_on_schedule

    now = [0.0]
    starts: list[float] = []
    waited: list[float] = []

    class Clock(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waited.append(float(timeout or 0))
            now[0] += float(timeout or 0)
            return False

    def serve() -> int:
        starts.append(now[0])
        now[0] += 600.0  # a version takes ten minutes
        return 0

    assert run_on_schedule(serve, 1.0, stop=Clock(), max_versions=3, clock=lambda: now[0]) == 0
    assert starts == [0.0, 3600.0, 7200.0] and waited == [3000.0, 3000.0]
    assert run_on_schedule(lambda: 3, 1.0, stop=Clock(), clock=lambda: now[0]) == 3
    tiny_cfg.versions.every_hours = 24.0
    with pytest.raises(ConfigError, match="versions.every_hours"):
        validate(tiny_cfg)  # a schedule of versions needs versions.enabled
    tiny_cfg.versions.enabled = True
    validate(tiny_cfg)
