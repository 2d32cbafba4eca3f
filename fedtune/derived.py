"""Adapters made from other adapters (merged, distilled): their output folder, record and card.

A merged or distilled adapter is computed from adapters a federation already released;
nothing in it touches a site's data again, so it is *post-processing* of DP outputs and
costs no privacy (Dwork & Roth, Prop. 2.1).  Its guarantee is exactly its sources': each
source's sites keep the (ε, δ) their own ledger accounted, no more, no less.  The record
says so, and says which versions it came from: ``parents`` lists each source's record
hash (:func:`fedtune.governance.record_hash`), so the hash chain of versions becomes a
graph with merges and distillations as nodes of several (or one) parents.

The output folder is a run folder in miniature, so ``fedtune evaluate OUT`` loads it like
any adapter: the peft adapter (``adapter_model.safetensors``, ``adapter_config.json``),
the ``config.yaml`` that rebuilds its base model, ``adapter_record.json`` and
``ADAPTER_CARD.md``, all moved into place in one rename (:func:`fedtune.checkpoint.save_adapter_dir`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
from peft import PeftModel, get_peft_model_state_dict

import fedtune
from fedtune.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_tensors, save_adapter_dir
from fedtune.config import FedtuneConfig
from fedtune.governance import RECORD_FILE, record_hash, record_text
from fedtune.inference import RUN_CONFIG, AdapterRun, UsageError
from fedtune.transparency.card import RECORD_HASH_LINE
from fedtune.transparency.digests import file_hashes, tensors_sha256

CARD_FILE = "ADAPTER_CARD.md"
PRIVACY_REPORT = "privacy_report.json"
POST_PROCESSING = ("post-processing of the sources' released DP adapters: no site's data was read, so it costs no "
                   "privacy; each source's sites keep exactly the (epsilon, delta) guarantee listed for that source")


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """``--out`` as an absolute path; an existing folder is refused unless the user asked to replace it."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not overwrite:
        raise UsageError("--out", f"'{out}' already exists", "Name a new folder, or pass --overwrite to replace it.")
    if path.exists() and not path.is_dir():
        raise UsageError("--out", f"'{out}' is a file", "Name a folder to write.")
    return path


def require_record(run: AdapterRun, argument: str = "ADAPTER") -> dict[str, Any]:
    """The adapter's record; an adapter without one cannot be a parent (its base model is unknown)."""
    if run.record is None:
        raise UsageError(argument, f"'{run.adapter_dir}' has no {RECORD_FILE}, so its base model and privacy "
                         "guarantee are unknown", "Use an adapter folder a run wrote with records "
                         "(RUN/adapters/round_NNN).")
    return run.record


def source_privacy(run: AdapterRun) -> dict[str, Any]:
    """The DP guarantee of a source: its record's own, else its run's privacy report, else unknown.

    A run's ``privacy_report.json`` holds each site's ε at the end of the run, which bounds
    the ε of any earlier round's adapter from above, so quoting it is never an understatement.
    """
    record = run.record or {}
    dp = ((record.get("method") or {}).get("dp_sgd") or {}).get("enabled", run.cfg.privacy.enabled)
    stated = record.get("privacy")
    if dp and isinstance(stated, dict) and stated and all(isinstance(v, dict) and "epsilon" in v
                                                           for v in stated.values()):
        first = next(iter(stated.values()))
        return {"source": RECORD_FILE, "dp": True, "accountant": first.get("accountant"), "delta": first.get("delta"),
                "epsilon_by_site": {site: spent["epsilon"] for site, spent in sorted(stated.items())},
                "note": "each site's epsilon as the source's record states it"}
    if not dp:
        return {"source": RUN_CONFIG, "dp": False, "note": "trained without DP (privacy.enabled=false)"}
    report_path = run.run_dir / PRIVACY_REPORT
    if not report_path.is_file():
        return {"source": None, "dp": True, "epsilon_by_site": None,
                "note": f"unknown: no {PRIVACY_REPORT} in {run.run_dir}"}
    report = json.loads(report_path.read_text(encoding="utf-8"))
    sites = set(record.get("sites") or report.get("sites", {}))
    return {"source": str(report_path), "dp": True, "accountant": report.get("accountant"),
            "delta": report.get("delta"),
            "epsilon_by_site": {name: site["epsilon"] for name, site in report.get("sites", {}).items()
                                if name in sites},
            "note": "each site's epsilon at the end of its run: an upper bound for an earlier round's adapter"}


