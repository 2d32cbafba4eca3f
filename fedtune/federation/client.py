"""The site's half of a round: validation, budget check, charge, local DP training, update.

Order matters and is the privacy argument.  First every field the server sent is checked
against the protocol and the site's own policy, model and data (a failure is a refusal
with a fixed code, and costs nothing); then the ledger check and the durable charge
happen *before* training, so no update can leave a site without its cost being on disk
first, whatever crashes afterwards.

A site whose data is a sequence of cohorts (``data.cohorts`` in site.yaml) checks and
charges each cohort against its own budget and samples only from the cohorts that can
afford the round; the others are retired (:mod:`fedtune.privacy.cohorts`).  A site with no
active cohort refuses with the budget code.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune import adapters
from fedtune.config import FedtuneConfig
from fedtune.data import FederatedData, Record
from fedtune.data.cohorts import CohortedRecords, cohorted
from fedtune.data.stream import stream_budgets, stream_records
from fedtune.federation import protocol
from fedtune.models import FingerprintedModel, lora_parameter_names, set_trainable, site_model
from fedtune.privacy.dpsgd import DPSGDParams, train_locally
from fedtune.privacy.cohorts import CohortBudget, cohort_epsilons, decide_cohorts
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.policy import SitePolicy, check_base_model, check_round
from fedtune.secagg.signing import Identity, simulated_identity
from fedtune.strategies import make_strategy
from fedtune.tasks import LossSettings, get_task

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
    # What rounds the site accepts; a simulated site takes SitePolicy.permissive.
    policy: SitePolicy = field(default_factory=lambda: SitePolicy.permissive(secure_aggregation=False))
    # Whether train.seed may seed sampling and noise (research simulations only).  A
    # deployed site never takes randomness from the server: its run config is refused.
    accept_seed: bool = True
    # The site's own class count for labelled data (a deployed site declares it in site.yaml).
    num_labels: Optional[int] = None
    # Its signing key and the enrolled roster (secure aggregation against an active server);
    # None: no valid roster, so every secure-aggregation stage is refused.
    identity: Optional[Identity] = None
    # The site's cohorts with their own budgets (site.yaml data.cohorts); empty: the whole
    # site is one budget, every ledger row counts.
    cohorts: tuple[CohortBudget, ...] = ()
    # What the site discloses of its data, as JSON (fedtune.deploy.manifest); None: nothing.
    disclosure: Optional[str] = None


TrainingData = Union[CohortedRecords, Sequence[Record]]
# The whole site, for a site without cohorts: its ledger rows name no cohort.
WHOLE_SITE: tuple[Optional[str], ...] = (None,)


def site_settings(context: Context, cfg: FedtuneConfig, run_dir: Path) -> SiteSettings:
    """In simulation a site is named by its partition (node config ``partition-id``).

    fedtune's own deployment never comes here: ``fedtune client`` builds the site's settings
    from its site.yaml (:func:`fedtune.apps.make_client_app`).  A plain Flower SuperNode may
    still name its site and ledger with node config ``site-id`` and ``ledger-path``.
    """
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
        # Inside a Ray actor "cuda" is the GPU share Ray reserved for it (federation.gpus_per_site).
        device=cfg.federation.site_training_device(),
        release_train_loss=cfg.privacy.release_train_loss,
        policy=SitePolicy.permissive(secure_aggregation=cfg.secagg.enabled),
        identity=simulated_identity(str(run_dir), name, SimulatedSites(cfg.federation.num_sites, name)),
        cohorts=stream_budgets(cfg),
    )


@dataclass(frozen=True)
class SimulatedSites:
    """The roster names of a simulation: every partition's site name (and this site's own, if named otherwise).

    Answered by rule, not listed: a site builds its settings for every message, and a list of
    10,000 names cost it 50 ms a message (plus hashing it to find the cached keys).
    """

    num_sites: int
    own: str

    def _partition_name(self, name: object) -> bool:
        if not isinstance(name, str) or not name.startswith("site-") or not name[5:].isdigit():
            return False
        index = int(name[5:])
        return index < self.num_sites and name == f"site-{index:02d}"

    def __contains__(self, name: object) -> bool:
        return name == self.own or self._partition_name(name)

    def __len__(self) -> int:
        return self.num_sites + (not self._partition_name(self.own))

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({f"site-{i:02d}" for i in range(self.num_sites)} | {self.own}))


def site_records(context: Context, data: FederatedData, cfg: Optional[FedtuneConfig] = None) -> TrainingData:
    """A simulated site's records: its partition of the pooled data (the arrived part of a stream)."""
    records = data.site_records(int(context.node_config["partition-id"]))
    return records if cfg is None else stream_records(records, cfg)


