"""SecAgg+ as plain functions: the site's half and the server's half of each stage.

Stages (each one Message-API round trip when wired into the apps):
  0. setup      server: neighbour graph (random k-regular, Harary construction of
                Bell et al.), threshold t, ring size.
  1. advertise  site: two X25519 key pairs (c: encryption, s: masks), a self-mask seed b.
  2. share      site: Shamir t-of-k shares of b and of s's private key, each pair
                encrypted to its neighbour (ChaCha20-Poly1305, key = HKDF(X25519)).
  3. mask       site: y = x + PRG(b) + Σ_{j>i} PRG(k_ij) − Σ_{j<i} PRG(k_ij).
  4. consistency site: sign the set of survivors it was told (``signing``); the site's
                checks against an active server are in ``federation.secure_checks``.
  5. unmask     site: for each neighbour, the b-share if it survived, the key-share if
                it dropped, never both, once t neighbours signed the same survivors;
                server: remove self masks of survivors and the dangling pairwise masks
                of dropped sites, or abandon the round.

Sites are numbered 1..n within a round (Shamir x-coordinates); nothing secret is logged.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag

from fedtune.secagg import crypto, shamir
from fedtune.secagg.masks import mask_stream, reduce_in_place, ring_dtype

log = logging.getLogger(__name__)

# Fewer than 3 sites would let each one subtract its own update from the sum and read the other's.
MIN_SITES = 3

SELF_MASK = b"self-mask"
PAIR_MASK = b"pair-mask"
SHARE_KEY = b"share-encryption"


class RoundAbandoned(RuntimeError):
    """Too few sites survived to unmask; no partial sum may be used."""


class ProtocolViolation(RuntimeError):
    """A request that would break the protocol's guarantees (e.g. both shares of one site)."""


class RoundAborted(ProtocolViolation):
    """A check against an active server failed at this site: the round is over for it.

    A forged or missing signature, a neighbour listed twice, too few neighbours, or a view
    of the survivors that the neighbours did not sign.  ``stage`` and ``neighbour`` (an
    index, never data) name what failed in the site's log.
    """

    def __init__(self, stage: str, neighbour: int | None, problem: str) -> None:
        self.stage, self.neighbour, self.problem = stage, neighbour, problem
        who = f"neighbour {neighbour}" if neighbour is not None else "the server's message"
        super().__init__(f"aborted at the {stage} stage: {who}: {problem}")


