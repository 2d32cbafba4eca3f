"""Is the claimed guarantee real?  An empirical privacy audit with one training run.

Steinke, Nasr and Jagielski (NeurIPS 2023): m random canary records are drawn; each is
included in one site's training data with probability 1/2 (a seeded coin).  The
federation trains as usual.  Each canary is then scored by its loss under the final
global adapter (mean over its tokens).  (Subtracting the loss under the initial adapter
was tried: it adds that model's per-character noise and weakened the audit.)  The auditor guesses
"included" for the k lowest scores and "excluded" for the k highest, abstaining on the
rest; the number of right guesses turns into a lower bound on ε at the run's δ
(:mod:`fedtune.experiments.bounds`).  A bound above the ledger's ε would mean the
implementation leaks more than it claims.

The same canaries and coins audit every run of one invocation (e.g. ε=1 and ε=∞), so
their bounds compare like with like.  Several k are tried; the confidence level is
split over them (Bonferroni), so the reported maximum is still a valid lower bound at
the stated confidence.

Outputs: ``audit.json`` and ``audit.md`` (lower bound beside claimed ε, per run),
``canary_scores.csv``, ``score_histograms.png``, ``canaries.jsonl`` (each canary and its
coin), ``experiment.json``/``config.yaml``, and ``runs/<key>/`` per federation.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TextIO

import numpy as np

from fedtune.checkpoint import atomic_write_text, from_peft_keys, load_checkpoint, peft_key_map
from fedtune.config import FedtuneConfig
from fedtune.data.records import RecordSchema
from fedtune.errors import ConfigError
from fedtune.experiments.bounds import epsilon_lower_bound
from fedtune.experiments.engine import ENGINES
from fedtune.experiments.sweep import INF, Setting, plan_runs, run_plans
from fedtune.experiments.tables import epsilon_value
from fedtune.experiments.utility import harness_defaults, write_experiment_record

log = logging.getLogger(__name__)

# Latin-1 Supplement and Latin Extended-A/B letters (U+00C0..U+024F), each 2 bytes in UTF-8.
CANARY_CODEPOINTS = tuple(range(0x00C0, 0x0250))
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)


@dataclass
class AuditSpec:
    canaries: int = 256
    canary_length: int = 8
    # One federation per ε, all with the same canaries; inf = non-private.
    epsilons: list[float] = field(default_factory=lambda: [1.0, 8.0, INF])
    confidence: float = 0.95
    seed: int = 0
    engine: str = "flower"


def quick_base() -> FedtuneConfig:
    """Small sites, many local steps: an unprotected model visibly memorises within a minute.

    The model is the built-in tiny one at its default width (64): at width 32 its 259
    output rows are too crowded to raise the included canaries' characters without the
    excluded ones (measured: the non-private bound stayed near 0).
    """
    cfg = FedtuneConfig()
    cfg.model.tiny.intermediate_size = 128
    cfg.data.demo_records = 300
    cfg.data.max_length = 64
    cfg.data.partition = "iid"
    cfg.federation.num_sites = 3
    cfg.federation.num_rounds = 4
    cfg.train.local_steps = 40
    cfg.privacy.sample_rate = 0.25
    return harness_defaults(cfg)


def full_base() -> FedtuneConfig:
    cfg = quick_base()
    cfg.model.tiny.intermediate_size = FedtuneConfig().model.tiny.intermediate_size
    cfg.data.demo_records = 1200
    cfg.federation.num_sites = 5
    cfg.federation.num_rounds = 6
    cfg.train.local_steps = 50
    return cfg


def quick_spec() -> AuditSpec:
    return AuditSpec(canaries=64, epsilons=[1.0, 8.0, INF], engine="inprocess")


def validate_spec(spec: AuditSpec, base: FedtuneConfig) -> None:
    if not 10 <= spec.canaries <= len(CANARY_CODEPOINTS):
        raise ConfigError("--canaries", f"{spec.canaries} is not in 10..{len(CANARY_CODEPOINTS)}",
                          f"Use 100 to {len(CANARY_CODEPOINTS)} canaries (more canaries, tighter bounds).")
    if spec.canary_length < 1:
        raise ConfigError("--canary-length", f"{spec.canary_length} < 1", "Use 1 (the default) or more.")
    if 2 * spec.canary_length + 1 > base.data.max_length:
        raise ConfigError("--canary-length", f"{spec.canary_length} characters (2 bytes each) do not fit "
                          f"data.max_length={base.data.max_length} tokens",
                          "Use shorter canaries or a larger data.max_length.")
    if not spec.epsilons or any(not (e > 0) for e in spec.epsilons):
        raise ConfigError("--epsilons", f"{spec.epsilons} is empty or not all positive",
                          "Use e.g. --epsilons 1,inf (inf = non-private).")
    if not 0.5 < spec.confidence < 1.0:
        raise ConfigError("--confidence", f"{spec.confidence} is not in (0.5, 1)", "Use e.g. 0.95.")
    if spec.engine not in ENGINES:
        raise ConfigError("--engine", f"'{spec.engine}' is not one of {', '.join(ENGINES)}",
                          "Use --engine flower (Ray) or --engine inprocess.")
    if not 0 <= base.data.canary_site < base.federation.num_sites:
        raise ConfigError("data.canary_site", f"{base.data.canary_site} is not a site index below "
                          f"federation.num_sites={base.federation.num_sites}",
                          f"Use a site index in 0..{base.federation.num_sites - 1}.")


def make_canaries(m: int, length: int, seed: int) -> tuple[list[str], np.ndarray]:
    """m canaries and their inclusion coins (True = trained on), from separate seeded streams.

    Canary i is one character repeated ``length`` times, and no two canaries share the
    character: each is a 2-byte UTF-8 letter from Latin-1/Latin Extended, which the demo
    corpus never uses.  Random strings over a common alphabet were tried first: the tiny
    model does not memorise them within a quick run (guessing accuracy stayed at chance
    even without DP), because what it learns from one string it learns for all the others
    that share its letters.  A private character per canary is what a record can teach a
    small model that no other record does, which is what DP bounds.  (Panda et al. 2025
    audit LLMs with new-token canaries for the same reason.)
    """
    if m > len(CANARY_CODEPOINTS):
        raise ValueError(f"at most {len(CANARY_CODEPOINTS)} canaries")
    # The first m code points, so that few canaries share a UTF-8 lead byte (U+00C0..U+00FF
    # all start with 0xC3); their order is shuffled, which changes nothing but the names.
    characters = np.random.default_rng([seed, 1]).permutation(np.array(CANARY_CODEPOINTS[:m]))
    canaries = [chr(int(c)) * length for c in characters]
    included = np.random.default_rng([seed, 2]).random(m) < 0.5
    return canaries, included


def write_canaries(path: Path, canaries: Sequence[str], included: Optional[np.ndarray] = None,
                   fields: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
    """JSONL readable in every text format ("text", or an instruction with an empty prompt), plus
    the fields the run's task adds to each canary (``Task.canary_fields``: a classifier's class)."""
    lines = []
    for i, text in enumerate(canaries):
        row: dict[str, Any] = {"text": text, "prompt": "", "response": text, **(fields[i] if fields else {})}
        if included is not None:
            row["included"] = bool(included[i])
        lines.append(json.dumps(row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def canary_losses(cfg: FedtuneConfig, texts: Sequence[str], state: Optional[dict[str, np.ndarray]],
                  fields: Optional[Sequence[Mapping[str, Any]]] = None) -> np.ndarray:
    """Each canary's own loss (``Task.per_record_loss``) under the adapter ``state`` (None: the
    initial adapter), read as the sites read it: mean per-token loss, or a class's cross-entropy."""
    import torch

    from fedtune import adapters
    from fedtune.models import build_lora_model
    from fedtune.tasks import get_task

    task = get_task(cfg.model.task)
    model, tokenizer = build_lora_model(cfg.model)
    if state is not None:
        # A checkpoint is peft-keyed; from_peft_keys also takes a state keyed by parameter names.
        adapters.load_lora_state(model, from_peft_keys(peft_key_map(model), state, "the audited adapter"))
    model.eval()
    schema = RecordSchema(cfg.data.format, None, cfg.data.label_field, cfg.data.label_names)
    records = [task.parse_record({"text": t, "prompt": "", "response": t, **(fields[i] if fields else {})}, schema,
                                 f"canary {i}") for i, t in enumerate(texts)]
    examples = task.encode_all(records, tokenizer, cfg.data.max_length)
    losses = []
    with torch.no_grad():
        for start in range(0, len(examples), 64):
            batch = task.collate(examples[start:start + 64], tokenizer.pad_token_id)
            losses.append(task.per_record_loss(model, batch).numpy())
    return np.concatenate(losses).astype(float)