def describe(msg: Message, site: SiteSettings) -> Message:
    record = ConfigRecord({
        "site": site.name,
        "budget_epsilon": float(site.budget_epsilon),
        "delta": float(site.delta),
        "require_privacy": site.require_privacy,
        # Its cohorts each hold their own budget: the server's whole-site ε is then an upper
        # bound on every record's, and the site alone decides when it is spent.
        "per_cohort_budget": bool(site.cohorts),
    })
    if site.disclosure is not None:
        record["disclosure"] = site.disclosure
    return Message(RecordDict({protocol.SITE: record}), reply_to=msg)


def refusal(msg: Message, refused: protocol.Refusal) -> Message:
    """The reply to a refused round: a fixed code only; the detail stays in this site's log."""
    log.warning("refusing round: %s", refused.detail)
    status = ConfigRecord({"status": protocol.STATUS_REFUSED, "reason": refused.code})
    return Message(RecordDict({protocol.STATUS: status}), reply_to=msg)


def read_round_config(msg: Message) -> protocol.RoundConfig:
    return protocol.RoundConfig.from_record(msg.content.config_records.get(protocol.ROUND_CONFIG))


def check_budget(rc: protocol.RoundConfig, site: SiteSettings, ledger: PrivacyLedger) -> tuple[Optional[str], ...]:
    """The cohorts this round may sample from; raise Refusal if none can afford it.

    Without cohorts the check covers every row of the site's ledger file, whatever site
    name it was charged under: renaming a site must not give it a fresh budget.  With
    cohorts each is checked against its own budget over its own rows (and whole-site rows).
    """
    if not site.require_privacy:
        return tuple(c.name for c in site.cohorts) or WHOLE_SITE
    if site.cohorts:
        decision = decide_cohorts(site.cohorts, rc.charge(), ledger, site.accountant)
        if not decision.active:
            raise protocol.Refusal(protocol.REFUSED_BUDGET, (
                f"{site.name}: round {rc.round} would take every cohort past its budget "
                f"({', '.join(f'{n} ε {e:.3f}' for n, e in decision.epsilon_after.items())})"))
        return decision.active
    decision = ledger.check(None, rc.charge(), site.budget_epsilon, site.delta)
    if not decision.allowed:
        raise protocol.Refusal(protocol.REFUSED_BUDGET, (
            f"{site.name}: round {rc.round} would raise ε from {decision.epsilon_before:.3f} to "
            f"{decision.epsilon_after:.3f}, past the budget ε={site.budget_epsilon:g} (δ={site.delta:g})"))
    return WHOLE_SITE


@dataclass
class PreparedRound:
    """A round that passed every check of the site; only the charge and training remain."""

    rc: protocol.RoundConfig
    built: FingerprintedModel
    global_state: adapters.State
    ledger: PrivacyLedger
    # The cohorts this round samples from and charges (WHOLE_SITE without cohorts), and their records.
    cohorts: tuple[Optional[str], ...]
    records: list[Record]
    # The frozen reference adapter of a task that has one (DPO from a trained start); None: the base.
    reference: Optional[adapters.State] = None


def check_round_message(msg: Message, site: SiteSettings, cfg: FedtuneConfig, secure: bool
                        ) -> tuple[protocol.RoundConfig, PrivacyLedger, tuple[Optional[str], ...]]:
    """Everything checkable before the adapter arrives: config, policy, seed, budget.

    Returns the round config, the ledger and the cohorts that can afford the round.
    """
    rc = read_round_config(msg)
    check_round(rc, site.policy, site.require_privacy, secure)
    if cfg.train.seed is not None and not site.accept_seed:
        raise protocol.Refusal(protocol.REFUSED_RUN_CONFIG, "the run sets train.seed; this site draws its noise "
                               "and sampling from OS entropy only")
    ledger = PrivacyLedger(site.ledger_path, accountant=site.accountant)
    active = check_budget(rc, site, ledger)
    return rc, ledger, active


