"""Secure aggregation cost: fedtune's SecAgg+ (signed and not) beside Flower's SecAgg+ and plain aggregation.

One run, same inputs, side by side (the machine is noisy; read the ratios, not the
absolute times).  For each federation size n, every site holds a float32 LoRA delta
of ``--entries`` entries and a weight (record count); 10% of the sites drop out.

What is measured, per implementation:
  client   per-site seconds of each stage: advertise (key generation), share (Shamir
           shares + their encryption; key agreement for the share keys), mask
           (quantise + derive pairwise keys + add masks; for Flower also decrypting the
           shares it received, which it does in this stage), unmask (the site's reply:
           decrypt/select shares), and their total.  Median over the timed sites.
  server   seconds to turn the masked vectors into the weighted sum: add the masked
           vectors, rebuild the seeds / keys from the shares, remove the masks,
           dequantise.  Two dropout cases, same masked inputs:
             after  the 10% sent their masked input, then vanished before unmasking
                    (the server removes every site's self mask);
             before the 10% shared keys, then vanished during training (their
                    masked input never arrives; the server rebuilds their mask keys
                    and removes their pairwise masks from each surviving neighbour).
  bytes    what one site sends over the whole round: the Flower RecordDict of every
           reply, serialised the way Flower ships it
           (``flwr.common.serde.recorddict_to_proto(content).ByteSize()``), summed
           over stages, "after" case; beside the plain site's one reply (float32 n·Δ
           in an ArrayRecord, its metrics and status).

fedtune: the functions of ``fedtune.secagg.protocol`` that ``secure_client`` and
``secure_server`` call, with replies built as those modules build them.
fedtune signed: the same, plus the active-adversary checks as ``secure_client`` runs them
(``fedtune.federation.secure_checks``): each site signs its keys (advertise), verifies
its k neighbours' signatures against the roster (share), signs the survivor set
(consistency, a fifth round trip) and verifies its neighbours' survivor signatures
(unmask); keys are ECDSA P-256, what ``fedtune client keygen`` makes.
Flower (flwr 1.42): running ``SecAggPlusWorkflow`` + ``secaggplus_mod`` end to end
for 100 nodes is impractical here, so this drives, in-process, the mod's own stage
functions (``_setup``, ``_share_keys``, ``_collect_masked_vectors``, ``_unmask``) and,
for the server, the workflow's unmask arithmetic re-stated step by step with the same
primitives (``combine_shares``, ``pseudo_rand_gen``, ``generate_shared_key``,
``parameters_*``, ``dequantize``).  Flower's defaults: ``quantization_range`` 2^22,
``modulus_range`` 2^32; ``num_shares`` = k + 1 (Flower counts the site itself),
threshold t; same k, t and clipping range as fedtune.  Not timed for either: the
ClientApp state save/load between stages, message transport, the local training.
plain: the server's float64 sum of the survivors' float32 n·Δ (``adapters.sum_updates``).

Every site is simulated (the server needs every masked vector for an exact sum, which
is checked against the plain sum, and the sites' work is independent, so n = 100 costs
about a minute of CPU).  The two implementations run interleaved, site by site and
stage by stage, so load from other jobs hits both alike; client stages are timed on
every surviving site (or on ``--sample`` random ones; the sites are printed).

Usage: python benchmarks/secagg.py [--quick] [--entries N] [--sites 10,50,100] [--sample S]
  default: 1M entries, n = 10, 50, 100;  --quick: 100k entries, n = 10, 20.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Generator, Iterator

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (factor_extract, get_parameters_shape,
                                                                 parameters_addition, parameters_mod,
                                                                 parameters_subtraction)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedtune import adapters
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.federation import protocol as msgs
from fedtune.federation import secure_checks, wire
from fedtune.privacy.policy import SitePolicy
from fedtune.secagg import protocol
from fedtune.secagg.masks import Quantizer
from fedtune.secagg.signing import Identity, keys_statement, survivors_statement

# The module, not the function of the same name that its package re-exports.
fmod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")

STAGES = ("advertise", "share", "mask", "consistency", "unmask")
ROUND = 1
CLIP = 1.0
MAX_WEIGHT = 1000
DROPOUT = 0.1


def wire_bytes(content: dict) -> int:
    return recorddict_to_proto(RecordDict(content)).ByteSize()


def ok() -> ConfigRecord:
    return ConfigRecord({"status": msgs.STATUS_OK})


@dataclass
class Timings:
    client: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    total: list[float] = field(default_factory=list)
    bytes_per_site: list[int] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)

    def record_sites(self, clocks: dict, timed: set[int], sent: dict[int, int], kept: list[int]) -> None:
        """Per-stage and total client time of the timed sites, and the bytes each kept site sent."""
        for i in sorted(timed):
            for stage in STAGES:
                self.client[stage].append(clocks[i].spent[stage])
            self.total.append(sum(clocks[i].spent.values()))
        self.bytes_per_site = [sent[i] for i in kept]


def site_delta(n_entries: int, site: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(site)
    return rng.normal(0.0, 0.01, n_entries).astype(np.float32), int(rng.integers(50, 500))


class Clock:
    """Accumulates one site's seconds per stage."""

    def __init__(self) -> None:
        self.spent = {s: 0.0 for s in STAGES}

    def run(self, stage: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.spent[stage] += time.perf_counter() - start
        return out


# ------------------------------------------------------------------ fedtune
def identities(n: int) -> dict[int, Identity]:
    """One enrolled P-256 key per site and the roster of all of them (made once, not timed)."""
    keys = {i: ec.generate_private_key(ec.SECP256R1()) for i in range(1, n + 1)}
    roster = {f"site-{i}": key.public_key() for i, key in keys.items()}
    return {i: Identity("bench", f"site-{i}", key, roster) for i, key in keys.items()}


def signed_advertise(ident: Identity, i: int) -> tuple[protocol.SiteSecrets, tuple[bytes, bytes], bytes]:
    secrets_, (enc, mask) = protocol.advertise_keys(i)
    return secrets_, (enc, mask), ident.sign(keys_statement(ident.federation, ROUND, i, ident.site_id, enc, mask))


def signed_share(ident: Identity, site: protocol.SiteSecrets, request: wire.ShareRequest, t: int) -> dict[int, bytes]:
    keys, names = secure_checks.verified_neighbours(ident, ROUND, request, SitePolicy())
    site.threshold, site.neighbour_sites = protocol.site_threshold(len(keys), t), names
    return protocol.share_keys(site, keys, site.threshold, ROUND)


@dataclass
class FedtuneSites:
    """One fedtune run's simulated sites: what they keep between stages, their clocks, the bytes each sent."""
    sites: list[int]
    graph: dict[int, list[int]]
    clocks: dict[int, Clock]
    sent: dict[int, int]
    ids: dict[int, Identity]  # enrolled keys, signed runs only
    signed: bool
    secrets: dict[int, protocol.SiteSecrets] = field(default_factory=dict)
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    signatures: dict[int, bytes] = field(default_factory=dict)


def run_fedtune(n: int, entries: int, k: int, t: int, dropped: set[int], timed: set[int], res: Timings,
                plain_sums: dict[str, tuple[np.ndarray, float]], signed: bool = False) -> Iterator[None]:
    """A generator: yields after each site's step, so that main() can interleave the implementations."""
    sites = list(range(1, n + 1))
    graph = protocol.neighbour_graph(sites, k, seed=ROUND)
    quant = Quantizer(bits=32, clip_range=CLIP, max_weight=MAX_WEIGHT, num_sites=n)
    quant.check()
    run = FedtuneSites(sites, graph, {i: Clock() for i in sites}, {i: 0 for i in sites},
                       identities(n) if signed else {}, signed)
    yield from fedtune_advertise(run)
    shares = yield from fedtune_share(run, t)
    routed = protocol.route_shares(shares)
    masked = yield from fedtune_mask(run, entries, quant, routed)

    for case, arrived in (("after", set(sites)), ("before", set(sites) - dropped)):
        seed_shares, key_shares = yield from fedtune_unmask(run, case, arrived, dropped)
        start = time.perf_counter()
        weighted, total = fedtune_server_sum(run, {i: masked[i] for i in arrived}, seed_shares, key_shares, t,
                                             quant)
        res.server[case] = time.perf_counter() - start
        ref_sum, ref_weight = plain_sums[case]
        assert total == ref_weight, (total, ref_weight)
        res.error[case] = float(np.max(np.abs(weighted / total - ref_sum / ref_weight)))
        res.error[case + "_bound"] = quant.sum_error_bound / total
        yield
    res.record_sites(run.clocks, timed, run.sent, [i for i in sites if i not in dropped])


def fedtune_advertise(run: FedtuneSites) -> Iterator[None]:
    """Stage 1 at every site: key generation (and, signed, the keys' signature)."""
    for i in run.sites:
        if run.signed:
            run.secrets[i], run.public[i], run.signatures[i] = run.clocks[i].run("advertise", signed_advertise,
                                                                                 run.ids[i], i)
        else:
            run.secrets[i], run.public[i] = run.clocks[i].run("advertise", protocol.advertise_keys, i)
        run.sent[i] += wire_bytes({**wire.AdvertiseReply(*run.public[i], run.signatures.get(i, b"")).to_record(),
                                   msgs.STATUS: ok()})
        yield


def fedtune_share(run: FedtuneSites, t: int) -> Generator[None, None, dict[int, dict[int, bytes]]]:
    """Stage 2 at every site: the encrypted shares for its neighbours, {sender: {receiver: ciphertext}}."""
    shares = {}
    for i in run.sites:
        if run.signed:
            request = wire.ShareRequest(t, {j: wire.SignedKeys(f"site-{j}", *run.public[j], run.signatures[j])
                                            for j in run.graph[i]})
            shares[i] = run.clocks[i].run("share", signed_share, run.ids[i], run.secrets[i], request, t)
        else:
            shares[i] = run.clocks[i].run("share", protocol.share_keys, run.secrets[i],
                                          {j: run.public[j] for j in run.graph[i]}, t, ROUND)
        run.sent[i] += wire_bytes({**wire.ShareReply(shares[i]).to_record(), msgs.STATUS: ok()})
        yield
    return shares


def fedtune_mask(run: FedtuneSites, entries: int, quant: Quantizer, routed: dict[int, dict[int, bytes]]
                 ) -> Generator[None, None, dict[int, np.ndarray]]:
    """Stage 3 at every site: its masked input."""
    def mask(i: int, delta: np.ndarray, weight: int) -> np.ndarray:
        if not np.all(np.isfinite(delta)):  # secure_client checks before masking
            raise RuntimeError("non-finite delta")
        return protocol.mask_input(run.secrets[i], quant.encode(delta, weight), routed[i], ROUND, quant.bits)

    masked = {}
    for i in run.sites:
        delta, weight = site_delta(entries, i)
        masked[i] = run.clocks[i].run("mask", mask, i, delta, weight)
        run.secrets[i].masked = True
        run.sent[i] += wire_bytes({**wire.MaskReply(masked[i]).to_record(), msgs.STATUS: ok()})
        yield
    return masked


def fedtune_unmask(run: FedtuneSites, case: str, arrived: set[int], dropped: set[int]
                   ) -> Generator[None, None, tuple[dict[int, dict[int, bytes]], dict[int, dict[int, bytes]]]]:
    """The last stages at the answering sites: (signed: consistency, then) the unmask replies.

    Returns the seed shares and the key shares, {owner: {holder: share}}.  Only the "after" case
    is timed and counted in the bytes: "before" reuses the same sites for the second dropout case.
    """
    answering = arrived - dropped  # sites that reply to the unmask stage
    view = frozenset(arrived)
    survivor_sigs = {i: consistency(run.ids[i], run.secrets[i], view, run.clocks[i] if case == "after" else Clock(),
                                    run.sent if case == "after" else None)
                     for i in sorted(answering)} if run.signed else {}
    seed_shares: dict[int, dict[int, bytes]] = {}
    key_shares: dict[int, dict[int, bytes]] = {}
    for i in sorted(answering):
        survivors = {j for j in run.graph[i] if j in arrived}
        gone = {j for j in run.graph[i] if j not in arrived}
        if run.signed:
            request = wire.UnmaskRequest(view, {j: survivor_sigs[j] for j in run.graph[i] if j in survivor_sigs})
            check = Clock() if case != "after" else run.clocks[i]
            check.run("unmask", secure_checks.check_survivor_signatures, run.ids[i], run.secrets[i], ROUND, request)
        if case == "after":
            s, kk = run.clocks[i].run("unmask", protocol.unmask, run.secrets[i], survivors, gone, ROUND)
            run.sent[i] += wire_bytes({**wire.UnmaskReply(s, kk).to_record(), msgs.STATUS: ok()})
        else:
            s, kk = protocol.unmask(run.secrets[i], survivors, gone, ROUND)
        for j, v in s.items():
            seed_shares.setdefault(j, {})[i] = v
        for j, v in kk.items():
            key_shares.setdefault(j, {})[i] = v
        yield
    return seed_shares, key_shares


def fedtune_server_sum(run: FedtuneSites, masked: dict[int, np.ndarray], seed_shares: dict[int, dict[int, bytes]],
                       key_shares: dict[int, dict[int, bytes]], t: int, quant: Quantizer) -> tuple[np.ndarray, float]:
    """The server's work on the masked vectors that arrived: unmask the ring sum, decode it."""
    ring_sum = protocol.unmask_sum(masked, set(run.sites), run.graph, run.public, seed_shares, key_shares, t, ROUND,
                                   quant.bits)
    return quant.decode_sum(ring_sum)


def consistency(ident: Identity, site: protocol.SiteSecrets, view: frozenset[int], clock: Clock,
                sent: dict[int, int] | None) -> bytes:
    """The signed protocol's fourth stage at one site: check the survivor set, sign it."""
    def sign() -> bytes:
        secure_checks.check_survivors(site, view, SitePolicy())
        site.signed = view
        return ident.sign(survivors_statement(ident.federation, ROUND, site.index, site.mask.public, view))

    site.signed = None  # each case of the benchmark is its own round's view
    signature = clock.run("consistency", sign)
    if sent is not None:
        sent[site.index] += wire_bytes({**wire.ConsistencyReply(signature).to_record(), msgs.STATUS: ok()})
    return signature


# ------------------------------------------------------------------ Flower
def flower_neighbours(nids: list[int], num_shares: int) -> dict[int, set[int]]:
    """SecAggPlusWorkflow.setup_stage's ring: each node and num_shares // 2 on each side."""
    order = list(nids)
    random.Random(ROUND).shuffle(order)
    half = num_shares >> 1
    return {nid: {order[(idx + off) % len(order)] for off in range(-half, half + 1)} for idx, nid in enumerate(order)}


@dataclass
class FlowerSites:
    """One Flower run's simulated nodes: the mod's state of each, their clocks, the bytes each sent."""
    nids: list[int]
    neighbours: dict[int, set[int]]
    clocks: dict[int, Clock]
    sent: dict[int, int]
    states: dict[int, fmod.SecAggPlusState] = field(default_factory=dict)
    public: dict[int, list[bytes]] = field(default_factory=dict)


def flower_reply_bytes(res_: dict, content: RecordDict | None = None) -> int:
    """The serialised size of a node's reply: the stage's output in the SecAgg+ config record."""
    content = content if content is not None else RecordDict()
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(res_)  # the mod passes keep_input=False
    return recorddict_to_proto(content).ByteSize()


def run_flower(n: int, entries: int, k: int, t: int, dropped: set[int], timed: set[int], res: Timings,
               plain_sums: dict[str, tuple[np.ndarray, float]]) -> Iterator[None]:
    """A generator, as run_fedtune: yields after each node's step."""
    nids = list(range(1, n + 1))
    num_shares, target_range, mod_range = k + 1, 1 << 22, 1 << 32
    run = FlowerSites(nids, flower_neighbours(nids, num_shares), {i: Clock() for i in nids}, {i: 0 for i in nids})
    setup = {Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: num_shares, Key.THRESHOLD: t, Key.CLIPPING_RANGE: CLIP,
             Key.TARGET_RANGE: target_range, Key.MOD_RANGE: mod_range, Key.MAX_WEIGHT: float(MAX_WEIGHT)}
    yield from flower_advertise(run, setup)
    fwd_ct, fwd_src = yield from flower_share(run)
    masked = yield from flower_mask(run, entries, fwd_ct, fwd_src)

    for case, arrived in (("after", set(nids)), ("before", set(nids) - dropped)):
        collected = yield from flower_unmask(run, case, arrived, dropped)
        start = time.perf_counter()
        vector = flower_masked_sum(masked, arrived, mod_range)
        vector = flower_remove_masks(run, vector, collected, arrived, t, mod_range)
        aggregated = flower_decode(vector, len(arrived), target_range)
        res.server[case] = time.perf_counter() - start
        ref_sum, ref_weight = plain_sums[case]
        res.error[case] = float(np.max(np.abs(aggregated[0] - ref_sum / ref_weight)))
        yield
    res.record_sites(run.clocks, timed, run.sent, [i for i in nids if i not in dropped])


def flower_advertise(run: FlowerSites, setup: dict) -> Iterator[None]:
    """The mod's setup stage at every node: its state and its two public keys."""
    for i in run.nids:
        state = fmod.SecAggPlusState()
        state.nid = i
        out = run.clocks[i].run("advertise", fmod._setup, state, ConfigRecord(dict(setup)))
        run.states[i], run.public[i] = state, [out[Key.PUBLIC_KEY_1], out[Key.PUBLIC_KEY_2]]
        run.sent[i] += flower_reply_bytes(out)
        yield


def flower_share(run: FlowerSites) -> Generator[None, None, tuple[dict[int, list[bytes]], dict[int, list[int]]]]:
    """The mod's share-keys stage at every node; the ciphertexts (and their sources) forwarded to each node."""
    fwd_ct: dict[int, list[bytes]] = {i: [] for i in run.nids}
    fwd_src: dict[int, list[int]] = {i: [] for i in run.nids}
    for i in run.nids:
        keys = ConfigRecord({str(j): run.public[j] for j in run.neighbours[i]})
        out = run.clocks[i].run("share", fmod._share_keys, run.states[i], keys)
        run.sent[i] += flower_reply_bytes(out)
        for dst, ct in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST]):
            fwd_ct[dst].append(ct)
            fwd_src[dst].append(i)
        yield
    return fwd_ct, fwd_src


