"""One round trip to many sites, with prompt polling.

Why not ``Grid.send_and_receive``: on a real SuperLink (flwr 1.42 ``HttpGrid``) it sleeps
a fixed 3 s between pulls, so each of a secure round's four round trips waited up to 3 s
after the last reply had arrived.  Here replies are pulled after 50 ms, backing off to
0.2 s: the pull is one local request to the SuperLink, and with the sites' replies now
arriving within a few hundred milliseconds a longer cap was a visible share of each stage.
Grids without push/pull (the tests' in-process grid) fall back to ``send_and_receive``.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Optional

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

FIRST_POLL_S = 0.05
MAX_POLL_S = 0.2


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: Optional[float]) -> dict[int, Message]:
    """Push ``messages``; return the replies that arrive within ``timeout`` seconds (None: all).

    Replies are keyed by the node each message was sent to: an error reply the SuperLink
    makes itself (the node is offline) names the SuperLink, not the node, as its source.
    """
    messages = list(messages)
    destination = {m.object_id: m.metadata.dst_node_id for m in messages}
    return {destination.get(r.metadata.reply_to_message_id, r.metadata.src_node_id): r
            for r in _replies(grid, messages, timeout)}


def _replies(grid: Grid, messages: list[Message], timeout: Optional[float]) -> list[Message]:
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    started = time.monotonic()
    pending = set(grid.push_messages(messages))
    pushed = time.monotonic()
    sent = len(pending)
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    interval = FIRST_POLL_S
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
        interval = min(MAX_POLL_S, interval * 1.5)
    log.debug("round trip: %d message(s) pushed in %.2fs, %d repl(ies) after %.2fs", sent, pushed - started,
              len(replies), time.monotonic() - started)
    return replies