def prepare_round(msg: Message, site: SiteSettings, cfg: FedtuneConfig, data: TrainingData, secure: bool,
                  max_weight: Optional[int] = None) -> PreparedRound:
    """Validate the whole train message against the site's policy, model, data and budget.

    Raises Refusal; nothing is charged and nothing is trained before this returns.  The
    records of the round are those of the cohorts that can afford it.
    """
    rc, ledger, active = check_round_message(msg, site, cfg, secure)
    built = site_model(cfg.model)
    check_base_model(rc, built.fingerprint, site.policy)
    names = lora_parameter_names(built.model)
    shapes = {n: tuple(p.shape) for n, p in built.model.named_parameters() if n in set(names)}
    # The exact float32 size of this site's own adapter, plus its layout: nothing larger is read.
    size = 4 * sum(int(math.prod(shape)) for shape in shapes.values()) + adapters.MAX_LAYOUT_BYTES
    spec = adapters.UpdateSpec(shapes, size)
    global_state = _checked_adapter(msg.content.array_records.get(protocol.GLOBAL_ADAPTER), protocol.GLOBAL_ADAPTER,
                                    spec, site.policy)
    reference = _checked_reference(msg, spec, site.policy, cfg)
    data = cohorted(data)
    # Only cohorts that hold records are sampled and charged (a declared cohort may not have arrived).
    active = tuple(c for c in active if c in set(data.cohorts))
    records = data.select(active)
    check_site_data(records, cfg, site, max_weight)
    return PreparedRound(rc, built, global_state, ledger, active, records, reference)


def _checked_adapter(record: object, name: str, spec: adapters.UpdateSpec, policy: SitePolicy) -> adapters.State:
    """The adapter ``record`` (the message's ``name``), checked against the site's own model; else Refusal."""
    try:
        return adapters.validate_global_adapter(record, spec, policy.max_adapter_value)
    except Exception as exc:  # noqa: BLE001 - any malformed adapter is the same refusal
        raise protocol.Refusal(protocol.REFUSED_INVALID_MESSAGE, f"{name.replace('_', ' ')}: {str(exc)[:200]}"
                               ) from None


def _checked_reference(msg: Message, spec: adapters.UpdateSpec, policy: SitePolicy, cfg: FedtuneConfig
                       ) -> Optional[adapters.State]:
    """The reference adapter, if the message carries one, validated exactly like the global adapter.

    Only a task whose loss has a reference policy takes one: a reference sent for any other
    task is a malformed message, refused like an unexpected round-config key.  Any record
    under the name counts (a ConfigRecord there is refused, not ignored).
    """
    if protocol.REFERENCE_ADAPTER not in msg.content:
        return None
    if not get_task(cfg.model.task).uses_reference:
        raise protocol.Refusal(protocol.REFUSED_INVALID_MESSAGE,
                               f"a reference adapter was sent for model.task={cfg.model.task}, which has none")
    return _checked_adapter(msg.content[protocol.REFERENCE_ADAPTER], protocol.REFERENCE_ADAPTER, spec, policy)


def check_site_data(records: list[Record], cfg: FedtuneConfig, site: SiteSettings, max_weight: Optional[int]) -> None:
    """Checks that involve the site's records, run before any charge.

    A deployed site has already checked δ and its labels against its own site.yaml when
    it started (fedtune.deploy.site_data); what is left compares the run's settings with
    the site's own: a refusal then depends on the site's configuration and record count,
    never on one record's content.
    """
    if not records:
        raise protocol.Refusal(protocol.REFUSED_RUN_CONFIG, "this site has no training records")
    if site.require_privacy and site.delta >= 1.0 / len(records):
        raise protocol.Refusal(protocol.REFUSED_RUN_CONFIG, f"δ={site.delta:g} is not below 1/records")
    if max_weight is not None and len(records) > max_weight:
        raise protocol.Refusal(protocol.REFUSED_RUN_CONFIG, "the site's record count exceeds secagg.max_weight")
    problem = get_task(cfg.model.task).site_data_problem(records, cfg.model, site.num_labels)
    if problem is not None:
        raise protocol.Refusal(protocol.REFUSED_RUN_CONFIG, problem)


