from __future__ import annotations

import itertools
import logging
import secrets

import numpy as np
import pytest
from scipy import stats

from fedtune.errors import ConfigError
from fedtune.secagg import protocol, shamir
from fedtune.secagg.masks import Quantizer, mask_stream, ring_add


def secure_round(deltas: list[np.ndarray], weights: list[int], k: int, t: int, bits: int = 32,
                 clip: float = 1.0, drop_at_mask: frozenset[int] = frozenset(), tamper: dict | None = None,
                 server_log: list | None = None):
    """All stages in-process; returns (decoded Σ nΔ, Σ n) or raises RoundAbandoned."""
    n = len(deltas)
    sites = list(range(1, n + 1))
    quant = Quantizer(bits=bits, clip_range=clip, max_weight=max(weights), num_sites=n)
    quant.check()
    graph = protocol.neighbour_graph(sites, k, seed=7)
    secrets_, public = {}, {}
    for i in sites:
        secrets_[i], public[i] = protocol.advertise_keys(i)
    shares = {i: protocol.share_keys(secrets_[i], {j: public[j] for j in graph[i]}, t, round_number=3)
              for i in sites}
    for (sender, receiver), flip in (tamper or {}).items():
        ct = bytearray(shares[sender][receiver])
        ct[flip] ^= 0x01
        shares[sender][receiver] = bytes(ct)
    routed = protocol.route_shares(shares)
    masked = {}
    for i in sites:
        vec = quant.encode(deltas[i - 1], weights[i - 1])
        y = protocol.mask_input(secrets_[i], vec, routed[i], round_number=3, bits=bits)
        if i not in drop_at_mask:
            masked[i] = y
    survivors = set(masked)
    dropped = set(sites) - survivors
    seed_shares: dict[int, dict[int, bytes]] = {}
    key_shares: dict[int, dict[int, bytes]] = {}
    for i in sorted(survivors):
        own_survivors = {j for j in graph[i] if j in survivors}
        own_dropped = {j for j in graph[i] if j in dropped}
        s, kk = protocol.unmask(secrets_[i], own_survivors, own_dropped, round_number=3)
        if server_log is not None:
            server_log.append((i, set(s), set(kk)))
        for j, share in s.items():
            seed_shares.setdefault(j, {})[i] = share
        for j, share in kk.items():
            key_shares.setdefault(j, {})[i] = share
    ring_sum = protocol.unmask_sum(masked, set(sites), graph, public, seed_shares, key_shares, t, 3, bits)
    return quant.decode_sum(ring_sum), quant, survivors