def flower_mask(run: FlowerSites, entries: int, fwd_ct: dict[int, list[bytes]], fwd_src: dict[int, list[int]]
                ) -> Generator[None, None, dict[int, list[bytes]]]:
    """The mod's collect-masked-vectors stage at every node: its masked parameters."""
    masked: dict[int, list[bytes]] = {}
    for i in run.nids:
        delta, weight = site_delta(entries, i)
        params = ndarrays_to_parameters([delta])  # what the wrapped ClientApp's fit returned
        cfg = ConfigRecord({Key.CIPHERTEXT_LIST: fwd_ct[i], Key.SOURCE_LIST: fwd_src[i]})
        out = run.clocks[i].run("mask", fmod._collect_masked_vectors, run.states[i], cfg, weight, params)
        masked[i] = out[Key.MASKED_PARAMETERS]
        content = compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), params, weight, {}), keep_input=True)
        for record in content.array_records.values():
            record.clear()  # as the mod does: only the masked vector leaves
        run.sent[i] += flower_reply_bytes(out, content)
        yield
    return masked


def flower_unmask(run: FlowerSites, case: str, arrived: set[int], dropped: set[int]
                  ) -> Generator[None, None, dict[int, list[bytes]]]:
    """The mod's unmask stage at the answering nodes; the shares collected for each node.

    Only the "after" case is timed and counted in the bytes, as for fedtune.
    """
    answering = arrived - dropped
    collected: dict[int, list[bytes]] = {i: [] for i in run.nids}
    for i in sorted(answering):
        cfg = ConfigRecord({Key.ACTIVE_NODE_ID_LIST: sorted(run.neighbours[i] & arrived),
                            Key.DEAD_NODE_ID_LIST: sorted(run.neighbours[i] - arrived)})
        if case == "after":
            out = run.clocks[i].run("unmask", fmod._unmask, run.states[i], cfg)
            run.sent[i] += flower_reply_bytes(out)
        else:
            out = fmod._unmask(run.states[i], cfg)
        for owner, share in zip(out[Key.NODE_ID_LIST], out[Key.SHARE_LIST]):
            collected[owner].append(share)
        yield
    return collected


