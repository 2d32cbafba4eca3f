"""Typed configuration of a fedtune run, and its validation.

Every field has a type (enforced by OmegaConf when Hydra composes the YAML, or by
:func:`load_structured` for every other entry point) and a meaning checked by one
validator per section here.  :func:`fedtune.validation.validate` composes them with the
secure-aggregation rules (:mod:`fedtune.secagg.parameters`) before any model is loaded
or any record is read, so this module stays a leaf: it imports nothing of fedtune but
its errors, and secagg, privacy and deploy can import the schema without a cycle.  A bad
run stops in seconds with one message naming the field and what would be valid, never
after spending privacy budget.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar, Union

from fedtune.errors import ConfigError, require

ACCOUNTANTS = ("rdp", "prv")
PARTITIONS = ("iid", "dirichlet", "by_field")
# The registries are fedtune.tasks (tasks and the record formats they read) and
# fedtune.strategies; this leaf cannot import them, so tests keep these names equal to theirs.
DATA_FORMATS = ("auto", "text", "instruction", "labelled", "preference")
TASKS = ("causal_lm", "classification", "dpo")
STRATEGIES = ("fedavg", "ffa")
# fedtune.server_optimizers' registry, each with the federation.server_* fields it reads; a test
# keeps this table equal to the classes' own, so a field the chosen optimiser ignores is refused.
SERVER_OPTIMIZER_FIELDS: dict[str, tuple[str, ...]] = {
    "fedavg": ("server_learning_rate",),
    "fedavgm": ("server_learning_rate", "server_momentum"),
    "fedadam": ("server_learning_rate", "server_beta_1", "server_beta_2", "server_tau"),
    "fedyogi": ("server_learning_rate", "server_beta_1", "server_beta_2", "server_tau"),
    "fedadagrad": ("server_learning_rate", "server_tau"),
}
SERVER_OPTIMIZERS = tuple(SERVER_OPTIMIZER_FIELDS)
OPTIMIZERS = ("sgd", "adam")
# Dtypes of the frozen base weights (model.dtype); the trained tensors are always float32.
MODEL_DTYPES = ("float32", "bfloat16", "float16")
# model.quantization values (null: the base in model.dtype); fedtune.quantization does it.
QUANTIZATIONS = ("4bit",)
MIN_BITSANDBYTES = (0, 46)
QUANTIZATION_INSTALL_HINT = ("Install it: pip install 'fedtune[qlora]' (bitsandbytes>=0.46), "
                             "or set model.quantization=null.")
# How a classifier reads its encoder (model.pooling; fedtune.tasks.pooling): auto takes the
# checkpoint's own sentence pooling when it declares one (sentence-transformers), else head;
# head is the transformers class's own head; mean and cls pool the token states.
POOLINGS = ("auto", "head", "mean", "cls")
# DPO's β (train.dpo_beta): TRL's default, and the bound a round config's β stays within.  Above
# ~10 the loss is a hard step in the margin (−log σ(β·m) saturates at |m| ≈ 1/β) and the
# adapter need not move to satisfy it; β enters only the loss, never the privacy guarantee.
DEFAULT_DPO_BETA = 0.1
MAX_DPO_BETA = 10.0


@dataclass
class TinyModelConfig:
    """Shape of the built-in Llama-style model (used when ``model.path`` is null)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 176
    max_position_embeddings: int = 512


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # None picks the per-family default from fedtune.models.DEFAULT_TARGET_MODULES.
    target_modules: Optional[list[str]] = None
    use_dora: bool = False


