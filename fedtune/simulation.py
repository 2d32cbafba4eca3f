"""Run a whole federation locally in Flower's simulation engine (Ray backend).

Why ``flwr.simulation.run_simulation`` and not ``flwr run``: flwr 1.42 deprecates the
former in favour of ``flwr run``, but ``flwr run``'s local simulation builds a fresh
environment from the package registry on every run (about 46 s here, and impossible
offline, which is how hospitals' machines are).  ``run_simulation`` starts the same
ServerApp and ClientApp, in the same Ray backend, in-process and offline.

Ray either starts privately on this machine (``federation.ray_address`` null: sized to
its CPU count) or the run joins an existing cluster, whose nodes then need fedtune at the
same paths and ``run_dir`` on a shared file system (the simulated sites write their
ledgers under it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TextIO

from fedtune.checkpoint import atomic_write_text
from fedtune.apps import make_client_app, make_server_app
from fedtune.config import FedtuneConfig, ModelConfig
from fedtune.data import load_federated_data
from fedtune.data.site_count import resolve_num_sites
from fedtune.errors import require
from fedtune.federation.server import ServerSummary
from fedtune.privacy.calibration import noise_multiplier
from fedtune.tasks import get_task
from fedtune.validation import validate, validate_against_data

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def check_devices(cfg: FedtuneConfig) -> None:
    """The GPUs the sites reserve exist here, before Ray starts and waits forever for them.

    Skipped for a run on an existing cluster: its nodes' GPUs count there, not this
    machine's, and Flower's actor pool refuses resources the cluster lacks.
    """
    f = cfg.federation
    if f.ray_address is not None or (f.gpus_per_site == 0 and f.site_training_device() == "cpu"):
        return
    import torch

    name = "federation.gpus_per_site" if f.gpus_per_site > 0 else "federation.site_device"
    require(torch.cuda.is_available(), name,
            f"sites are to train on a GPU (gpus_per_site={f.gpus_per_site:g}, device "
            f"{f.site_training_device()}) but torch sees no CUDA device on this machine",
            "Set federation.gpus_per_site=0 and federation.site_device=cpu (or null), install a CUDA build of "
            "torch, or run on a Ray cluster with GPUs (federation.ray_address=...).")
    count = torch.cuda.device_count()
    require(f.gpus_per_site <= count, "federation.gpus_per_site",
            f"each site reserves {f.gpus_per_site:g} GPUs but this machine has {count}",
            f"Use at most {count}, or a fraction such as 0.5 to share a GPU between sites.")


def check_config(cfg: FedtuneConfig) -> None:
    """Everything that can fail before training: the config, then this machine's GPUs.

    A null federation.num_sites (data.partition=by_field) is counted in the data first, the
    only record reading done here, so that every check below sees the number.
    """
    resolve_num_sites(cfg)
    validate(cfg)
    # Simulated sites disclose nothing, so no version after the first would ever train.
    require(not cfg.versions.on_new_cohort, "versions.on_new_cohort", "is for `fedtune server` (it reads the "
            "cohorts deployed sites disclose); simulated sites disclose none",
            "Replay a stream with versions.stream_cohorts and versions.arrived_cohorts instead, or set it to false.")
    check_devices(cfg)
    if cfg.model.quantization is not None and cfg.federation.ray_address is None:
        from fedtune.quantization import check_backend

        check_backend(cfg.federation.site_training_device())


def check_data(cfg: FedtuneConfig) -> None:
    """Load and partition the data once, before Ray starts, to fail fast on bad input.

    A record the task cannot encode within data.max_length (a preference pair whose prompt
    fills the window) is an error naming its line here, never a failed round after a charge.
    """
    data = load_federated_data(cfg.data, cfg.federation.num_sites)
    validate_against_data(cfg, [len(s) for s in data.site_indices], data.num_train_records)
    get_task(cfg.model.task).check_encodable(data.records, lambda: run_tokenizer(cfg.model), cfg.data.max_length)


def run_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer alone (the built-in byte tokenizer, or the model directory's)."""
    from transformers import AutoTokenizer

    from fedtune.models import build_tokenizer, resolve_model_dir

    source = resolve_model_dir(cfg)
    return build_tokenizer() if source is None else AutoTokenizer.from_pretrained(source)


