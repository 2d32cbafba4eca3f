"""Merge LoRA adapters trained on one base model into one adapter, with peft's own merge methods.

Every method is peft's (``LoraModel.add_weighted_adapter``, whose arithmetic is
``peft.utils.merge_utils``); this module checks that the sources can be merged, loads
them as named adapters of one model, asks peft for the merge and writes the result with a
record whose ``parents`` are the sources' record hashes (:mod:`fedtune.derived`).

Two families, and why the difference matters:

* **factor-wise** (``linear``, ``ties``, ``dare_linear``, ``dare_ties``,
  ``magnitude_prune``): peft combines the A factors with each other and the B factors with
  each other.  Merging A and B separately is *not* merging the updates B·A: with weights
  w_i the merged update is (Σ √w_i B_i)(Σ √w_i A_i), whose cross terms B_i A_j (i ≠ j)
  belong to no source.  It is exact only when the sources share their A, which is the case
  under FFA-LoRA (A frozen at the seed's initialisation, ``federation.strategy=ffa``) and
  close to it for short runs from one ``model.seed``.  It needs equal ranks and keeps the rank.
* **on the deltas** (``task_arithmetic``, ``ties_svd``, ``dare_linear_svd``,
  ``dare_ties_svd``, ``magnitude_prune_svd``, ``cat``): peft forms each ΔW_i = s_i B_i A_i,
  combines those, and factors the result back by SVD (``cat`` stacks the factors instead,
  rank Σ r_i, which is exact).  ``task_arithmetic`` is peft's ``svd`` combination,
  Σ w_i ΔW_i; with ``--svd-rank`` at its default, the sum of the sources' ranks, the SVD
  loses nothing, so it is exact too.

Merging is post-processing of DP adapters: it costs no privacy, and the record says so.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import peft
from peft import PeftModel

from fedtune.derived import POST_PROCESSING, check_out_dir, derived_record, source_entry, write_derived_adapter
from fedtune.governance import lora_settings, record_hash
from fedtune.inference import AdapterRun, UsageError, locate
from fedtune.models import base_fingerprint, load_base_model, seeded

log = logging.getLogger(__name__)

# fedtune's method name -> peft's combination_type.
METHODS: dict[str, str] = {
    "linear": "linear", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties",
    "magnitude_prune": "magnitude_prune",
    "task_arithmetic": "svd", "ties_svd": "ties_svd", "dare_linear_svd": "dare_linear_svd",
    "dare_ties_svd": "dare_ties_svd", "magnitude_prune_svd": "magnitude_prune_svd", "cat": "cat",
}
FACTOR_WISE = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
# Methods that prune by a density (peft's ``density``); the others ignore it.
PRUNING = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune_svd"})
# Methods that draw random masks (DARE); they run under --seed so a merge can be repeated.
RANDOM = frozenset({"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"})
MERGED = "merged"


@dataclass(frozen=True)
class MergeRequest:
    """What ``fedtune merge`` was asked: the sources, the method and its settings, and where to write."""

    adapters: Sequence[str]
    out: str
    method: str = "linear"
    weights: Optional[Sequence[float]] = None
    density: float = 0.5
    svd_rank: Optional[int] = None
    seed: int = 0
    overrides: Sequence[str] = field(default_factory=tuple)
    overwrite: bool = False


def check_request(request: MergeRequest) -> list[float]:
    """The merge weights (default: an equal average); UsageError naming the argument otherwise."""
    if len(request.adapters) < 1:
        raise UsageError("ADAPTER", "no adapter given", "Name the adapter folders to merge: fedtune merge A B --out DIR.")
    if request.method not in METHODS:
        raise UsageError("--method", f"'{request.method}' is not a merge method",
                         f"Use one of {', '.join(METHODS)}.")
    weights = list(request.weights) if request.weights else [1.0 / len(request.adapters)] * len(request.adapters)
    if len(weights) != len(request.adapters):
        raise UsageError("--weights", f"{len(weights)} weights for {len(request.adapters)} adapters",
                         "Give one weight per adapter, in the adapters' order.")
    if request.method in PRUNING and not 0.0 < request.density <= 1.0:
        raise UsageError("--density", f"{request.density} is not in (0, 1]",
                         "Give the share of each update to keep, e.g. --density 0.5.")
    if request.svd_rank is not None and request.svd_rank < 1:
        raise UsageError("--svd-rank", f"{request.svd_rank} < 1", "Give a positive rank, or leave it out.")
    return weights


def _lora(run: AdapterRun) -> dict[str, Any]:
    return (run.record or {}).get("lora") or {}


def _check_pair(first: AdapterRun, other: AdapterRun, method: str) -> None:
    """``other`` can be merged with ``first``: same base weights, task, LoRA targets (and rank, factor-wise)."""
    name = f"ADAPTER {other.adapter_dir}"
    base_a, base_b = first.record["base_model"], other.record["base_model"]  # type: ignore[index]
    if base_a.get("fingerprint") != base_b.get("fingerprint"):
        raise UsageError(name, f"it was trained on another base model (fingerprint {str(base_b.get('fingerprint'))[:12]}"
                         f"... of {base_b.get('name_or_path')}) than {first.adapter_dir} "
                         f"({str(base_a.get('fingerprint'))[:12]}... of {base_a.get('name_or_path')})",
                         "Merge only adapters of one base model; a LoRA update means nothing on other weights.")
    if base_a.get("task") != base_b.get("task"):
        raise UsageError(name, f"it is a {base_b.get('task')} adapter and {first.adapter_dir} a {base_a.get('task')} "
                         "one", "Merge adapters of one task.")
    lora_a, lora_b = _lora(first), _lora(other)
    if sorted(lora_a.get("target_modules", [])) != sorted(lora_b.get("target_modules", [])):
        raise UsageError(name, f"it adapts {lora_b.get('target_modules')} and {first.adapter_dir} adapts "
                         f"{lora_a.get('target_modules')}", "Merge adapters trained with the same "
                         "model.lora.target_modules.")
    if method in FACTOR_WISE and lora_a.get("r") != lora_b.get("r"):
        raise UsageError(name, f"its rank {lora_b.get('r')} differs from {first.adapter_dir}'s {lora_a.get('r')}, "
                         f"and --method {method} combines the factors, which needs one rank",
                         "Use --method task_arithmetic, cat or a *_svd method, which merge the updates B·A.")


def check_compatible(runs: Sequence[AdapterRun], method: str) -> None:
    """Refuse, before loading any weights, sources that cannot be merged; the message names the adapter."""
    for run in runs:
        if (run.record or {}).get("lora", {}).get("modules_to_save"):
            raise UsageError(f"ADAPTER {run.adapter_dir}", "it carries a trained head (a classifier's "
                             "modules_to_save), which peft's merge methods cannot combine",
                             "Merge causal-LM adapters; a classifier's head is a full matrix, not a LoRA update.")
    for other in runs[1:]:
        _check_pair(runs[0], other, method)


def load_sources(runs: Sequence[AdapterRun]) -> tuple[PeftModel, Any, list[str]]:
    """One base model (the first source's config) with every source loaded as a named peft adapter."""
    base, tokenizer = load_base_model(runs[0].cfg.model)
    fingerprint = base_fingerprint(base, tokenizer)
    expected = runs[0].record["base_model"]["fingerprint"]  # type: ignore[index]
    if fingerprint != expected:
        raise UsageError("model.path", f"the base model rebuilt from {runs[0].run_dir / 'config.yaml'} has "
                         f"fingerprint {fingerprint[:12]}..., not the sources' {expected[:12]}...",
                         "Point model.path=DIR at a copy of the base model the adapters were trained on.")
    names = [f"source_{i}" for i in range(len(runs))]
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing; noise on a user's terminal.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(base, str(runs[0].adapter_dir), adapter_name=names[0], is_trainable=False)
        for name, run in zip(names[1:], runs[1:]):
            model.load_adapter(str(run.adapter_dir), adapter_name=name, is_trainable=False)
    return model, tokenizer, names


def merge_loaded(model: PeftModel, names: list[str], request: MergeRequest, weights: list[float]) -> dict[str, Any]:
    """Ask peft to merge ``names`` into the adapter ``merged``; returns the method's settings for the record."""
    ranks = [int(model.peft_config[n].r) for n in names]
    svd_rank = request.svd_rank or sum(ranks)
    combination = METHODS[request.method]
    kwargs: dict[str, Any] = {"combination_type": combination}
    if combination.endswith("svd"):
        kwargs["svd_rank"] = svd_rank
    if request.method in PRUNING:
        kwargs["density"] = request.density
    with seeded(request.seed):
        model.base_model.add_weighted_adapter(names, weights, MERGED, **kwargs)
    model.set_adapter(MERGED)
    return {"name": "merge", "method": request.method, "peft_combination_type": combination,
            "weights": weights, **({"svd_rank": svd_rank} if "svd_rank" in kwargs else {}),
            **({"density": request.density} if "density" in kwargs else {}),
            **({"seed": request.seed} if request.method in RANDOM else {}), "peft_version": peft.__version__}


@dataclass(frozen=True)
class MergeResult:
    out: Path
    record: dict[str, Any]

    @property
    def record_hash(self) -> str:
        return record_hash(self.record)


def merge(request: MergeRequest) -> MergeResult:
    """``fedtune merge``: check everything, load the sources, merge with peft, write OUT atomically."""
    weights = check_request(request)
    out = check_out_dir(request.out, request.overwrite)
    runs = [locate(adapter, request.overrides) for adapter in request.adapters]
    sources = [source_entry(run) for run in runs]  # also refuses an adapter without a record
    check_compatible(runs, request.method)
    model, _, names = load_sources(runs)
    method = merge_loaded(model, names, request, weights)
    record = derived_record("merge", runs[0].record["base_model"], lora_settings(model, MERGED),  # type: ignore[index]
                            sources, method, f"Merging is {POST_PROCESSING}.")
    record = write_derived_adapter(out, model, MERGED, runs[0].cfg, record)
    log.info("merged %d adapters (%s) into %s", len(runs), request.method, out)
    return MergeResult(out, record)
