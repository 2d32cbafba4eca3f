"""``versions.every_hours``: `fedtune server` runs version after version on a schedule of its own.

Each version is one whole `fedtune server` run (SuperLink, enrolment, `flwr run`), so a
schedule is a loop around it: start a version, wait until ``every_hours`` after its start,
start the next (from the then current version, with the then arrived cohorts), until the
operator stops the command.  No cron job is needed, and a version that fails ends the loop
with its exit code, so a broken federation is not retried silently.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)


def run_on_schedule(serve_once: Callable[[], int], every_hours: float, stop: Optional[threading.Event] = None,
                    max_versions: Optional[int] = None, clock: Callable[[], float] = time.monotonic) -> int:
    """Call ``serve_once`` every ``every_hours`` (measured start to start) until ``stop``; returns its exit code."""
    stop = stop or threading.Event()
    served = 0
    while not stop.is_set():
        started = clock()
        code = serve_once()
        served += 1
        if code != 0:
            log.error("the scheduled version failed (exit code %d); stopping the schedule", code)
            return code
        if max_versions is not None and served >= max_versions:
            return 0
        wait_s = max(0.0, started + every_hours * 3600.0 - clock())
        log.info("next version in %.1f h (versions.every_hours=%g); Ctrl-C stops the schedule", wait_s / 3600,
                 every_hours)
        stop.wait(wait_s)
    return 0
