"""The one-run audit's bound (Steinke, Nasr, Jagielski 2023) against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.experiments.audit import guess_counts, guess_sizes, make_canaries
from fedtune.experiments.bounds import audit_p_value, binomial_tail, epsilon_lower_bound, guess_accuracy


def test_p_value_by_hand_pure_dp() -> None:
    # ε = ln 2: each guess is right with probability 2/3 under the null; 6 of 6 right.
    assert guess_accuracy(math.log(2)) == pytest.approx(2 / 3)
    assert audit_p_value(10, 6, 6, math.log(2), 0.0) == pytest.approx(64 / 729, rel=1e-12)


def test_p_value_by_hand_with_delta() -> None:
    # W ~ Bin(6, 2/3): P[W=5] = 192/729, P[W=4] = 240/729, P[W=3] = 160/729, ...
    # max_i P[6-i <= W < 6] / i is at i = 2: (192 + 240) / 729 / 2 = 8/27.
    # p = P[W >= 6] + 2·m·δ·8/27 with m = 10, δ = 1e-3.
    expected = 64 / 729 + 2 * 10 * 1e-3 * 8 / 27
    assert audit_p_value(10, 6, 6, math.log(2), 1e-3) == pytest.approx(expected, rel=1e-12)


def test_lower_bound_by_hand() -> None:
    # δ = 0, all 6 guesses right: the bound solves q^6 = β with q = e^ε / (1 + e^ε).
    q = 0.05 ** (1 / 6)
    assert epsilon_lower_bound(10, 6, 6, 0.0, beta=0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    # 4 of 4 right: P = 1/16 > 0.05 even at ε = 0, so nothing is rejected.
    assert epsilon_lower_bound(10, 4, 4, 0.0, beta=0.05) == 0.0


def test_lower_bound_is_where_the_p_value_crosses_beta() -> None:
    m, r, v, delta, beta = 1000, 100, 80, 1e-5, 0.05
    eps = epsilon_lower_bound(m, r, v, delta, beta)
    assert eps > 0
    assert audit_p_value(m, r, v, eps, delta) < beta <= audit_p_value(m, r, v, eps + 1e-4, delta)


def test_lower_bound_behaves() -> None:
    # Chance-level guessing proves nothing; more right guesses prove more; δ only weakens.
    assert epsilon_lower_bound(200, 100, 50, 1e-5) == 0.0
    bounds = [epsilon_lower_bound(200, 100, v, 1e-5) for v in (70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_lower_bound(200, 100, 90, 1e-3) < epsilon_lower_bound(200, 100, 90, 0.0)
    with pytest.raises(ValueError):
        audit_p_value(10, 11, 5, 1.0, 0.0)


def test_binomial_tail_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for n, p, v in [(50, 0.6, 35), (200, 0.73, 170), (10, 0.5, 0), (10, 0.5, 11), (30, 0.99, 30)]:
        assert binomial_tail(n, p, v) == pytest.approx(float(stats.binom.sf(v - 1, n, p)), rel=1e-9, abs=1e-300)


def test_guess_counts_by_hand() -> None:
    scores = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.8])
    included = np.array([True, False, True, False, False, True])
    # Lowest two (0.1, 0.2) are guessed in: both right; highest two (0.9, 0.8) guessed out: one right.
    assert guess_counts(scores, included, 2, 2) == (4, 3)
    assert guess_counts(scores, included, 3, 0) == (3, 2)
    assert guess_sizes(64) == [3, 6, 13, 19, 32]


def test_canaries_are_distinct_and_seeded() -> None:
    canaries, included = make_canaries(64, 8, seed=3)
    again, coins = make_canaries(64, 8, seed=3)
    assert canaries == again and (included == coins).all()
    assert len(set(canaries)) == 64 and all(len(set(c)) == 1 and len(c) == 8 for c in canaries)
    assert 16 < included.sum() < 48
    assert make_canaries(64, 8, seed=4)[1].tolist() != included.tolist()