@dataclass
class ModelConfig:
    # A local Hugging Face causal-LM directory; null selects the built-in tiny model.
    path: Optional[str] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    # causal_lm: fine-tune the LM on text; classification: a sequence-classification head
    # (trained with the adapter) over labelled records (data.format=labelled); dpo: preference
    # pairs (data.format=preference), DPO against the frozen starting policy.
    task: str = "causal_lm"
    num_labels: int = 2
    # A GGUF checkpoint inside model.path (a file name, not a path): it is dequantised once
    # into a safetensors Hugging Face folder under cache_dir and loaded from there.
    gguf_file: Optional[str] = None
    # Where converted GGUF checkpoints are kept, one folder per SHA-256 of the file;
    # null: $XDG_CACHE_HOME/fedtune/gguf (~/.cache/fedtune/gguf).
    cache_dir: Optional[str] = None
    # dtype of the frozen base weights: float32, bfloat16 (halves their memory; works on
    # CPU) or float16 (CUDA only).  LoRA tensors, a trained head, gradients, DP noise and
    # the update stay float32 whatever this is: noise added in low precision is rounded away.
    dtype: str = "float32"
    # model.task=classification over a pretrained encoder: what its head reads (POOLINGS).
    pooling: str = "auto"
    # Recompute each layer's activations in the backward pass instead of keeping them:
    # activation memory falls from one copy per layer to about one layer's, for roughly one
    # more forward pass of time.  The gradients are the same (fedtune.models.enable_gradient_checkpointing).
    gradient_checkpointing: bool = False
    # QLoRA: null (the base in model.dtype) or 4bit (its linear layers stored in NF4 with
    # bitsandbytes, about a quarter of bfloat16's memory; LoRA stays float32).  The base
    # fingerprint is taken before quantising, so it is a party's own memory choice
    # (fedtune.quantization); on CPU it saves memory, not time.
    quantization: Optional[str] = None


@dataclass
class DataConfig:
    # A local JSONL file; null selects the built-in demo corpus.
    path: Optional[str] = None
    format: str = "auto"
    # Labelled records ({"text": ..., "label": ...}): the label is an integer class
    # index, or one of label_names (its position is the class index).
    label_field: str = "label"
    label_names: Optional[list[str]] = None
    # Field used by the Dirichlet partitioner to make sites differ (e.g. a speciality), and
    # by by_field to make one site per distinct value (e.g. a speaker, a writer).
    group_field: Optional[str] = "source"
    # iid, dirichlet (each group spread over the sites in Dirichlet(α) shares) or by_field
    # (one site per group_field value; federation.num_sites null takes their number from the
    # data, and a number must equal it).
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    # by_field: a group with fewer training records is left out (a one-record site's update is noise).
    min_records_per_site: int = 2
    eval_fraction: float = 0.1
    # A local JSONL file of held-out records the *server* evaluates on (same format and
    # fields as data.path).  null: a simulation evaluates on the eval_fraction split of
    # the pooled data; a deployment's server, which holds no site data, does not evaluate.
    eval_path: Optional[str] = None
    max_length: int = 160
    demo_records: int = 6000
    seed: int = 0
    # Privacy audits only (fedtune experiment audit): a JSONL file of extra records
    # (canaries) added to the training data of site number ``canary_site`` after
    # partitioning; they never enter the held-out set.
    canary_path: Optional[str] = None
    canary_site: int = 0


@dataclass
class PrivacyConfig:
    enabled: bool = True
    # Each site's (ε, δ) budget over the whole federation.
    target_epsilon: float = 8.0
    delta: float = 1e-5
    # DP-SGD's σ; null: calibrated so that a site training every round spends exactly
    # target_epsilon over num_rounds × local_steps at sample_rate (fedtune.privacy.calibration).
    noise_multiplier: Optional[float] = None
    max_grad_norm: float = 1.0
    # Poisson sampling rate q.  Larger batches with σ calibrated for the whole schedule give
    # a better signal-to-noise ratio per step than many small ones (README, "Defaults that learn").
    sample_rate: float = 0.2
    accountant: str = "rdp"
    # A site's mean DP-SGD batch loss is computed from its private records without noise:
    # it is a membership-inference signal that ε does not cover, so a site does not send it
    # unless this is true (research simulations that want the train-loss column).  Under
    # secure aggregation it is never sent; a non-private run always sends it.
    release_train_loss: bool = False