def spent_epsilon(prepared: PreparedRound, site: SiteSettings) -> float:
    """The site's ε after the round's charge: the largest of its active cohorts', or its own."""
    if prepared.cohorts == WHOLE_SITE:
        return prepared.ledger.epsilon(None, site.delta)
    active = [c for c in site.cohorts if c.name in set(prepared.cohorts)]
    return max(cohort_epsilons(active, prepared.ledger, site.accountant).values())


def local_update(prepared: PreparedRound, site: SiteSettings, cfg: FedtuneConfig) -> tuple[dict, float, dict]:
    """Charge durably, then train; returns (Δ over the aggregated tensors, weight n, metrics)."""
    started = time.perf_counter()
    rc, ledger, records = prepared.rc, prepared.ledger, prepared.records
    # Charge first, durably, every cohort sampled from: from here on the update may leave this site.
    ledger.charge(site.name, rc.charge(), prepared.cohorts)
    epsilon_now = spent_epsilon(prepared, site)

    torch.set_num_threads(cfg.train.torch_threads)
    model, tokenizer = prepared.built.model, prepared.built.tokenizer
    # Before train_locally attaches Opacus' hooks: a model moved afterwards trains nothing.
    model.to(site.device)
    task = get_task(cfg.model.task).with_loss(LossSettings(dpo_beta=rc.dpo_beta))
    examples = task.encode_all(records, tokenizer, cfg.data.max_length)
    if prepared.reference is not None:
        # The reference's values of every pair, before the policy's adapter and any hook (fedtune.tasks.dpo).
        adapters.load_lora_state(model, prepared.reference)
        examples = task.with_reference(model, examples, tokenizer.pad_token_id, cfg.train.eval_batch_size)
    # The whole adapter is loaded (exact key set), so nothing of the last round (or the reference) survives.
    adapters.load_lora_state(model, prepared.global_state)
    # The rule decides what is trained, as the server decides what it aggregates: the same set.
    trained = make_strategy(rc.strategy).trainable_names(model)
    set_trainable(model, trained)
    seed = cfg.train.seed if site.accept_seed else None
    sample_seed = secrets.randbits(63) if seed is None else stable_seed(seed, site.name, rc.round, "sampling")
    noise_seed = None if seed is None else stable_seed(seed, site.name, rc.round, "noise")
    params = DPSGDParams(
        noise_multiplier=rc.noise_multiplier, max_grad_norm=rc.max_grad_norm, sample_rate=rc.sample_rate,
        steps=rc.local_steps, learning_rate=rc.learning_rate, head_learning_rate=rc.head_learning_rate,
        optimizer=rc.optimizer, private=rc.private,
    )
    result = train_locally(task, model, examples, params, tokenizer.pad_token_id, seed=sample_seed,
                           noise_seed=noise_seed)

    local_state = adapters.lora_state(model, trained)
    delta = adapters.subtract(local_state, {n: prepared.global_state[n] for n in trained})
    delta_norm = adapters.l2_norm(delta)
    if not math.isfinite(delta_norm):
        raise RuntimeError(f"{site.name}: local training produced a non-finite adapter delta")
    if delta_norm == 0.0:
        # Opacus issue #820: a model moved after hooks were attached trains nothing.
        raise RuntimeError(f"{site.name}: the adapter delta is exactly zero; the LoRA parameters were not updated")
    # Local only: the clipped share is computed from un-noised gradients and never sent.
    log.info("%s round %d: %d steps (%d empty), loss %.4f, |Δ| %.4f, %.0f%% of records clipped, ε %.3f",
             site.name, rc.round, result.steps, result.empty_batches, result.mean_loss, delta_norm,
             100 * result.clipped_fraction, epsilon_now)
    metrics = {
        "train_loss": float(result.mean_loss) if math.isfinite(result.mean_loss) else -1.0,
        "epsilon": float(epsilon_now) if math.isfinite(epsilon_now) else -1.0,
        "empty_batches": int(result.empty_batches),
        "train_seconds": float(time.perf_counter() - started),
    }
    return delta, float(len(records)), metrics


def train(msg: Message, site: SiteSettings, cfg: FedtuneConfig, data: TrainingData) -> Message:
    """Handle one plain ``train`` message: refuse, or charge, train and return n·Δ and n."""
    try:
        prepared = prepare_round(msg, site, cfg, data, secure=False)
    except protocol.Refusal as refused:
        return refusal(msg, refused)
    delta, weight, metrics = local_update(prepared, site, cfg)
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
