"""The server's half of a secure-aggregation round, on Flower's Grid.

Four round trips (advertise, share, mask = train, unmask).  The server only ever holds
public keys, ciphertexts it cannot open, masked vectors, and for each site *either*
self-mask shares (it survived) *or* mask-key shares (it dropped), never both.  Charges:
every site that was sent the masked-input stage and did not refuse is charged, since its
masked update may have left even if its reply was lost.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.federation import exchange, protocol
from fedtune.privacy.accounting import Charge
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.secagg import protocol as secagg
from fedtune.secagg.masks import Quantizer, ring_dtype
from fedtune.secagg.parameters import secagg_parameters

if TYPE_CHECKING:
    from fedtune.federation.server import RoundOutcome, SiteInfo

log = logging.getLogger(__name__)

# A SuperLink that restarted hears a reconnecting site's heartbeat within ~2 s (see
# fedtune.deploy.supernode); wait that long before asking an "offline" site again.
ADVERTISE_RETRY_S = 3.0


def _send(grid: Grid, contents: dict[int, dict], rc: protocol.RoundConfig, stage: dict,
          timeout: Optional[float], names: dict[int, str],
          per_node: Optional[dict[int, dict]] = None) -> tuple[dict[int, Message], set[int]]:
    """One stage to many nodes in one round trip; ``per_node`` adds node-specific stage fields.

    Returns the good replies by node, and the nodes the SuperLink reported offline.
    """
    messages = []
    for node, records in contents.items():
        records = dict(records)
        records[protocol.ROUND_CONFIG] = rc.to_record()
        records[protocol.SECAGG] = ConfigRecord({**stage, **(per_node or {}).get(node, {})})
        messages.append(Message(RecordDict(records), dst_node_id=node, message_type=protocol.TRAIN))
    replies: dict[int, Message] = {}
    offline: set[int] = set()
    for node, reply in exchange.send_and_receive(grid, messages, timeout).items():
        if reply.has_error():
            log.warning("%s failed the %s stage of round %d: %s", names.get(node, f"node {node}"), stage["stage"],
                        rc.round, reply.error.reason)
            if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                offline.add(node)
            continue
        replies[node] = reply
    return replies, offline


def _without_refusals(replies: dict[int, Message], names: dict[int, str], rc: protocol.RoundConfig,
                      stage: str) -> dict[int, Message]:
    """The replies that carry the stage's answer; a site's refusal (a fixed code) is logged and left out."""
    kept = {}
    for node, reply in replies.items():
        status = reply.content.config_records.get(protocol.STATUS)
        if status is not None and status.get("status") == protocol.STATUS_REFUSED:
            log.warning("%s refused the %s stage of round %d: %s", names.get(node, f"node {node}"), stage, rc.round,
                        status.get("reason"))
            continue
        kept[node] = reply
    return kept


def secure_round(grid: Grid, selected: list["SiteInfo"], cfg: FedtuneConfig, rc: protocol.RoundConfig,
                 global_state: dict, names: list[str], ledger: PrivacyLedger,
                 timeout: Optional[float]) -> "RoundOutcome":
    from fedtune.federation.server import RoundOutcome, record_refusal

    out = RoundOutcome()
    charge = Charge(round=rc.round, noise_multiplier=rc.noise_multiplier, sample_rate=rc.sample_rate,
                    steps=rc.local_steps)
    index = {s.node_id: i + 1 for i, s in enumerate(selected)}
    by_index = {index[s.node_id]: s for s in selected}

    # Stage 1: advertise keys (a site over budget refuses here, before any secret exists).
    site_names = {s.node_id: s.name for s in selected}
    advertise = {"stage": protocol.STAGE_ADVERTISE}
    per_node = {s.node_id: {"index": index[s.node_id]} for s in selected}
    replies, offline = _send(grid, {s.node_id: {} for s in selected}, rc, advertise, timeout, site_names, per_node)
    if offline:
        # No secret exists before this stage completes, so asking again is safe.  The usual
        # cause is a SuperLink that restarted and has not yet heard a heartbeat from a site
        # that is polling again; without a second ask one blip would abandon the round.
        time.sleep(ADVERTISE_RETRY_S)
        log.info("asking %s again to advertise keys for round %d", ", ".join(sorted(site_names[n] for n in offline)),
                 rc.round)
        again, _ = _send(grid, {n: {} for n in offline}, rc, advertise, timeout, site_names, per_node)
        replies.update(again)
    public: dict[int, tuple[bytes, bytes]] = {}
    for s in selected:
        reply = replies.get(s.node_id)
        if reply is None:
            out.failures.append(s.name)
            continue
        if record_refusal(reply, s.name, rc.round, out):
            continue
        keys = reply.content[protocol.SECAGG]
        public[index[s.node_id]] = (bytes(keys["enc_pk"]), bytes(keys["mask_pk"]))

    k, t = secagg_parameters(cfg, len(public))
    if len(public) < secagg.MIN_SITES or len(public) < t + 1:
        log.warning("round %d abandoned: only %d sites advertised keys (secure aggregation needs at least %d "
                    "and more than the threshold %d); nothing was trained", rc.round, len(public), secagg.MIN_SITES, t)
        return out
    graph = secagg.neighbour_graph(sorted(public), k, seed=rc.round)

    # Stage 2: share keys.
    contents = {}
    for i in public:
        keys = {}
        for j in graph[i]:
            keys[f"{j}.enc"], keys[f"{j}.mask"] = public[j]
        contents[by_index[i].node_id] = {protocol.KEYS: ConfigRecord(keys)}
    replies, _ = _send(grid, contents, rc, {"stage": protocol.STAGE_SHARE, "threshold": t}, timeout, site_names)
    replies = _without_refusals(replies, site_names, rc, protocol.STAGE_SHARE)
    shares = {index[node]: {int(j): bytes(ct) for j, ct in r.content[protocol.SHARES].items()}
              for node, r in replies.items()}
    sharers = set(shares)
    routed = secagg.route_shares({i: {j: ct for j, ct in v.items() if j in sharers} for i, v in shares.items()})

    # Stage 3: masked input (local DP training happens here).
    quant = Quantizer(bits=cfg.secagg.bits, clip_range=cfg.secagg.clip_range, max_weight=cfg.secagg.max_weight,
                      num_sites=len(sharers))
    stage = {"stage": protocol.STAGE_MASK, "bits": quant.bits, "clip_range": quant.clip_range,
             "max_weight": quant.max_weight, "num_sites": quant.num_sites}
    adapter = adapters.to_array_record(global_state)
    contents = {by_index[i].node_id: {protocol.GLOBAL_ADAPTER: adapter,
                                      protocol.SHARES: ConfigRecord({str(j): ct for j, ct in routed.get(i, {}).items()})}
                for i in sorted(sharers)}
    replies, _ = _send(grid, contents, rc, stage, timeout, site_names)
    length = sum(int(np.prod(global_state[n].shape)) for n in names) + 1
    masked: dict[int, np.ndarray] = {}
    for i in sorted(sharers):
        site = by_index[i]
        reply = replies.get(site.node_id)
        if reply is not None and record_refusal(reply, site.name, rc.round, out):
            continue
        ledger.charge(site.name, charge)
        if reply is None:
            log.warning("%s dropped out of round %d after the share stage; recovering its masks", site.name,
                        rc.round)
            out.failures.append(site.name)
            continue
        try:
            vector = reply.content[protocol.UPDATE]["masked"]
            expected_dtype = np.dtype(ring_dtype(quant.bits)).name
            if tuple(vector.shape) != (length,) or vector.dtype != expected_dtype:
                raise ValueError(f"masked vector of shape {tuple(vector.shape)} and dtype {vector.dtype}, expected "
                                 f"({length},) {expected_dtype}")
            if len(vector.data) > cfg.federation.max_update_bytes:
                raise ValueError(f"payload of {len(vector.data)} bytes exceeds the limit")
            masked[i] = vector.numpy()
        except (KeyError, TypeError, ValueError) as exc:
            log.error("rejected the masked update of %s in round %d: %s; treated as a dropout", site.name,
                      rc.round, exc)
            out.failures.append(site.name)

    # Stage 4: unmask.
    survivors = set(masked)
    # Index 0 is never a site; it keeps the lists non-empty for ConfigRecord.
    sets = {by_index[i].node_id: {"survivors": [0] + [j for j in graph[i] if j in survivors],
                                  "dropped": [0] + [j for j in graph[i] if j in sharers and j not in survivors]}
            for i in survivors}
    replies, _ = _send(grid, {n: {} for n in sets}, rc, {"stage": protocol.STAGE_UNMASK}, timeout, site_names, sets)
    replies = _without_refusals(replies, site_names, rc, protocol.STAGE_UNMASK)
    seed_shares: dict[int, dict[int, bytes]] = {}
    key_shares: dict[int, dict[int, bytes]] = {}
    for node, reply in replies.items():
        holder = index[node]
        for j, share in reply.content["seed_shares"].items():
            seed_shares.setdefault(int(j), {})[holder] = bytes(share)
        for j, share in reply.content["key_shares"].items():
            key_shares.setdefault(int(j), {})[holder] = bytes(share)
    try:
        ring_sum = secagg.unmask_sum(masked, sharers, graph, public, seed_shares, key_shares, t, rc.round,
                                     quant.bits)
    except secagg.RoundAbandoned as exc:
        log.error("round %d abandoned: %s; no partial sum is used, the sites' charges stay", rc.round, exc)
        out.failures.extend(by_index[i].name for i in survivors)
        return out
    weighted, total = quant.decode_sum(ring_sum)
    shapes = {n: tuple(global_state[n].shape) for n in names}
    out.weighted_sum = adapters.unflatten(weighted, shapes, sorted(names))
    out.total_weight = total
    out.participants = sorted(by_index[i].name for i in survivors)
    out.extra["quantization_error_bound"] = quant.sum_error_bound / max(total, 1.0)
    return out