def source_entry(run: AdapterRun) -> dict[str, Any]:
    """What a derived record says of one source: where it was, its record and weights hashes, sites, guarantee."""
    record = require_record(run)
    return {"adapter": str(run.adapter_dir), "record_hash": record_hash(record),
            # A round's record states its weights' digest; an older one's is computed here, the same way.
            "weights_sha256": (record.get("files") or {}).get("weights_sha256")
            or tensors_sha256(load_tensors(run.adapter_dir / WEIGHTS_FILE)[1]),
            "round": record.get("round"),
            "sites": sorted(record.get("sites") or []), "base_model": record.get("base_model"),
            "privacy": source_privacy(run)}


def derived_record(kind: str, base_model: dict[str, Any], lora: dict[str, Any], sources: list[dict[str, Any]],
                   method: dict[str, Any], privacy: str, **extra: Any) -> dict[str, Any]:
    """The record of an adapter derived from ``sources`` by ``kind`` (``merge``, ``distil``).

    ``round`` is null (no federation round produced it) and ``parents`` replaces the single
    ``parent`` of a round's record.  ``sites`` is the union of the sources' sites: whose
    data, through the sources, this adapter reflects.
    """
    sites = sorted({site for source in sources for site in source["sites"]})
    return {"round": None, "kind": kind, "parents": [s["record_hash"] for s in sources], "base_model": base_model,
            "lora": lora, "method": method, "sources": sources, "sites": sites,
            "privacy": {"post_processing": True, "statement": privacy}, **extra,
            "fedtune_version": fedtune.__version__}


def _epsilon_text(privacy: dict[str, Any]) -> str:
    if privacy.get("dp") is False:
        return "no DP (trained with privacy.enabled=false)"
    by_site = privacy.get("epsilon_by_site")
    if not by_site:
        return privacy.get("note", "unknown")
    delta = privacy.get("delta")
    return ", ".join(f"{site} ε={eps if isinstance(eps, str) else f'{eps:.3f}'}" for site, eps in by_site.items()) + (
        f" at δ={delta}" if delta is not None else "")


def card_text(record: dict[str, Any]) -> str:
    """``ADAPTER_CARD.md``: the record in words, for a person deciding whether to use or publish it."""
    base = record["base_model"]
    title = {"merge": "merged adapter", "distil": "distilled student adapter"}.get(record["kind"], record["kind"])
    lines = [f"# Adapter card: {title}", "",
             f"- base model: {base.get('name_or_path')} (fingerprint `{base.get('fingerprint')}`)",
             f"- task: {base.get('task')}; LoRA rank {record['lora'].get('r')}, targets "
             f"{', '.join(record['lora'].get('target_modules', []))}",
             f"- method: {json.dumps(record['method'], sort_keys=True)}",
             f"- fedtune {record['fedtune_version']}", "", f"{RECORD_HASH_LINE}`{record_hash(record)}`", "",
             "## Privacy", "", record["privacy"]["statement"], "",
             "## Sources", "", "| adapter | record hash | round | sites | guarantee |", "| --- | --- | --- | --- | --- |"]
    for source in record["sources"]:
        lines.append(f"| {source['adapter']} | `{source['record_hash'][:16]}` | {source.get('round')} | "
                     f"{', '.join(source['sites'])} | {_epsilon_text(source['privacy'])} |")
    for key, value in record.items():
        if key == "data":
            lines += ["", "## Data", "", f"```json\n{json.dumps(value, indent=2, sort_keys=True)}\n```"]
    return "\n".join(lines) + "\n"


def adapter_config_text(model: PeftModel, adapter_name: str) -> str:
    """peft's ``adapter_config.json`` for one of ``model``'s adapters, as peft writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        model.peft_config[adapter_name].save_pretrained(tmp)
        return (Path(tmp) / CONFIG_FILE).read_text(encoding="utf-8")


def config_yaml(cfg: FedtuneConfig) -> str:
    """The config that rebuilds the output's base model, written as a run writes its own."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def write_derived_adapter(out: Path, model: PeftModel, adapter_name: str, cfg: FedtuneConfig,
                          record: dict[str, Any], extra_files: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Write ``model``'s adapter ``adapter_name`` with its config, record and card to ``out``, atomically.

    The tensors are peft's saved keys (``get_peft_model_state_dict``: no adapter name in
    them), so ``PeftModel.from_pretrained(base, out)`` loads them as the default adapter.
    The record gains the digests of those tensors and of the config (``files``, as a round's
    record states them, :mod:`fedtune.transparency.digests`); it is returned as written.
    """
    state = {key: np.ascontiguousarray(value.detach().float().cpu().numpy())
             for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    adapter_config = adapter_config_text(model, adapter_name)
    record = {**record, "files": file_hashes(state, adapter_config)}
    files = {RUN_CONFIG: config_yaml(cfg), RECORD_FILE: record_text(record), CARD_FILE: card_text(record),
             **(extra_files or {})}
    save_adapter_dir(out, state, adapter_config, files)
    return record