def flower_masked_sum(masked: dict[int, list[bytes]], arrived: set[int], mod_range: int) -> list[np.ndarray]:
    """SecAggPlusWorkflow.collect_masked_vectors_stage: sum the masked vectors."""
    vector = None
    for i in sorted(arrived):
        arrays = [bytes_to_ndarray(b) for b in masked[i]]
        vector = arrays if vector is None else parameters_addition(vector, arrays)
    return parameters_mod(vector, mod_range)


def flower_remove_masks(run: FlowerSites, vector: list[np.ndarray], collected: dict[int, list[bytes]],
                        arrived: set[int], t: int, mod_range: int) -> list[np.ndarray]:
    """SecAggPlusWorkflow.unmask_stage: remove the arrived nodes' self masks and the dropped nodes' pairwise masks."""
    for nid, share_list in collected.items():
        if len(share_list) < t:
            raise RuntimeError(f"Flower: not enough shares for node {nid}")
        secret = combine_shares(share_list)
        if nid in arrived:
            vector = parameters_subtraction(vector, pseudo_rand_gen(secret, mod_range, get_parameters_shape(vector)))
        else:
            for other in run.neighbours[nid] - {nid}:
                shared = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(run.public[other][0]))
                mask = pseudo_rand_gen(shared, mod_range, get_parameters_shape(vector))
                vector = (parameters_addition(vector, mask) if nid > other
                          else parameters_subtraction(vector, mask))
    return parameters_mod(vector, mod_range)