@dataclass
class TrainConfig:
    # DP-SGD steps per site per round: at q = 0.2, about one pass over a site's records.
    local_steps: int = 5
    # The local optimiser and its step sizes; null: the task's defaults (Task.training_defaults:
    # causal_lm Adam 0.01; classification SGD 0.05 for the adapter, 1 for the new head).
    learning_rate: Optional[float] = None
    optimizer: Optional[str] = None
    # Step size of a newly initialised head (a classifier's), which under DP must move far
    # while the adapter moves little; null: the task's default, or learning_rate.
    head_learning_rate: Optional[float] = None
    eval_batch_size: int = 32
    torch_threads: int = 1
    # Seeds Poisson sampling and DP noise, for reproducible research runs only.  Never
    # set it in a deployment: whoever knows the seed can regenerate and subtract the
    # noise.  null draws both from OS entropy.
    seed: Optional[int] = None
    # model.task=dpo: β of the DPO loss −log σ(β·margin), how far the policy may move from its
    # reference for a given margin (sent to the sites in every round config, checked there).
    dpo_beta: float = DEFAULT_DPO_BETA
    # A fedtune adapter directory (a run's adapters/round_NNN/ or checkpoint/) this run starts
    # from instead of a fresh LoRA; for model.task=dpo it is also the frozen reference policy.
    # Read by the server only (never a site's path).  With versions.enabled a version starts
    # from its parent instead, so it must be null there.
    start_adapter: Optional[str] = None


# Where a simulated site trains (federation.site_device).  Ray gives each site actor the GPUs
# it reserved as CUDA device 0 (CUDA_VISIBLE_DEVICES), so "cuda" names it; cuda:N would not.
SITE_DEVICES = ("cpu", "cuda")


@dataclass
class FederationConfig:
    # null: as many as the data makes (data.partition=by_field only; resolved from the data
    # before any work by fedtune.data.site_count.resolve_num_sites, logged, in config.yaml).
    num_sites: Optional[int] = 5
    num_rounds: int = 5
    # At most this many sites per round (null: every site with budget left).
    sites_per_round: Optional[int] = None
    strategy: str = "fedavg"
    # How the server applies the round's mean delta (fedtune.server_optimizers): fedavg (add it),
    # fedavgm (server momentum), fedadam, fedyogi, fedadagrad (Reddi et al., ICLR 2021).  The
    # server_* fields below are read only by the optimisers that use them; null is the
    # optimiser's own default (Flower's: learning rate 1 for fedavg/fedavgm, 0.1 fedadam and
    # fedadagrad, 0.01 fedyogi; momentum 0.9; betas 0.9, 0.99; tau 1e-9, fedyogi 1e-3).
    server_optimizer: str = "fedavg"
    server_learning_rate: Optional[float] = None
    server_momentum: Optional[float] = None
    server_beta_1: Optional[float] = None
    server_beta_2: Optional[float] = None
    # The adaptivity ε of the adaptive optimisers: the step is m / (√v + tau).
    server_tau: Optional[float] = None
    # A site's update larger than this many bytes is rejected unread.
    max_update_bytes: int = 256 * 1024 * 1024
    # Ray resources each simulated site reserves (client_resources): CPUs, and GPUs, which may
    # be a fraction (0.5: two sites share one GPU).  Ray runs as many sites at once as fit.
    cpus_per_site: float = 1.0
    gpus_per_site: float = 0.0
    # Where a simulated site trains: cpu or cuda; null: cuda when gpus_per_site > 0, else cpu.
    # (A deployed site names its own device in site.yaml.)
    site_device: Optional[str] = None
    # An existing Ray cluster to simulate on (ray.init's address: "auto", "HOST:6379",
    # "ray://HOST:10001"); null starts a local Ray instance sized to this machine.
    ray_address: Optional[str] = None
    seed: int = 0
    # How long the server waits for num_sites sites to connect before starting with fewer.
    wait_for_sites_s: float = 120.0
    # How long one round trip waits for replies before treating silent sites as dropped
    # (null: wait indefinitely, as in simulation where no site can vanish).
    round_timeout_s: Optional[float] = None

    def site_training_device(self) -> str:
        """The device a simulated site trains on: ``site_device``, or the one its reservation implies."""
        if self.site_device is not None:
            return self.site_device
        return "cuda" if self.gpus_per_site > 0 else "cpu"


@dataclass
class SecAggConfig:
    enabled: bool = True
    # Neighbours per site in the SecAgg+ graph; null: about 2·log2(n), even, ≤ n − 1.
    neighbours: Optional[int] = None
    # Neighbours that must survive to unmask; null: a majority of the neighbours.
    threshold: Optional[int] = None
    bits: int = 32
    # Each coordinate of a site's delta is clipped to [-clip_range, clip_range] before quantising.
    clip_range: float = 1.0
    # Upper bound on a site's weight (its record count) inside the masked vector.
    max_weight: int = 100000


