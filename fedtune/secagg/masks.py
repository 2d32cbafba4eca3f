"""Mask streams over Z_(2^b) and the quantisation that puts updates on that ring.

Masks are ChaCha20 keystream (``cryptography``) under the full 32-byte key, with a
nonce derived from (purpose, round): domain separation, so a pairwise key never yields
the same stream for two purposes or two rounds.  Keystream bytes are uniform, and
2^b divides 2^32 or 2^64, so the masked entries are exactly uniform on the ring.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedtune.errors import ConfigError


def ring_dtype(bits: int) -> type:
    return np.uint32 if bits <= 32 else np.uint64


def ring_mask(bits: int) -> int:
    return (1 << bits) - 1


def mask_stream(key: bytes, purpose: bytes, round_number: int, length: int, bits: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """``length`` uniform elements of Z_(2^b) from ChaCha20(key, nonce(purpose, round)).

    ``out`` (a contiguous ring vector of that length) is filled instead of a new
    array: masking adds many streams, and reusing one buffer saves an allocation and
    a copy per stream.
    """
    if len(key) != 32:
        raise ValueError("mask keys are 32 bytes")
    dtype = ring_dtype(bits)
    if out is None:
        out = np.empty(length, dtype=dtype)
    elif out.shape != (length,) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {np.dtype(dtype).name} vector of length {length}")
    nonce = b"\x00" * 4 + hashlib.sha256(purpose + b"/" + str(round_number).encode()).digest()[:12]
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    encryptor.update_into(bytes(out.nbytes), out.view(np.uint8))  # keystream = encryption of zeros
    if bits not in (32, 64):
        out &= dtype(ring_mask(bits))
    return out


def reduce_in_place(vector: np.ndarray, bits: int) -> np.ndarray:
    """Reduce mod 2^b a vector accumulated with wrap-around in its 32/64-bit dtype.

    Since 2^b divides 2^32 (2^64), sums and differences may be reduced once, at the end.
    """
    if bits not in (32, 64):
        vector &= ring_dtype(bits)(ring_mask(bits))
    return vector


def ring_add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    out = a + b  # unsigned wrap-around is reduction mod 2^32 / 2^64
    return out if bits in (32, 64) else out & ring_dtype(bits)(ring_mask(bits))


@dataclass(frozen=True)
class Quantizer:
    """Fixed-point encoding of ``n·Δ`` (Δ clipped to [-r, r]) and of the weight n.

    The scale is the largest that keeps every possible sum of ``num_sites`` vectors
    inside (-2^(b-1), 2^(b-1)), so the sum never wraps around the ring.  Rounding is
    stochastic (unbiased); each site adds at most one unit, so each coordinate of the
    decoded sum is within ``num_sites / scale`` of the true one.
    """

    bits: int
    clip_range: float
    max_weight: int
    num_sites: int

    @property
    def scale(self) -> int:
        return int(math.floor((2 ** (self.bits - 1) - 1 - self.num_sites) / (self.num_sites * self.max_weight * self.clip_range)))

    @property
    def sum_error_bound(self) -> float:
        """Largest error of one coordinate of the decoded Σ n_i Δ_i (clipping aside)."""
        return self.num_sites / self.scale

    def check(self) -> None:
        if not 8 < self.bits <= 64:
            raise ConfigError("secagg.bits", f"{self.bits} is outside 9..64", "Use 32 (or 64 for very many sites).")
        if self.clip_range <= 0:
            raise ConfigError("secagg.clip_range", f"{self.clip_range} is not positive", "Use e.g. 1.0.")
        if self.num_sites * self.max_weight >= 2 ** (self.bits - 1):
            raise ConfigError("secagg.max_weight", f"{self.num_sites} sites × weight {self.max_weight} could wrap a "
                              f"{self.bits}-bit ring", "Lower secagg.max_weight or raise secagg.bits.")
        if self.scale < 1:
            raise ConfigError(
                "secagg.bits",
                f"{self.num_sites} sites × weight ≤ {self.max_weight} × range {self.clip_range} reach "
                f"{self.num_sites * self.max_weight * self.clip_range:.3g}, which could wrap a {self.bits}-bit ring "
                f"(limit {2 ** (self.bits - 1):.3g})",
                "Raise secagg.bits, or lower secagg.clip_range or secagg.max_weight.")

    def encode(self, delta: np.ndarray, weight: int) -> np.ndarray:
        """Ring vector [q(n·clip(Δ)) ..., n] of length len(Δ) + 1."""
        if not 0 < weight <= self.max_weight or int(weight) != weight:
            raise ValueError(f"weight {weight} must be an integer in 1..secagg.max_weight={self.max_weight}")
        # float64 throughout: n·scale·r reaches 2^31, beyond float32's exact integers.
        scaled = np.array(delta, dtype=np.float64, copy=True).reshape(-1)
        np.clip(scaled, -self.clip_range, self.clip_range, out=scaled)
        scaled *= float(weight * self.scale)
        scaled += np.random.default_rng(secrets.randbits(128)).random(scaled.shape)
        np.floor(scaled, out=scaled)
        values = np.empty(len(scaled) + 1, dtype=np.int64)
        values[:-1] = scaled
        values[-1] = weight
        # Two's complement: the cast to an unsigned dtype is the reduction mod 2^32 / 2^64.
        ring = values.view(np.uint64) if self.bits > 32 else values.astype(np.uint32)
        return reduce_in_place(ring, self.bits)

    def decode_sum(self, ring_sum: np.ndarray) -> tuple[np.ndarray, float]:
        """(Σ n_i Δ_i, Σ n_i) from the unmasked ring sum."""
        values = ring_sum.astype(np.uint64).astype(np.int64) if self.bits < 64 else ring_sum.view(np.int64)
        if self.bits < 64:
            half = np.int64(1) << np.int64(self.bits - 1)
            values = np.where(values >= half, values - (np.int64(1) << np.int64(self.bits)), values)
        return values[:-1].astype(np.float64) / self.scale, float(values[-1])
