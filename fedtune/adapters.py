"""LoRA adapter state, deltas, and their wire form (the aggregation rules are in fedtune.strategies).

A site sends ``n_i · Δ_i`` and ``n_i`` (its record count) rather than ``Δ_i``: the
weighted mean Σ n_i Δ_i / Σ n_i then needs only two sums, which is exactly what a
secure sum reveals, so no site's size is ever seen on its own.  The step between
"updates received" and "sum formed" is :func:`sum_updates`; secure aggregation
replaces only that step.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel

log = logging.getLogger(__name__)

State = dict[str, np.ndarray]


def lora_state(model: PeftModel, names: list[str]) -> State:
    """float32 copies of the named LoRA tensors."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().numpy().astype(np.float32, copy=True) for n in names}


def load_lora_state(model: PeftModel, state: Mapping[str, np.ndarray]) -> None:
    """Copy adapter tensors into the model; only LoRA and head tensors can be written.

    A name of a frozen base weight (an embedding row, ``lm_head``) is refused even if the
    caller forgot to check the key set: a crafted adapter must never reach the base model.
    """
    from fedtune.models import lora_parameter_names

    params = dict(model.named_parameters())
    writable = set(lora_parameter_names(model))
    foreign = sorted(set(state) - writable)
    if foreign:
        raise ValueError(f"adapter names {len(foreign)} tensors that are not LoRA or head tensors of this model")
    with torch.no_grad():
        for name, value in state.items():
            target = params[name]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"adapter tensor {name}: shape {value.shape} does not fit {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype))


# The wire form of an adapter is one packed vector plus its layout, not one Array per tensor.
# Flower stores every Array of an ArrayRecord as its own content-addressed object (with a
# chunk object of its own) and moves each object with a separate request on every hop
# (ServerApp -> SuperLink -> SuperNode -> ClientApp).  A rank-64 LoRA of an 8-layer model is
# 64 tensors, so ~130 requests per hop for 4 MiB; measured in a 3-site deployment the sites'
# pull of the global adapter was a quarter of a round.  Packed, it is five objects whatever
# the number of tensors.  The layout (names and shapes, in order) travels as UTF-8 JSON in a
# uint8 Array so that the record stays self-describing and is checked before it is used.
PACKED = "packed"
LAYOUT = "layout"
MAX_LAYOUT_BYTES = 1 << 20


def to_array_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack the tensors (in name order) into one vector; the dtype is the tensors' common dtype."""
    names = sorted(state)
    layout = json.dumps([[n, [int(d) for d in np.shape(state[n])]] for n in names]).encode()
    values = (np.concatenate([np.asarray(state[n]).ravel() for n in names]) if names
              else np.zeros(0, dtype=np.float32))
    return ArrayRecord(array_dict={PACKED: Array(np.ascontiguousarray(values)),
                                   LAYOUT: Array(np.frombuffer(layout, dtype=np.uint8).copy())})


def record_layout(record: ArrayRecord) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) list of a packed record; ValueError names what is malformed."""
    if set(record.keys()) != {PACKED, LAYOUT}:
        raise ValueError(f"not a packed adapter: arrays {sorted(record.keys())[:4]}, expected "
                         f"{sorted([LAYOUT, PACKED])}")
    raw = record[LAYOUT]
    if raw.dtype != "uint8" or len(raw.data) > MAX_LAYOUT_BYTES:
        raise ValueError(f"adapter layout must be uint8 JSON of at most {MAX_LAYOUT_BYTES} bytes")
    try:
        entries = json.loads(raw.numpy().tobytes().decode())
        layout = [(str(name), tuple(int(d) for d in shape)) for name, shape in entries]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"adapter layout is not a JSON list of [name, shape] pairs: {exc}") from None
    if any(d < 0 for _, shape in layout for d in shape) or len({n for n, _ in layout}) != len(layout):
        raise ValueError("adapter layout has a negative dimension or a repeated tensor name")
    return layout


def from_array_record(record: ArrayRecord) -> State:
    """The tensors of a packed record, as views into one array (load or copy before changing them)."""
    return _unpack(record, record_layout(record))


def _unpack(record: ArrayRecord, layout: list[tuple[str, tuple[int, ...]]]) -> State:
    values = record[PACKED].numpy()
    if values.ndim != 1:
        raise ValueError(f"packed adapter must be a vector, got shape {values.shape}")
    return unflatten(values, dict(layout), [n for n, _ in layout])


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> State:
    return {n: a[n] - b[n] for n in a}


def scale(state: Mapping[str, np.ndarray], factor: float) -> State:
    return {n: (v * factor).astype(np.float32) for n, v in state.items()}


def l2_norm(state: Mapping[str, np.ndarray]) -> float:
    return float(math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values())))


class UpdateRejected(ValueError):
    """A site's update is malformed; it is logged and never aggregated."""