@dataclass
class VersionsConfig:
    """Continuous fine-tuning: a federation that produces adapter version after version.

    With ``enabled``, ``run_dir`` is the federation's root: each server run writes the next
    version under ``versions/vNNNN/`` starting from the current version's adapter, and the
    server ledger in the root (a deployment: the federation's own) covers every version.
    """

    enabled: bool = False
    # Promote a new version to current only if its held-out loss is at most its parent's
    # (on the same held-out set) plus this much; otherwise keep it unpromoted and say why.
    gate_tolerance: float = 0.0
    # Simulation only: split each site's records into this many time-ordered cohorts (0: none),
    # of which the first arrived_cohorts have arrived (null: all); a stream experiment raises it
    # by one per version.  per_cohort_budget: each cohort has its own privacy.target_epsilon
    # (fedtune.privacy.cohorts); false: one budget for the site's whole data, the baseline.
    stream_cohorts: int = 0
    arrived_cohorts: Optional[int] = None
    per_cohort_budget: bool = True
    # `fedtune server` only: start a new version this many hours after the last one started,
    # until stopped (null: one version per command).
    every_hours: Optional[float] = None
    # `fedtune server` only: train a new version only when some site's disclosure reports a
    # cohort the last version did not see (fedtune.federation.new_cohorts); with every_hours,
    # each interval is a cheap check that trains only when data has arrived.
    on_new_cohort: bool = False


@dataclass
class FedtuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    versions: VersionsConfig = field(default_factory=VersionsConfig)
    # Where outputs go; null means Hydra's run directory under `fedtune simulate`, else runs/default.
    run_dir: Optional[str] = None
    log_level: str = "INFO"


def _choice(value: str, options: tuple[str, ...], field_name: str) -> None:
    require(
        value in options,
        field_name,
        f"'{value}' is not one of {', '.join(options)}",
        f"Set {field_name} to one of: {', '.join(options)}.",
    )


def validate_privacy(p: PrivacyConfig) -> None:
    require(
        p.target_epsilon > 0 and not math.isnan(p.target_epsilon),
        "privacy.target_epsilon",
        f"{p.target_epsilon} is not a positive budget",
        "Use a positive number such as 1, 4 or 8 (set privacy.enabled=false for a non-private run).",
    )
    require(0 < p.delta < 1, "privacy.delta", f"{p.delta} is not in (0, 1)",
            "Use a small positive δ below 1/(records per site), e.g. 1e-5.")
    require(p.max_grad_norm > 0, "privacy.max_grad_norm", f"clipping norm {p.max_grad_norm} is not positive",
            "Use a positive clipping norm C, e.g. 1.0.")
    require(0 < p.sample_rate <= 1, "privacy.sample_rate", f"{p.sample_rate} is outside (0, 1]",
            "Use a Poisson sampling rate q in (0, 1], e.g. 0.2.")
    _choice(p.accountant, ACCOUNTANTS, "privacy.accountant")
    if p.noise_multiplier is None:
        return
    require(p.noise_multiplier >= 0 and math.isfinite(p.noise_multiplier), "privacy.noise_multiplier",
            f"{p.noise_multiplier} is not a finite σ ≥ 0",
            "Use σ ≥ 0, or null to calibrate σ to privacy.target_epsilon over the run.")
    if p.enabled:
        require(p.noise_multiplier > 0, "privacy.noise_multiplier",
                "σ = 0 with privacy.enabled=true gives an infinite ε",
                "Use σ > 0, null (calibrated to privacy.target_epsilon), or set privacy.enabled=false.")


def validate_train(t: TrainConfig) -> None:
    require(t.local_steps >= 1, "train.local_steps", f"{t.local_steps} < 1", "Use at least one local step.")
    for name in ("learning_rate", "head_learning_rate"):
        value = getattr(t, name)
        require(value is None or (value > 0 and math.isfinite(value)), f"train.{name}",
                f"{value} is not a positive number", "Use a positive step size such as 0.05, or null for the task's.")
    if t.optimizer is not None:
        _choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    require(t.eval_batch_size >= 1, "train.eval_batch_size", f"{t.eval_batch_size} < 1", "Use at least 1.")
    require(t.torch_threads >= 1, "train.torch_threads", f"{t.torch_threads} < 1", "Use at least 1.")
    require(not isinstance(t.dpo_beta, bool) and math.isfinite(t.dpo_beta) and 0 < t.dpo_beta <= MAX_DPO_BETA,
            "train.dpo_beta", f"{t.dpo_beta} is not a finite β in (0, {MAX_DPO_BETA:g}]",
            f"Use DPO's β, e.g. {DEFAULT_DPO_BETA} (TRL's default; 0.05–0.5 is the usual range).")
    if t.start_adapter is not None:
        weights = Path(t.start_adapter) / "adapter_model.safetensors"
        require(weights.is_file(), "train.start_adapter",
                f"'{t.start_adapter}' is not a fedtune adapter directory (no {weights.name})",
                "Point it at an earlier run's adapters/round_NNN/ or checkpoint/ directory, or null for a fresh LoRA.")