def guess_counts(scores: np.ndarray, included: np.ndarray, k_pos: int, k_neg: int) -> tuple[int, int]:
    """(guesses r, correct v): "included" for the k_pos lowest scores, "excluded" for the k_neg highest."""
    if k_pos + k_neg > len(scores):
        raise ValueError("k_pos + k_neg exceeds the number of canaries")
    order = np.argsort(scores, kind="stable")
    correct = int(included[order[:k_pos]].sum()) + int((~included[order[len(scores) - k_neg:]]).sum()) \
        if k_neg else int(included[order[:k_pos]].sum())
    return k_pos + k_neg, correct


def guess_sizes(m: int) -> list[int]:
    return sorted({max(1, int(round(f * m))) for f in GUESS_FRACTIONS if 2 * max(1, int(round(f * m))) <= m})


def audit_scores(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float) -> dict[str, Any]:
    """The best lower bound over several guess sizes, with the confidence split among them."""
    m = len(scores)
    sizes = guess_sizes(m)
    beta = (1.0 - confidence) / len(sizes)
    attempts = []
    for k in sizes:
        r, v = guess_counts(scores, included, k, k)
        attempts.append({"k_pos": k, "k_neg": k, "guesses": r, "correct": v,
                         "epsilon_lower_bound": epsilon_lower_bound(m, r, v, delta, beta)})
    best = max(attempts, key=lambda a: a["epsilon_lower_bound"])
    return {"canaries": m, "included": int(included.sum()), "delta": delta, "confidence": confidence,
            "beta_per_attempt": beta, "attempts": attempts, "best": best,
            "epsilon_lower_bound": best["epsilon_lower_bound"]}


