from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from fedtune import adapters
from fedtune.apps import make_client_app
from fedtune.checkpoint import load_checkpoint, peft_key_map
from fedtune.config import FedtuneConfig
from fedtune.federation import protocol
from fedtune.federation.server import round_config, run_server
from fedtune.models import build_fingerprinted_model
from fedtune.privacy.accounting import Charge, epsilon
from fedtune.privacy.ledger import PrivacyLedger

from conftest import InProcessGrid


def _key_map(cfg: FedtuneConfig) -> dict[str, str]:
    """The model's parameter names -> the checkpoint's peft keys."""
    return peft_key_map(build_fingerprinted_model(cfg.model).model)


def _rounds_epsilon(cfg: FedtuneConfig, rounds: int = 1) -> float:
    rc = round_config(cfg, 1, "0" * 64)
    charges = [Charge(r, rc.noise_multiplier, rc.sample_rate, rc.local_steps) for r in range(rounds)]
    return epsilon(charges, cfg.privacy.delta)


def test_round_loop_writes_outputs(tiny_cfg: FedtuneConfig) -> None:
    grid = InProcessGrid(make_client_app(tiny_cfg), 3)
    summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    run = Path(tiny_cfg.run_dir)
    assert summary.rounds_completed == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for key in ("participants", "refusals", "train_loss", "eval_loss", "eval_perplexity", "max_epsilon"):
        assert key in rows[0]
    assert rows[0]["participants"] == ["site-00", "site-01", "site-02"]
    assert rows[0]["train_loss"] is None  # private sites do not send their un-noised train loss
    assert (run / "adapters" / "round_002" / "adapter_model.safetensors").is_file()
    report = json.loads((run / "privacy_report.json").read_text())
    server_ledger = PrivacyLedger(run / "server_ledger.sqlite")
    for name, entry in report["sites"].items():
        site_ledger = PrivacyLedger(run / "sites" / name / "ledger.sqlite")
        # The server's own accounting agrees with what each site charged itself.
        assert entry["epsilon"] == site_ledger.epsilon(name, tiny_cfg.privacy.delta)
        assert server_ledger.history(name) == site_ledger.history(name)
        assert entry["rounds"] == 2 and entry["steps"] == 2 * tiny_cfg.train.local_steps
    assert load_checkpoint(run / "checkpoint")[0] == 2
    assert summary.failure is None and summary.rounds_aggregated == 2
    written = json.loads((run / "summary.json").read_text())
    assert written["failed"] is None and written["rounds_aggregated"] == 2


def test_exhausted_sites_are_not_scheduled_and_run_ends(tiny_cfg: FedtuneConfig, caplog) -> None:
    tiny_cfg.federation.num_rounds = 4
    # one round fits, two do not
    tiny_cfg.privacy.target_epsilon = (_rounds_epsilon(tiny_cfg, 1) + _rounds_epsilon(tiny_cfg, 2)) / 2
    grid = InProcessGrid(make_client_app(tiny_cfg), 3)
    with caplog.at_level(logging.INFO, logger="fedtune"):
        summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    assert summary.rounds_completed == 1
    assert "no site has privacy budget left for round 2" in summary.stop_reason
    train_messages = [m for m in grid.sent if m.metadata.message_type == protocol.TRAIN]
    assert len(train_messages) == 3  # only round 1 was ever sent
    assert "not scheduling site-00" in caplog.text
    assert summary.failure is None  # it trained a round before the budget ran out


def test_budget_too_small_for_one_round_releases_nothing(tiny_cfg: FedtuneConfig) -> None:
    tiny_cfg.privacy.target_epsilon = _rounds_epsilon(tiny_cfg) * 0.5
    grid = InProcessGrid(make_client_app(tiny_cfg), 3)
    summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    assert summary.rounds_completed == 0
    assert "round 1" in summary.stop_reason and "privacy.target_epsilon" in summary.stop_reason
    run = Path(tiny_cfg.run_dir)
    assert not (run / "adapters").exists()
    assert not (run / "sites").exists()  # no site was ever asked to train
    assert json.loads((run / "privacy_report.json").read_text())["sites"]["site-00"]["rounds"] == 0
    # Training nothing is a failure, and the summary says why.
    assert summary.failure == summary.stop_reason
    assert json.loads((run / "summary.json").read_text())["failed"] == summary.stop_reason


def test_a_run_whose_every_round_is_abandoned_failed(tiny_cfg: FedtuneConfig) -> None:
    tiny_cfg.federation.num_rounds = 2
    grid = InProcessGrid(make_client_app(tiny_cfg), 3, drop={100, 101, 102})
    summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), wait_timeout_s=0.5, show_progress=False)
    assert summary.rounds_aggregated == 0 and summary.failure is not None
    assert summary.failure == "every one of the 2 round(s) was abandoned: no usable sum of updates"
    assert json.loads((Path(tiny_cfg.run_dir) / "summary.json").read_text())["failed"] == summary.failure