def validate_federation(f: FederationConfig) -> None:
    """The federation section; a null num_sites (by_field's, resolved from the data) skips the checks that need it."""
    require(f.num_sites is None or f.num_sites >= 1, "federation.num_sites", f"{f.num_sites} < 1",
            "Use at least one site (or null with data.partition=by_field: one per group in the data).")
    require(f.num_rounds >= 1, "federation.num_rounds", f"{f.num_rounds} < 1", "Use at least one round.")
    if f.sites_per_round is not None and f.num_sites is not None:
        require(1 <= f.sites_per_round <= f.num_sites, "federation.sites_per_round",
                f"{f.sites_per_round} is not between 1 and num_sites={f.num_sites}",
                "Use null (all sites) or a number in that range.")
    _choice(f.strategy, STRATEGIES, "federation.strategy")
    require(f.max_update_bytes > 0, "federation.max_update_bytes", "must be positive", "Use e.g. 268435456.")
    require(f.wait_for_sites_s > 0, "federation.wait_for_sites_s", "must be positive", "Use e.g. 120.")
    require(f.round_timeout_s is None or f.round_timeout_s > 0, "federation.round_timeout_s",
            f"{f.round_timeout_s} is not positive", "Use null (wait indefinitely) or seconds, e.g. 600.")
    validate_site_resources(f)
    validate_server_optimizer(f)


def validate_versions(v: VersionsConfig) -> None:
    require(math.isfinite(v.gate_tolerance) and v.gate_tolerance >= 0, "versions.gate_tolerance",
            f"{v.gate_tolerance} is not a finite number >= 0",
            "Use the largest rise in held-out loss a new version may show and still be promoted, e.g. 0 or 0.02.")
    if v.every_hours is not None:
        require(v.enabled and math.isfinite(v.every_hours) and v.every_hours > 0, "versions.every_hours",
                f"{v.every_hours} is not a positive number of hours, or versions.enabled is false",
                "Set versions.enabled=true and a positive interval, e.g. versions.every_hours=24, or null.")
    require(v.enabled or not v.on_new_cohort, "versions.on_new_cohort", "is true but versions.enabled is false",
            "Set versions.enabled=true (the check compares with the last version), or on_new_cohort=false.")
    require(v.stream_cohorts >= 0, "versions.stream_cohorts", f"{v.stream_cohorts} < 0",
            "Use 0 (no stream) or the number of cohorts to split each simulated site's data into, e.g. 4.")
    if v.arrived_cohorts is not None:
        require(v.stream_cohorts > 0 and 1 <= v.arrived_cohorts <= v.stream_cohorts, "versions.arrived_cohorts",
                f"{v.arrived_cohorts} is not between 1 and versions.stream_cohorts={v.stream_cohorts}",
                "Set versions.stream_cohorts first, and arrived_cohorts to at most it (or null: all arrived).")


def validate_server_optimizer(f: FederationConfig) -> None:
    """The server optimiser's name, its settings' ranges, and no setting it would silently ignore."""
    _choice(f.server_optimizer, SERVER_OPTIMIZERS, "federation.server_optimizer")
    used = SERVER_OPTIMIZER_FIELDS[f.server_optimizer]
    for name in ("server_learning_rate", "server_momentum", "server_beta_1", "server_beta_2", "server_tau"):
        require(getattr(f, name) is None or name in used, f"federation.{name}",
                f"is set but federation.server_optimizer={f.server_optimizer} does not use it",
                f"Set it to null, or choose an optimiser that uses it ({_users_of(name)}).")
    _positive(f.server_learning_rate, "federation.server_learning_rate", "e.g. 1 (fedavg) or 0.01 (fedadam)")
    _positive(f.server_tau, "federation.server_tau", "e.g. 1e-3; it must be > 0 so that a zero coordinate "
              "of the delta cannot divide 0 by 0")
    for name in ("server_momentum", "server_beta_1", "server_beta_2"):
        value = getattr(f, name)
        require(value is None or 0 <= value < 1, f"federation.{name}", f"{value} is not in [0, 1)",
                "Use e.g. 0.9 (0.99 for server_beta_2), or null for the optimiser's default.")