def flower_decode(vector: list[np.ndarray], n_arrived: int, target_range: int) -> list[np.ndarray]:
    """The workflow's dequantisation of the unmasked sum into the weighted mean."""
    q_total_ratio, recon = factor_extract(vector)
    inv_dq_total_ratio = target_range / q_total_ratio
    aggregated = dequantize(recon, CLIP, target_range)
    offset = -(n_arrived - 1) * CLIP
    for vec in aggregated:
        vec += offset
        vec *= inv_dq_total_ratio
    return aggregated


# ------------------------------------------------------------------ plain
def run_plain(n: int, entries: int, dropped: set[int], res: Timings) -> dict[str, tuple[np.ndarray, float]]:
    """The plain reply's size, the server's sum time, and the reference sums for both cases."""
    sums = {}
    for case, arrived in (("after", set(range(1, n + 1))), ("before", set(range(1, n + 1)) - dropped)):
        updates = []
        for i in sorted(arrived):
            delta, weight = site_delta(entries, i)
            updates.append(({"delta": adapters.scale({"delta": delta}, weight)["delta"]}, float(weight)))
        if case == "after":
            update = updates[0][0]
            res.bytes_per_site = [wire_bytes({
                msgs.UPDATE: adapters.to_array_record(update),
                msgs.METRICS: MetricRecord({"weight": 100.0, "train_loss": 1.0, "epsilon": 1.0, "empty_batches": 0,
                                            "train_seconds": 1.0}),
                msgs.STATUS: ok()})]
        start = time.perf_counter()
        total, weight = adapters.sum_updates(updates)
        res.server[case] = time.perf_counter() - start
        sums[case] = (total["delta"], weight)
        del updates
    return sums


