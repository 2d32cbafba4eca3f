"""``ADAPTER_CARD.md``: the adapter record in words, for people who will not read JSON.

It is rendered from the record alone plus the round's held-out evaluation (made after
the record), and names the record's SHA-256, which ``fedtune record verify`` checks; the
evaluation figures are the server's own and are not part of the hash chain.
"""

from __future__ import annotations

from typing import Any, Optional

from fedtune.evaluate import EvalResult

CARD_FILE = "ADAPTER_CARD.md"
RECORD_HASH_LINE = "Record SHA-256: "


def _eps(value: Any) -> str:
    """ε as a person reads it: three decimals, ∞, or unknown."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.3f}"
    return "∞" if value == "inf" else "unknown"


def _method(record: dict[str, Any]) -> list[str]:
    method = record.get("method", {})
    dp = method.get("dp_sgd", {})
    lines = [f"- Strategy: {record.get('strategy')}; server optimiser: "
             f"{record.get('server_optimizer', {}).get('name', 'fedavg')}",
             f"- LoRA: {record.get('lora')}"]
    if dp.get("enabled"):
        lines.append(f"- DP-SGD per site, privacy unit one record: σ = {dp.get('noise_multiplier')}, "
                     f"q = {dp.get('sample_rate')}, C = {dp.get('max_grad_norm')}, {dp.get('local_steps')} steps "
                     f"a round, accountant {dp.get('accountant')}")
    else:
        lines.append("- Not differentially private (privacy.enabled=false)")
    lines.append(f"- Secure aggregation: {'on' if method.get('secure_aggregation') else 'off'}")
    if "start_adapter" in record:
        lines.append(f"- Started from the adapter of record {record['start_adapter'].get('record_sha256')}")
    if "dpo" in record:
        policy = record["dpo"].get("reference_policy", {})
        reference = ("the base model (adapter disabled)" if policy.get("kind") == "base model" else
                     f"the start adapter, frozen (record {policy.get('record_sha256')}"
                     + (f", version {policy['version']})" if policy.get("version") else ")"))
        lines.append(f"- DPO: β = {record['dpo'].get('beta')}, reference policy {reference}")
    return lines


def _sites(record: dict[str, Any]) -> list[str]:
    lines = []
    disclosures = record.get("disclosures", {})
    for site, spent in sorted(record.get("privacy", {}).items()):
        took_part = "trained this round" if site in record.get("sites", []) else "did not train this round"
        lines.append(f"- **{site}** ({took_part}): ε = {_eps(spent.get('epsilon'))} at δ = {spent.get('delta')} "
                     f"({spent.get('accountant')}, all versions so far"
                     f"{'; an upper bound on each of its cohorts' if spent.get('per_cohort_budget') else ''})")
        for key, value in sorted(disclosures.get(site, {}).get("manifest", {}).items()):
            lines.append(f"  - {key}: {value}")
        for cohort in disclosures.get(site, {}).get("cohorts", []):
            lines.append(f"  - cohort {cohort['name']} (period {cohort.get('period')}, {cohort.get('records')} "
                         f"records): ε = {_eps(cohort.get('epsilon'))} of {_eps(cohort.get('budget_epsilon'))} as "
                         f"the site reported it, commitment HMAC-SHA256 {cohort['commitment']}")
    return lines or ["- none"]


def render_card(record: dict[str, Any], record_hash: str, evaluation: Optional[EvalResult]) -> str:
    base = record.get("base_model", {})
    version = record.get("version", {})
    held_out = ("not evaluated (the server holds no held-out set)" if evaluation is None else
                f"loss {evaluation.loss:.4f}, perplexity {evaluation.perplexity:.2f}"
                + (f", accuracy {evaluation.accuracy:.4f}" if evaluation.accuracy is not None else ""))
    lines = [f"# Adapter card: round {record.get('round')}" + (f", version {version['name']}" if version else ""),
             "", f"{RECORD_HASH_LINE}`{record_hash}`", "",
             f"- Date: {record.get('date')}",
             f"- Parent record: {record.get('parent') or 'none (first version)'}"
             + (f" (parent version {version.get('parent')})" if version.get("parent") else ""),
             f"- Base model: {base.get('name_or_path')}, fingerprint {base.get('fingerprint')}, "
             f"task {base.get('task')}",
             f"- Files: {record.get('files')}", "", "## Method", *_method(record), "",
             "## Sites and their data (by pseudonym; only what each site chose to disclose)", *_sites(record), "",
             "## Evaluation", f"- Held-out: {held_out}", "",
             "## Software", *[f"- {k} {v}" for k, v in sorted(record.get("software", {}).items())], ""]
    return "\n".join(lines)
