"""Real deployments: `fedtune server` / `fedtune client` processes on 127.0.0.1 only.

Each test starts the commands a user runs (Flower SuperLink with TLS and node
authentication, SuperNodes with enrolment kits), stops or kills them by process id, and
is bounded in time.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fedtune.checkpoint import load_checkpoint
from fedtune.deploy.processes import flower_env
from fedtune.privacy.ledger import PrivacyLedger

from localhost import LocalFederation, free_port

pytestmark = pytest.mark.slow

# Small rounds: 3 DP-SGD steps on the tiny model; dead sites are given up after 40 s.
SERVER_ARGS = ("train.local_steps=3", "privacy.sample_rate=0.05", "data.demo_records=1200", "federation.round_timeout_s=40",
               "federation.wait_for_sites_s=90")


def _site_ledger(fed: LocalFederation, site_id: str) -> PrivacyLedger:
    return PrivacyLedger(fed.kit(site_id) / "ledger.sqlite")


def _charges(fed: LocalFederation, site_id: str) -> int:
    path = fed.kit(site_id) / "ledger.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as conn:
        try:
            return int(conn.execute("SELECT COUNT(*) FROM charges WHERE site = ?", (site_id,)).fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def _run_to_exit(command: list[str], log_path: Path, timeout_s: float = 120) -> tuple[int, str]:
    """Run a Flower process to its exit (output to a file: its children may hold pipes open)."""
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=flower_env(),
                                   start_new_session=True)
    try:
        code = process.wait(timeout=timeout_s)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return code, log_path.read_text(errors="replace")


@pytest.fixture
def federation(tmp_path: Path):
    created: list[LocalFederation] = []

    def make(site_ids: list[str]) -> LocalFederation:
        fed = LocalFederation(tmp_path / "fed", site_ids)
        fed.init()
        created.append(fed)
        return fed

    yield make
    for fed in created:
        fed.stop_all()


def test_three_sites_tls_auth_dp_secagg_and_a_site_pinned_to_another_version(federation) -> None:
    fed = federation(["hosp-a", "hosp-b", "hosp-c", "hosp-old"])
    # Four nodes connect; hosp-old pins a fedtune version the run does not have and must refuse.
    fed.start_server("federation.num_sites=4", "federation.num_rounds=2", *SERVER_ARGS)
    for site in ("hosp-a", "hosp-b", "hosp-c"):
        fed.start_site(site)
    fed.start_site("hosp-old", "app.version=0.0.1")
    assert fed.server is not None
    fed.server.wait(timeout=420)
    assert fed.server.returncode == 0, fed.tail("server", 80)

    run = fed.run_dir
    for name in ("metrics.jsonl", "privacy_report.json", "privacy_report.md", "summary.json", "rounds.png",
                 "config.yaml", "adapters/round_001", "adapters/round_002", "checkpoint"):
        assert (run / name).exists(), name
    rows = fed.metrics()
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["participants"] == ["hosp-a", "hosp-b", "hosp-c"]
        assert row["quantization_error_bound"] > 0  # secure aggregation was on
        assert row["max_epsilon"] > 0
    assert rows[-1]["eval_loss"] < json.loads((run / "summary.json").read_text())["initial_eval_loss"]

    # The refusal is in the pinned site's own log, and no code of the run was loaded there.
    assert "REFUSED" in fed.tail("hosp-old", 200) and "0.0.1" in fed.tail("hosp-old", 200)
    assert _charges(fed, "hosp-old") == 0
    # The server's report agrees with each site's own ledger.
    report = json.loads((run / "privacy_report.json").read_text())["sites"]
    assert set(report) == {"hosp-a", "hosp-b", "hosp-c"}
    for site in ("hosp-a", "hosp-b", "hosp-c"):
        assert report[site]["epsilon"] == pytest.approx(_site_ledger(fed, site).epsilon(site, 1e-5), rel=1e-9)
    # The server's ledger is the federation's (every run of it counts), not the run's.
    federation_ledger = PrivacyLedger(fed.root / "operator" / "server_ledger.sqlite")
    assert len(federation_ledger.history("hosp-a")) == 2 and not (run / "server_ledger.sqlite").exists()
    assert federation_ledger.runs("hosp-a") == [json.loads((run / "privacy_report.json").read_text())["run"]]
    # The SuperLink ran with TLS, node authentication and runtime installs off.
    log = (fed.root / "superlink" / "superlink.log").read_text()
    assert "https://127.0.0.1" in log
    _assert_server_state_is_owner_only(fed)


def _assert_server_state_is_owner_only(fed: LocalFederation) -> None:
    """The SuperLink's database (plain-mode updates), flwr-home, the run and the operator's files: 0600/0700.

    And no site's private key was made by the operator: each enrolled the key its own keygen wrote.
    """
    from fedtune.deploy.federation import load_federation

    assert (fed.root / "superlink" / "state.db").is_file()
    for top in (fed.root / "operator", fed.root / "superlink", fed.run_dir):
        for path in [top, *top.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            if path.is_symlink() or path.suffix == ".crt":
                continue  # certificates may stay readable
            assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    _, enrolled = load_federation(fed.root)
    assert enrolled.sites and not any(s.operator_holds_key for s in enrolled.sites)


def test_unknown_key_plain_text_and_control_api_from_the_site_side_are_refused(federation, tmp_path: Path) -> None:
    from fedtune.deploy.federation import load_federation
    from fedtune.deploy.operator import SuperLink
    from fedtune.deploy.pki import node_auth_keypair, write_public, write_secret

    fed = federation(["hosp-a"])
    paths, fed_cfg = load_federation(fed.root)
    superlink = SuperLink(paths, fed_cfg)
    superlink.start()
    try:
        superlink.register_sites()
        # A key the operator never enrolled.
        private, public = node_auth_keypair()
        write_secret(tmp_path / "rogue.key", private)
        write_public(tmp_path / "rogue.pub", public)
        base = ["flower-supernode", "--superlink", f"127.0.0.1:{fed.port}", "--max-retries", "2",
                "--max-wait-time", "20", "--port", str(free_port())]
        rogue_code, rogue_out = _run_to_exit([*base, "--root-certificates", str(fed.kit("hosp-a") / "ca.crt"),
                                              "--auth-supernode-private-key", str(tmp_path / "rogue.key")],
                                             tmp_path / "rogue.log")
        assert rogue_code != 0, rogue_out
        # Plain text against the TLS-only SuperLink: a SuperNode without TLS, and a raw HTTP request.
        plain_code, plain_out = _run_to_exit([*base, "--insecure"], tmp_path / "plain.log")
        assert plain_code != 0, plain_out
        import httpx

        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{fed.port}/", timeout=10)
        # The sites' port exposes the Fleet API only: the Control API (enrol keys, submit runs) is not there,
        # even over valid TLS.
        ca = str(fed.kit("hosp-a") / "ca.crt")
        assert httpx.post(f"https://127.0.0.1:{fed.port}/v1/control/list-runs", verify=ca, content=b"",
                          timeout=10).status_code == 404
        assert httpx.post(f"https://127.0.0.1:{fed.port}/v1/runtime/acquire-task", verify=ca, content=b"",
                          timeout=10).status_code == 404
    finally:
        superlink.stop()
    server_log = superlink.log_path.read_text()
    # The SuperLink logged the refused node key (HTTP 412 / unregistered node) ...
    assert "412" in server_log or "not registered" in server_log.lower() or "unauthenticated" in server_log.lower(), \
        server_log[-3000:]
    # ... and the rogue SuperNode saw a refusal, not a success.
    assert "Failed to activate SuperNode" in rogue_out, rogue_out
    assert "Failed to" in plain_out or "could not establish" in plain_out, plain_out


def test_killed_site_is_dropped_resumes_with_its_ledger_and_an_exhausted_site_stays_idle(federation) -> None:
    fed = federation(["hosp-a", "hosp-b", "hosp-c", "hosp-d"])
    # hosp-d's own budget fits two rounds of (σ=0.8, q=0.05, 3 steps) but not three.
    fed.start_server("federation.num_sites=4", "federation.num_rounds=3", "privacy.noise_multiplier=0.8",
                     *SERVER_ARGS)
    for site in ("hosp-a", "hosp-b", "hosp-c"):
        fed.start_site(site)
    fed.start_site("hosp-d", "budget.epsilon=3.4")

    # Kill hosp-c during round 2, once its round-2 charge is on its ledger (its update may leave).
    fed.wait_until(lambda: _charges(fed, "hosp-c") >= 2, 300, "hosp-c to be charged for round 2")
    fed.kill(fed.sites["hosp-c"], signal.SIGKILL)
    charges_at_kill = _charges(fed, "hosp-c")
    assert fed.sites["hosp-c"].poll() is not None
    # It comes straight back: same enrolment key, same ledger, charges intact.
    fed.start_site("hosp-c")
    fed.wait_until(lambda: len(fed.metrics()) >= 2, 300, "round 2 to complete without hosp-c")
    round2 = fed.metrics()[1]
    assert "hosp-c" in round2["failures"] or "hosp-c" in round2["participants"], round2
    assert _charges(fed, "hosp-c") == charges_at_kill
    assert fed.server is not None
    fed.server.wait(timeout=420)
    assert fed.server.returncode == 0, fed.tail("server", 80)

    rows = fed.metrics()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["participants"] == ["hosp-a", "hosp-b", "hosp-c", "hosp-d"]
    assert rows[2]["participants"] == ["hosp-a", "hosp-b", "hosp-c"]  # hosp-c is back; hosp-d is out of budget
    assert fed.sites["hosp-d"].poll() is None  # ... but still connected
    assert _charges(fed, "hosp-d") == 2
    assert "not scheduling hosp-d" in fed.tail("server", 400)
    assert "hosp-c is back" in fed.tail("server", 400)  # asked again before round 3, not dropped for good
    assert _charges(fed, "hosp-c") == charges_at_kill + 1  # round 3, trained after the restart

    # Every site's own ledger agrees with the server's privacy report.
    report = json.loads((fed.run_dir / "privacy_report.json").read_text())["sites"]
    for site in ("hosp-a", "hosp-b", "hosp-c", "hosp-d"):
        assert report[site]["epsilon"] == pytest.approx(_site_ledger(fed, site).epsilon(site, 1e-5), rel=1e-9), site
    assert report["hosp-d"]["epsilon"] <= 3.4


def _version_dir(fed: LocalFederation, name: str) -> Path:
    return fed.run_dir / "versions" / name


def _records(fed: LocalFederation, name: str) -> list[dict]:
    rounds = sorted((_version_dir(fed, name) / "adapters").iterdir())
    return [json.loads((d / "adapter_record.json").read_text()) for d in rounds]


def test_server_killed_mid_version_resumes_and_three_versions_chain_across_server_restarts(federation) -> None:
    from fedtune.governance import record_hash

    fed = federation(["hosp-a", "hosp-b", "hosp-c"])
    # A fixed σ: a calibrated one spends the whole budget in the first version.
    args = ("federation.num_sites=3", "versions.enabled=true", "privacy.noise_multiplier=1.0", *SERVER_ARGS)
    fed.start_server(*args, "federation.num_rounds=2")
    for site in ("hosp-a", "hosp-b", "hosp-c"):
        fed.start_site(site)
    checkpoint = _version_dir(fed, "v0001") / "checkpoint"
    fed.wait_until(lambda: load_checkpoint(checkpoint) is not None, 300, "the round-1 checkpoint")
    assert fed.server is not None
    fed.kill(fed.server, signal.SIGKILL)  # the SuperLink and its ServerApp go with it
    done, saved = load_checkpoint(checkpoint)  # type: ignore[misc]
    assert done == 1
    time.sleep(1.0)

    fed.start_server(*args, "federation.num_rounds=2")
    fed.server.wait(timeout=420)
    assert fed.server.returncode == 0, fed.tail("server", 80)
    log = fed.tail("server", 400)
    assert "resuming the unfinished version v0001" in log and "resuming from the checkpoint of round 1" in log
    rows = [json.loads(line) for line in (_version_dir(fed, "v0001") / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    # Every site reconnected to the new SuperLink and took part in round 2.
    assert rows[-1]["participants"] == ["hosp-a", "hosp-b", "hosp-c"], fed.tail("server", 80)
    # Round 2 started from the checkpointed adapter: the round-1 adapter on disk is that state.
    from safetensors.numpy import load_file

    round1 = load_file(str(_version_dir(fed, "v0001") / "adapters" / "round_001" / "adapter_model.safetensors"))
    assert set(saved) == set(round1)  # one artefact: the checkpoint is peft-keyed like every round's adapter
    for name, value in saved.items():
        np.testing.assert_array_equal(round1[name], value)

    # Two more versions, a server started afresh for each: each from its parent, rounds numbered on.
    for _ in range(2):
        fed.start_server(*args, "federation.num_rounds=1")
        fed.server.wait(timeout=420)
        assert fed.server.returncode == 0, fed.tail("server", 80)
    infos = [json.loads((_version_dir(fed, v) / "version.json").read_text()) for v in ("v0001", "v0002", "v0003")]
    assert [i["parent_name"] for i in infos] == [None, "v0001", "v0002"]
    assert [(i["first_round"], i["last_round"]) for i in infos] == [(1, 2), (3, 3), (4, 4)]
    assert all(i["finished"] for i in infos)
    chain = [r for v in ("v0001", "v0002", "v0003") for r in _records(fed, v)]
    assert [r["round"] for r in chain] == [1, 2, 3, 4] and chain[0]["parent"] is None
    for parent, child in zip(chain, chain[1:]):
        assert child["parent"] == record_hash(parent)
    # The federation's ledger covers every version, and agrees with each site's own.
    report = json.loads((_version_dir(fed, "v0003") / "privacy_report.json").read_text())["sites"]
    federation_ledger = PrivacyLedger(fed.root / "operator" / "server_ledger.sqlite")
    for site in ("hosp-a", "hosp-b", "hosp-c"):
        assert len(federation_ledger.history(site)) == 4 == _charges(fed, site)
        assert report[site]["epsilon"] == pytest.approx(_site_ledger(fed, site).epsilon(site, 1e-5), rel=1e-9)
