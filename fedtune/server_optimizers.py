"""Server optimisers: how the server turns a round's mean delta into the step it takes.

The mean delta that :meth:`fedtune.strategies.Strategy.aggregate` returns is the
round's pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).
Plain FedAvg adds it as it is; FedAvgM (Hsu et al. 2019) adds a momentum of past
deltas; FedAdam, FedYogi and FedAdagrad divide a momentum by a running estimate of
each coordinate's scale.  Averaging over rounds damps the per-site DP noise that
each single mean delta still carries, which is why these help private fine-tuning.

**No privacy cost.**  Each mean delta is computed from the sites' DP releases (a
sum under secure aggregation, unmasked); the optimiser reads nothing else, so
whatever it does is post-processing of DP outputs and spends no privacy budget.
Its state (the moments) is a function of released sums only, and may be logged or
checkpointed freely.

**Which tensors.**  The optimiser sees only the tensors the strategy aggregated (all
of LoRA's A and B for FedAvg-LoRA; B and the head for FFA-LoRA), keeps moments only
for those, and returns a step only for those; ``Strategy.apply`` leaves every other
tensor (FFA's frozen A) exactly as it is.

**Why not Flower's strategies.**  ``flwr.server.strategy.FedAdam`` and its siblings
do this inside ``aggregate_fit``, on Flower ``Parameters`` built from every site's
individual ``FitRes``.  fedtune's server never sees one site's update: it unmasks
only the secure sum Σ nᵢΔᵢ and owns its round loop (:mod:`fedtune.federation.server`),
so the update rules are restated here, acting on the mean delta.  They follow
Flower 1.x's ``fedavgm.py``, ``fedadam.py``, ``fedyogi.py`` and ``fedadagrad.py``
(defaults included), with one deliberate difference noted at :class:`FedAdam`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Mapping, Optional

import numpy as np

from fedtune.config import FederationConfig
from fedtune.errors import ConfigError

State = dict[str, np.ndarray]
# Tensors of a saved optimiser state are keyed "slot/tensor name" (tensor names contain dots).
SEPARATOR = "/"


class ServerOptimizer(ABC):
    """One server update rule: the step for each aggregated tensor, from its mean delta.

    ``settings`` are the ``federation.server_*`` fields the rule reads, ``defaults``
    their values when the config leaves them null; ``slots`` name its per-tensor
    state (moments), kept as float32 arrays so a saved state restores bit for bit.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    settings: ClassVar[tuple[str, ...]]
    defaults: ClassVar[dict[str, float]]
    slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **hyper: float) -> None:
        unknown = set(hyper) - set(self.settings)
        if unknown:
            raise TypeError(f"{self.name} takes no {sorted(unknown)}")
        self.hyper = {**self.defaults, **hyper}
        self.learning_rate = float(self.hyper["server_learning_rate"])
        # Steps taken: rounds that produced a usable sum (FedAdam's bias correction counts them).
        self.steps = 0
        self.moments: dict[str, State] = {slot: {} for slot in self.slots}

    def update(self, mean_delta: Mapping[str, np.ndarray]) -> State:
        """The step to add to each aggregated tensor; advances the moments by one round."""
        self.steps += 1
        return {n: (self.learning_rate * self._direction(n, np.asarray(d, dtype=np.float32))).astype(np.float32)
                for n, d in mean_delta.items()}

    @abstractmethod
    def _direction(self, name: str, delta: np.ndarray) -> np.ndarray:
        """The rule for one tensor: the direction the learning rate scales (updates its moments)."""

    def _moment(self, slot: str, name: str, like: np.ndarray) -> np.ndarray:
        """A tensor's moment, zero until the tensor is first aggregated (as in Flower)."""
        return self.moments[slot].get(name, np.zeros_like(like, dtype=np.float32))

    def state_dict(self) -> State:
        """The moments, keyed ``slot/tensor`` (copies: the caller may write them out later)."""
        return {f"{slot}{SEPARATOR}{n}": v.copy() for slot, by_name in self.moments.items() for n, v in by_name.items()}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray], steps: int,
                        shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Restore saved moments; ``shapes`` are the adapter's, which every moment must match."""
        moments: dict[str, State] = {slot: {} for slot in self.slots}
        for key, value in tensors.items():
            slot, _, name = key.partition(SEPARATOR)
            if slot not in moments or name not in shapes or tuple(value.shape) != tuple(shapes[name]):
                raise ValueError(f"the saved {self.name} state holds '{key}' {tuple(value.shape)}, which is not a "
                                 "moment of this adapter's tensors")
            moments[slot][name] = np.asarray(value, dtype=np.float32).copy()
        self.moments, self.steps = moments, int(steps)


