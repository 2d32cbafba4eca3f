"""The site executor's polling: prompt mid-round, relaxed when idle."""

from __future__ import annotations

import time

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
