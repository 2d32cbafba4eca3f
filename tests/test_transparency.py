"""The transparency record: a site's chosen disclosure, commitments, cards, and `fedtune record verify`."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedtune import governance
from fedtune.apps import make_client_app
from fedtune.cli import main as fedtune_main
from fedtune.config import FedtuneConfig
from fedtune.deploy.site_config import CohortSource
from fedtune.federation import protocol
from fedtune.federation.membership import SiteInfo
from fedtune.federation.server import run_server
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.transparency.card import render_card
from fedtune.transparency.content import round_content
from fedtune.transparency.disclosure import read_disclosure
from fedtune.transparency.verify import verify

from conftest import InProcessGrid
from site_attack import PLANTED, HostileServer, outcome, reply_text, write_site

PIECES = (PLANTED, "7731-PLANT", "porphyria", "Quartermain")


def _leaks(text: str) -> bool:
    return any(piece in text for piece in PIECES)


def _disclosing_site(tmp_path: Path):  # type: ignore[no-untyped-def]
    site = write_site(tmp_path / "hosp-a")
    (tmp_path / "hosp-a" / "feb.jsonl").write_text("".join(json.dumps({"text": f"February ward note {i}."}) + "\n"
                                                           for i in range(30)))
    site.data.cohorts = [CohortSource(name="2026-01", path="data.jsonl", period="2026-01"),
                         CohortSource(name="2026-02", path="feb.jsonl", period="2026-02", epsilon=5.0)]
    site.manifest.name, site.manifest.licence = "Cardiology discharge notes", "internal research use"
    site.manifest.provenance = "the ward's own EHR export (not disclosed)"
    site.manifest.deidentification = "names and MRNs replaced by the hospital's tool"
    site.manifest.disclose = ["name", "licence", "deidentification", "cohorts"]
    return site


def test_a_site_discloses_what_it_chooses_and_commits_to_each_cohort_without_a_record(tmp_path: Path) -> None:
    site = _disclosing_site(tmp_path)
    server = HostileServer(site)
    described = server.send({}, protocol.DESCRIBE)
    assert outcome(server.train(1)) == "ok"
    assert server.leaked() == []
    disclosure = read_disclosure("hosp-a", described.content[protocol.SITE]["disclosure"])
    assert disclosure["manifest"] == {"name": "Cardiology discharge notes", "licence": "internal research use",
                                      "deidentification": "names and MRNs replaced by the hospital's tool"}
    assert "not disclosed" not in reply_text(described)  # provenance is set but not chosen
    key_path = site.resolve(site.commitment_key)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    for cohort, path in zip(disclosure["cohorts"], ("data.jsonl", "feb.jsonl")):
        expected = hmac.new(key_path.read_bytes(), site.resolve(path).read_bytes(), hashlib.sha256).hexdigest()
        assert cohort["commitment"] == expected
    assert [(c["name"], c["period"], c["records"], c["budget_epsilon"]) for c in disclosure["cohorts"]] == [
        ("2026-01", "2026-01", 40, 20.0), ("2026-02", "2026-02", 30, 5.0)]
    # What reaches a record and a card: the disclosure, the server's ε, no record text.
    info = SiteInfo(7, "hosp-a", 20.0, 1e-4, per_cohort_budget=True, disclosure=disclosure)
    content = round_content(PrivacyLedger(tmp_path / "server.sqlite"), [info], private=True)
    record = {"round": 1, "parent": None, "sites": ["hosp-a"], **content}
    card = render_card(record, governance.record_hash(record), None)
    assert "Cardiology discharge notes" in card and disclosure["cohorts"][1]["commitment"] in card
    assert not _leaks(card + json.dumps(record))


@pytest.mark.parametrize("garbage", [
    7, b"{}", "not json", "[]", json.dumps({"manifest": {}, "extra": 1}), json.dumps({"manifest": {"owner": "x"}}),
    json.dumps({"manifest": {"name": "x" * 501}}), json.dumps({"manifest": {"name": "a\x00b"}}),
    json.dumps({"manifest": {"name": 5}}), json.dumps({"cohorts": {"name": "a"}}),
    json.dumps({"cohorts": [{"name": "a"}]}), json.dumps({"cohorts": [{"name": "a", "commitment": "g" * 64}]}),
    json.dumps({"cohorts": [{"name": "a", "commitment": "a" * 64, "records": -1}]}),
    json.dumps({"cohorts": [{"name": "a", "commitment": "a" * 64, "records": True}]}),
    json.dumps({"cohorts": [{"name": "a", "commitment": "a" * 64, "epsilon": -2}]}),
    json.dumps({"cohorts": [{"name": "a", "commitment": "a" * 64, "url": "x"}]}),
    json.dumps({"manifest": {"name": "x" * 400}, "cohorts": [{"name": "a", "commitment": "a" * 64}] * 1001}),
])
def test_the_server_drops_a_malformed_disclosure(garbage: object, caplog: pytest.LogCaptureFixture) -> None:
    assert read_disclosure("hosp-x", garbage) == {}
    assert "hosp-x sent a malformed data disclosure" in caplog.text


def test_a_well_formed_disclosure_is_read_as_sent() -> None:
    sent = {"manifest": {"licence": "CC-BY-4.0"},
            "cohorts": [{"name": "q1", "period": None, "records": 12, "commitment": "ab" * 32, "epsilon": 1.5,
                         "delta": 1e-5, "budget_epsilon": 4.0}]}
    assert read_disclosure("s", json.dumps(sent)) == sent
    assert read_disclosure("s", None) == {}


def _planted_run(cfg: FedtuneConfig, tmp_path: Path) -> Path:
    lines = [json.dumps({"text": f"Routine cardiology note number {i}: blood pressure stable."}) for i in range(230)]
    lines += [json.dumps({"text": f"{PLANTED} (copy {i})"}) for i in range(10)]
    (tmp_path / "planted.jsonl").write_text("\n".join(lines) + "\n")
    cfg.data.path = str(tmp_path / "planted.jsonl")
    cfg.data.partition = "iid"
    run_dir = Path(cfg.run_dir)
    run_server(InProcessGrid(make_client_app(cfg), cfg.federation.num_sites), cfg, run_dir, show_progress=False)
    return run_dir


def test_no_record_card_or_log_line_carries_record_text_and_verify_detects_tampering(
        tiny_cfg: FedtuneConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    run_dir = _planted_run(tiny_cfg, tmp_path)
    assert not [r.getMessage() for r in caplog.records if _leaks(r.getMessage())]
    server_files = [p for p in run_dir.rglob("*") if p.is_file() and "sites" not in p.relative_to(run_dir).parts]
    assert any(p.name == "ADAPTER_CARD.md" for p in server_files)
    assert not [p for p in server_files if _leaks(p.read_bytes().decode("latin-1"))]

    fedtune_main(["record", "verify", str(run_dir)])
    assert "ok: 2 record(s)" in capsys.readouterr().out
    rounds = run_dir / "adapters"

    def tampered(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        return copy

    weights = tampered("weights") / "adapters" / "round_001" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + np.float32(1e-3)
    save_file(tensors, str(weights))
    assert any("weights_sha256" in p for p in verify(weights.parents[2])[1])

    # A rewritten parent: round 1's record says another site trained; round 2 no longer finds it.
    rewritten = tampered("parent")
    record_path = rewritten / "adapters" / "round_001" / governance.RECORD_FILE
    record = json.loads(record_path.read_text())
    record["sites"] = ["site-00"]
    record_path.write_text(governance.record_text(record))
    assert any("rewritten parent" in p for p in verify(rewritten)[1])
    # ... and re-pointing round 2 at it changes round 2's hash, which the checkpoint anchors.
    second_path = rewritten / "adapters" / "round_002" / governance.RECORD_FILE
    second = json.loads(second_path.read_text())
    second["parent"] = governance.record_hash(record)
    second_path.write_text(governance.record_text(second))
    problems = verify(rewritten)[1]
    assert any("rewritten latest record" in p for p in problems)
    assert not any("rewritten parent" in p for p in problems)
    with pytest.raises(SystemExit) as failed:
        fedtune_main(["record", "verify", str(rewritten)])
    assert failed.value.code == 1 and "FAILED" in capsys.readouterr().out
    assert rounds.is_dir()


class _DescribeGrid:
    """Nodes that answer `describe` with the given site records (what a hostile or broken site may send)."""

    def __init__(self, infos: list[dict]) -> None:
        self.infos = infos

    def send_and_receive(self, messages, timeout=None):  # type: ignore[no-untyped-def]
        from flwr.app import ConfigRecord, Message, RecordDict

        replies = []
        for msg, info in zip(messages, self.infos):
            msg.metadata.__dict__["_message_id"] = msg.object_id
            replies.append(Message(RecordDict({protocol.SITE: ConfigRecord(info)}), reply_to=msg))
        return replies


def test_the_server_reads_a_sites_cohort_flag_and_disclosure_strictly() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.federation.membership import discover_sites

    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
    good = json.dumps({"manifest": {"licence": "CC0"}})
    base = {"budget_epsilon": 8.0, "delta": 1e-5, "require_privacy": True}
    infos = [{**base, "site": "a", "per_cohort_budget": True, "disclosure": good},
             {**base, "site": "b", "per_cohort_budget": "yes", "disclosure": "{\"manifest\": [1]}"},
             {**base, "site": "c", "per_cohort_budget": 1, "disclosure": "x" * 70000}]
    grid = _DescribeGrid(infos)
    sites = {s.name: s for s in discover_sites(grid, [1, 2, 3], timeout_s=1.0)}  # type: ignore[arg-type]
    assert sites["a"].per_cohort_budget and sites["a"].disclosure == {"manifest": {"licence": "CC0"}}
    assert not sites["b"].per_cohort_budget and sites["b"].disclosure == {}
    assert not sites["c"].per_cohort_budget and sites["c"].disclosure == {}
