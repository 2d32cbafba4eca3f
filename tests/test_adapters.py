from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.models import build_lora_model, lora_parameter_names


def test_array_record_round_trip(tiny_cfg: FedtuneConfig) -> None:
    model, _ = build_lora_model(tiny_cfg.model)
    state = adapters.lora_state(model, lora_parameter_names(model))
    back = adapters.from_array_record(adapters.to_array_record(state))
    assert back.keys() == state.keys()
    for n in state:
        np.testing.assert_array_equal(back[n], state[n])


def test_validate_update_rejects_bad_input() -> None:
    good = {"w": np.zeros((2, 2), np.float32)}
    spec = adapters.UpdateSpec.from_state(good, max_bytes=10_000)
    adapters.validate_update(adapters.to_array_record(good), 3.0, spec)
    cases = [
        ({"w": np.zeros((2, 3), np.float32)}, 3.0, "shape"),
        ({"w": np.zeros((2, 2), np.float64)}, 3.0, "dtype"),
        ({"x": np.zeros((2, 2), np.float32)}, 3.0, "wrong tensors"),
        ({"w": np.full((2, 2), np.inf, np.float32)}, 3.0, "NaN or Inf"),
        (good, -1.0, "weight"),
        (good, float("nan"), "weight"),
    ]
    for state, weight, words in cases:
        with pytest.raises(adapters.UpdateRejected, match=words):
            adapters.validate_update(adapters.to_array_record(state), weight, spec)
    small = adapters.UpdateSpec.from_state(good, max_bytes=8)
    with pytest.raises(adapters.UpdateRejected, match="exceeds the limit"):
        adapters.validate_update(adapters.to_array_record(good), 3.0, small)


def _record(packed: np.ndarray, layout: bytes) -> ArrayRecord:
    return ArrayRecord(array_dict={adapters.PACKED: Array(packed),
                                   adapters.LAYOUT: Array(np.frombuffer(layout, dtype=np.uint8).copy())})


def test_malformed_packed_records_are_rejected_with_the_reason() -> None:
    """A hostile site controls every byte of its update, the layout included."""
    spec = adapters.UpdateSpec({"w": (2, 2)}, max_bytes=10_000)
    four = np.zeros(4, np.float32)
    cases = [
        (ArrayRecord(array_dict={"w": Array(np.zeros((2, 2), np.float32))}), "not a packed adapter"),
        (_record(four, b"not json"), "not a JSON list"),
        (_record(four, b'{"w": [2, 2]}'), "not a JSON list"),
        (_record(four, b'[["w", [2, 2]], ["w", [0]]]'), "repeated tensor name"),
        (_record(four, b'[["w", [-2, -2]]]'), "negative dimension"),
        (_record(np.zeros(5, np.float32), b'[["w", [2, 2]]]'), "does not match"),
        (_record(np.zeros(3, np.float32), b'[["w", [2, 2]]]'), "reshape|does not match"),
        (_record(np.zeros((2, 2), np.float32), b'[["w", [2, 2]]]'), "must be a vector"),
        (_record(four, b"[" + b" " * 20_000 + b"]"), "exceeds the limit"),
    ]
    for record, words in cases:
        with pytest.raises(adapters.UpdateRejected, match=words):
            adapters.validate_update(record, 3.0, spec)


def test_wire_form_is_a_handful_of_flower_objects_whatever_the_tensor_count(tiny_cfg: FedtuneConfig) -> None:
    """Flower moves each object with its own request; one Array per tensor meant ~2 per tensor."""
    model, _ = build_lora_model(tiny_cfg.model)
    rng = np.random.default_rng(0)  # distinct tensors: Flower stores equal arrays (B starts at 0) once
    state = {n: rng.normal(size=v.shape).astype(np.float32)
             for n, v in adapters.lora_state(model, lora_parameter_names(model)).items()}
    assert len(state) >= 8
    record = adapters.to_array_record(state)
    assert len(get_all_nested_objects(record)) <= 5
    back = adapters.from_array_record(record)
    assert all(np.array_equal(back[n], state[n]) for n in state)
    per_tensor = ArrayRecord(array_dict={n: Array(v) for n, v in state.items()})
    assert len(get_all_nested_objects(per_tensor)) >= 2 * len(state)
