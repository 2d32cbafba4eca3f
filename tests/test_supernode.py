"""The SuperNode launcher's changes to Flower: prompt polls, prompt reconnection after a SuperLink restart."""

from __future__ import annotations

import itertools
from pathlib import Path

import flwr.supercore.heartbeat as heartbeat
import flwr.supercore.inflatable.inflatable_utils as inflatable_utils
import flwr.supercore.retry.http_retry as http_retry
import flwr.supernode.fleet_http_connection as connection
import flwr.supernode.start_client_internal as internal
import pytest

from fedtune.deploy import supernode


@pytest.fixture
def restore_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``install`` patch Flower in this process and undo it after the test."""
    for module, name in [(internal, "time"), (internal, "pull_objects"), (internal, "_push_messages"),
                         (connection, "HEARTBEAT_DEFAULT_INTERVAL"),
                         (heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"), (heartbeat, "exponential"),
                         (http_retry, "exponential")]:
        monkeypatch.setattr(module, name, getattr(module, name))


def _first_waits(invoker, n: int = 7) -> list[float]:
    return list(itertools.islice(invoker.wait_gen_factory(), n))


def test_flower_alone_backs_off_to_20_seconds() -> None:
    """The premise: without the launcher a heartbeat retry can wait 16-20 s, past the SuperLink's patience."""
    waits = _first_waits(heartbeat.HeartbeatSender(lambda: True)._retry_invoker)
    assert max(waits) >= 16


def test_heartbeat_and_fleet_retries_are_capped_after_install(restore_flower) -> None:
    supernode.install(poll_s=0.5, heartbeat_s=10, retry_max_s=2)
    beat = _first_waits(heartbeat.HeartbeatSender(lambda: True)._retry_invoker)
    fleet = _first_waits(http_retry.make_simple_http_retry_invoker())
    assert beat == fleet == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    # Heartbeats at 10 s (the SuperLink's minimum) keep a site online 20 s past its last beat.
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 10


def test_interval_below_the_superlink_minimum_is_raised(restore_flower) -> None:
    supernode.install(poll_s=0.2, heartbeat_s=1, retry_max_s=0.1)
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 10
    assert _first_waits(http_retry.make_simple_http_retry_invoker(), 3) == [0.25, 0.25, 0.25]
    assert internal.pull_objects.func is inflatable_utils.pull_objects
    assert internal.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}


def test_waits_are_short_mid_round_and_relaxed_when_idle(restore_flower, monkeypatch) -> None:
    """Flower's own 3 s idle and 0.5 s reply waits, as start_client_internal calls them."""
    pushed: list[str] = []
    monkeypatch.setattr(internal, "_push_messages", lambda **_: pushed.append("reply"))
    supernode.install(poll_s=0.5)
    slept: list[float] = []
    monkeypatch.setattr(supernode._time, "sleep", slept.append)
    clock = internal.time
    clock.sleep(supernode.FLOWER_IDLE_SLEEP_S)  # idle since start: the site's own poll interval
    internal._push_messages(state=None)  # a message was handled: a round is in progress
    clock.sleep(supernode.FLOWER_IDLE_SLEEP_S)  # the next stage is imminent: poll fast
    clock.sleep(supernode.FLOWER_REPLY_SLEEP_S)  # waiting for the ClientApp's reply
    clock.sleep(1.0)  # any other wait is untouched
    assert pushed == ["reply"]
    assert slept == [0.5, supernode.BUSY_POLL_S, supernode.REPLY_POLL_S, 1.0]
    clock.last_busy -= supernode.BUSY_WINDOW_S + 1  # a quiet moment later
    clock.sleep(supernode.FLOWER_IDLE_SLEEP_S)
    assert slept[-1] == 0.5
    # The shim matches Flower's waits by value: fail loudly if an upgrade changes them.
    source = Path(internal.__file__).read_text()
    assert "time.sleep(3)" in source and source.count("time.sleep(0.5)") == 2