class FedAvg(ServerOptimizer):
    """Add the mean delta, scaled by the server learning rate (1: plain FedAvg, no state)."""

    name = "fedavg"
    title = "FedAvg"
    settings = ("server_learning_rate",)
    defaults = {"server_learning_rate": 1.0}

    def _direction(self, name: str, delta: np.ndarray) -> np.ndarray:
        return delta


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019): m ← β·m + Δ, step η·m.

    Flower's ``FedAvgM`` (written on the negated delta, w − η·m) is the same rule.  Its
    default momentum is 0, which is plain FedAvg; fedtune's is 0.9, Hsu et al.'s choice,
    so that choosing fedavgm changes something.
    """

    name = "fedavgm"
    title = "FedAvgM"
    settings = ("server_learning_rate", "server_momentum")
    defaults = {"server_learning_rate": 1.0, "server_momentum": 0.9}
    slots = ("m",)

    def _direction(self, name: str, delta: np.ndarray) -> np.ndarray:
        m = np.float32(self.hyper["server_momentum"]) * self._moment("m", name, delta) + delta
        self.moments["m"][name] = m
        return m


class _Adaptive(ServerOptimizer):
    """The shared shape of Reddi et al.'s Algorithm 2: m ← β₁m + (1 − β₁)Δ, then a rule for v."""

    slots = ("m", "v")

    def _first_moment(self, name: str, delta: np.ndarray) -> np.ndarray:
        beta_1 = np.float32(self.hyper["server_beta_1"])
        m = beta_1 * self._moment("m", name, delta) + (1 - beta_1) * delta
        self.moments["m"][name] = m
        return m

    @abstractmethod
    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """The next v of one tensor from its current v and its delta."""

    def _scale(self) -> float:
        """A factor on the step (1, but for FedAdam's bias correction)."""
        return 1.0

    def _direction(self, name: str, delta: np.ndarray) -> np.ndarray:
        m = self._first_moment(name, delta)
        v = self._second_moment(self._moment("v", name, delta), delta).astype(np.float32)
        self.moments["v"][name] = v
        return np.float32(self._scale()) * m / (np.sqrt(v) + np.float32(self.hyper["server_tau"]))


class FedAdam(_Adaptive):
    """FedAdam: v ← β₂v + (1 − β₂)Δ², step η·√(1 − β₂ᵗ)/(1 − β₁ᵗ)·m/(√v + τ).

    The bias correction is Adam's (Kingma & Ba), with t the number of steps taken.
    Flower's ``FedAdam`` applies the same correction with exponent ``server_round + 1``,
    one more than Adam's t; fedtune counts steps, so a round without a usable sum does
    not advance it, and a resumed run continues from the saved count.
    """

    name = "fedadam"
    title = "FedAdam"
    settings = ("server_learning_rate", "server_beta_1", "server_beta_2", "server_tau")
    defaults = {"server_learning_rate": 0.1, "server_beta_1": 0.9, "server_beta_2": 0.99, "server_tau": 1e-9}

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        beta_2 = np.float32(self.hyper["server_beta_2"])
        return beta_2 * v + (1 - beta_2) * delta * delta

    def _scale(self) -> float:
        t = self.steps
        return math.sqrt(1 - self.hyper["server_beta_2"] ** t) / (1 - self.hyper["server_beta_1"] ** t)


class FedYogi(_Adaptive):
    """FedYogi: v ← v − (1 − β₂)·Δ²·sign(v − Δ²), step η·m/(√v + τ) (no bias correction, as in Flower).

    v grows like Adam's when Δ² exceeds it but shrinks only additively, so one noisy
    round cannot shrink the step size of every later one.
    """

    name = "fedyogi"
    title = "FedYogi"
    settings = ("server_learning_rate", "server_beta_1", "server_beta_2", "server_tau")
    defaults = {"server_learning_rate": 0.01, "server_beta_1": 0.9, "server_beta_2": 0.99, "server_tau": 1e-3}

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        squared = delta * delta
        return v - (1 - np.float32(self.hyper["server_beta_2"])) * squared * np.sign(v - squared)


class FedAdagrad(_Adaptive):
    """FedAdagrad: v ← v + Δ², step η·Δ/(√v + τ).

    As in Flower's ``FedAdagrad``, β₁ is 0: the first moment is the delta itself, so v
    is the only state.
    """

    name = "fedadagrad"
    title = "FedAdagrad"
    settings = ("server_learning_rate", "server_tau")
    defaults = {"server_learning_rate": 0.1, "server_tau": 1e-9}
    slots = ("v",)

    def _first_moment(self, name: str, delta: np.ndarray) -> np.ndarray:
        return delta

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + delta * delta


REGISTRY: dict[str, type[ServerOptimizer]] = {
    rule.name: rule for rule in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}


def make_server_optimizer(f: Optional[FederationConfig] = None) -> ServerOptimizer:
    """The optimiser ``federation.server_optimizer`` names, with the settings it reads (null: its defaults)."""
    f = f or FederationConfig()
    if f.server_optimizer not in REGISTRY:
        raise ConfigError("federation.server_optimizer", f"unknown server optimiser '{f.server_optimizer}'",
                          f"Use one of {', '.join(REGISTRY)}.")
    rule = REGISTRY[f.server_optimizer]
    return rule(**{name: getattr(f, name) for name in rule.settings if getattr(f, name) is not None})
