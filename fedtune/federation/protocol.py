"""Names and shapes of the records exchanged in one round (Flower Message API)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flwr.app import ConfigRecord

# Message types: Flower routes "query" and "train" to the ClientApp's handlers.
DESCRIBE = "query"
TRAIN = "train"

# Record names inside a Message's RecordDict.
GLOBAL_ADAPTER = "global_adapter"
ROUND_CONFIG = "round_config"
UPDATE = "update"
METRICS = "metrics"
STATUS = "status"
SITE = "site"

STATUS_OK = "ok"
STATUS_REFUSED = "refused"


@dataclass(frozen=True)
class RoundConfig:
    """Everything the server dictates for one round; the server accounts from this alone."""

    round: int
    noise_multiplier: float
    sample_rate: float
    local_steps: int
    max_grad_norm: float
    learning_rate: float
    optimizer: str
    strategy: str
    private: bool

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "RoundConfig":
        return cls(
            round=int(record["round"]),
            noise_multiplier=float(record["noise_multiplier"]),
            sample_rate=float(record["sample_rate"]),
            local_steps=int(record["local_steps"]),
            max_grad_norm=float(record["max_grad_norm"]),
            learning_rate=float(record["learning_rate"]),
            optimizer=str(record["optimizer"]),
            strategy=str(record["strategy"]),
            private=bool(record["private"]),
        )

# Secure aggregation (fedtune.secagg): the stage travels in the SECAGG record.
SECAGG = "secagg"
KEYS = "neighbour_keys"
SHARES = "shares"
STAGE_ADVERTISE = "advertise"
STAGE_SHARE = "share"
STAGE_MASK = "mask"
STAGE_UNMASK = "unmask"
