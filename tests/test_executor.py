"""The site executor's polling: prompt mid-round, relaxed when idle."""

from __future__ import annotations

import time

import pytest
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError, pull_objects

from fedtune.deploy import executor
from fedtune.deploy.executor import SiteExecutor


def test_polls_fast_right_after_a_task_and_slowly_when_idle() -> None:
    site = SiteExecutor("127.0.0.1:9100", app=None, pin=None,  # type: ignore[arg-type]
                        poll_interval_s=0.05, idle_poll_s=0.5)
    assert site.next_poll_s() == 0.5  # nothing run yet: an idle site costs next to nothing
    site.last_task_end = time.monotonic()
    assert site.next_poll_s() == 0.05  # the round's next stage is imminent
    site.last_task_end = time.monotonic() - executor.BUSY_WINDOW_S - 0.1
    assert site.next_poll_s() == 0.5
    # An idle interval below the busy one is raised to it, never the other way round.
    eager = SiteExecutor("127.0.0.1:9100", None, None, poll_interval_s=0.2, idle_poll_s=0.05)  # type: ignore[arg-type]
    assert eager.next_poll_s() == 0.2


def test_a_message_whose_objects_stopped_arriving_is_given_up() -> None:
    """Flower leaves such a task behind when the SuperLink stops mid-fetch; its objects never come."""
    available = {"a": b"A"}

    def fetch(object_id: str) -> bytes:
        if object_id not in available:
            raise ObjectUnavailableError(object_id)
        return available[object_id]

    started = time.monotonic()
    with pytest.raises(ObjectPullError, match="stopped fetching"):
        pull_objects(["a", "b"], executor.stall_guarded(fetch, stall_s=0.3), initial_backoff=0.01, backoff_cap=0.05)
    assert time.monotonic() - started < 5  # not Flower's 500 tries per object


def test_a_slow_transfer_that_keeps_delivering_is_not_given_up() -> None:
    """Objects that arrive one by one, each within the stall limit, may take longer than it in total."""
    arrival = {f"o{i}": time.monotonic() + 0.15 * (i + 1) for i in range(6)}  # 0.9 s in all

    def fetch(object_id: str) -> bytes:
        if time.monotonic() < arrival[object_id]:
            raise ObjectUnavailableError(object_id)
        return object_id.encode()

    got = pull_objects(list(arrival), executor.stall_guarded(fetch, stall_s=0.5), initial_backoff=0.01,
                       backoff_cap=0.05, max_concurrent_pulls=1)
    assert sorted(got) == sorted(arrival)