def _users_of(name: str) -> str:
    return ", ".join(opt for opt, fields in SERVER_OPTIMIZER_FIELDS.items() if name in fields)


def _positive(value: Optional[float], field_name: str, example: str) -> None:
    require(value is None or (math.isfinite(value) and value > 0), field_name,
            f"{value} is not a positive finite number", f"Use {example}, or null for the optimiser's default.")


def validate_site_resources(f: FederationConfig) -> None:
    """What a simulated site reserves from Ray and where it trains, as far as the config alone tells.

    Whether this machine has the GPUs is checked where the simulation starts
    (:func:`fedtune.simulation.check_devices`): a deployment's server validates the same
    config on a machine whose GPUs, if any, are irrelevant.
    """
    require(f.cpus_per_site > 0, "federation.cpus_per_site", "must be positive", "Use e.g. 1.")
    require(f.gpus_per_site >= 0 and math.isfinite(f.gpus_per_site), "federation.gpus_per_site",
            f"{f.gpus_per_site} is not a number of GPUs ≥ 0",
            "Use 0 (CPU only), a fraction such as 0.5 (two sites share a GPU), or 1.")
    if f.site_device is not None:
        _choice(f.site_device, SITE_DEVICES, "federation.site_device")
    # Ray sets CUDA_VISIBLE_DEVICES="" in an actor that reserves no GPU, so such a site sees none.
    require(f.site_training_device() != "cuda" or f.gpus_per_site > 0, "federation.site_device",
            "is cuda but federation.gpus_per_site=0: Ray hides every GPU from a site that reserves none",
            "Set federation.gpus_per_site (e.g. 0.5: two sites per GPU, or 1), or federation.site_device=cpu.")
    if f.ray_address is not None:
        require(f.ray_address.strip() != "", "federation.ray_address", "is empty",
                "Give the cluster's address (auto, HOST:6379 or ray://HOST:10001), or null for a local Ray.")


def validate_task(m: ModelConfig, d: DataConfig) -> None:
    """The task and the records' format are known names.

    Whether they agree (and the task's own settings, such as a classifier's classes) is
    the task's check, ``Task.check_config`` in :mod:`fedtune.tasks`, composed by
    :mod:`fedtune.validation`: this module cannot import the tasks.
    """
    _choice(d.format, DATA_FORMATS, "data.format")
    _choice(m.task, TASKS, "model.task")


def validate_num_sites_source(num_sites: Optional[int], d: DataConfig) -> None:
    """Only by_field can say how many sites there are: its groups are in the data."""
    require(num_sites is not None or d.partition == "by_field", "federation.num_sites",
            f"is null, but only data.partition=by_field can take the number of sites from the data "
            f"(data.partition={d.partition} splits the records into as many sites as it is told)",
            "Set federation.num_sites to a number, or use data.partition=by_field with data.group_field.")