def test_no_site_connected_is_a_failure_with_a_summary(tiny_cfg: FedtuneConfig) -> None:
    grid = InProcessGrid(make_client_app(tiny_cfg), 0)
    summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), wait_timeout_s=0.2, show_progress=False)
    assert summary.failure == "no site connected"
    written = json.loads((Path(tiny_cfg.run_dir) / "summary.json").read_text())
    assert written["failed"] == "no site connected" and written["rounds_completed"] == 0


def test_silent_site_is_charged_by_the_server(tiny_cfg: FedtuneConfig) -> None:
    tiny_cfg.federation.num_rounds = 1
    grid = InProcessGrid(make_client_app(tiny_cfg), 3, drop={101})
    summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    assert summary.rows[0]["failures"] == ["site-01"]
    assert summary.rows[0]["participants"] == ["site-00", "site-02"]
    assert len(PrivacyLedger(Path(tiny_cfg.run_dir) / "server_ledger.sqlite").history("site-01")) == 1


class CorruptingApp:
    """Wraps the real ClientApp and spoils one site's update in a chosen way."""

    def __init__(self, app, node: int, how: str) -> None:
        self.app, self.node, self.how = app, node, how

    def __call__(self, msg: Message, ctx):
        reply = self.app(msg, ctx)
        if msg.metadata.message_type == protocol.TRAIN and msg.metadata.dst_node_id == self.node:
            state = {n: v.copy() for n, v in adapters.from_array_record(reply.content[protocol.UPDATE]).items()}
            name = sorted(state)[0]
            if self.how == "nan":
                state[name].flat[0] = np.nan
            elif self.how == "shape":
                state[name] = state[name][:1]
            elif self.how == "dtype":
                state = {n: v.astype(np.float64) for n, v in state.items()}
            reply.content[protocol.UPDATE] = adapters.to_array_record(state)
        return reply


def test_malformed_updates_are_rejected_and_logged(tiny_cfg: FedtuneConfig, caplog) -> None:
    tiny_cfg.federation.num_rounds = 1
    for how, words in (("nan", "NaN"), ("shape", "shape"), ("dtype", "dtype")):
        tiny_cfg.run_dir = str(Path(tiny_cfg.run_dir).with_name(f"run-{how}"))
        grid = InProcessGrid(CorruptingApp(make_client_app(tiny_cfg), 102, how), 3)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="fedtune"):
            summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
        assert summary.rows[0]["participants"] == ["site-00", "site-01"]
        assert "rejected the update of site-02" in caplog.text and words in caplog.text


def test_oversized_update_is_rejected(tiny_cfg: FedtuneConfig, caplog) -> None:
    tiny_cfg.federation.num_rounds = 1
    tiny_cfg.federation.max_update_bytes = 1000
    grid = InProcessGrid(make_client_app(tiny_cfg), 3)
    with caplog.at_level(logging.ERROR, logger="fedtune"):
        summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    assert summary.rows[0]["participants"] == []
    assert "exceeds the limit" in caplog.text
    assert not (Path(tiny_cfg.run_dir) / "adapters").exists()


