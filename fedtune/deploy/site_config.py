"""A site's own configuration file (``site.yaml``) for ``fedtune client``.

Everything here belongs to the site and is never sent or overridden by the server:
where its data and ledger live, its privacy budget and policy, which SuperLink it trusts
(by CA certificate) and which fedtune app it is willing to run.  Only a declared list of
shared settings (model shape, LoRA shape, sequence length: fedtune.deploy.run_config)
comes from the server's run, and each round's DP-SGD parameters must pass the site's
policy and budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fedtune.config import ACCOUNTANTS, DATA_FORMATS, QUANTIZATIONS, check_quantization_available, load_structured
from fedtune.errors import ConfigError, require
from fedtune.privacy.policy import SitePolicy, validate_policy


@dataclass
class CohortSource:
    """One cohort of the site's data: a JSONL file of records that arrived together.

    Each cohort has its own (ε, δ) budget (null: the site's ``budget``) and retires when it
    is spent; see fedtune.privacy.cohorts.  Its name is its ledger key: renaming a cohort
    gives it a fresh budget, so names are for the site to keep stable.
    """

    name: str = ""
    path: str = ""
    epsilon: Optional[float] = None
    delta: Optional[float] = None
    # When its records were collected, e.g. "2026-01" (disclosed only if manifest.disclose has "cohorts").
    period: Optional[str] = None


# What a site may disclose of its data in adapter records: its manifest's fields, and per
# cohort its name, period, record count and commitment (``cohorts``).
MANIFEST_FIELDS = ("name", "licence", "provenance", "period", "deidentification")
DISCLOSABLE = (*MANIFEST_FIELDS, "cohorts")


@dataclass
class DataManifest:
    """The site's description of its data source, for the transparency record (fedtune.transparency).

    Nothing of it is sent unless named in ``disclose``.
    """

    name: Optional[str] = None
    licence: Optional[str] = None
    provenance: Optional[str] = None
    period: Optional[str] = None
    deidentification: Optional[str] = None
    disclose: list[str] = field(default_factory=list)


@dataclass
class SiteData:
    # The site's records, when it declares no cohorts (not read when it does).
    path: str = "data.jsonl"
    # The site's data as a sequence of cohorts, oldest first; empty: ``path`` is the whole site.
    cohorts: list[CohortSource] = field(default_factory=list)
    format: str = "auto"
    group_field: Optional[str] = "source"
    # Labelled records (classification): the label field, and the site's own classes, as
    # names (their positions are the class indices) or as a count of integer labels.  The
    # site checks its labels against these when it starts, so that no round's answer can
    # depend on one record's label.
    label_field: str = "label"
    label_names: Optional[list[str]] = None
    num_labels: Optional[int] = None


@dataclass
class SiteBudget:
    epsilon: float = 8.0
    delta: float = 1e-5
    accountant: str = "rdp"
    # Refuse any round that is not DP-SGD (σ > 0), whatever the server says.
    require_privacy: bool = True


@dataclass
class SiteApp:
    """The only app this site runs: the fedtune installed here, at this version."""

    publisher: str = "fedtune"
    name: str = "fedtune"
    # null: the version of the fedtune package installed on this machine.
    version: Optional[str] = None


@dataclass
class SiteConfig:
    # Stable pseudonym of the site in ledgers, reports and adapter records.
    site_id: str = "site"
    superlink: str = "127.0.0.1:9093"
    root_certificates: str = "ca.crt"
    auth_private_key: str = "auth.key"
    # The CA-signed roster of enrolled sites' public keys (from the kit): secure aggregation
    # verifies every neighbour's signed keys against it (fedtune.deploy.roster).
    roster: str = "roster.json"
    data: SiteData = field(default_factory=SiteData)
    budget: SiteBudget = field(default_factory=SiteBudget)
    ledger_path: str = "ledger.sqlite"
    # Local directory of this site's copy of the federation's base model; null: the built-in
    # tiny model.  The server's model.path is never used here: each round carries the base
    # model's fingerprint, and a site whose own copy hashes differently refuses.
    model_path: Optional[str] = None
    # A GGUF checkpoint (a file name) inside model_path; it is dequantised once into a
    # safetensors folder under model_cache_dir (null: ~/.cache/fedtune/gguf).  null: model_path
    # is a Hugging Face directory.
    model_gguf_file: Optional[str] = None
    model_cache_dir: Optional[str] = None
    # Recompute activations in the backward pass (less memory, same gradients): a local
    # choice, whatever the server's run config says.
    model_gradient_checkpointing: bool = False
    # QLoRA: 4bit keeps this site's copy of the base in NF4 (bitsandbytes), about a quarter
    # of bfloat16's memory; null: full precision.  A local choice, like checkpointing: the
    # fingerprint is the full-precision base's either way (fedtune.quantization).
    model_quantization: Optional[str] = None
    device: str = "cpu"
    torch_threads: int = 1
    # The SuperNode's local Runtime API, where this site's executor fetches tasks.
    runtime_port: int = 9100
    # How often an idle site asks for work: the SuperNode asks the SuperLink, the executor
    # asks the SuperNode (Flower's own: 3 s).  Mid-round both ask faster, see fedtune.deploy.supernode.
    poll_interval_s: float = 0.5
    state_dir: str = "state"
    app: SiteApp = field(default_factory=SiteApp)
    # What rounds this site accepts, whatever the server asks (fedtune.privacy.policy).
    policy: SitePolicy = field(default_factory=SitePolicy)
    # Its data source's description, disclosed field by field (fedtune.transparency).
    manifest: DataManifest = field(default_factory=DataManifest)
    # The site's own key for its cohorts' HMAC-SHA256 commitments (created 0600 if absent;
    # never sent: an auditor shown it can check which data the site used).
    commitment_key: str = "state/commitment.key"

    # Set by load_site_config: relative paths above are resolved against it.
    base_dir: Optional[str] = None

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = Path(self.base_dir) / path
        return path


SITE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def is_site_id(text: str) -> bool:
    """ASCII letters, digits, '-', '_' and '.', at most 64, not only dots.

    A site id names a kit directory, a ledger and a report entry: '..' would write a kit
    into the federation root, and a Unicode homoglyph ('hosp-а' with a Cyrillic а) would
    pass for another site in an operator's eyes.
    """
    return (isinstance(text, str) and 0 < len(text) <= 64 and all(c in SITE_ID_CHARS for c in text)
            and set(text) != {"."})


def validate_site_config(site: SiteConfig, check_files: bool = True) -> None:
    """Check the whole site file before anything starts; raise ConfigError naming the field."""
    require(is_site_id(site.site_id), "site_id",
             f"{site.site_id!r} is empty, too long, only dots, or has characters other than ASCII letters, "
             "digits, '-', '_', '.'",
             "Use the name your operator enrolled you under, e.g. hospital-a.")
    host, _, port = site.superlink.rpartition(":")
    require(bool(host) and port.isdigit(), "superlink", f"{site.superlink!r} is not host:port",
             "Use the SuperLink address your operator gave you, e.g. superlink.example.org:9093.")
    budget = site.budget
    require(budget.epsilon > 0 and not math.isnan(budget.epsilon), "budget.epsilon",
             f"{budget.epsilon} is not a positive budget", "Use a positive ε such as 1, 4 or 8.")
    require(0 < budget.delta < 1, "budget.delta", f"{budget.delta} is not in (0, 1)",
             "Use a δ below 1/(number of records), e.g. 1e-5.")
    require(budget.accountant in ACCOUNTANTS, "budget.accountant", f"unknown accountant {budget.accountant!r}",
             f"Use one of {', '.join(ACCOUNTANTS)}.")
    require(site.data.format in DATA_FORMATS, "data.format", f"unknown format {site.data.format!r}",
             f"Use one of {', '.join(DATA_FORMATS)}.")
    require(site.device == "cpu" or site.device.startswith("cuda"), "device", f"unknown device {site.device!r}",
             "Use cpu or cuda (cuda:N for a given GPU).")
    if site.device.startswith("cuda"):
        import torch

        require(torch.cuda.is_available(), "device", f"{site.device} asked for but torch sees no CUDA device",
                 "Install a CUDA build of torch and check the GPU, or set device: cpu.")
    _check_quantization(site)
    require(site.torch_threads >= 1, "torch_threads", f"{site.torch_threads} < 1", "Use at least 1.")
    require(1024 <= site.runtime_port <= 65535, "runtime_port", f"{site.runtime_port} is not a usable port",
             "Use a free local port between 1024 and 65535, e.g. 9100.")
    require(0.05 <= site.poll_interval_s <= 60, "poll_interval_s", f"{site.poll_interval_s} s is out of range",
             "Use between 0.05 and 60 seconds, e.g. 0.5.")
    validate_policy(site.policy)
    if site.data.num_labels is not None:
        require(site.data.num_labels >= 2, "data.num_labels", f"{site.data.num_labels} < 2",
                "Give the number of classes of your labelled data, e.g. 2.")
    _validate_cohorts(site, check_files)
    _validate_manifest(site.manifest)
    if check_files:
        data_files = () if site.data.cohorts else (("data.path", site.data.path),)
        for name, value in (*data_files, ("root_certificates", site.root_certificates),
                            ("auth_private_key", site.auth_private_key)):
            require(site.resolve(value).is_file(), name, f"file {site.resolve(value)} does not exist",
                     "Fix the path in site.yaml (relative paths are relative to site.yaml).")
        if site.model_path is not None:
            require(site.resolve(site.model_path).is_dir(), "model_path",
                     f"directory {site.resolve(site.model_path)} does not exist",
                     "Point model_path at the local copy of the federation's base model.")
        _check_gguf(site)


def _validate_cohorts(site: SiteConfig, check_files: bool) -> None:
    """Cohort names are unique ids, budgets are budgets, and (with check_files) each file exists."""
    seen: set[str] = set()
    for i, cohort in enumerate(site.data.cohorts):
        where = f"data.cohorts[{i}]"
        require(is_site_id(cohort.name), f"{where}.name", f"{cohort.name!r} is not a name of ASCII letters, digits, "
                "'-', '_', '.' (at most 64)", "Name each cohort, e.g. 2026-01.")
        require(cohort.name not in seen, f"{where}.name", f"{cohort.name!r} names two cohorts",
                "Give every cohort its own name: it is the cohort's key in the ledger.")
        seen.add(cohort.name)
        require(bool(cohort.path), f"{where}.path", "is empty",
                "Give the cohort's JSONL file, e.g. cohorts/2026-01.jsonl.")
        if cohort.epsilon is not None:
            require(math.isfinite(cohort.epsilon) and cohort.epsilon > 0, f"{where}.epsilon",
                    f"{cohort.epsilon} is not a positive budget",
                    "Use a positive ε such as 4, or null for budget.epsilon.")
        if cohort.delta is not None:
            require(0 < cohort.delta < 1, f"{where}.delta", f"{cohort.delta} is not in (0, 1)",
                    "Use a δ below 1/(the cohort's records), or null for budget.delta.")
        if check_files:
            require(site.resolve(cohort.path).is_file(), f"{where}.path", f"file {site.resolve(cohort.path)} does "
                    "not exist", "Fix the path in site.yaml (relative paths are relative to site.yaml).")


def _validate_manifest(manifest: DataManifest) -> None:
    for name in manifest.disclose:
        require(name in DISCLOSABLE, "manifest.disclose", f"{name!r} is not a disclosable field",
                f"Use any of {', '.join(DISCLOSABLE)}.")
    for name in MANIFEST_FIELDS:
        value = getattr(manifest, name)
        require(value is None or len(value) <= 500, f"manifest.{name}", "is longer than 500 characters",
                "Describe the source in a sentence or two.")
        require(name not in manifest.disclose or value is not None, f"manifest.{name}",
                "is disclosed (manifest.disclose) but not set",
                f"Set manifest.{name}, or drop it from manifest.disclose.")


def _check_quantization(site: SiteConfig) -> None:
    if site.model_quantization is None:
        return
    require(site.model_quantization in QUANTIZATIONS, "model_quantization",
            f"{site.model_quantization!r} is not one of {', '.join(QUANTIZATIONS)}",
            "Use 4bit, or null for the full-precision base.")
    check_quantization_available("model_quantization")


def _check_gguf(site: SiteConfig) -> None:
    """model_gguf_file names a file inside model_path (a plain name: never a path out of it)."""
    name = site.model_gguf_file
    if name is None:
        return
    require(site.model_path is not None, "model_gguf_file", "is set but model_path is null",
             "Set model_path to the directory that holds the GGUF file.")
    require(Path(name).name == name and name not in ("", ".", ".."), "model_gguf_file",
             f"{name!r} is not a plain file name", "Give the file's name only; its directory is model_path.")
    gguf = site.resolve(str(site.model_path)) / name
    require(gguf.is_file(), "model_gguf_file", f"file {gguf} does not exist",
             "Name the .gguf file inside model_path, or set model_gguf_file: null.")


def load_site_config(path: str | Path, overrides: Optional[list[str]] = None, check_files: bool = True) -> SiteConfig:
    """Read ``site.yaml`` (plus ``key=value`` overrides), type-check and validate it."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError("--site-config", f"{path} does not exist",
                          "Pass the site.yaml from your enrolment kit.")
    site = load_structured(SiteConfig, path, overrides=list(overrides or []),
                           fix="Check the key name and value type against the template in the enrolment kit.")
    site.base_dir = str(path.parent)
    validate_site_config(site, check_files=check_files)
    return site
