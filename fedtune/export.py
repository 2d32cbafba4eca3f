"""``fedtune export``: an adapter as files that Hugging Face libraries load without fedtune.

Two forms:

* ``--merge``: the base model with the adapter folded into its weights
  (peft's ``merge_and_unload``), saved with ``save_pretrained`` as safetensors with its
  config and tokenizer: ``AutoModelForCausalLM.from_pretrained(DIR)`` (or the
  classification class) loads it, and it serves at the base model's cost;
* without it: the plain peft adapter folder (``PeftModel.from_pretrained(base, DIR)``),
  whose ``adapter_config.json`` names the base model's path (``model.path``).  The
  built-in tiny model has no files, so its adapter only loads through fedtune; export it
  with ``--merge``.

Either way the adapter's record (and card, if it has one) is copied beside the files, with
``fedtune_export.json`` saying what was exported from which record.  Exporting is
post-processing of a released adapter: it costs no privacy.  The folder is written to a
temporary sibling and moved into place whole.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from transformers import PreTrainedModel

import fedtune
from fedtune.checkpoint import atomic_replace_dir, atomic_write_text
from fedtune.derived import CARD_FILE, check_out_dir
from fedtune.governance import RECORD_FILE, record_hash, record_text
from fedtune.inference import LoadedAdapter, UsageError, load_model, locate

log = logging.getLogger(__name__)

EXPORT_FILE = "fedtune_export.json"


@dataclass(frozen=True)
class ExportResult:
    out: Path
    merged: bool
    model_class: str
    # The base model's path a plain adapter folder names (None: the built-in tiny model).
    base_model: Optional[str]


def _merged_model(loaded: LoadedAdapter) -> PreTrainedModel:
    """The base model with the adapter folded in; refused if it is not a Hugging Face model class."""
    merged = loaded.model.merge_and_unload()
    if not isinstance(merged, PreTrainedModel):
        raise UsageError("--merge", f"the merged model is a {type(merged).__name__} (fedtune's own pooling head on "
                         "a sentence encoder), which Hugging Face's Auto classes cannot load",
                         "Export the adapter without --merge, or use a base model with its own classification head.")
    return merged


def _write_merged(loaded: LoadedAdapter, folder: Path) -> str:
    merged = _merged_model(loaded)
    merged.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)
    return type(merged).__name__


def _write_adapter(loaded: LoadedAdapter, folder: Path) -> str:
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing; noise on a user's terminal.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        loaded.model.save_pretrained(folder)
    return type(loaded.model).__name__


def _provenance(loaded: LoadedAdapter, merged: bool, model_class: str) -> dict[str, Any]:
    record = loaded.run.record
    return {"source_adapter": str(loaded.run.adapter_dir),
            "source_record_hash": record_hash(record) if record is not None else None,
            "merged": merged, "model_class": model_class,
            "privacy": "exporting is post-processing of the released adapter: it costs no privacy; the adapter's "
                       f"guarantee is its record's ({RECORD_FILE})",
            "fedtune_version": fedtune.__version__}


def export(adapter: str, out: str, merge: bool = False, overrides: Sequence[str] = (),
           overwrite: bool = False) -> ExportResult:
    """``fedtune export ADAPTER --out DIR [--merge]``: see the module docstring."""
    target = check_out_dir(out, overwrite)
    loaded = load_model(locate(adapter, overrides))
    folder = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        model_class = _write_merged(loaded, folder) if merge else _write_adapter(loaded, folder)
        if loaded.run.record is not None:
            atomic_write_text(folder / RECORD_FILE, record_text(loaded.run.record))
        if (loaded.run.adapter_dir / CARD_FILE).is_file():
            shutil.copyfile(loaded.run.adapter_dir / CARD_FILE, folder / CARD_FILE)
        atomic_write_text(folder / EXPORT_FILE, json.dumps(_provenance(loaded, merge, model_class), indent=2) + "\n")
        atomic_replace_dir(folder, target)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    base = loaded.cfg.model.path
    if not merge and base is None:
        log.warning("the adapter's base is fedtune's built-in tiny model, which has no files: the exported adapter "
                    "loads only through fedtune; export with --merge for a standalone model")
    log.info("exported %s to %s (%s)", loaded.run.adapter_dir, target, "merged" if merge else "peft adapter")
    return ExportResult(target, merge, model_class, None if base is None else str(base))
