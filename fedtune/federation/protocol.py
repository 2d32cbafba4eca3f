"""Names and shapes of the records exchanged in one round (Flower Message API).

Everything a site receives is untrusted: a hostile server may put any type, any value or
any extra key in any field.  :meth:`RoundConfig.from_record` is therefore strict (exact
key set, exact types, finite values in range) and raises :class:`Refusal`, whose fixed
``code`` is all the server is ever told; the detail stays in the site's own log.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord

from fedtune.config import MAX_DPO_BETA, OPTIMIZERS, STRATEGIES
from fedtune.privacy.accounting import MAX_NOISE_MULTIPLIER, Charge

# Message types: Flower routes "query" and "train" to the ClientApp's handlers.
DESCRIBE = "query"
TRAIN = "train"

# Record names inside a Message's RecordDict.
GLOBAL_ADAPTER = "global_adapter"
# A task with a reference policy (DPO) that starts from a trained adapter: that adapter, frozen,
# beside the global one (validated as strictly; fedtune.tasks.dpo says why it travels).
REFERENCE_ADAPTER = "reference_adapter"
ROUND_CONFIG = "round_config"
UPDATE = "update"
METRICS = "metrics"
STATUS = "status"
SITE = "site"

STATUS_OK = "ok"
STATUS_REFUSED = "refused"

# The only reasons a site ever sends.  They are constants on purpose: a reason built from
# an exception's text could carry a record, a label, a path or the site's size to the server.
REFUSED_INVALID_MESSAGE = "refused: invalid message"
REFUSED_POLICY = "refused: outside the site's policy"
REFUSED_BUDGET = "refused: privacy budget exhausted"
REFUSED_BASE_MODEL = "refused: base model mismatch"
REFUSED_RUN_CONFIG = "refused: run config not accepted"
FAILED_TRAINING = "failed: local training error"
FAILED_PROTOCOL = "failed: secure aggregation protocol error"
# A neighbour's signature failed, or the server's view of the round was inconsistent:
# the site abandoned the round (its charge stays if it had masked its update).
ABORTED_SECAGG = "aborted: secure aggregation check failed"
CODES = (REFUSED_INVALID_MESSAGE, REFUSED_POLICY, REFUSED_BUDGET, REFUSED_BASE_MODEL, REFUSED_RUN_CONFIG,
         FAILED_TRAINING, FAILED_PROTOCOL, ABORTED_SECAGG)

# Bounds a valid round config stays within whatever a site's policy says.
MAX_LOCAL_STEPS = 100_000
MAX_ROUND = 10_000_000
MAX_GRAD_NORM = 1e6
MAX_LEARNING_RATE = 100.0
FINGERPRINT_HEX = 64


class Refusal(Exception):
    """A site will not take this message: ``code`` (one of CODES) for the server, ``detail`` for its log."""

    def __init__(self, code: str, detail: str) -> None:
        assert code in CODES, code
        self.code, self.detail = code, detail
        super().__init__(f"{code} ({detail})")


def _invalid(name: str, value: Any, expected: str) -> Refusal:
    # repr() of a server-sent value is cut short: it goes to the site's own log only.
    return Refusal(REFUSED_INVALID_MESSAGE, f"round config field '{name}' = {repr(value)[:60]} is not {expected}")


def _int_in(record: ConfigRecord, name: str, low: int, high: int) -> int:
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(name, value, f"an integer in [{low}, {high}]")
    return value


def _float_in(record: ConfigRecord, name: str, low: float, high: float, low_open: bool) -> float:
    value = record[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        raise _invalid(name, value, f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}]")
    return float(value)


def _choice_of(record: ConfigRecord, name: str, options: tuple[str, ...]) -> str:
    value = record[name]
    if not isinstance(value, str) or value not in options:
        raise _invalid(name, value, f"one of {', '.join(options)}")
    return value


@dataclass(frozen=True)
class RoundConfig:
    """Everything the server dictates for one round; the server accounts from this alone."""

    round: int
    noise_multiplier: float
    sample_rate: float
    local_steps: int
    max_grad_norm: float
    learning_rate: float
    # A newly initialised head's step size (a classifier's); the adapter's is learning_rate.
    head_learning_rate: float
    optimizer: str
    strategy: str
    private: bool
    # DPO's β (train.dpo_beta), in every round whatever the task: a site checks it like any field.
    dpo_beta: float
    # SHA-256 of the base model's frozen weights (fedtune.models.base_fingerprint): a site
    # trains only if its own copy hashes the same, so both sides mean the same adapter.
    base_fingerprint: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    def charge(self) -> Charge:
        """What this round costs a site that takes part, as both sides record it in their ledgers.

        A non-private round is charged σ = 0 (ε = ∞) whatever σ it carries: the site did
        not add noise, so no finite ε may ever be claimed for it.  The server builds its
        non-private rounds with σ = 0 already, so both ledgers hold the same row.
        """
        return Charge(round=self.round, noise_multiplier=self.noise_multiplier if self.private else 0.0,
                      sample_rate=self.sample_rate, steps=self.local_steps)

    @classmethod
    def from_record(cls, record: Any) -> "RoundConfig":
        """Parse a server-sent round config; any deviation raises Refusal(REFUSED_INVALID_MESSAGE)."""
        if not isinstance(record, ConfigRecord):
            raise Refusal(REFUSED_INVALID_MESSAGE, f"round config is a {type(record).__name__}, not a ConfigRecord")
        expected = {f.name for f in fields(cls)}
        if set(record.keys()) != expected:
            raise Refusal(REFUSED_INVALID_MESSAGE, f"round config keys differ from the protocol's: missing "
                          f"{sorted(expected - set(record.keys()))}, unexpected {len(set(record.keys()) - expected)}")
        private = record["private"]
        if not isinstance(private, bool):
            raise _invalid("private", private, "a bool")
        fingerprint = record["base_fingerprint"]
        if not (isinstance(fingerprint, str) and len(fingerprint) == FINGERPRINT_HEX
                and all(c in "0123456789abcdef" for c in fingerprint)):
            raise _invalid("base_fingerprint", fingerprint, f"{FINGERPRINT_HEX} lowercase hex digits")
        sigma_low_open = private  # a private round needs σ > 0; a non-private one carries σ = 0
        return cls(
            round=_int_in(record, "round", 1, MAX_ROUND),
            noise_multiplier=_float_in(record, "noise_multiplier", 0.0, MAX_NOISE_MULTIPLIER, sigma_low_open),
            sample_rate=_float_in(record, "sample_rate", 0.0, 1.0, low_open=True),
            local_steps=_int_in(record, "local_steps", 1, MAX_LOCAL_STEPS),
            max_grad_norm=_float_in(record, "max_grad_norm", 0.0, MAX_GRAD_NORM, low_open=True),
            learning_rate=_float_in(record, "learning_rate", 0.0, MAX_LEARNING_RATE, low_open=True),
            head_learning_rate=_float_in(record, "head_learning_rate", 0.0, MAX_LEARNING_RATE, low_open=True),
            optimizer=_choice_of(record, "optimizer", OPTIMIZERS),
            strategy=_choice_of(record, "strategy", STRATEGIES),
            private=private,
            dpo_beta=_float_in(record, "dpo_beta", 0.0, MAX_DPO_BETA, low_open=True),
            base_fingerprint=fingerprint,
        )

# Secure aggregation (fedtune.secagg): the stage travels in the SECAGG record.
SECAGG = "secagg"
KEYS = "neighbour_keys"
SHARES = "shares"
SIGNATURES = "survivor_signatures"
STAGE_ADVERTISE = "advertise"
STAGE_SHARE = "share"
STAGE_MASK = "mask"
STAGE_CONSISTENCY = "consistency"
STAGE_UNMASK = "unmask"
