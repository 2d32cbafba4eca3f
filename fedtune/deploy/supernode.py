"""``python -m fedtune.deploy.supernode [flower-supernode args]``: Flower's SuperNode, tuned for sites.

flwr 1.42's SuperNode sleeps a fixed 3 s whenever a pull from the SuperLink finds no
message, so every stage of a round waited up to 3 s before a site even saw its message;
with four secure-aggregation stages that was most of a small round.  This runs the
unchanged ``flower-supernode`` entry point with that one idle sleep shortened to
``FEDTUNE_SUPERNODE_POLL_S`` (default 0.5 s).  Nothing else in Flower is touched: the
module-level ``time`` of ``flwr.supernode.start_client_internal`` is swapped for a shim
whose ``sleep`` caps only that 3 s wait.

Second, object pulls: the SuperNode starts fetching a message's objects (the 4 MiB global
adapter) while the ServerApp may still be uploading them, and Flower then retries after
1, 2, 4, 8 s; measured, that was a quarter of a deployment round.  Retries here start at
50 ms, capped at 0.5 s.

Third, the node heartbeat: flwr 1.42 uses 30 s and the SuperLink refuses to re-activate
a node's key until it has missed two heartbeats, so a site restarted after a crash was
locked out for up to a minute and missed the next round.  ``FEDTUNE_SUPERNODE_HEARTBEAT_S``
(default 10 s, the SuperLink's minimum) shortens that to about 20 s.
"""

from __future__ import annotations

import functools
import os
import time as _time
from typing import Any

FLOWER_IDLE_SLEEP_S = 3


class _PromptTime:
    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s

    def sleep(self, seconds: float) -> None:
        _time.sleep(self.poll_s if seconds == FLOWER_IDLE_SLEEP_S else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def main() -> None:
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supercore.inflatable.inflatable_utils as inflatable_utils
    import flwr.supernode.fleet_http_connection as connection
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli import flower_supernode

    internal.time = _PromptTime(float(os.environ.get("FEDTUNE_SUPERNODE_POLL_S", "0.5")))  # type: ignore[assignment]
    # The SuperNode fetches a message's objects (the global adapter) while the ServerApp may
    # still be uploading them; Flower retries after 1, 2, 4, 8 s.  Start at 50 ms, cap 0.5 s.
    internal.pull_objects = functools.partial(inflatable_utils.pull_objects, initial_backoff=0.05,
                                              backoff_cap=0.5)  # type: ignore[assignment]
    beat = max(10.0, float(os.environ.get("FEDTUNE_SUPERNODE_HEARTBEAT_S", "10")))
    connection.HEARTBEAT_DEFAULT_INTERVAL = beat  # what the SuperLink is told to expect
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = beat  # how often the node's sender actually beats
    flower_supernode()


if __name__ == "__main__":
    main()