def write_resolved_config(cfg: FedtuneConfig, run_dir: Path) -> None:
    from omegaconf import OmegaConf

    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def backend_config(cfg: FedtuneConfig) -> dict[str, Any]:
    """Flower's Ray backend settings: what each site reserves, and how Ray starts or connects.

    A local Ray is sized to this machine without its dashboard.  On an existing cluster
    ``ray.init`` takes the address alone: it refuses ``num_cpus`` when connecting, and the
    cluster's own settings decide its dashboard.  ``log_to_driver`` brings the sites'
    output (their log lines, their warnings) to this process, whose stdout and stderr a
    quiet ``fedtune simulate`` sends to the run's log.txt.
    """
    f = cfg.federation
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if f.ray_address is None:
        init_args.update(num_cpus=os.cpu_count() or 1, include_dashboard=False)
    else:
        init_args["address"] = f.ray_address
    return {
        "client_resources": {"num_cpus": f.cpus_per_site, "num_gpus": f.gpus_per_site},
        "init_args": init_args,
    }


def describe_run(cfg: FedtuneConfig) -> list[str]:
    """The few lines a researcher checks before a run starts: what trains on what, how privately, where."""
    m, d, f, p, t = cfg.model, cfg.data, cfg.federation, cfg.privacy, cfg.train
    model = m.path or f"built-in tiny Llama-style model (hidden {m.tiny.hidden_size}, {m.tiny.num_layers} layers)"
    data = d.path or f"built-in demo corpus ({d.demo_records} records)"
    split = {"iid": "iid", "by_field": f"one site per {d.group_field}"}.get(d.partition,
                                                                          f"dirichlet α={d.dirichlet_alpha:g}")
    per_round = f", {f.sites_per_round} a round" if f.sites_per_round is not None else ""
    if d.partition == "by_field":  # the count is the data's (resolve_num_sites, or checked against it)
        per_round = f" (one per {d.group_field} with ≥ {d.min_records_per_site} training records){per_round}"
    gpus = f" + {f.gpus_per_site:g} GPU" if f.gpus_per_site > 0 else ""
    where = f"Ray cluster {f.ray_address}" if f.ray_address is not None else "local Ray"
    sigma = f"{noise_multiplier(cfg):.3g}" + (" calibrated" if p.noise_multiplier is None else "") if p.enabled else ""
    privacy = (f"ε ≤ {p.target_epsilon:g} per site, δ = {p.delta:g} ({p.accountant}; σ = {sigma}, "
               f"q = {p.sample_rate:g}, {t.local_steps} steps a round)" if p.enabled else "off (no DP-SGD)")
    secagg = "on (SecAgg+: the server sees only sums)" if cfg.secagg.enabled else "off"
    return [
        f"  model     {model}; {m.task}, LoRA rank {m.lora.rank}",
        f"  data      {data}, {split}",
        f"  sites     {f.num_sites} sites{per_round}, {f.num_rounds} rounds, {f.strategy}",
        f"  compute   {f.cpus_per_site:g} CPU{gpus} per site, training on {f.site_training_device()}, {where}",
        f"  privacy   {privacy}",
        f"  secagg    {secagg}",
        f"  run dir   {cfg.run_dir}",
    ]


def simulate(cfg: FedtuneConfig, progress_file: Optional[TextIO] = None) -> ServerSummary:
    """Validate, then run ``cfg.federation.num_sites`` virtual sites to completion.

    ``progress_file``: where the round table and its bar go (default: stdout and stderr).
    """
    check_config(cfg)
    check_data(cfg)
    cfg.run_dir = str(Path(cfg.run_dir or "runs/default").resolve())
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, Path(cfg.run_dir))

    from flwr.simulation import run_simulation

    summaries: list[ServerSummary] = []
    server_app = make_server_app(cfg, on_done=summaries.append, progress_file=progress_file)
    client_app = make_client_app(cfg)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_sites,
                   backend_config=backend_config(cfg))  # type: ignore[arg-type]
    if not summaries:
        raise RuntimeError(f"the simulation ended without a result; see its log and {cfg.run_dir}")
    return summaries[0]