@dataclass(frozen=True)
class UpdateSpec:
    """What a well-formed update must look like: these tensors, shapes, float32."""

    shapes: dict[str, tuple[int, ...]]
    max_bytes: int

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], max_bytes: int) -> "UpdateSpec":
        return cls({n: tuple(v.shape) for n, v in state.items()}, max_bytes)


def validate_update(record: ArrayRecord, weight: float, spec: UpdateSpec) -> State:
    """Check names, shapes, dtype, size, weight and finiteness *before* decoding into the sum."""
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise UpdateRejected(f"weight {weight} is not a positive finite number")
    return checked_state(record, spec)


def validate_masked_update(record: object, name: str, length: int, dtype: np.dtype, max_bytes: int) -> np.ndarray:
    """The secure-aggregation counterpart of :func:`validate_update`: one masked ring vector.

    Masked entries are uniform on the ring, so nothing about their values can be checked;
    what can is checked before the vector enters the sum: exactly one array ``name``, a
    vector of ``length`` entries of the ring's ``dtype``, at most ``max_bytes``.
    """
    if not isinstance(record, ArrayRecord) or set(record.keys()) != {name}:
        raise UpdateRejected(f"not a masked update: expected one array '{name}'")
    vector = record[name]
    if tuple(vector.shape) != (length,) or vector.dtype != dtype.name:
        raise UpdateRejected(f"masked vector of shape {tuple(vector.shape)} and dtype {vector.dtype}, expected "
                             f"({length},) {dtype.name}")
    if len(vector.data) > max_bytes:
        raise UpdateRejected(f"payload of {len(vector.data)} bytes exceeds the limit of {max_bytes}")
    try:
        return vector.numpy()
    except (TypeError, ValueError) as exc:
        raise UpdateRejected(f"masked vector does not decode: {exc}") from None


def validate_global_adapter(record: object, spec: UpdateSpec, max_abs: float) -> State:
    """A site's check of the server's global adapter: exactly its own model's tensors, bounded.

    The server may craft the adapter: an extra key could overwrite a frozen weight, and a
    NaN or a huge entry could make training fail depending on the data, which would answer
    the server with an un-noised bit about the records.  So the key set, shapes, dtype,
    finiteness and size are those of the site's own LoRA model, and every entry is at most
    ``max_abs`` in magnitude.
    """
    if not isinstance(record, ArrayRecord):
        raise UpdateRejected(f"global adapter is a {type(record).__name__}, not an ArrayRecord")
    state = checked_state(record, spec)
    for name, value in state.items():
        if float(np.max(np.abs(value), initial=0.0)) > max_abs:
            raise UpdateRejected(f"tensor {name} has an entry larger than {max_abs:g} in magnitude")
    return state


def checked_state(record: ArrayRecord, spec: UpdateSpec) -> State:
    """The tensors of a packed record if names, shapes, dtype, size and finiteness match ``spec``."""
    try:
        total_bytes = sum(len(record[n].data) for n in record.keys())
        if total_bytes > spec.max_bytes:
            raise UpdateRejected(f"payload of {total_bytes} bytes exceeds the limit of {spec.max_bytes}")
        entries = record_layout(record)
    except ValueError as exc:
        raise UpdateRejected(str(exc)) from None
    layout = dict(entries)
    if set(layout) != set(spec.shapes):
        missing, extra = sorted(set(spec.shapes) - set(layout)), sorted(set(layout) - set(spec.shapes))
        raise UpdateRejected(f"wrong tensors (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, shape in layout.items():
        if shape != spec.shapes[name]:
            raise UpdateRejected(f"tensor {name} has shape {shape}, expected {spec.shapes[name]}")
    if record[PACKED].dtype != "float32":
        raise UpdateRejected(f"update has dtype {record[PACKED].dtype}, expected float32")
    try:
        state = _unpack(record, entries)
    except ValueError as exc:
        raise UpdateRejected(str(exc)) from None
    for name, value in state.items():
        if not np.all(np.isfinite(value)):
            raise UpdateRejected(f"tensor {name} contains NaN or Inf")
    return state


def sum_updates(updates: list[tuple[State, float]]) -> tuple[State, float]:
    """Σ n_i Δ_i and Σ n_i, in float64.  The seam that secure aggregation replaces."""
    if not updates:
        raise ValueError("no updates to sum")
    names = list(updates[0][0])
    total = {n: np.zeros(updates[0][0][n].shape, dtype=np.float64) for n in names}
    weight = 0.0
    for state, w in updates:
        for n in names:
            total[n] += state[n]
        weight += w
    return total, weight


def flatten(state: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    """One float64 vector of the named tensors, in the given order (for masking)."""
    return np.concatenate([np.asarray(state[n], dtype=np.float64).ravel() for n in names])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]], names: list[str]) -> State:
    out, offset = {}, 0
    for n in names:
        size = int(np.prod(shapes[n]))
        out[n] = vector[offset:offset + size].reshape(shapes[n])
        offset += size
    if offset != len(vector):
        raise ValueError(f"vector of {len(vector)} entries does not match tensors of {offset}")
    return out