def site_threshold(neighbours: int, requested: int) -> int:
    """The site's own t: a strict majority of its neighbours (more only if the server waits for more).

    A majority is what makes a split view impossible: the self-mask seed and the mask key
    each need t of the k shares, each neighbour reveals one kind, and 2t > k.
    """
    if requested > neighbours:
        raise ProtocolViolation(f"a threshold of {requested} with only {neighbours} neighbours")
    return max(neighbours // 2 + 1, requested)


def default_neighbours(n: int) -> int:
    """k ≈ 2·log2(n), even, and at most n − 1 (a complete graph for small federations)."""
    import math

    k = 2 * math.ceil(math.log2(max(n, 2)))
    k += k % 2
    return min(k, n - 1)


def neighbour_graph(sites: list[int], k: int, seed: int) -> dict[int, list[int]]:
    """Random k-regular graph: a Harary graph H(k, n) over a random ordering of the sites."""
    n = len(sites)
    if k >= n - 1:
        return {s: sorted(x for x in sites if x != s) for s in sites}
    if k % 2:
        raise ValueError("the neighbour count k must be even (Harary construction)")
    order = list(sites)
    random.Random(seed).shuffle(order)
    graph: dict[int, set[int]] = {s: set() for s in sites}
    for pos, s in enumerate(order):
        for step in range(1, k // 2 + 1):
            other = order[(pos + step) % n]
            graph[s].add(other)
            graph[other].add(s)
    return {s: sorted(v) for s, v in graph.items()}


@dataclass
class SiteSecrets:
    """A site's secrets for one round; kept in the ClientApp's state, never logged."""

    index: int
    enc: crypto.KeyPair
    mask: crypto.KeyPair
    self_seed: bytes
    received: dict[int, bytes] = field(default_factory=dict)  # neighbour -> ciphertext for us
    neighbour_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    # The active-adversary state: the site's own t, who each neighbour index is (roster id),
    # whether this site has masked its input, and the survivor set it signed (once per round).
    threshold: int = 0
    neighbour_sites: dict[int, str] = field(default_factory=dict)
    masked: bool = False
    signed: frozenset[int] | None = None

    def __repr__(self) -> str:
        return f"SiteSecrets(index={self.index})"


# ---------------------------------------------------------------- site side
def advertise_keys(index: int) -> tuple[SiteSecrets, tuple[bytes, bytes]]:
    secrets_ = SiteSecrets(index=index, enc=crypto.generate_keypair(), mask=crypto.generate_keypair(),
                           self_seed=crypto.random_seed())
    return secrets_, (secrets_.enc.public, secrets_.mask.public)


def _aad(round_number: int, sender: int, receiver: int) -> bytes:
    return f"fedtune-secagg/{round_number}/{sender}->{receiver}".encode()


def share_keys(site: SiteSecrets, neighbour_keys: dict[int, tuple[bytes, bytes]], threshold: int,
               round_number: int) -> dict[int, bytes]:
    """Encrypted (b-share, s-key-share) for each neighbour."""
    if len(neighbour_keys) < threshold:
        raise RoundAbandoned(f"only {len(neighbour_keys)} neighbours, below the threshold {threshold}")
    site.neighbour_keys = dict(neighbour_keys)
    holders = sorted(neighbour_keys)
    seed_shares = shamir.split(site.self_seed, threshold, holders)
    key_shares = shamir.split(site.mask.private, threshold, holders)
    out = {}
    for j in holders:
        key = crypto.derive_key(site.enc.private, neighbour_keys[j][0], SHARE_KEY)
        plaintext = site.index.to_bytes(4, "big") + j.to_bytes(4, "big") + seed_shares[j] + key_shares[j]
        out[j] = crypto.encrypt(key, plaintext, _aad(round_number, site.index, j))
    return out


def _pair_key(private: bytes, peer_public: bytes) -> bytes:
    return crypto.derive_key(private, peer_public, PAIR_MASK)


def mask_input(site: SiteSecrets, vector: np.ndarray, received: dict[int, bytes], round_number: int,
               bits: int) -> np.ndarray:
    """Mask a ring vector; ``received`` are the neighbours' ciphertexts addressed to us.

    Only neighbours that completed the share stage (those in ``received``) mask with us.
    """
    site.received = dict(received)
    # Accumulate in place, with one scratch buffer for the streams, and reduce once.
    masked = np.array(vector, dtype=ring_dtype(bits), copy=True)
    stream = np.empty_like(masked)
    np.add(masked, mask_stream(site.self_seed, SELF_MASK, round_number, len(masked), bits, out=stream), out=masked)
    for j in sorted(received):
        mask_stream(_pair_key(site.mask.private, site.neighbour_keys[j][1]), PAIR_MASK, round_number, len(masked),
                    bits, out=stream)
        (np.add if j > site.index else np.subtract)(masked, stream, out=masked)
    return reduce_in_place(masked, bits)


def unmask(site: SiteSecrets, survivors: set[int], dropped: set[int], round_number: int
           ) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """(b-shares of surviving neighbours, key-shares of dropped neighbours).

    A tampered or misaddressed ciphertext fails authentication and is discarded with a
    log line; the server can still recover with the other neighbours' shares.
    """
    both = survivors & dropped
    if both:
        raise ProtocolViolation(f"asked for both shares of sites {sorted(both)}: that would reveal their input")
    seed_shares, key_shares = {}, {}
    for j, ciphertext in site.received.items():
        if j not in survivors and j not in dropped:
            continue
        key = crypto.derive_key(site.enc.private, site.neighbour_keys[j][0], SHARE_KEY)
        try:
            plaintext = crypto.decrypt(key, ciphertext, _aad(round_number, j, site.index))
        except InvalidTag:
            log.warning("site %d: the share from site %d failed authentication (tampered?); discarded",
                        site.index, j)
            continue
        sender, receiver = int.from_bytes(plaintext[:4], "big"), int.from_bytes(plaintext[4:8], "big")
        if (sender, receiver) != (j, site.index):
            log.warning("site %d: share labelled %d->%d arrived as %d->%d; discarded", site.index, sender,
                        receiver, j, site.index)
            continue
        body = plaintext[8:]
        if j in survivors:
            seed_shares[j] = body[:shamir.SHARE_BYTES]
        else:
            key_shares[j] = body[shamir.SHARE_BYTES:]
    return seed_shares, key_shares


# ---------------------------------------------------------------- server side
def route_shares(shares: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
    """From {sender: {receiver: ct}} to {receiver: {sender: ct}}."""
    routed: dict[int, dict[int, bytes]] = {}
    for sender, by_receiver in shares.items():
        for receiver, ct in by_receiver.items():
            routed.setdefault(receiver, {})[sender] = ct
    return routed


def unmask_sum(masked: dict[int, np.ndarray], sharers: set[int], graph: dict[int, list[int]],
               public_keys: dict[int, tuple[bytes, bytes]], seed_shares: dict[int, dict[int, bytes]],
               key_shares: dict[int, dict[int, bytes]], threshold: int, round_number: int, bits: int
               ) -> np.ndarray:
    """The ring sum of the survivors' inputs.

    ``sharers`` completed the share stage (so they hold masks with each other);
    survivors are the sites in ``masked``; ``seed_shares[i]`` / ``key_shares[j]`` are the
    shares (by holder) collected in the unmask stage for survivor i / dropped site j.
    """
    survivors = set(masked)
    dropped = sharers - survivors
    if len(survivors) < threshold:
        raise RoundAbandoned(f"only {len(survivors)} sites sent masked input; the threshold is {threshold}")
    length = len(next(iter(masked.values())))
    total = np.zeros(length, dtype=ring_dtype(bits))
    for vector in masked.values():
        np.add(total, vector, out=total)
    stream = np.empty_like(total)
    for i in sorted(survivors):
        shares = seed_shares.get(i, {})
        if len(shares) < threshold:
            raise RoundAbandoned(f"site {i}: {len(shares)} self-mask shares, {threshold} needed")
        seed = shamir.combine(shares, threshold)
        np.subtract(total, mask_stream(seed, SELF_MASK, round_number, length, bits, out=stream), out=total)
    for j in sorted(dropped):
        shares = key_shares.get(j, {})
        if len(shares) < threshold:
            raise RoundAbandoned(f"dropped site {j}: {len(shares)} mask-key shares, {threshold} needed")
        private = shamir.combine(shares, threshold)
        if crypto.public_from_private(private) != public_keys[j][1]:
            raise RoundAbandoned(f"dropped site {j}: reconstructed mask key does not match its public key")
        for i in graph[j]:
            if i not in survivors:
                continue
            mask_stream(_pair_key(private, public_keys[i][1]), PAIR_MASK, round_number, length, bits, out=stream)
            # Survivor i added +stream if j > i, else −stream; undo it.
            (np.subtract if j > i else np.add)(total, stream, out=total)
    return reduce_in_place(total, bits)