def test_server_resumes_from_checkpoint(tiny_cfg: FedtuneConfig) -> None:
    tiny_cfg.federation.num_rounds = 1
    run_server(InProcessGrid(make_client_app(tiny_cfg), 3), tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    _, after_one = load_checkpoint(Path(tiny_cfg.run_dir) / "checkpoint", _key_map(tiny_cfg))
    tiny_cfg.federation.num_rounds = 2
    grid = InProcessGrid(make_client_app(tiny_cfg), 3)
    summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    assert [r["round"] for r in summary.rows] == [2]
    sent = [m for m in grid.sent if m.metadata.message_type == protocol.TRAIN][0]
    sent_state = adapters.from_array_record(sent.content[protocol.GLOBAL_ADAPTER])
    for name, value in after_one.items():
        np.testing.assert_array_equal(sent_state[name], value)
    assert math.isfinite(summary.rows[0]["eval_loss"])


def test_crash_between_checkpoint_and_metrics_line_is_finished_on_resume(tiny_cfg: FedtuneConfig,
                                                                         monkeypatch) -> None:
    """The evaluation after a checkpoint takes a while; a crash in it must not lose the round's row."""
    from fedtune.federation.run_files import PENDING_ROW
    from fedtune.tasks.causal_lm import CausalLM

    real = CausalLM.evaluate
    calls = []

    def crash_on_round_one(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first call is the baseline, the second follows round 1's checkpoint
            raise KeyboardInterrupt("the server was stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(CausalLM, "evaluate", crash_on_round_one)
    run = Path(tiny_cfg.run_dir)
    with pytest.raises(KeyboardInterrupt):
        run_server(InProcessGrid(make_client_app(tiny_cfg), 3), tiny_cfg, run, show_progress=False)
    assert load_checkpoint(run / "checkpoint")[0] == 1  # type: ignore[index]
    assert not (run / "metrics.jsonl").exists()
    pending = json.loads((run / PENDING_ROW).read_text())
    assert pending["round"] == 1 and pending["participants"] == ["site-00", "site-01", "site-02"]

    monkeypatch.setattr(CausalLM, "evaluate", real)
    summary = run_server(InProcessGrid(make_client_app(tiny_cfg), 3), tiny_cfg, run, show_progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and [r["round"] for r in summary.rows] == [2]
    assert rows[0]["participants"] == ["site-00", "site-01", "site-02"] and rows[0]["round_seconds"] > 0
    # Round 1's line carries the evaluation of round 1's checkpoint: the resumed baseline.
    assert rows[0]["eval_loss"] == pytest.approx(json.loads((run / "summary.json").read_text())["initial_eval_loss"])
    assert not (run / PENDING_ROW).exists()
    assert (run / "adapters" / "round_001" / "adapter_model.safetensors").is_file()


def test_evaluation_of_a_round_runs_while_the_sites_train_the_next(tiny_cfg: FedtuneConfig, monkeypatch) -> None:
    import threading

    from fedtune.tasks.causal_lm import CausalLM

    real = CausalLM.evaluate
    events: list[tuple[str, int]] = []
    first_eval_done = threading.Event()

    def slow_eval(*args, **kwargs):
        result = real(*args, **kwargs)
        if len([e for e in events if e[0] == "eval"]) == 1:  # round 1's evaluation (after the baseline)
            first_eval_done.wait(timeout=30)  # held until round 2's train messages have gone out
        events.append(("eval", threading.get_ident()))
        return result

    class WatchingGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == protocol.TRAIN:
                events.append(("train", threading.get_ident()))
                if len([e for e in events if e[0] == "train"]) == 2:
                    first_eval_done.set()
            return super().send_and_receive(messages, timeout=timeout)

    monkeypatch.setattr(CausalLM, "evaluate", slow_eval)
    summary = run_server(WatchingGrid(make_client_app(tiny_cfg), 3), tiny_cfg, Path(tiny_cfg.run_dir),
                         show_progress=False)
    kinds = [kind for kind, _ in events]
    # baseline, round 1's train, round 2's train (sent before round 1's evaluation finished), ...
    assert kinds[:4] == ["eval", "train", "train", "eval"], kinds
    assert events[3][1] != events[2][1]  # evaluated on the evaluator thread
    assert [r["round"] for r in summary.rows] == [1, 2]
    assert all(r["eval_seconds"] > 0 and r["round_seconds"] > 0 for r in summary.rows)


def test_a_stale_pending_row_is_dropped(tiny_cfg: FedtuneConfig) -> None:
    """A round that crashed before its checkpoint runs again; its half-written row must not survive."""
    from fedtune.federation.run_files import PENDING_ROW

    run = Path(tiny_cfg.run_dir)
    run.mkdir(parents=True)
    (run / PENDING_ROW).write_text(json.dumps({"round": 1, "participants": ["ghost"]}))
    tiny_cfg.federation.num_rounds = 1
    run_server(InProcessGrid(make_client_app(tiny_cfg), 3), tiny_cfg, run, show_progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["participants"] == ["site-00", "site-01", "site-02"]
    assert not (run / PENDING_ROW).exists()


def test_a_node_claiming_another_sites_name_is_not_scheduled(tiny_cfg: FedtuneConfig, caplog) -> None:
    from fedtune.federation.membership import discover_sites

    grid = InProcessGrid(make_client_app(tiny_cfg), 3)
    # In simulation node 100+i answers "site-0i".  Enrolment says node 102's key was issued to site-03.
    enrolled = {100: "site-00", 101: "site-01", 102: "site-03"}
    with caplog.at_level(logging.ERROR, logger="fedtune"):
        sites = discover_sites(grid, grid.get_node_ids(), timeout_s=10, enrolled=enrolled)
    assert [(s.node_id, s.name) for s in sites] == [(100, "site-00"), (101, "site-01")]
    assert "node 102 claims to be site 'site-02'" in caplog.text
    # Without an enrolment map (simulation) every node is taken at its word.
    assert len(discover_sites(grid, grid.get_node_ids(), timeout_s=10)) == 3


def test_a_site_that_missed_a_round_is_asked_again_before_the_next(tiny_cfg: FedtuneConfig, caplog) -> None:
    tiny_cfg.federation.num_rounds = 2
    grid = InProcessGrid(make_client_app(tiny_cfg), 3, drop={101})
    with caplog.at_level(logging.INFO, logger="fedtune"):
        summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False)
    describes = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == protocol.DESCRIBE]
    # Once at start for every node, then again for the silent one only, before round 2.
    assert sorted(describes) == [100, 101, 101, 102]
    assert "site-01 is back" in caplog.text
    assert summary.rows[1]["failures"] == ["site-01"]
