"""Shamir t-of-n secret sharing of 32-byte secrets over GF(2^521 - 1).

The field is a Mersenne prime larger than any 32-byte secret, so a secret is one
field element and a share is (x, y) with y < 2^521.  Coefficients come from
``secrets``; x values are the holders' 1-based indices.
"""

from __future__ import annotations

import secrets

PRIME = 2**521 - 1
SHARE_BYTES = 66


def split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, bytes]:
    """Shares of ``secret`` for holders ``xs`` (distinct, non-zero); any ``threshold`` recover it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of holders {len(xs)}")
    if len(set(xs)) != len(xs) or any(x <= 0 for x in xs):
        raise ValueError("share indices must be distinct and positive")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: dict[int, bytes], threshold: int, secret_bytes: int = 32) -> bytes:
    """Lagrange interpolation at 0 from at least ``threshold`` shares."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot recover a secret that needs {threshold}")
    points = list(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + int.from_bytes(yi, "big") * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * secret_bytes):
        raise ValueError("the shares do not reconstruct a secret of the expected size (wrong or too few shares)")
    return secret.to_bytes(secret_bytes, "big")
