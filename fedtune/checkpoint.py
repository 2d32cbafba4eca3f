"""Atomic writes of the global adapter, per round and as the resumable checkpoint.

Everything is written to a temporary sibling and moved into place with
``os.replace``, so a crash leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

CHECKPOINT_FILE = "global_adapter.safetensors"


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


def save_checkpoint(directory: Path, round_number: int, state: dict[str, np.ndarray]) -> None:
    """One safetensors file holding the adapter *and* its round (in the metadata), so
    the pair is replaced in one atomic rename."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".global.", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp, metadata={"round": str(round_number)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, directory / CHECKPOINT_FILE)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(directory: Path) -> Optional[tuple[int, dict[str, np.ndarray]]]:
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as handle:
        round_number = int(handle.metadata()["round"])
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    return round_number, state
