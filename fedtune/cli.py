"""The ``fedtune`` command: ``fedtune simulate [hydra overrides...]``.

``simulate`` is a Hydra app, so ``federation.num_sites=20``, ``--multirun`` sweeps and
``hydra.run.dir=DIR`` (or ``run_dir=DIR``) work as in any Hydra program.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from fedtune.config import FedtuneConfig, register_configs
from fedtune.data.records import DataError
from fedtune.errors import ConfigError

log = logging.getLogger("fedtune")

USAGE = """usage: fedtune COMMAND [ARGS ...]

commands:
  simulate          a simulated federation (below)
  experiment        research harness: `fedtune experiment utility|audit --help`
  init-federation   operator: create the CA, SuperLink certificate and site enrolment kits from the
                    sites' public keys
  server            operator: start the SuperLink and submit the fedtune run
  client keygen     site: make this site's key pair (send the operator only auth.pub)
  client            site: start this site's SuperNode from its site config
  evaluate          held-out metrics of a run's adapter: `fedtune evaluate ADAPTER [data.path=FILE] [--baseline]`
  generate          continue a prompt with a causal-LM run's adapter: `fedtune generate ADAPTER --prompt TEXT`

fedtune simulate [OVERRIDE ...] [--multirun]

  Runs a simulated federation (Flower simulation engine) configured by Hydra.
  Examples:
    fedtune simulate
    fedtune simulate federation.num_sites=20 privacy.target_epsilon=4
    fedtune simulate model.path=/models/llama data.path=/data/notes.jsonl run_dir=out/run1
    fedtune simulate --multirun privacy.target_epsilon=1,4,8
  Show the composed config: fedtune simulate --cfg job
"""


# Sub-commands other than `simulate` live next to the code they drive; each entry is
# "module:function" taking the remaining argv.
SUBCOMMANDS: dict[str, str] = {
    "experiment": "fedtune.experiments.cli:main",
    "init-federation": "fedtune.deploy.cli:init_federation_main",
    "server": "fedtune.deploy.cli:server_main",
    "client": "fedtune.deploy.cli:client_main",
    "evaluate": "fedtune.inference_cli:evaluate_main",
    "generate": "fedtune.inference_cli:generate_main",
}


def config_dir() -> Optional[Path]:
    """The repository's configs/ (editable installs and checkouts), if present."""
    candidate = Path(__file__).resolve().parent.parent / "configs"
    return candidate if (candidate / "config.yaml").is_file() else None


def _resolve_run_dir(cfg: FedtuneConfig) -> None:
    if cfg.run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        cfg.run_dir = HydraConfig.get().runtime.output_dir


def _simulate_job(raw_cfg) -> None:  # type: ignore[no-untyped-def]
    from omegaconf import OmegaConf

    from fedtune.simulation import simulate

    cfg: FedtuneConfig = OmegaConf.to_object(raw_cfg)  # type: ignore[assignment]
    logging.getLogger("fedtune").setLevel(cfg.log_level)
    _resolve_run_dir(cfg)
    try:
        summary = simulate(cfg)
    except (ConfigError, DataError) as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"\n{summary.stop_reason}: {summary.rounds_completed} round(s).")
    print(f"Outputs: {summary.run_dir}")
    print("  metrics.jsonl, privacy_report.json/.md, adapters/round_NNN/, rounds.png, config.yaml")


def simulate_main(argv: list[str]) -> None:
    import hydra

    register_configs()
    directory = config_dir()
    sys.argv = [sys.argv[0], *argv]
    decorated = hydra.main(
        version_base="1.3",
        config_path=str(directory) if directory else None,
        config_name="config" if directory else "fedtune_schema",
    )(_simulate_job)
    decorated()


def main(argv: Optional[list[str]] = None) -> None:
    """The ``fedtune`` command; ``argv`` (default ``sys.argv[1:]``) lets tests call it in-process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per HTTP request (Flower's Runtime API polling) drowns the operator's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "simulate":
        simulate_main(rest)
        return
    target = SUBCOMMANDS.get(command)
    if target is None:
        print(f"fedtune: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    module_name, function_name = target.split(":")
    import importlib

    # Imported lazily so that `fedtune client` never pays for the simulation stack.
    getattr(importlib.import_module(module_name), function_name)(rest)


if __name__ == "__main__":
    main()
