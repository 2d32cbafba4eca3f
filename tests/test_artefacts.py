"""One adapter artefact: checkpoint/ and adapters/round_NNN/ are peft adapters with records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel, get_peft_model_state_dict
from safetensors.numpy import load_file, save_file

from fedtune import adapters, governance
from fedtune.apps import make_client_app
from fedtune.checkpoint import (
    LEGACY_CHECKPOINT_FILE,
    WEIGHTS_FILE,
    checkpoint_record,
    load_checkpoint,
    peft_key_map,
)
from fedtune.config import FedtuneConfig
from fedtune.federation import protocol
from fedtune.federation.server import run_server
from fedtune.models import build_fingerprinted_model, load_base_model

from conftest import InProcessGrid


def _run(cfg: FedtuneConfig) -> InProcessGrid:
    grid = InProcessGrid(make_client_app(cfg), 3)
    run_server(grid, cfg, Path(cfg.run_dir), show_progress=False)
    return grid


def test_checkpoint_and_round_adapters_load_with_peft_and_chain_their_records(tiny_cfg: FedtuneConfig) -> None:
    _run(tiny_cfg)
    run = Path(tiny_cfg.run_dir)
    _, saved = load_checkpoint(run / "checkpoint")  # type: ignore[misc]
    round_two = load_file(str(run / "adapters" / "round_002" / WEIGHTS_FILE))
    assert set(round_two) == set(saved) and all(np.array_equal(round_two[k], saved[k]) for k in saved)
    for directory in (run / "checkpoint", run / "adapters" / "round_002"):
        base, _ = load_base_model(tiny_cfg.model)
        loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, str(directory)))
        assert set(loaded) == set(saved) and all(".default" not in key for key in saved)
        for key, value in saved.items():
            np.testing.assert_array_equal(loaded[key].numpy(), value)

    first = json.loads((run / "adapters" / "round_001" / governance.RECORD_FILE).read_text())
    second = json.loads((run / "adapters" / "round_002" / governance.RECORD_FILE).read_text())
    built = build_fingerprinted_model(tiny_cfg.model)
    assert first["round"] == 1 and first["parent"] is None
    assert second["round"] == 2 and second["parent"] == governance.record_hash(first)
    assert second["base_model"]["fingerprint"] == built.fingerprint
    assert second["lora"]["r"] == tiny_cfg.model.lora.rank and second["strategy"] == "fedavg"
    assert second["sites"] == ["site-00", "site-01", "site-02"] and second["fedtune_version"]
    assert checkpoint_record(run / "checkpoint") == second


def test_a_checkpoint_in_the_old_key_format_still_resumes(tiny_cfg: FedtuneConfig) -> None:
    """Before adapters were peft-keyed the checkpoint was global_adapter.safetensors, keyed by parameter names."""
    tiny_cfg.federation.num_rounds = 1
    _run(tiny_cfg)
    checkpoint = Path(tiny_cfg.run_dir) / "checkpoint"
    key_map = peft_key_map(build_fingerprinted_model(tiny_cfg.model).model)
    _, by_name = load_checkpoint(checkpoint, key_map)  # type: ignore[misc]
    assert set(by_name) == set(key_map)
    save_file(by_name, str(checkpoint / LEGACY_CHECKPOINT_FILE), metadata={"round": "1"})
    (checkpoint / WEIGHTS_FILE).unlink()

    tiny_cfg.federation.num_rounds = 2
    grid = _run(tiny_cfg)
    sent = next(m for m in grid.sent if m.metadata.message_type == protocol.TRAIN)
    sent_state = adapters.from_array_record(sent.content[protocol.GLOBAL_ADAPTER])
    for name, value in by_name.items():
        np.testing.assert_array_equal(sent_state[name], value)
    assert load_checkpoint(checkpoint)[0] == 2  # type: ignore[index]
    assert not (checkpoint / LEGACY_CHECKPOINT_FILE).exists()
    # The legacy checkpoint had no record, so the first version after it has no parent.
    assert checkpoint_record(checkpoint)["parent"] is None  # type: ignore[index]


def test_a_checkpoint_of_another_adapter_is_refused_with_what_differs(tiny_cfg: FedtuneConfig) -> None:
    tiny_cfg.federation.num_rounds = 1
    _run(tiny_cfg)
    tiny_cfg.model.lora.target_modules = ["q_proj"]  # another LoRA config over the same run directory
    with pytest.raises(ValueError, match="does not hold this model's adapter.*model.lora"):
        _run(tiny_cfg)
