"""Secure aggregation (SecAgg+), the server's half, as a round protocol on Flower's Grid.

Five round trips (advertise, share, mask = train, consistency, unmask), one function
each.  The server relays each site's signed keys and signed survivor set; it verifies
nothing itself, since the sites do (:mod:`fedtune.federation.secure_checks`), and a site
that aborts on a failed check ends the round: no partial sum is used.  The
server only ever holds public keys, ciphertexts it cannot open, masked vectors, and for
each site *either* self-mask shares (it survived) *or* mask-key shares (it dropped),
never both.  Charges: every site that was sent the masked-input stage and did not refuse
is charged, since its masked update may have left even if its reply was lost.  Every
reply is parsed by the typed records of :mod:`fedtune.federation.wire`; a malformed one
counts as that site failing the stage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.federation import exchange, protocol, wire
from fedtune.federation.rounds import RoundContext, RoundOutcome, record_refusal
from fedtune.secagg import protocol as secagg
from fedtune.secagg.masks import Quantizer
from fedtune.secagg.parameters import secagg_parameters

if TYPE_CHECKING:
    from fedtune.federation.membership import SiteInfo

log = logging.getLogger(__name__)

# A SuperLink that restarted hears a reconnecting site's heartbeat within ~2 s (see
# fedtune.deploy.supernode); wait that long before asking an "offline" site again.
ADVERTISE_RETRY_S = 3.0

PublicKeys = dict[int, tuple[bytes, bytes]]
Advertised = dict[int, wire.SignedKeys]


class SecureAggregation:
    """The round protocol with SecAgg+ (``secagg.enabled=true``): the server sees sums only."""

    min_sites = secagg.MIN_SITES

    def __init__(self, cfg: FedtuneConfig) -> None:
        self.cfg = cfg

    def run(self, grid: Grid, selected: list["SiteInfo"], rc: protocol.RoundConfig,
            global_state: adapters.State, context: RoundContext) -> RoundOutcome:
        rnd = SecureRound(grid, rc, context, selected)
        advertised = advertise_keys(rnd)
        public = {i: signed.keys for i, signed in advertised.items()}
        k, t = secagg_parameters(self.cfg, len(public))
        if len(public) < secagg.MIN_SITES or len(public) < t + 1:
            log.warning("round %d abandoned: only %d sites advertised keys (secure aggregation needs at least %d "
                        "and more than the threshold %d); nothing was trained", rc.round, len(public),
                        secagg.MIN_SITES, t)
            return rnd.out
        graph = secagg.neighbour_graph(sorted(public), k, seed=rc.round)
        routed = share_keys(rnd, advertised, graph, t)
        s = self.cfg.secagg
        quant = Quantizer(bits=s.bits, clip_range=s.clip_range, max_weight=s.max_weight, num_sites=len(routed))
        masked = masked_input(rnd, routed, quant, global_state)
        # Each survivor needs t surviving neighbours (its own check, and the shares of its
        # self-mask); with fewer the round cannot complete, so nobody is asked to sign.
        enough = len(masked) >= t and all(len(set(graph[i]) & set(masked)) >= t for i in masked)
        signatures = consistency_check(rnd, set(masked)) if enough else None
        if signatures is None:
            _abandon(rnd, set(masked), "too few survivors, or a site aborted the consistency check")
            return rnd.out
        ring_sum = unmask(rnd, masked, set(routed), graph, public, t, quant.bits, signatures)
        if ring_sum is not None:
            _decode(rnd, ring_sum, quant, set(masked))
        return rnd.out


@dataclass
class SecureRound:
    """One secure round in progress: the sites by their Shamir index (1..n), and the outcome so far."""

    grid: Grid
    rc: protocol.RoundConfig
    context: RoundContext
    selected: list["SiteInfo"]
    out: RoundOutcome = field(default_factory=RoundOutcome)
    index: dict[int, int] = field(init=False)  # node id -> index
    aborted: set[int] = field(default_factory=set)  # sites that aborted on a failed check
    by_index: dict[int, "SiteInfo"] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {s.node_id: i + 1 for i, s in enumerate(self.selected)}
        self.by_index = {self.index[s.node_id]: s for s in self.selected}

    def name(self, node: int) -> str:
        site = self.by_index.get(self.index.get(node, 0))
        return site.name if site is not None else f"node {node}"

    def send(self, stage: str, requests: dict[int, RecordDict]) -> tuple[dict[int, Message], set[int]]:
        """One stage to many sites (by index) in one round trip, each request beside the round config.

        Returns the good replies by index, and the indices the SuperLink reported offline.
        """
        messages = []
        for i, content in requests.items():
            content[protocol.ROUND_CONFIG] = self.rc.to_record()
            messages.append(Message(content, dst_node_id=self.by_index[i].node_id, message_type=protocol.TRAIN))
        replies: dict[int, Message] = {}
        offline: set[int] = set()
        for node, reply in exchange.send_and_receive(self.grid, messages, self.context.timeout).items():
            if reply.has_error():
                log.warning("%s failed the %s stage of round %d: %s", self.name(node), stage, self.rc.round,
                            reply.error.reason)
                if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    offline.add(self.index[node])
                continue
            replies[self.index[node]] = reply
        return replies, offline

    def answers(self, stage: str, replies: dict[int, Message]) -> dict[int, Message]:
        """The replies that carry the stage's answer; a site's refusal (a fixed code) is logged and left out.

        A site that aborted on a failed check is noted in ``aborted``.
        """
        kept = {}
        for i, reply in replies.items():
            status = reply.content.config_records.get(protocol.STATUS)
            if status is not None and status.get("status") == protocol.STATUS_REFUSED:
                log.warning("%s refused the %s stage of round %d: %s", self.by_index[i].name, stage, self.rc.round,
                            status.get("reason"))
                if status.get("reason") == protocol.ABORTED_SECAGG:
                    self.aborted.add(i)
                continue
            kept[i] = reply
        return kept

    def malformed(self, i: int, stage: str, exc: Exception) -> None:
        log.error("rejected the %s reply of %s in round %d: %s", stage, self.by_index[i].name, self.rc.round, exc)


def advertise_keys(rnd: SecureRound) -> Advertised:
    """Stage 1: every selected site makes this round's key pairs (a site over budget refuses here,
    before any secret exists).  Returns the advertised, signed public keys by index, each
    with the roster id the site is enrolled (in simulation: named) under."""
    def requests(indices: list[int]) -> dict[int, RecordDict]:
        return {i: wire.AdvertiseRequest(index=i).to_record() for i in indices}

    replies, offline = rnd.send(protocol.STAGE_ADVERTISE, requests(sorted(rnd.by_index)))
    if offline:
        # No secret exists before this stage completes, so asking again is safe.  The usual
        # cause is a SuperLink that restarted and has not yet heard a heartbeat from a site
        # that is polling again; without a second ask one blip would abandon the round.
        time.sleep(ADVERTISE_RETRY_S)
        log.info("asking %s again to advertise keys for round %d",
                 ", ".join(sorted(rnd.by_index[i].name for i in offline)), rnd.rc.round)
        again, _ = rnd.send(protocol.STAGE_ADVERTISE, requests(sorted(offline)))
        replies.update(again)
    public: Advertised = {}
    for i, site in sorted(rnd.by_index.items()):
        reply = replies.get(i)
        if reply is None:
            rnd.out.failures.append(site.name)
            continue
        if record_refusal(reply, site.name, rnd.rc.round, rnd.out):
            continue
        try:
            answer = wire.AdvertiseReply.from_record(reply.content)
            public[i] = wire.SignedKeys(site_id=site.name, enc_pk=answer.enc_pk, mask_pk=answer.mask_pk,
                                        signature=answer.signature)
        except protocol.Refusal as exc:
            rnd.malformed(i, protocol.STAGE_ADVERTISE, exc)
            rnd.out.failures.append(site.name)
    return public


def share_keys(rnd: SecureRound, public: Advertised, graph: dict[int, list[int]], threshold: int
               ) -> dict[int, dict[int, bytes]]:
    """Stage 2: each site Shamir-shares its secrets, encrypted to each neighbour.

    Returns, for every site that shared (the sharers), the ciphertexts addressed to it
    by other sharers: {receiver: {sender: ciphertext}}.
    """
    requests = {i: wire.ShareRequest(threshold=threshold, neighbour_keys={j: public[j] for j in graph[i]}).to_record()
                for i in public}
    replies, _ = rnd.send(protocol.STAGE_SHARE, requests)
    shares: dict[int, dict[int, bytes]] = {}
    for i, reply in rnd.answers(protocol.STAGE_SHARE, replies).items():
        try:
            shares[i] = wire.ShareReply.from_record(reply.content, graph[i]).shares
        except protocol.Refusal as exc:
            rnd.malformed(i, protocol.STAGE_SHARE, exc)
    sharers = set(shares)
    routed = secagg.route_shares({i: {j: ct for j, ct in v.items() if j in sharers} for i, v in shares.items()})
    return {i: routed.get(i, {}) for i in sorted(sharers)}


def masked_input(rnd: SecureRound, routed: dict[int, dict[int, bytes]], quant: Quantizer,
                 global_state: adapters.State) -> dict[int, np.ndarray]:
    """Stage 3: each sharer trains with DP-SGD and sends its masked, quantised (n·Δ, n).

    Every sharer that did not refuse is charged, answered or not.  Returns the masked
    vectors by index; a lost or malformed one makes its site a dropout.
    """
    adapter_records = rnd.context.adapter_records(global_state)
    requests = {}
    for i, received in routed.items():
        requests[i] = wire.MaskRequest(quantizer=quant, shares=received).to_record()
        for name, record in adapter_records.items():
            requests[i][name] = record
    replies, _ = rnd.send(protocol.STAGE_MASK, requests)
    # The flattened trainable tensors, then the weight n.
    length = sum(int(np.prod(shape)) for shape in rnd.context.spec.shapes.values()) + 1
    masked: dict[int, np.ndarray] = {}
    for i in sorted(routed):
        site, reply = rnd.by_index[i], replies.get(i)
        if reply is not None and record_refusal(reply, site.name, rnd.rc.round, rnd.out):
            continue
        rnd.context.ledger.charge(site.name, rnd.rc.charge())
        if reply is None:
            log.warning("%s dropped out of round %d after the share stage; recovering its masks", site.name,
                        rnd.rc.round)
            rnd.out.failures.append(site.name)
            continue
        try:
            masked[i] = wire.MaskReply.from_record(reply.content, length, quant.bits,
                                                   rnd.context.spec.max_bytes).masked
        except adapters.UpdateRejected as exc:
            log.error("rejected the masked update of %s in round %d: %s; treated as a dropout", site.name,
                      rnd.rc.round, exc)
            rnd.out.failures.append(site.name)
    return masked


def consistency_check(rnd: SecureRound, survivors: set[int]) -> Optional[dict[int, bytes]]:
    """Stage 4: every survivor signs the set of survivors; returns the signatures by signer.

    None if a site aborted (it saw a set it cannot accept): the round is then abandoned.
    A survivor that does not answer is still in the set; its input is in the sum.
    """
    request = wire.ConsistencyRequest(survivors=frozenset(survivors))
    replies, _ = rnd.send(protocol.STAGE_CONSISTENCY, {i: request.to_record() for i in sorted(survivors)})
    signatures: dict[int, bytes] = {}
    for i, reply in rnd.answers(protocol.STAGE_CONSISTENCY, replies).items():
        try:
            signatures[i] = wire.ConsistencyReply.from_record(reply.content).signature
        except protocol.Refusal as exc:
            rnd.malformed(i, protocol.STAGE_CONSISTENCY, exc)
    return None if rnd.aborted else signatures


def _abandon(rnd: SecureRound, survivors: set[int], why: str) -> None:
    log.error("round %d abandoned: %s; no partial sum is used, the sites' charges stay", rnd.rc.round, why)
    rnd.out.failures.extend(rnd.by_index[i].name for i in sorted(survivors))


def unmask(rnd: SecureRound, masked: dict[int, np.ndarray], sharers: set[int], graph: dict[int, list[int]],
           public: PublicKeys, threshold: int, bits: int, signatures: dict[int, bytes]) -> Optional[np.ndarray]:
    """Stage 5: survivors reveal self-mask shares of surviving and mask-key shares of dropped neighbours.

    Each signer is sent the survivor set and its neighbours' signatures over it.  Returns
    the ring sum of the survivors' inputs, or None if the round is abandoned (too few
    shares, or a site aborted): no partial sum is ever used, and the charges stay.
    """
    survivors = frozenset(masked)
    requests = {i: wire.UnmaskRequest(survivors=survivors,
                                      signatures={j: signatures[j] for j in graph[i] if j in signatures})
                for i in sorted(signatures)}
    replies, _ = rnd.send(protocol.STAGE_UNMASK, {i: request.to_record() for i, request in requests.items()})
    seed_shares: dict[int, dict[int, bytes]] = {}
    key_shares: dict[int, dict[int, bytes]] = {}
    for holder, reply in rnd.answers(protocol.STAGE_UNMASK, replies).items():
        alive = set(graph[holder]) & survivors
        try:
            answer = wire.UnmaskReply.from_record(reply.content, alive, (set(graph[holder]) & sharers) - alive)
        except protocol.Refusal as exc:
            rnd.malformed(holder, protocol.STAGE_UNMASK, exc)
            continue
        for j, share in answer.seed_shares.items():
            seed_shares.setdefault(j, {})[holder] = share
        for j, share in answer.key_shares.items():
            key_shares.setdefault(j, {})[holder] = share
    if rnd.aborted:
        _abandon(rnd, set(survivors), "a site aborted the unmask stage")
        return None
    try:
        return secagg.unmask_sum(masked, sharers, graph, public, seed_shares, key_shares, threshold, rnd.rc.round,
                                 bits)
    except secagg.RoundAbandoned as exc:
        _abandon(rnd, set(survivors), str(exc))
        return None


def _decode(rnd: SecureRound, ring_sum: np.ndarray, quant: Quantizer, survivors: set[int]) -> None:
    """Σ n_i·Δ_i and Σ n_i from the ring sum, and the bound on the mean's quantisation error."""
    weighted, total = quant.decode_sum(ring_sum)
    names = rnd.context.names
    rnd.out.weighted_sum = adapters.unflatten(weighted, rnd.context.spec.shapes, names)
    rnd.out.total_weight = total
    rnd.out.participants = sorted(rnd.by_index[i].name for i in survivors)
    rnd.out.extra["quantization_error_bound"] = quant.sum_error_bound / max(total, 1.0)