def validate_data(d: DataConfig, num_sites: Optional[int]) -> None:
    """The data section; ``num_sites`` None (by_field, not yet counted) skips the canary site's bound."""
    _choice(d.partition, PARTITIONS, "data.partition")
    validate_num_sites_source(num_sites, d)
    require(d.dirichlet_alpha > 0, "data.dirichlet_alpha", f"{d.dirichlet_alpha} is not positive",
            "Use α > 0 (small α such as 0.3 gives very different sites; large α approaches iid).")
    require(d.min_records_per_site >= 1, "data.min_records_per_site", f"{d.min_records_per_site} < 1",
            "Use the least number of training records a group needs to become a site, e.g. 2.")
    require(d.partition != "by_field" or d.group_field is not None, "data.group_field",
            "data.partition=by_field makes one site per value of data.group_field, which is null",
            "Name the field that says whose each record is, e.g. data.group_field=speaker.")
    require(0 < d.eval_fraction < 1, "data.eval_fraction", f"{d.eval_fraction} is outside (0, 1)",
            "Hold out a fraction such as 0.1 for evaluation.")
    require(d.max_length >= 8, "data.max_length", f"{d.max_length} < 8", "Use at least 8 tokens, e.g. 128.")
    if d.path is None:
        require(d.demo_records >= 10, "data.demo_records", f"{d.demo_records} < 10", "Use at least 10 records.")
    else:
        path = Path(d.path)
        require(path.is_file(), "data.path", f"'{d.path}' is not a file",
                "Point data.path at a local JSONL file, or set it to null for the built-in demo corpus.")
        require(path.stat().st_size > 0, "data.path", f"'{d.path}' is empty",
                "Give a JSONL file with one record per line.")
    if d.eval_path is not None:
        require(Path(d.eval_path).is_file() and Path(d.eval_path).stat().st_size > 0, "data.eval_path",
                f"'{d.eval_path}' is not a non-empty file",
                "Point data.eval_path at the server's held-out JSONL file, or set it to null.")
    if d.canary_path is not None:
        require(Path(d.canary_path).is_file(), "data.canary_path", f"'{d.canary_path}' is not a file",
                "Point data.canary_path at a JSONL file of canary records, or set it to null.")
        if num_sites is not None:
            require(0 <= d.canary_site < num_sites, "data.canary_site",
                    f"{d.canary_site} is not a site index below num_sites={num_sites}",
                    f"Use a site index in 0..{num_sites - 1}.")


def validate_lora(lora: LoraSettings) -> None:
    require(lora.rank >= 1, "model.lora.rank", f"{lora.rank} < 1", "Use a rank such as 8.")
    require(lora.alpha > 0, "model.lora.alpha", f"{lora.alpha} is not positive", "Use e.g. 2 × rank.")
    require(0 <= lora.dropout < 1, "model.lora.dropout", f"{lora.dropout} is outside [0, 1)", "Use e.g. 0.0 or 0.05.")
    require(not lora.use_dora, "model.lora.use_dora",
            "DoRA's magnitude vector has no per-sample gradient rule in Opacus, so DP-SGD cannot clip it",
            "Set model.lora.use_dora=false.")
    if lora.target_modules is not None:
        require(len(lora.target_modules) > 0, "model.lora.target_modules", "is empty",
                "List module names such as [q_proj, v_proj], or null for the model family's default.")
        embedding_like = [name for name in lora.target_modules if "emb" in name or name in ("wte", "wpe")]
        require(not embedding_like, "model.lora.target_modules",
                f"LoRA on embeddings ({', '.join(embedding_like)}) fails under every Opacus grad-sample mode",
                "Target attention/MLP projections instead, e.g. [q_proj, v_proj].")


def validate_model_source(m: ModelConfig) -> None:
    """model.path is a Hugging Face directory, or the directory of model.gguf_file.

    The GGUF name must be a plain file name inside model.path: a name with separators or
    ``..`` could make a site read (and hash, and convert) a file outside its model copy.
    """
    if m.gguf_file is None:
        if m.path is not None:
            mp = Path(m.path)
            require(mp.is_dir() and (mp / "config.json").is_file(), "model.path",
                    f"'{m.path}' is not a Hugging Face model directory (no config.json)",
                    "Point model.path at a local directory saved with save_pretrained, or null for the tiny "
                    "model (or name a GGUF file in it with model.gguf_file).")
        return
    require(m.path is not None, "model.gguf_file", "is set but model.path is null",
            "Set model.path to the directory that holds the GGUF file.")
    require(Path(m.gguf_file).name == m.gguf_file and m.gguf_file not in ("", ".", ".."), "model.gguf_file",
            f"'{m.gguf_file}' is not a plain file name", "Give the file's name only; its directory is model.path.")
    gguf = Path(str(m.path)) / m.gguf_file
    require(gguf.is_file(), "model.gguf_file", f"'{gguf}' is not a file",
            "Name a .gguf file inside model.path, or set model.gguf_file=null for a Hugging Face directory.")
    require(importlib.util.find_spec("gguf") is not None, "model.gguf_file",
            "reading a GGUF checkpoint needs the gguf package, which is not installed",
            "Install it: pip install 'fedtune[gguf]' (or pip install gguf).")
    if m.cache_dir is not None:
        require(not Path(m.cache_dir).expanduser().is_file(), "model.cache_dir", f"'{m.cache_dir}' is a file",
                "Point model.cache_dir at a directory (it is created if missing), or null for the default.")


