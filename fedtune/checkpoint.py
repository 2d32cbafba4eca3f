"""Atomic writes of the global adapter, per round and as the resumable checkpoint.

Everything is written to a temporary sibling and moved into place with
``os.replace``, so a crash leaves either the old file or the new one, never half.

Both artefacts are one format: peft's.  ``adapters/round_NNN/`` and ``checkpoint/``
each hold ``adapter_model.safetensors`` keyed as ``get_peft_model_state_dict`` keys a
LoRA (no adapter name inside the keys) and peft's ``adapter_config.json``, so either
loads with ``PeftModel.from_pretrained(base, dir)``.  In memory fedtune keys tensors
by ``named_parameters()`` (``...lora_A.default.weight``), because that is what a site
trains and what travels; :func:`peft_key_map` is the one bridge, taken from peft itself.
The checkpoint's file also carries its round and its adapter record in the safetensors
metadata, so weights, round and record are replaced by one rename.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

log = logging.getLogger(__name__)

# peft's own file names: a directory holding them is a peft adapter.
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# Before adapters were peft-keyed the checkpoint was this file, keyed by named_parameters().
LEGACY_CHECKPOINT_FILE = "global_adapter.safetensors"
RECORD_METADATA = "adapter_record"

State = dict[str, np.ndarray]


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place (removing an older one)."""
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, final_dir)


def peft_key_map(model: Any) -> dict[str, str]:
    """{named_parameters() name: peft state-dict key} for every adapter tensor of ``model``.

    Taken from ``peft.get_peft_model_state_dict`` by tensor identity rather than by
    rewriting names here, so the mapping is whatever peft saves (LoRA tensors lose the
    adapter name; a classification head's ``modules_to_save.default`` copy is saved under
    the head's own name), for any peft version.
    """
    from peft import get_peft_model_state_dict

    from fedtune.models import lora_parameter_names

    params = dict(model.named_parameters())
    by_storage = {(t.data_ptr(), tuple(t.shape)): key for key, t in get_peft_model_state_dict(model).items()}
    mapping = {}
    for name in lora_parameter_names(model):
        key = by_storage.get((params[name].data_ptr(), tuple(params[name].shape)))
        if key is None:
            raise ValueError(f"peft does not save the adapter tensor {name}; cannot write a peft adapter")
        mapping[name] = key
    if len(set(mapping.values())) != len(mapping):
        raise ValueError("two adapter tensors map to one peft key")
    return mapping


def to_peft_keys(key_map: Mapping[str, str], state: Mapping[str, np.ndarray]) -> State:
    """A model-keyed adapter state under peft's keys (exactly the tensors of ``key_map``)."""
    if set(state) != set(key_map):
        raise ValueError("the adapter state does not hold exactly the model's adapter tensors")
    return {key_map[n]: np.ascontiguousarray(v, dtype=np.float32) for n, v in state.items()}


def from_peft_keys(key_map: Mapping[str, str], state: Mapping[str, np.ndarray], source: str) -> State:
    """A saved adapter under the model's ``named_parameters()`` names.

    Accepts peft's keys and, for checkpoints written before adapters were peft-keyed,
    the model's own names.  Anything else is refused with what does not match: a
    checkpoint of another model or LoRA config must not be resumed from.
    """
    if set(state) == set(key_map.values()):
        back = {key: name for name, key in key_map.items()}
        return {back[key]: value for key, value in state.items()}
    if set(state) == set(key_map):
        log.info("%s is keyed by parameter names (written before adapters were peft-keyed); loading it as such",
                 source)
        return dict(state)
    expected = set(key_map.values())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    raise ValueError(f"{source} does not hold this model's adapter: missing {len(missing)} tensors "
                     f"({missing[:2]}), unexpected {len(unexpected)} ({unexpected[:2]}). Was it written for another "
                     "model.path, model.lora or model.task? Resume with the settings it was written with, or move "
                     "the run directory aside to start afresh.")


def _write_weights(path: Path, peft_state: Mapping[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A safetensors file via a temporary sibling, fsynced, then renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".safetensors")
    os.close(fd)
    try:
        # "format": "pt" is what peft's own save writes; loaders that check it accept these files.
        save_file({k: np.ascontiguousarray(v) for k, v in peft_state.items()}, tmp,
                  metadata={"format": "pt", **metadata})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Any named tensors with string metadata (e.g. the server optimiser's moments), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_weights(path, tensors, dict(metadata))


def load_tensors(path: Path) -> tuple[dict[str, str], State]:
    """(metadata, tensors) of a file :func:`save_tensors` wrote."""
    with safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata() or {}), {k: handle.get_tensor(k) for k in handle.keys()}


def save_adapter_dir(directory: Path, peft_state: Mapping[str, np.ndarray], adapter_config: str,
                     files: Mapping[str, str]) -> None:
    """A peft adapter directory (weights, config, and ``files`` such as the record), moved into place whole."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_weights(tmp / WEIGHTS_FILE, peft_state, {})
    for name, text in {CONFIG_FILE: adapter_config, **files}.items():
        atomic_write_text(tmp / name, text)
    atomic_replace_dir(tmp, directory)


def save_checkpoint(directory: Path, round_number: int, peft_state: Mapping[str, np.ndarray], adapter_config: str,
                    record: Optional[dict[str, Any]] = None) -> None:
    """The resumable checkpoint: one peft-keyed safetensors file holding the adapter, its round and
    its record (in the metadata), so the three are replaced in one atomic rename.

    ``adapter_config.json`` beside it never changes within a run; it is rewritten only
    when it differs, before the weights, so the directory always loads with peft.
    """
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or config_path.read_text(encoding="utf-8") != adapter_config:
        atomic_write_text(config_path, adapter_config)
    metadata = {"round": str(round_number)}
    if record is not None:
        metadata[RECORD_METADATA] = json.dumps(record, sort_keys=True)
    _write_weights(directory / WEIGHTS_FILE, peft_state, metadata)
    (directory / LEGACY_CHECKPOINT_FILE).unlink(missing_ok=True)


def _checkpoint_file(directory: Path) -> Optional[Path]:
    for name in (WEIGHTS_FILE, LEGACY_CHECKPOINT_FILE):
        if (directory / name).is_file():
            return directory / name
    return None


def load_checkpoint(directory: Path, key_map: Optional[Mapping[str, str]] = None
                    ) -> Optional[tuple[int, State]]:
    """(round, adapter) of the checkpoint in ``directory``, or None if there is none.

    The tensors are keyed as in the file (peft's keys; parameter names in a checkpoint
    from before adapters were peft-keyed), or, given the model's ``key_map``
    (:func:`peft_key_map`), by the model's parameter names, whichever format the file has.
    """
    path = _checkpoint_file(directory)
    if path is None:
        return None
    with safe_open(str(path), framework="numpy") as handle:
        round_number = int(handle.metadata()["round"])
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    if key_map is not None:
        state = from_peft_keys(key_map, state, str(path))
    return round_number, state


def checkpoint_record(directory: Path) -> Optional[dict[str, Any]]:
    """The adapter record stored with the checkpoint (None: no checkpoint, or one from before records)."""
    path = _checkpoint_file(directory)
    if path is None:
        return None
    with safe_open(str(path), framework="numpy") as handle:
        raw = (handle.metadata() or {}).get(RECORD_METADATA)
    return json.loads(raw) if raw else None


def adapter_config_json(model: Any) -> str:
    """peft's ``adapter_config.json`` of ``model``'s adapter, as peft itself writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        model.peft_config["default"].save_pretrained(tmp)
        return (Path(tmp) / CONFIG_FILE).read_text(encoding="utf-8")
