"""The site's half of a round: budget check, charge, local DP training, update.

Order matters and is the privacy argument: the ledger check and the durable charge
happen *before* training, so no update can leave a site without its cost being on
disk first, whatever crashes afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.data import Record, load_federated_data
from fedtune.data.encoding import encode_all
from fedtune.federation import protocol
from fedtune.models import build_lora_model, lora_parameter_names, set_trainable
from fedtune.privacy.accounting import Charge
from fedtune.privacy.dpsgd import DPSGDParams, train_locally
from fedtune.privacy.ledger import PrivacyLedger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSettings:
    """The site's own settings; the server never sends or overrides any of these."""

    name: str
    ledger_path: Path
    budget_epsilon: float
    delta: float
    accountant: str
    require_privacy: bool
    # Where this site trains ("cpu", "cuda", "cuda:1"); a deployed site sets it in site.yaml.
    device: str = "cpu"
    # Whether the plain update carries the site's un-noised mean train loss (see
    # PrivacyConfig.release_train_loss); a deployed private site never sends it.
    release_train_loss: bool = False


def site_settings(context: Context, cfg: FedtuneConfig, run_dir: Path) -> SiteSettings:
    """In simulation a site is named by its partition; a deployment sets ``site-id``."""
    node = context.node_config
    name = str(node["site-id"]) if "site-id" in node else f"site-{int(node['partition-id']):02d}"
    ledger = Path(str(node["ledger-path"])) if "ledger-path" in node else run_dir / "sites" / name / "ledger.sqlite"
    return SiteSettings(
        name=name,
        ledger_path=ledger,
        budget_epsilon=cfg.privacy.target_epsilon,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
        require_privacy=cfg.privacy.enabled,
        release_train_loss=cfg.privacy.release_train_loss,
    )


def site_records(context: Context, cfg: FedtuneConfig) -> list[Record]:
    data = load_federated_data(cfg.data, cfg.federation.num_sites)
    return data.site_records(int(context.node_config["partition-id"]))


def describe(msg: Message, site: SiteSettings) -> Message:
    record = ConfigRecord({
        "site": site.name,
        "budget_epsilon": float(site.budget_epsilon),
        "delta": float(site.delta),
        "require_privacy": site.require_privacy,
    })
    return Message(RecordDict({protocol.SITE: record}), reply_to=msg)


def refusal(msg: Message, reason: str, spent: float) -> Message:
    log.info("refusing round: %s", reason)
    status = ConfigRecord({"status": protocol.STATUS_REFUSED, "reason": reason, "epsilon_spent": float(spent)})
    return Message(RecordDict({protocol.STATUS: status}), reply_to=msg)


def budget_refusal(rc: protocol.RoundConfig, site: SiteSettings, ledger: PrivacyLedger) -> Optional[str]:
    """Why this site must refuse the round, or None if it can afford it."""
    if not site.require_privacy:
        return None
    if not rc.private or rc.noise_multiplier <= 0:
        return f"{site.name} requires DP but round {rc.round} asks for a non-private update"
    decision = ledger.check(site.name, charge_of(rc), site.budget_epsilon, site.delta)
    if decision.allowed:
        return None
    return (f"{site.name}: round {rc.round} would raise ε from {decision.epsilon_before:.3f} to "
            f"{decision.epsilon_after:.3f}, past the budget ε={site.budget_epsilon:g} (δ={site.delta:g})")


def charge_of(rc: protocol.RoundConfig) -> Charge:
    return Charge(round=rc.round, noise_multiplier=rc.noise_multiplier if rc.private else 0.0,
                  sample_rate=rc.sample_rate, steps=rc.local_steps)


def local_update(rc: protocol.RoundConfig, global_state: dict, site: SiteSettings, cfg: FedtuneConfig,
                 records: list[Record], ledger: PrivacyLedger) -> tuple[dict, float, dict]:
    """Charge durably, then train; returns (Δ over the aggregated tensors, weight n, metrics)."""
    started = time.perf_counter()
    # Charge first, durably: from here on the update may leave this site.
    ledger.charge(site.name, charge_of(rc))
    epsilon_now = ledger.epsilon(site.name, site.delta)

    torch.set_num_threads(cfg.train.torch_threads)
    model, tokenizer = build_lora_model(cfg.model)
    adapters.load_lora_state(model, global_state)
    trained = lora_parameter_names(model, only_b=(rc.strategy == "ffa"))
    set_trainable(model, trained)
    # Before train_locally attaches Opacus' hooks: a model moved afterwards trains nothing.
    model.to(site.device)
    examples = encode_all(records, tokenizer, cfg.data.max_length)
    seed = cfg.train.seed
    sample_seed = secrets.randbits(63) if seed is None else stable_seed(seed, site.name, rc.round, "sampling")
    noise_seed = None if seed is None else stable_seed(seed, site.name, rc.round, "noise")
    params = DPSGDParams(
        noise_multiplier=rc.noise_multiplier, max_grad_norm=rc.max_grad_norm, sample_rate=rc.sample_rate,
        steps=rc.local_steps, learning_rate=rc.learning_rate, optimizer=rc.optimizer, private=rc.private,
    )
    result = train_locally(model, examples, params, tokenizer.pad_token_id, seed=sample_seed, noise_seed=noise_seed)

    local_state = adapters.lora_state(model, trained)
    delta = adapters.subtract(local_state, {n: global_state[n] for n in trained})
    delta_norm = adapters.l2_norm(delta)
    if not math.isfinite(delta_norm):
        raise RuntimeError(f"{site.name}: local training produced a non-finite adapter delta")
    if delta_norm == 0.0:
        # Opacus issue #820: a model moved after hooks were attached trains nothing.
        raise RuntimeError(f"{site.name}: the adapter delta is exactly zero; the LoRA parameters were not updated")
    log.info("%s round %d: %d steps (%d empty), loss %.4f, |Δ| %.4f, ε %.3f", site.name, rc.round,
             result.steps, result.empty_batches, result.mean_loss, delta_norm, epsilon_now)
    metrics = {
        "train_loss": float(result.mean_loss) if math.isfinite(result.mean_loss) else -1.0,
        "epsilon": float(epsilon_now) if math.isfinite(epsilon_now) else -1.0,
        "empty_batches": int(result.empty_batches),
        "train_seconds": float(time.perf_counter() - started),
    }
    return delta, float(len(records)), metrics


def train(msg: Message, site: SiteSettings, cfg: FedtuneConfig, records: list[Record]) -> Message:
    """Handle one plain ``train`` message: refuse, or charge, train and return n·Δ and n."""
    rc = protocol.RoundConfig.from_record(msg.content[protocol.ROUND_CONFIG])  # type: ignore[arg-type]
    ledger = PrivacyLedger(site.ledger_path, accountant=site.accountant)
    reason = budget_refusal(rc, site, ledger)
    if reason is not None:
        return refusal(msg, reason, ledger.epsilon(site.name, site.delta))
    global_state = adapters.from_array_record(msg.content[protocol.GLOBAL_ADAPTER])  # type: ignore[arg-type]
    delta, weight, metrics = local_update(rc, global_state, site, cfg, records, ledger)
    if site.require_privacy and not site.release_train_loss:
        del metrics["train_loss"]  # logged here, never sent: ε does not cover it
    content = RecordDict({
        protocol.UPDATE: adapters.to_array_record(adapters.scale(delta, weight)),
        protocol.METRICS: MetricRecord({"weight": weight, **metrics}),
        protocol.STATUS: ConfigRecord({"status": protocol.STATUS_OK}),
    })
    return Message(content, reply_to=msg)


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process (Python's own hash() of a str is not)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
