"""Plain aggregation: one round trip, and the server sees each site's n_i·Δ_i and n_i.

Charges: a site that answered with an update, or went silent, is charged (a silent
site may have released its update); a site that refused is not.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedtune import adapters
from fedtune.federation import exchange, protocol
from fedtune.federation.rounds import RoundContext, RoundOutcome, record_refusal

if TYPE_CHECKING:
    from fedtune.federation.membership import SiteInfo

log = logging.getLogger(__name__)


class PlainAggregation:
    """The round protocol without secure aggregation (``secagg.enabled=false``)."""

    min_sites = 1

    def run(self, grid: Grid, selected: list["SiteInfo"], rc: protocol.RoundConfig,
            global_state: adapters.State, context: RoundContext) -> RoundOutcome:
        content = {**context.adapter_records(global_state), protocol.ROUND_CONFIG: rc.to_record()}
        messages = [Message(RecordDict(dict(content)), dst_node_id=s.node_id, message_type=protocol.TRAIN)
                    for s in selected]
        replies = exchange.send_and_receive(grid, messages, context.timeout)
        out = RoundOutcome()
        updates: list[tuple[adapters.State, float]] = []
        for site in selected:
            update = _take_update(replies.get(site.node_id), site.name, rc, context, out)
            if update is not None:
                updates.append(update)
        if updates:
            out.weighted_sum, out.total_weight = adapters.sum_updates(updates)
        return out


def _take_update(reply: Optional[Message], name: str, rc: protocol.RoundConfig, context: RoundContext,
                 out: RoundOutcome) -> Optional[tuple[adapters.State, float]]:
    """Charge the site unless it refused, and return its checked (n·Δ, n), or None."""
    if reply is None or reply.has_error():
        reason = "no reply" if reply is None else reply.error.reason
        log.warning("%s failed in round %d (%s); charging it, as its update may have left", name, rc.round, reason)
        context.ledger.charge(name, rc.charge())
        out.failures.append(name)
        return None
    if record_refusal(reply, name, rc.round, out):
        return None
    context.ledger.charge(name, rc.charge())
    try:
        metrics = reply.content[protocol.METRICS]
        weight = float(metrics["weight"])
        state = adapters.validate_update(reply.content[protocol.UPDATE], weight, context.spec)
        train_seconds = float(metrics["train_seconds"])
    except (adapters.UpdateRejected, KeyError, TypeError, ValueError) as exc:
        log.error("rejected the update of %s in round %d: %s; it is not aggregated", name, rc.round, exc)
        out.failures.append(name)
        return None
    out.participants.append(name)
    out.local_train_seconds += train_seconds
    if "train_loss" in metrics and float(metrics["train_loss"]) >= 0:  # sent only when the site allows it
        out.train_losses.append(float(metrics["train_loss"]))
    return state, weight
