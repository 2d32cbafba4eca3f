"""An in-memory stand-in for Flower's Grid: the server loop's messages go straight to ClientApps.

The experiments' ``inprocess`` engine runs whole federations on it (no Ray start-up), and
the tests run the server loop on it, with the faults a real federation produces (a site
that vanishes mid-round, a SuperLink that answers for an unreachable node).  One grid for
both, so what the tests exercise is what the experiments run.
"""

from __future__ import annotations

from typing import Iterable, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode


class InProcessGrid:
    """The two Grid methods the server loop uses, delivering to ClientApps in this process.

    Node contexts carry ``partition-id``/``num-partitions`` as Flower's simulation
    engine sets them, so each ClientApp loads its own share of the data; node ids are
    100, 101, ...  The fault options let tests play what a real federation does to a
    round: ``drop`` names node ids whose update replies are lost (a site that vanished
    mid-round); ``offline_once`` names node ids whose first secure-aggregation message the
    SuperLink answers "Node Unavailable" itself (a SuperLink that restarted and has not
    yet heard the site's heartbeat).  ``keep_messages`` keeps every message sent and
    received in ``sent``/``received`` for inspection; off by default, since a run's
    messages hold every round's adapters.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, drop: Optional[set[int]] = None,
                 offline_once: Optional[set[int]] = None, keep_messages: bool = False) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        # Messages built inside a ClientApp read the task identity Flower's runtime sets.
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 1
        self.app = client_app
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": num_nodes},
                             state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.drop = set(drop or ())
        self.offline_once = set(offline_once or ())
        self.keep_messages = keep_messages
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> list[Message]:
        replies = [reply for reply in map(self._deliver, messages) if reply is not None]
        if self.keep_messages:
            self.received.extend(replies)
        return replies

    def _deliver(self, msg: Message) -> Optional[Message]:
        msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink does on push
        if self.keep_messages:
            self.sent.append(msg)
        node = msg.metadata.dst_node_id
        if node in self.drop and self._is_update_stage(msg):
            return None
        if node in self.offline_once and "secagg" in msg.content.config_records:
            self.offline_once.discard(node)
            reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers, not the node
            return reply
        return self.app(msg, self.contexts[node])

    @staticmethod
    def _is_update_stage(msg: Message) -> bool:
        """The plain train message, or secure aggregation's masked-input stage."""
        if msg.metadata.message_type != "train":
            return False
        stage = msg.content.config_records.get("secagg")
        return stage is None or stage["stage"] == "mask"
