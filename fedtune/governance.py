"""Adapter records: what each version of the global adapter is, and which version it came from.

A federation is long-lived and produces adapter versions, each from its parent.  Every
saved adapter carries an ``adapter_record.json``: its round, the hash of its parent's
record (null for the first version), the base model it adapts (path and the SHA-256
fingerprint of its frozen weights, which every site checks), the LoRA settings, the
aggregation rule, the sites whose updates went into it (by pseudonym) and the fedtune
version.  The parent hashes chain the versions, so a copy of one round's adapter says
where it sits in the federation's history.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import fedtune

RECORD_FILE = "adapter_record.json"


def lora_settings(model: Any, adapter_name: str = "default") -> dict[str, Any]:
    """The LoRA settings of ``model``'s adapter (``adapter_name``) that decide what its tensors mean."""
    config = model.peft_config[adapter_name]
    return {
        "r": int(config.r),
        "lora_alpha": float(config.lora_alpha),
        "lora_dropout": float(config.lora_dropout),
        "target_modules": sorted(config.target_modules),
        "modules_to_save": sorted(config.modules_to_save or []),
        "task_type": str(config.task_type),
        "use_dora": bool(config.use_dora),
    }


def adapter_record(round_number: int, parent: Optional[str], identity: dict[str, Any],
                   sites: list[str]) -> dict[str, Any]:
    """The record of the adapter produced by round ``round_number`` from the version ``parent``.

    ``identity`` holds what every version of a run shares (``base_model``, ``lora``,
    ``strategy``); see :func:`run_identity`.
    """
    return {"round": round_number, "parent": parent, **identity, "sites": sorted(sites),
            "fedtune_version": fedtune.__version__}


def run_identity(model: Any, base_path: Optional[str], fingerprint: str, task: str,
                 strategy: str) -> dict[str, Any]:
    """The fields of a record that every version of one run shares."""
    return {"base_model": {"name_or_path": base_path or "fedtune built-in tiny model", "fingerprint": fingerprint,
                           "task": task},
            "lora": lora_settings(model), "strategy": strategy}


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON (sorted keys, no spaces): the child's ``parent``."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_text(record: dict[str, Any]) -> str:
    """The record as written to ``adapter_record.json``."""
    return json.dumps(record, indent=2, sort_keys=True) + "\n"
