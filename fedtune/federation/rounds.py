"""The round-protocol interface: how one round's sum of weighted deltas is obtained.

A round protocol takes the sites the scheduler selected and returns Σ n_i·Δ_i and Σ n_i
(or nothing usable), after charging every site whose update may have left it.  The
server's loop does not know how: plain aggregation sees each site's update, secure
aggregation only the masked sum.  A cross-cutting concern such as site-level DP
(distributed noise) is a wrapper around a protocol, not a third branch in the loop:
it holds an inner protocol and changes the round config or the outcome around
``inner.run``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedtune import adapters
from fedtune.federation import protocol
from fedtune.privacy.ledger import PrivacyLedger

if TYPE_CHECKING:
    from fedtune.federation.membership import SiteInfo

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What one round's aggregation step yields, whatever the protocol."""

    weighted_sum: Optional[dict[str, np.ndarray]] = None  # Σ n_i Δ_i, or None if nothing usable
    total_weight: float = 0.0
    participants: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    local_train_seconds: float = 0.0
    # Protocol-specific metrics that go into the round's metrics line (e.g. the
    # quantisation error bound of secure aggregation).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundContext:
    """What every protocol needs beyond the round config, fixed for the whole run.

    ``spec`` names the tensors a site sends (the strategy's trainable set), their shapes
    and the size limit of an update; ``ledger`` is the server's own, charged for every
    site whose update may have left it.
    """

    ledger: PrivacyLedger
    spec: adapters.UpdateSpec
    timeout: Optional[float]
    # The frozen reference adapter every site receives beside the global one (DPO from a trained
    # start, fedtune.federation.reference); None: the task has none, or it is the base model.
    reference: Optional[adapters.State] = None

    @property
    def names(self) -> list[str]:
        """The aggregated tensors in the order both sides flatten them."""
        return sorted(self.spec.shapes)

    def adapter_records(self, global_state: adapters.State) -> dict[str, ArrayRecord]:
        """What a site trains from, as records: the global adapter, and the reference if there is one."""
        records = {protocol.GLOBAL_ADAPTER: adapters.to_array_record(global_state)}
        if self.reference is not None:
            records[protocol.REFERENCE_ADAPTER] = adapters.to_array_record(self.reference)
        return records


class RoundProtocol(Protocol):
    """One way to run a round; plain and secure aggregation implement it.

    ``min_sites`` is the least number of reachable sites worth starting a round with
    (secure aggregation needs three), which the scheduler waits for.
    """

    min_sites: int

    def run(self, grid: Grid, selected: list["SiteInfo"], rc: protocol.RoundConfig,
            global_state: adapters.State, context: RoundContext) -> RoundOutcome:
        """Send the round to ``selected``, charge ``context.ledger``, return the sum (or nothing usable)."""
        ...


def record_refusal(reply: Message, site_name: str, round_number: int, out: RoundOutcome) -> bool:
    """If ``reply`` is a refusal, log it and note it in ``out``; refusals are never charged."""
    status = reply.content.config_records.get(protocol.STATUS)
    if status is None or status.get("status") != protocol.STATUS_REFUSED:
        return False
    log.info("%s refused round %d: %s", site_name, round_number, status.get("reason"))
    out.refusals.append(site_name)
    return True
