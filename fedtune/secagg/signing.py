"""Signatures of the active-adversary protocol (Bonawitz et al. CCS 2017, §4/§6).

Against a server that lies, a site must know that the keys relayed as "neighbour j's" are
the ones the enrolled site j made this round, and that its neighbours were told the same
set of survivors.  Both are signed with the site's enrolment key (the ECDSA key it
authenticates to the SuperLink with) and checked against the federation's roster of
enrolled public keys, which the server cannot change (see :mod:`fedtune.deploy.roster`).

Statements are length-prefixed fields under a purpose label, so a signature made for one
purpose, federation, round or index never verifies for another.  The survivors statement
names the signer's own mask key of the round: a signature from an earlier run's round of
the same number does not verify, because the key is fresh in every round.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Collection, Iterator, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEYS_LABEL = b"fedtune-secagg/keys/v1"
SURVIVORS_LABEL = b"fedtune-secagg/survivors/v1"
# A DER ECDSA signature on P-521 is at most 139 bytes.
MAX_SIGNATURE_BYTES = 160


def _frame(*parts: bytes) -> bytes:
    """Unambiguous concatenation: each part is preceded by its 4-byte length."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def keys_statement(federation: str, round_number: int, index: int, site_id: str, enc_pk: bytes,
                   mask_pk: bytes) -> bytes:
    """What a site signs when it advertises its two public keys of a round."""
    return _frame(KEYS_LABEL, federation.encode(), str(round_number).encode(), str(index).encode(),
                  site_id.encode(), enc_pk, mask_pk)


def survivors_statement(federation: str, round_number: int, index: int, mask_pk: bytes,
                        survivors: Iterable[int]) -> bytes:
    """What a site signs in the consistency check: the set of sites it was told sent masked input."""
    listed = ",".join(str(i) for i in sorted(set(survivors))).encode()
    return _frame(SURVIVORS_LABEL, federation.encode(), str(round_number).encode(), str(index).encode(), mask_pk,
                  listed)


def _hash_for(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    # The hash that matches the curve's strength (RFC 5656 for the OpenSSH key types).
    if curve.key_size > 384:
        return hashes.SHA512()
    return hashes.SHA384() if curve.key_size > 256 else hashes.SHA256()


def sign(private_key: ec.EllipticCurvePrivateKey, statement: bytes) -> bytes:
    return private_key.sign(statement, ec.ECDSA(_hash_for(private_key.curve)))


def verify(public_key: ec.EllipticCurvePublicKey, statement: bytes, signature: bytes) -> bool:
    try:
        public_key.verify(signature, statement, ec.ECDSA(_hash_for(public_key.curve)))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A site's signing key and the roster it checks its neighbours against.

    ``federation`` names the roster's federation; it is in every statement, so a
    signature from another federation never verifies here.
    """

    federation: str
    site_id: str
    private_key: ec.EllipticCurvePrivateKey
    roster: Mapping[str, ec.EllipticCurvePublicKey]

    def __repr__(self) -> str:  # never print the private key
        return f"Identity(federation={self.federation!r}, site_id={self.site_id!r}, roster={len(self.roster)} sites)"

    def sign(self, statement: bytes) -> bytes:
        return sign(self.private_key, statement)

    def verify(self, site_id: str, statement: bytes, signature: bytes) -> bool:
        """Whether ``site_id`` is enrolled and signed ``statement``."""
        public = self.roster.get(site_id)
        return public is not None and verify(public, statement, signature)


def _derived_key(label: str, site_id: str) -> ec.EllipticCurvePrivateKey:
    material = HKDF(algorithm=hashes.SHA256(), length=48, salt=hashlib.sha256(label.encode()).digest(),
                    info=b"fedtune-simulated-site/" + site_id.encode()).derive(b"fedtune-simulation")
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # the order of P-256
    return ec.derive_private_key(int.from_bytes(material, "big") % (order - 1) + 1, ec.SECP256R1())


@functools.lru_cache(maxsize=4096)
def _simulated_public_key(label: str, site_id: str) -> ec.EllipticCurvePublicKey:
    return _derived_key(label, site_id).public_key()


class SimulatedRoster(Mapping[str, ec.EllipticCurvePublicKey]):
    """A simulation's roster: its site names, each public key derived when first looked up.

    Deriving every key up front cost a P-256 key derivation per site in every process
    (2.7 s for 10,000 sites, in each Ray actor), and a round's sites only ever check
    their few neighbours' keys: so the roster holds the names (any collection answering
    ``in`` and ``len`` without listing them) and derives a key on demand.
    """

    def __init__(self, label: str, site_ids: Collection[str]) -> None:
        self.label, self.site_ids = label, site_ids

    def __getitem__(self, site_id: str) -> ec.EllipticCurvePublicKey:
        if site_id not in self.site_ids:
            raise KeyError(site_id)
        return _simulated_public_key(self.label, site_id)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.site_ids))

    def __len__(self) -> int:
        return len(self.site_ids)


def simulated_identity(label: str, site_id: str, site_ids: Collection[str]) -> Identity:
    """A simulated site's identity: keys anyone can derive from ``label`` (the run directory).

    In a simulation the researcher runs the server and every site, so there is nobody to
    protect the keys from; the signatures still run, so a simulation exercises the same
    protocol a deployment does.  Never used by a deployed site (its key is its auth.key).
    """
    return Identity(federation=f"simulation:{label}", site_id=site_id, private_key=_derived_key(label, site_id),
                    roster=SimulatedRoster(label, site_ids))
