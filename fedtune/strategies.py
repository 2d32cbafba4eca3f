"""Aggregation rules for LoRA adapters, one class each, used by the server *and* the site.

A rule decides two things that must agree on both sides of a round: which adapter
tensors a site trains (and therefore sends), and how the server turns the sum of the
sites' weighted deltas into the next global adapter.  Keeping both in one object means
the site's trainable set and the server's expected update layout cannot drift apart.
Adding a rule is one class here plus its name in :data:`REGISTRY` (and in
``fedtune.config.STRATEGIES``, which a test keeps equal to it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping

import numpy as np
from peft import PeftModel

from fedtune.adapters import State
from fedtune.errors import ConfigError


class Strategy(ABC):
    """One aggregation rule: what a site trains, and how the server combines the deltas."""

    name: ClassVar[str]
    # How tables and plots name the rule.
    title: ClassVar[str]

    def trainable_names(self, model: PeftModel) -> list[str]:
        """The tensors a site trains and sends, and the server aggregates: the whole adapter."""
        from fedtune.models import lora_parameter_names

        return lora_parameter_names(model)

    @abstractmethod
    def aggregate(self, weighted_sum: Mapping[str, np.ndarray], total_weight: float) -> State:
        """The rule: the mean delta from the secure sum Σ n_i Δ_i and Σ n_i."""

    def apply(self, global_state: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> State:
        """The next global adapter; tensors the rule did not aggregate stay as they are."""
        return {n: (global_state[n] + mean_delta[n]).astype(np.float32) if n in mean_delta else global_state[n]
                for n in global_state}


class FedAvgLoRA(Strategy):
    """Weighted FedAvg of the deltas of every LoRA tensor (A and B).

    Averaging A and B separately is not averaging the products B·A, so the global
    adapter is only approximately the mean of the sites' adapters; this is the usual
    LoRA-FedAvg trade-off.
    """

    name = "fedavg"
    title = "FedAvg-LoRA"

    def aggregate(self, weighted_sum: Mapping[str, np.ndarray], total_weight: float) -> State:
        """Σ n_i Δ_i / Σ n_i."""
        if total_weight <= 0:
            raise ValueError("total weight must be positive")
        return {n: (v / total_weight).astype(np.float32) for n, v in weighted_sum.items()}


class FFALoRA(FedAvgLoRA):
    """FFA-LoRA (Sun et al., ICLR 2024): A frozen at its shared initialisation, only B trained.

    With A fixed, B·A is linear in B, so the average of the sites' adapters is exactly
    the adapter of the averaged B; and DP noise is spread over half the parameters.  A
    classification head is new, so it is trained (and averaged) like B.
    """

    name = "ffa"
    title = "FFA-LoRA"

    def trainable_names(self, model: PeftModel) -> list[str]:
        return [n for n in super().trainable_names(model) if ".lora_A." not in n]


REGISTRY: dict[str, type[Strategy]] = {rule.name: rule for rule in (FedAvgLoRA, FFALoRA)}


def make_strategy(name: str) -> Strategy:
    if name not in REGISTRY:
        raise ConfigError("federation.strategy", f"unknown strategy '{name}'", f"Use {' or '.join(REGISTRY)}.")
    return REGISTRY[name]()
