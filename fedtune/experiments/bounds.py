"""The ε lower bound of a one-run privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023).

Setting: m canaries, each included in the training data independently with probability
1/2.  After training, an auditor guesses "included" or "excluded" for r of them (and
abstains on the rest) and gets v right.  If training is (ε, δ)-DP then (their Theorem
5.2, the (ε, δ) extension of Theorem 3.1):

    P[v correct or more]  ≤  P[W ≥ v] + 2·m·δ · max_{i=1..v} P[v−i ≤ W < v] / i,
                             with W ~ Binomial(r, e^ε / (1 + e^ε)).

That right-hand side is the p-value of the hypothesis "training is (ε, δ)-DP".  The
empirical lower bound at confidence 1 − β is the largest ε whose p-value is still below
β: any smaller ε is rejected at level β.  It is found by bisection, as in the paper's
Appendix D; the p-value increases with ε.  With δ = 0 this is the pure-DP Theorem 3.1.

Everything here is exact arithmetic on binomial probabilities (log-space, no SciPy).
"""

from __future__ import annotations

import math


def _log_binomial_pmf(k: int, n: int, log_p: float, log_q: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q


def binomial_pmfs(n: int, p: float) -> list[float]:
    """P[W = k] for k = 0..n, W ~ Binomial(n, p)."""
    if p <= 0.0:
        return [1.0] + [0.0] * n
    if p >= 1.0:
        return [0.0] * n + [1.0]
    log_p, log_q = math.log(p), math.log1p(-p)
    return [math.exp(_log_binomial_pmf(k, n, log_p, log_q)) for k in range(n + 1)]


def binomial_tail(n: int, p: float, v: int) -> float:
    """P[W ≥ v] for W ~ Binomial(n, p)."""
    if v <= 0:
        return 1.0
    if v > n:
        return 0.0
    return min(1.0, math.fsum(binomial_pmfs(n, p)[v:]))


def guess_accuracy(epsilon: float) -> float:
    """e^ε / (1 + e^ε): the best accuracy of a guess about one canary under ε-DP."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ≥ v correct out of r guesses if training were (ε, δ)-DP (an upper bound)."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if epsilon < 0 or not (0.0 <= delta <= 1.0):
        raise ValueError(f"need ε >= 0 and δ in [0, 1], got ε={epsilon}, δ={delta}")
    pmfs = binomial_pmfs(r, guess_accuracy(epsilon))
    p_value = math.fsum(pmfs[v:])
    if delta > 0 and v > 0:
        # max over i of P[v−i ≤ W < v] / i: the δ term of Theorem 5.2.
        worst, window = 0.0, 0.0
        for i in range(1, v + 1):
            window += pmfs[v - i]
            worst = max(worst, window / i)
        p_value += 2.0 * m * delta * worst
    return min(1.0, p_value)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05,
                        tolerance: float = 1e-7) -> float:
    """The largest ε rejected at level β by v correct guesses out of r (0 if none is).

    Training cannot be (ε, δ)-DP for any ε below the returned value, except with
    probability β over the canaries' coin flips.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"β must be in (0, 1), got {beta}")
    if audit_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0  # invariant: p(low) < β ≤ p(high)
    while audit_p_value(m, r, v, high, delta) < beta:
        low, high = high, 2.0 * high
        if high > 1e4:  # only reached when every guess is right and δ = 0, with r huge
            return low
    while high - low > tolerance:
        mid = 0.5 * (low + high)
        if audit_p_value(m, r, v, mid, delta) < beta:
            low = mid
        else:
            high = mid
    return low
