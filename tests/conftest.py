"""Shared fixtures: a tiny, fast config and an in-process stand-in for Flower's Grid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest
import torch
from flwr.clientapp import ClientApp

from fedtune.config import FedtuneConfig
from fedtune.experiments.grid import InProcessGrid as LibraryGrid

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


class InProcessGrid(LibraryGrid):
    """fedtune's in-memory grid (drop, offline_once), keeping every message for the tests to read."""

    def __init__(self, client_app: ClientApp, num_nodes: int, drop: Optional[set[int]] = None,
                 offline_once: Optional[set[int]] = None) -> None:
        super().__init__(client_app, num_nodes, drop=drop, offline_once=offline_once, keep_messages=True)