def interleave(*steps: Iterator[None]) -> None:
    """Run the generators' steps in turn (same stage, same site), so load drifts hit both alike."""
    live = list(steps)
    while live:
        for gen in list(live):
            if next(gen, StopIteration) is StopIteration:
                live.remove(gen)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# One row of the main table: n, implementation, per-stage and total client seconds, (mask, total) × Flower,
# server seconds (drop after / before mask), bytes per site, bytes × plain.
Row = tuple[int, str, dict[str, float], float, tuple[float, float], float, float, float, float]
# One row of the signed table: n, signed client total × fedtune and × Flower, bytes × plain, server × fedtune.
Ratios = tuple[int, float, float, float, float]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k entries, n = 10, 20")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--sites", default=None, help="comma-separated federation sizes")
    parser.add_argument("--sample", type=int, default=0,
                        help="time the client stages on this many random surviving sites (0: all of them)")
    return parser.parse_args()


def plan_sites(n: int, sample: int) -> tuple[int, int, set[int], set[int]]:
    """Neighbours k, threshold t, the dropped sites and the sites whose client stages are timed."""
    k = protocol.default_neighbours(n)
    t = k // 2 + 1
    rng = random.Random(n)
    dropped = set(rng.sample(range(1, n + 1), max(1, round(DROPOUT * n))))
    surviving = sorted(set(range(1, n + 1)) - dropped)
    timed = set(rng.sample(surviving, sample) if 0 < sample < len(surviving) else surviving)
    return k, t, dropped, timed


