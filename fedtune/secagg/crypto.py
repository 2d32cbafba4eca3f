"""The few primitives the protocol needs, behind a narrow interface (``cryptography``).

No function here logs or returns a secret in printable form.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12


@dataclass(frozen=True)
class KeyPair:
    private: bytes  # raw 32-byte X25519 private key
    public: bytes   # raw 32-byte X25519 public key

    def __repr__(self) -> str:  # never print the private key
        return f"KeyPair(public={self.public.hex()[:16]}...)"


def generate_keypair() -> KeyPair:
    private = X25519PrivateKey.generate()
    return KeyPair(
        private=private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption()),
        public=private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    )


def public_from_private(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def derive_key(private: bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """X25519 agreement, then HKDF-SHA256 with a purpose label (domain separation)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"fedtune-secagg/" + purpose).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """Raises ``cryptography.exceptions.InvalidTag`` if anything was altered."""
    return ChaCha20Poly1305(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated)


def random_seed() -> bytes:
    return os.urandom(KEY_BYTES)
