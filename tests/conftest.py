"""Shared fixtures: a tiny, fast config and an in-process stand-in for Flower's Grid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedtune.config import FedtuneConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(run_dir: Path, **changes: object) -> FedtuneConfig:
    """A federation small enough to run in seconds on one core."""
    cfg = FedtuneConfig()
    cfg.run_dir = str(run_dir)
    cfg.data.demo_records = 240
    cfg.data.max_length = 64
    cfg.model.tiny.hidden_size = 32
    cfg.model.tiny.intermediate_size = 64
    cfg.model.tiny.num_heads = 2
    cfg.model.lora.rank = 4
    cfg.federation.num_sites = 3
    cfg.federation.num_rounds = 2
    cfg.privacy.sample_rate = 0.2
    cfg.privacy.noise_multiplier = 1.0
    cfg.train.local_steps = 3
    cfg.train.seed = 0
    cfg.secagg.enabled = False
    for dotted, value in changes.items():
        section, _, name = dotted.partition("__")
        setattr(getattr(cfg, section), name, value) if name else setattr(cfg, section, value)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> FedtuneConfig:
    return tiny_config(tmp_path / "run")


class InProcessGrid:
    """Delivers the ServerApp's messages straight to ClientApps in this process.

    It implements the two Grid methods the server loop uses; ``drop`` names node ids
    whose replies are lost (a site that vanished mid-round); ``offline_once`` names node ids
    whose first secure-aggregation message the SuperLink answers "Node Unavailable" itself
    (a SuperLink that restarted and has not yet heard the site's heartbeat).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, drop: Optional[set[int]] = None,
                 offline_once: Optional[set[int]] = None) -> None:
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 1
        self.app = client_app
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": num_nodes},
                             state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.drop = drop or set()
        self.offline_once = set(offline_once or ())
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink does on push
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.drop and self._is_update_stage(msg):
                continue
            if node in self.offline_once and "secagg" in msg.content.config_records:
                self.offline_once.discard(node)
                reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers, not the node
                replies.append(reply)
                continue
            replies.append(self.app(msg, self.contexts[node]))
        self.received.extend(replies)
        return replies

    @staticmethod
    def _is_update_stage(msg: Message) -> bool:
        """The plain train message, or secure aggregation's masked-input stage."""
        if msg.metadata.message_type != "train":
            return False
        stage = msg.content.config_records.get("secagg")
        return stage is None or stage["stage"] == "mask"