def bench_size(n: int, entries: int, sample: int) -> tuple[list[Row], Ratios]:
    """One federation size, all four implementations side by side; prints its set-up and error lines."""
    k, t, dropped, timed = plan_sites(n, sample)
    surviving = sorted(set(range(1, n + 1)) - dropped)
    which = f"sites {sorted(timed)}" if len(timed) < len(surviving) else f"all {len(timed)} surviving sites"
    print(f"\nn={n}: k={k} neighbours, threshold t={t}; dropped sites {sorted(dropped)}; client stages timed "
          f"on {which}, median (all {n} sites simulated)", flush=True)
    plain, ours, signed, flower = Timings(), Timings(), Timings(), Timings()
    sums = run_plain(n, entries, dropped, plain)
    interleave(run_fedtune(n, entries, k, t, dropped, timed, ours, sums),
               run_fedtune(n, entries, k, t, dropped, timed, signed, sums, signed=True),
               run_flower(n, entries, k, t, dropped, timed, flower, sums))
    del sums
    plain_bytes = plain.bytes_per_site[0]
    ratios = (n, median(signed.total) / median(ours.total), median(signed.total) / median(flower.total),
              median(signed.bytes_per_site) / plain_bytes, signed.server["after"] / ours.server["after"])
    rows = table_rows(n, (("fedtune", ours), ("fedtune signed", signed), ("Flower", flower), ("plain", plain)),
                      flower, plain_bytes)
    print(f"  max |error| of the decoded mean vs the plain mean (after/before): fedtune "
          f"{ours.error['after']:.2e}/{ours.error['before']:.2e} (bound {ours.error['after_bound']:.2e}/"
          f"{ours.error['before_bound']:.2e}); Flower {flower.error['after']:.2e}/{flower.error['before']:.2e}")
    return rows, ratios


