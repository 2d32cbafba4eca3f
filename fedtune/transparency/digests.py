"""Hashes of an adapter's files that its record states, so a changed file is detectable.

The weights are hashed as tensors, not as file bytes: the record is made when the round
commits, before its directory is written, and the digest must not depend on how a
safetensors writer lays out its header.  Each tensor contributes its peft key, dtype,
shape and raw little-endian bytes, in key order.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np


def tensors_sha256(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over every tensor of ``state`` (name, dtype, shape, bytes), names sorted."""
    hasher = hashlib.sha256()
    for name in sorted(state):
        array = np.ascontiguousarray(state[name])
        header = f"{name}\0{array.dtype.str}\0{','.join(map(str, array.shape))}\0".encode()
        hasher.update(len(header).to_bytes(8, "big") + header)
        hasher.update(array.tobytes())
    return hasher.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_hashes(peft_state: Mapping[str, np.ndarray], adapter_config: str) -> dict[str, str]:
    """The ``files`` entry of a record: the weights' and the peft config's digests."""
    return {"weights_sha256": tensors_sha256(peft_state), "adapter_config_sha256": text_sha256(adapter_config)}