def claimed_epsilon(run_dir: Path, site_index: int) -> float:
    """The audited site's ε from the server's ledger (privacy_report.json)."""
    report = json.loads((run_dir / "privacy_report.json").read_text())
    sites = report["sites"]
    entry = sites.get(f"site-{site_index:02d}") or max(sites.values(), key=lambda s: epsilon_value(s["epsilon"]))
    return epsilon_value(entry["epsilon"])


def _fmt(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:.3f}"


def write_report(out_dir: Path, runs: Sequence[dict[str, Any]], spec: AuditSpec, base: FedtuneConfig) -> str:
    lines = [
        "# Empirical privacy audit (one training run)",
        "",
        f"{spec.canaries} canaries (a private character repeated {spec.canary_length} times), each inserted into site "
        f"{base.data.canary_site}'s training data with probability 1/2 (seed {spec.seed}); score = loss under "
        f"the final global adapter. Lower bound on ε at confidence "
        f"{spec.confidence:g} (Steinke, Nasr & Jagielski 2023, Theorem 5.2, δ as claimed), best over guess "
        f"sizes {', '.join(str(a['k_pos']) for a in runs[0]['audit']['attempts'])} with the confidence split "
        "among them.",
        "",
        "| run | claimed ε (ledger) | δ | audit ε lower bound | correct / guesses | mean score in | mean score out |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        a = run["audit"]
        scores, inc = np.asarray(run["scores"]), np.asarray(run["included"], dtype=bool)
        lines.append(f"| {run['key']} | {_fmt(run['claimed_epsilon'])} | {a['delta']:g} | "
                     f"{a['epsilon_lower_bound']:.3f} | {a['best']['correct']} / {a['best']['guesses']} | "
                     f"{scores[inc].mean():.3f} | {scores[~inc].mean():.3f} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "audit.md", text)
    return text


def run_audit(spec: AuditSpec, base: FedtuneConfig, out_dir: Path, progress: bool = True,
              progress_file: Optional[TextIO] = None) -> list[dict[str, Any]]:
    """Train one federation per ε with the same canaries; write the audit report; return its runs."""
    from fedtune.experiments.plots import plot_score_histograms
    from fedtune.tasks import get_task

    validate_spec(spec, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    canaries, included = make_canaries(spec.canaries, spec.canary_length, spec.seed)
    fields = get_task(base.model.task).canary_fields(spec.canaries, base.model, base.data, spec.seed)
    write_canaries(out_dir / "canaries.jsonl", canaries, included, fields)
    inserted = out_dir / "inserted_canaries.jsonl"
    keep = np.flatnonzero(included)
    write_canaries(inserted, [canaries[i] for i in keep], None, [fields[i] for i in keep])

    base = dataclasses.replace(base, data=dataclasses.replace(base.data, canary_path=str(inserted.resolve())))
    settings = [Setting(eps, base.federation.strategy, base.federation.num_sites, base.data.partition, spec.seed,
                        base.data.dirichlet_alpha) for eps in spec.epsilons]
    plans = plan_runs(settings, base, out_dir)
    write_experiment_record(out_dir, "audit", {**dataclasses.asdict(spec),
                                               "epsilons": ["inf" if math.isinf(e) else e for e in spec.epsilons]},
                            base)
    run_plans(plans, out_dir, spec.engine, progress=progress, progress_file=progress_file)

    runs = []
    for setting, cfg in plans:
        run_dir = Path(cfg.run_dir)  # type: ignore[arg-type]
        checkpoint = load_checkpoint(run_dir / "checkpoint")
        scores = canary_losses(cfg, canaries, checkpoint[1] if checkpoint else None, fields)
        runs.append({
            "key": setting.key,
            "epsilon_target": "inf" if math.isinf(setting.epsilon) else setting.epsilon,
            "claimed_epsilon": claimed_epsilon(run_dir, cfg.data.canary_site),
            "noise_multiplier": cfg.privacy.noise_multiplier,
            "rounds_completed": checkpoint[0] if checkpoint else 0,
            "audit": audit_scores(scores, included, cfg.privacy.delta, spec.confidence),
            "scores": scores.tolist(),
            "included": included.tolist(),
        })
    with (out_dir / "canary_scores.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["canary", "text", "included", *(f"score_{r['key']}" for r in runs)])
        for i, text in enumerate(canaries):
            writer.writerow([i, text, bool(included[i]), *(f"{r['scores'][i]:.6f}" for r in runs)])
    summary = [{k: v for k, v in r.items() if k not in ("scores", "included")} for r in runs]
    for row in summary:
        row["claimed_epsilon"] = "inf" if math.isinf(row["claimed_epsilon"]) else row["claimed_epsilon"]
    atomic_write_text(out_dir / "audit.json", json.dumps({"runs": summary}, indent=2))
    write_report(out_dir, runs, spec, base)
    plot_score_histograms([{**r, "epsilon_lower_bound": r["audit"]["epsilon_lower_bound"],
                            "claimed_epsilon": "∞" if math.isinf(r["claimed_epsilon"]) else r["claimed_epsilon"]}
                           for r in runs], out_dir / "score_histograms.png")
    return runs