def table_rows(n: int, runs: tuple[tuple[str, Timings], ...], flower: Timings, plain_bytes: int) -> list[Row]:
    """The main table's row of each implementation: medians, and ratios to Flower and to plain."""
    rows = []
    for name, r in runs:
        per_stage = {s: median(r.client[s]) for s in STAGES}
        total = median(r.total) if r.total else 0.0
        b = median(r.bytes_per_site)
        vs_flower = (per_stage["mask"] / median(flower.client["mask"]), total / median(flower.total))
        rows.append((n, name, per_stage, total, vs_flower, r.server["after"], r.server["before"], b,
                     b / plain_bytes))
    return rows


def print_table(rows: list[Row]) -> None:
    print("\n| n | implementation | advertise ms | share ms | mask ms | consistency ms | unmask ms | client total ms "
          "| mask, total × Flower | server s (drop after mask) | server s (drop before mask) | bytes/site | × plain |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, name, st, total, vs_flower, after, before, b, vs_plain in rows:
        if name == "plain":
            cells = ["—"] * 7
        else:
            cells = [f"{st[s] * 1e3:.1f}" for s in STAGES] + [f"{total * 1e3:.1f}",
                                                                f"{vs_flower[0]:.2f}, {vs_flower[1]:.2f}"]
        print(f"| {n} | {name} | " + " | ".join(cells) + f" | {after:.3f} | {before:.3f} | {b / 1e6:.3f} MB | "
              f"{vs_plain:.3f} |")


def print_signed_table(ratios: list[Ratios]) -> None:
    print("\n| n | signed client total × fedtune | signed client total × Flower | signed bytes × plain | "
          "signed server × fedtune |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, vs_ours, vs_flower, vs_plain, server in ratios:
        print(f"| {n} | {vs_ours:.2f} | {vs_flower:.2f} | {vs_plain:.4f} | {server:.2f} |")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.INFO)  # the mod's per-stage DEBUG lines, as in a normal run
    entries = args.entries or (100_000 if args.quick else 1_000_000)
    sizes = [int(x) for x in (args.sites or ("10,20" if args.quick else "10,50,100")).split(",")]

    print(f"LoRA delta of {entries:,} float32 entries; {DROPOUT:.0%} of the sites drop out; ring 2^32 "
          f"(Flower: modulus 2^32, quantisation range 2^22); clipping range {CLIP}, max weight {MAX_WEIGHT}")
    rows: list[Row] = []
    ratios: list[Ratios] = []
    for n in sizes:
        size_rows, size_ratios = bench_size(n, entries, sample=args.sample)
        rows += size_rows
        ratios.append(size_ratios)
    print_table(rows)
    print_signed_table(ratios)


if __name__ == "__main__":
    main()
