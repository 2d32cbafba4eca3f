"""``python -m fedtune.deploy.supernode [flower-supernode args]``: Flower's SuperNode, tuned for sites.

First, its fixed waits.  flwr 1.42's SuperNode sleeps 3 s whenever a pull from the
SuperLink finds no message, and polls every 0.5 s for the ClientApp's reply (and for the
reply's objects) before sending it on.  A secure round is four back-to-back round trips of
kilobyte messages, each paying both waits at every site, and the slowest site sets the
pace: measured, the three short stages took 1.3-2.6 s each.  Here the idle wait is
``FEDTUNE_SUPERNODE_POLL_S`` (default 0.5 s), shortened to 0.1 s for 2 s after the site
handled a message (the round's next stage follows within about a second), and the reply
waits are 0.05 s (they only read the SuperNode's own in-process state).  The window is
short on purpose: polling fast through the server's evaluation between rounds (10 s
windows were tried) took CPU from it and from training on a shared 2-core machine.
Nothing else in Flower is touched: the module-level ``time`` of
``flwr.supernode.start_client_internal`` is swapped for a shim whose ``sleep`` changes only
those waits, and ``_push_messages`` is wrapped to note when the site was last busy.

Second, object pulls: the SuperNode starts fetching a message's objects (the 4 MiB global
adapter) while the ServerApp may still be uploading them, and Flower then retries after
1, 2, 4, 8 s; measured, that was a quarter of a deployment round.  Retries here start at
50 ms, capped at 0.5 s.

Third, the node heartbeat: flwr 1.42 uses 30 s and the SuperLink refuses to re-activate
a node's key until it has missed two heartbeats, so a site restarted after a crash was
locked out for up to a minute and missed the next round.  ``FEDTUNE_SUPERNODE_HEARTBEAT_S``
(default 10 s, the SuperLink's minimum) shortens that to about 20 s.

Fourth, reconnection after the SuperLink restarts (an operator's upgrade, or a crash
resumed from the checkpoint): Flower retries both the node heartbeat and every Fleet call
with full-jitter exponential backoff growing to 20 s.  The SuperLink keeps each node
online only for two heartbeat intervals after its last beat, so a heartbeat still backing
off when that lapsed made the SuperLink answer the next round's messages "Node
Unavailable" although the site was polling again; a secure round with three sites was
then abandoned (seen in CI).  Here both back off from 0.25 s to at most
``FEDTUNE_SUPERNODE_RETRY_MAX_S`` (default 2 s): a restarted SuperLink hears every site
again within seconds, for the price of one small request per site every 2 s while it
is down.
"""

from __future__ import annotations

import functools
import os
import time as _time
from typing import Any, Callable, Iterator

FLOWER_IDLE_SLEEP_S = 3  # start_client_internal: no message was pulled
FLOWER_REPLY_SLEEP_S = 0.5  # start_client_internal: waiting for the ClientApp's reply or its objects
BUSY_POLL_S = 0.1
BUSY_WINDOW_S = 2.0
REPLY_POLL_S = 0.05


class _PromptTime:
    """Stands in for the ``time`` module inside ``flwr.supernode.start_client_internal``."""

    def __init__(self, idle_poll_s: float) -> None:
        self.idle_poll_s = idle_poll_s
        self.last_busy = -float("inf")

    def mark_busy(self) -> None:
        self.last_busy = _time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP_S:
            busy = _time.monotonic() - self.last_busy < BUSY_WINDOW_S
            _time.sleep(min(BUSY_POLL_S, self.idle_poll_s) if busy else self.idle_poll_s)
        elif seconds == FLOWER_REPLY_SLEEP_S:
            _time.sleep(REPLY_POLL_S)
        else:
            _time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def _marking_busy(push_messages: Callable[..., None], clock: _PromptTime) -> Callable[..., None]:
    """Flower calls ``_push_messages`` only after it pulled a message: the site is mid-round."""

    @functools.wraps(push_messages)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        clock.mark_busy()
        try:
            push_messages(*args, **kwargs)
        finally:
            clock.mark_busy()

    return wrapper


def prompt_backoff(max_delay_s: float) -> Callable[..., Iterator[float]]:
    """A drop-in for Flower's ``exponential`` that starts at 0.25 s and caps at ``max_delay_s``."""
    from flwr.supercore.retry import exponential

    def factory(*_: Any, **__: Any) -> Iterator[float]:
        first = min(0.25, max_delay_s)
        return exponential(base_delay=first, multiplier=2, max_delay=max_delay_s)  # type: ignore[arg-type]

    return factory


def install(poll_s: float = 0.5, heartbeat_s: float = 10.0, retry_max_s: float = 2.0) -> None:
    """Apply the four changes above to the Flower modules loaded in this process."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supercore.inflatable.inflatable_utils as inflatable_utils
    import flwr.supercore.retry.http_retry as http_retry
    import flwr.supernode.fleet_http_connection as connection
    import flwr.supernode.start_client_internal as internal

    clock = _PromptTime(poll_s)
    internal.time = clock  # type: ignore[assignment]
    internal._push_messages = _marking_busy(internal._push_messages, clock)  # type: ignore[assignment]
    internal.pull_objects = functools.partial(inflatable_utils.pull_objects, initial_backoff=0.05,
                                              backoff_cap=0.5)  # type: ignore[assignment]
    beat = max(10.0, heartbeat_s)  # the SuperLink refuses intervals under 10 s
    connection.HEARTBEAT_DEFAULT_INTERVAL = beat  # what the SuperLink is told to expect
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = beat  # how often the node's sender actually beats
    backoff = prompt_backoff(max(0.25, retry_max_s))
    heartbeat.exponential = backoff  # type: ignore[assignment]  # the heartbeat sender's retries
    http_retry.exponential = backoff  # type: ignore[assignment]  # every Fleet call's retries


def main() -> None:
    from flwr.supernode.cli import flower_supernode

    install(poll_s=float(os.environ.get("FEDTUNE_SUPERNODE_POLL_S", "0.5")),
            heartbeat_s=float(os.environ.get("FEDTUNE_SUPERNODE_HEARTBEAT_S", "10")),
            retry_max_s=float(os.environ.get("FEDTUNE_SUPERNODE_RETRY_MAX_S", "2")))
    flower_supernode()


if __name__ == "__main__":
    main()