def validate_model_dtype(m: ModelConfig) -> None:
    """model.dtype is known, and float16 only where torch sees a CUDA device.

    Every simulated site and the server's evaluation compute on CPU, where float16
    matmuls are unsupported or several times slower than float32; bfloat16 is the
    low-memory choice there.  (torch is imported only for float16, keeping this module light.)
    """
    _choice(m.dtype, MODEL_DTYPES, "model.dtype")
    if m.dtype == "float16":
        import torch

        require(torch.cuda.is_available(), "model.dtype",
                "float16 on CPU: float16 matmuls are unsupported or slow there, and torch sees no CUDA device",
                "Use model.dtype=bfloat16 on CPU (or float32); float16 is for parties that compute on a GPU.")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int("".join(ch for ch in piece if ch.isdigit()) or 0) for piece in text.split(".")[:2])


def check_quantization_available(field_name: str = "model.quantization") -> None:
    """bitsandbytes is importable and new enough for NF4 on CPU (0.46); a ConfigError naming the field if not."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(field_name, "4-bit quantisation needs bitsandbytes, which is not installed",
                          QUANTIZATION_INSTALL_HINT)
    version = importlib.metadata.version("bitsandbytes")
    if _version_tuple(version) < MIN_BITSANDBYTES:
        raise ConfigError(field_name, f"bitsandbytes {version} is too old (NF4 on CPU needs 0.46 or later)",
                          QUANTIZATION_INSTALL_HINT)


def validate_model_quantization(m: ModelConfig) -> None:
    """model.quantization is null or known, and bitsandbytes is there to do it (fedtune.quantization)."""
    if m.quantization is None:
        return
    _choice(m.quantization, QUANTIZATIONS, "model.quantization")
    check_quantization_available("model.quantization")


def validate_model(m: ModelConfig) -> None:
    """The base model and its LoRA shape (the task is :func:`validate_task`'s)."""
    validate_lora(m.lora)
    validate_model_source(m)
    validate_model_dtype(m)
    validate_model_quantization(m)
    _choice(m.pooling, POOLINGS, "model.pooling")
    tiny = m.tiny
    require(tiny.hidden_size % tiny.num_heads == 0, "model.tiny.hidden_size",
            f"{tiny.hidden_size} is not divisible by num_heads={tiny.num_heads}", "Pick a multiple of num_heads.")


def to_dict(cfg: FedtuneConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> FedtuneConfig:
    """Rebuild a config from :func:`to_dict` output (e.g. a JSON run config)."""
    return load_structured(FedtuneConfig, data)


T = TypeVar("T")
Source = Union[str, Path, Mapping[str, Any]]
CHECK_SCHEMA = "Check the key and its type against configs/."


def load_structured(schema: Union[type[T], T], *sources: Source, overrides: Sequence[str] = (),
                    fix: str = CHECK_SCHEMA) -> T:
    """``schema`` (a dataclass, or an instance as the base), then each source, then overrides.

    Every entry point but ``fedtune simulate`` (where Hydra composes) reads its settings
    through here: a source is a YAML file or a mapping (e.g. parsed JSON), an override is
    ``dotted.key=value``.  OmegaConf type-checks the merge against the dataclasses; its
    errors become one ConfigError naming the full key (``federation.num_rondz``) and
    ``fix``, so a mistyped field never reaches the run as a traceback or a silent default.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides:
        require("=" in item, item, "is not an override of the form key=value",
                "Write e.g. federation.num_rounds=5 (dotted keys reach nested fields).")
    files = [str(source) for source in sources if isinstance(source, (str, Path))]
    # Named when OmegaConf's error has no key (a file whose top level is not a mapping).
    where = files[-1] if files else "override" if overrides else "config"
    try:
        parts = [OmegaConf.structured(schema)]
        parts += [OmegaConf.load(source) if isinstance(source, (str, Path)) else OmegaConf.create(dict(source))
                  for source in sources]
        parts.append(OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(OmegaConf.merge(*parts))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or where
        raise ConfigError(str(key), str(exc).splitlines()[0], fix) from None


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore so YAML is type-checked against it."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="fedtune_schema", node=FedtuneConfig)