@pytest.mark.parametrize("n", [3, 10, 30])
def test_unmasked_sum_equals_plain_sum_within_bound(n: int) -> None:
    rng = np.random.default_rng(n)
    deltas = [rng.uniform(-0.5, 0.5, 100_000).astype(np.float32) for _ in range(n)]
    weights = [int(w) for w in rng.integers(10, 500, n)]
    k = protocol.default_neighbours(n)
    (weighted_sum, total), quant, _ = secure_round(deltas, weights, k=k, t=max(2, k // 2 + 1))
    plain = sum(w * d.astype(np.float64) for w, d in zip(weights, deltas))
    assert total == sum(weights)
    assert np.max(np.abs(weighted_sum - plain)) <= quant.sum_error_bound
    mean_err = np.max(np.abs(weighted_sum / total - plain / sum(weights)))
    assert mean_err <= quant.sum_error_bound / sum(weights)


def test_masked_vector_is_uniform_even_for_a_zero_update() -> None:
    (weighted_sum, total), quant, _ = secure_round([np.zeros(10, np.float32)] * 3, [1, 1, 1], k=2, t=2)
    assert total == 3 and np.max(np.abs(weighted_sum)) <= quant.sum_error_bound  # the masks cancel in the sum
    secrets_, _ = protocol.advertise_keys(1)
    quant = Quantizer(bits=32, clip_range=1.0, max_weight=1, num_sites=3)
    vec = quant.encode(np.zeros(200_000, np.float32), 1)
    _, pub2 = protocol.advertise_keys(2)
    protocol.share_keys(secrets_, {2: pub2}, 1, round_number=1)
    masked = protocol.mask_input(secrets_, vec, {2: b""}, round_number=1, bits=32)
    counts = np.bincount((masked >> np.uint32(24)).astype(np.int64), minlength=256)  # top byte, 256 bins
    assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.chisquare(np.bincount((vec >> np.uint32(24)).astype(np.int64), minlength=256)).pvalue < 1e-10


def test_mask_streams_are_domain_separated() -> None:
    key = bytes(range(32))
    a = mask_stream(key, b"self-mask", 1, 1000, 32)
    assert not np.array_equal(a, mask_stream(key, b"self-mask", 2, 1000, 32))
    assert not np.array_equal(a, mask_stream(key, b"pair-mask", 1, 1000, 32))
    np.testing.assert_array_equal(a, mask_stream(key, b"self-mask", 1, 1000, 32))
    small = mask_stream(key, b"x", 1, 1000, 20)
    assert small.max() < 2**20


@pytest.mark.parametrize("drops", [1, 3, 5])
def test_dropouts_at_masked_input(drops: int) -> None:
    n, k, t = 10, 6, 4
    rng = np.random.default_rng(drops)
    deltas = [rng.uniform(-1, 1, 2000).astype(np.float32) for _ in range(n)]
    weights = [5] * n
    dropped = frozenset(range(1, drops + 1))
    graph = protocol.neighbour_graph(list(range(1, n + 1)), k, seed=7)
    enough = all(len([j for j in graph[i] if j not in dropped]) >= t for i in range(1, n + 1))
    if not enough:
        with pytest.raises(protocol.RoundAbandoned):
            secure_round(deltas, weights, k, t, drop_at_mask=dropped)
        return
    (weighted_sum, total), quant, survivors = secure_round(deltas, weights, k, t, drop_at_mask=dropped)
    plain = sum(5 * deltas[i - 1].astype(np.float64) for i in survivors)
    assert total == 5 * len(survivors)
    assert np.max(np.abs(weighted_sum - plain)) <= quant.sum_error_bound


def test_round_abandoned_when_too_few_survive() -> None:
    n, k, t = 10, 6, 4
    deltas = [np.zeros(100, np.float32)] * n
    with pytest.raises(protocol.RoundAbandoned):
        secure_round(deltas, [1] * n, k, t, drop_at_mask=frozenset(range(1, 8)))


def test_tampered_share_is_discarded_and_round_completes(caplog) -> None:
    n, k, t = 6, 4, 2
    rng = np.random.default_rng(0)
    deltas = [rng.uniform(-1, 1, 500).astype(np.float32) for _ in range(n)]
    graph = protocol.neighbour_graph(list(range(1, n + 1)), k, seed=7)
    receiver = graph[1][0]
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        (weighted_sum, _), quant, _ = secure_round(deltas, [3] * n, k, t, tamper={(1, receiver): 20})
    assert f"site {receiver}: the share from site 1 failed authentication" in caplog.text
    plain = sum(3 * d.astype(np.float64) for d in deltas)
    assert np.max(np.abs(weighted_sum - plain)) <= quant.sum_error_bound


def test_server_never_gets_both_shares_of_one_site() -> None:
    log: list = []
    n, k, t = 10, 6, 3
    secure_round([np.zeros(50, np.float32)] * n, [1] * n, k, t, drop_at_mask=frozenset({2, 5}), server_log=log)
    seed_for = set().union(*(s for _, s, _ in log))
    key_for = set().union(*(kk for _, _, kk in log))
    assert key_for == {2, 5} and not seed_for & key_for
    secrets_, _ = protocol.advertise_keys(1)
    with pytest.raises(protocol.ProtocolViolation):
        protocol.unmask(secrets_, {2, 3}, {3}, round_number=1)


def test_ring_that_could_wrap_is_rejected_with_numbers() -> None:
    with pytest.raises(ConfigError, match=r"secagg.bits.*could wrap a 16-bit ring"):
        Quantizer(bits=16, clip_range=20.0, max_weight=1000, num_sites=3).check()


def _through(points: dict[int, int], x: int) -> int:
    """The lowest-degree polynomial through ``points`` over GF(p), at ``x`` (Lagrange, not shamir.combine)."""
    total = 0
    for xi, yi in points.items():
        num = den = 1
        for xj in points:
            if xj != xi:
                num, den = num * (x - xj) % shamir.PRIME, den * (xi - xj) % shamir.PRIME
        total = (total + yi * num * pow(den, -1, shamir.PRIME)) % shamir.PRIME
    return total


def test_shamir_threshold() -> None:
    t, holders = 3, [1, 2, 3, 4, 5]
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, t, holders)
    for subset in itertools.combinations(holders, t):  # any t shares reconstruct
        assert shamir.combine({x: shares[x] for x in subset}, t) == secret
    with pytest.raises(ValueError):
        shamir.combine({x: shares[x] for x in holders[:t - 1]}, t)
    ys = {x: int.from_bytes(shares[x], "big") for x in holders}
    few = {x: ys[x] for x in (2, 4)}  # t - 1 shares
    # t - 1 shares reveal nothing: with every candidate secret s they lie on exactly one
    # polynomial of degree t - 1 through (0, s), and split's uniform coefficients make each
    # of these polynomials equally likely.  The completing share is wrong for all but the secret.
    for candidate in [secret, bytes(32), b"\xff" * 32, *(secrets.token_bytes(32) for _ in range(5))]:
        forged = _through({0: int.from_bytes(candidate, "big"), **few}, 5)
        completed = {**{x: shares[x] for x in few}, 5: forged.to_bytes(shamir.SHARE_BYTES, "big")}
        assert shamir.combine(completed, t) == candidate
        assert (forged == ys[5]) == (candidate == secret)
    # The polynomial really has degree t - 1: a lower one through t - 1 shares misses the
    # secret, and a second split of the same secret draws fresh coefficients.
    assert _through(few, 0) != int.from_bytes(secret, "big")
    again = shamir.split(secret, t, holders)
    assert all(again[x] != shares[x] and ys[x] != int.from_bytes(secret, "big") for x in holders)


def test_neighbour_graph_is_regular() -> None:
    graph = protocol.neighbour_graph(list(range(1, 31)), 10, seed=1)
    assert all(len(v) == 10 for v in graph.values())
    assert all(i in graph[j] for i in graph for j in graph[i])
    assert protocol.default_neighbours(3) == 2 and protocol.default_neighbours(100) == 14


def test_masking_is_additive() -> None:
    a = np.array([2**32 - 1, 5], dtype=np.uint32)
    np.testing.assert_array_equal(ring_add(a, np.array([2, 1], np.uint32), 32), [1, 6])
