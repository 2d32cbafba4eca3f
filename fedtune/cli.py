"""The ``fedtune`` command: ``fedtune simulate [-v] [hydra overrides...]``.

``simulate`` is a Hydra app, so ``federation.num_sites=20``, ``--multirun`` sweeps and
``hydra.run.dir=DIR`` (or ``run_dir=DIR``) work as in any Hydra program.  It is quiet:
the console gets the run's summary, the round table under a progress bar and the final
lines, while Ray, Flower, warnings and every log line (the sites' too) go to the run
directory's log.txt (:mod:`fedtune.run_log`).  ``-v`` / ``--verbose``, taken out of the
arguments before Hydra reads them, leaves all of it on the console instead.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from fedtune.config import FedtuneConfig, register_configs
from fedtune.data.records import DataError
from fedtune.errors import ConfigError
from fedtune.run_log import LOG_FILE, HeldRecords, hold_log_records, output_to_log

if TYPE_CHECKING:
    from fedtune.federation.server import ServerSummary

log = logging.getLogger("fedtune")

VERBOSE_FLAGS = ("-v", "--verbose")

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
  record verify     check the hash chain of a run's or federation's adapter records and their files:
                    `fedtune record verify DIR`
  merge             merge adapters of one base model with peft: `fedtune merge A B --method ties --out DIR`
  export            an adapter as Hugging Face files: `fedtune export ADAPTER --out DIR [--merge]`
  distil            a small student imitating an adapter on public data:
                    `fedtune distil --teacher ADAPTER --student MODEL_DIR --data FILE --public --out DIR`

fedtune simulate [-v] [OVERRIDE ...] [--multirun]

  Runs a simulated federation (Flower simulation engine) configured by Hydra. It prints the
  run's settings, one row per round and where the outputs are; everything else (Ray, Flower,
  warnings, log lines) goes to RUN_DIR/log.txt. -v, --verbose: print all of it here instead.
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
    "record": "fedtune.transparency.verify:main",
    "merge": "fedtune.derive_cli:merge_main",
    "export": "fedtune.derive_cli:export_main",
    "distil": "fedtune.derive_cli:distil_main",
}


def config_dir() -> Optional[Path]:
    """The repository's configs/ (editable installs and checkouts), if present."""
    candidate = Path(__file__).resolve().parent.parent / "configs"
    return candidate if (candidate / "config.yaml").is_file() else None


def _resolve_run_dir(cfg: FedtuneConfig) -> None:
    if cfg.run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        cfg.run_dir = HydraConfig.get().runtime.output_dir


def _user_error(exc: Exception) -> SystemExit:
    print(f"fedtune: {exc}", file=sys.stderr)
    return SystemExit(2)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: Flower wraps a ServerApp's failure in a RuntimeError of its own."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        exc = inner
        seen.add(id(exc))
    return exc


def _crash(exc: BaseException, log_path: Path) -> SystemExit:
    """One line on the console for a failure whose traceback went to log.txt, and the exit code."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"fedtune: interrupted; the run's log is {log_path}", file=sys.stderr)
        return SystemExit(130)
    if isinstance(exc, SystemExit):
        print(f"fedtune: the simulation exited with code {exc.code}; see {log_path}", file=sys.stderr)
        return SystemExit(exc.code)
    cause = _root_cause(exc)
    what = (str(cause).strip().splitlines() or [""])[0][:300]
    print(f"fedtune: the simulation failed: {type(cause).__name__}: {what}\n"
          f"  the traceback and the run's whole log are in {log_path}", file=sys.stderr)
    return SystemExit(1)


def _simulate_quietly(cfg: FedtuneConfig, held: Optional[HeldRecords] = None) -> "ServerSummary":
    """:func:`fedtune.simulation.simulate` with descriptors 1 and 2 in log.txt and the table on the console.

    Every failure is recorded in the log with its traceback and leaves one line on the
    console; user errors (a bad config or data file) read exactly as without the log.
    ``held``: log records of the imports, written to the log first.
    """
    from fedtune.simulation import simulate

    log_path = Path(str(cfg.run_dir)) / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Ray folds similar lines of different sites into one "[repeated 2x]" for a console; a log keeps each.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    failure: Optional[BaseException] = None
    with output_to_log(log_path) as console:
        if held is not None:
            held.replay()
        try:
            return_value = simulate(cfg, progress_file=console)
        except (ConfigError, DataError) as exc:
            failure = exc
        except BaseException as exc:  # noqa: BLE001 - interrupts and exits too: the console must hear of them
            # Into log.txt, which descriptor 2 is here (whatever object sys.stderr has become).
            os.write(2, traceback.format_exc().encode("utf-8", "replace"))
            failure = exc
    if isinstance(failure, (ConfigError, DataError)):
        raise _user_error(failure) from None
    if failure is not None:
        raise _crash(failure, log_path) from None
    return return_value


def _simulate_job(raw_cfg, verbose: bool) -> None:  # type: ignore[no-untyped-def]
    from omegaconf import OmegaConf

    with hold_log_records() as held:  # what the libraries log as they load goes to log.txt
        from fedtune.simulation import check_config, describe_run, simulate
    from fedtune.tasks import resolve_format

    if verbose:
        held.replay()
    cfg: FedtuneConfig = OmegaConf.to_object(raw_cfg)  # type: ignore[assignment]
    resolve_format(cfg)  # model.task=dpo alone reads preference pairs
    logging.getLogger("fedtune").setLevel(cfg.log_level)
    _resolve_run_dir(cfg)
    cfg.run_dir = str(Path(str(cfg.run_dir)).resolve())
    try:
        check_config(cfg)  # before anything is printed or created
    except (ConfigError, DataError) as exc:
        held.replay()  # no log.txt yet: the console is the only place left for them
        raise _user_error(exc) from None
    print(*describe_run(cfg), sep="\n")
    if verbose:
        try:
            summary = simulate(cfg)
        except (ConfigError, DataError) as exc:
            raise _user_error(exc) from None
    else:
        print(f"  log       {Path(cfg.run_dir) / LOG_FILE} (-v prints it here instead)\n", flush=True)
        summary = _simulate_quietly(cfg, held)
    if summary.failure is not None:
        print(f"\nfedtune: the run trained nothing: {summary.failure}\n  outputs and log: {summary.run_dir}",
              file=sys.stderr)
        raise SystemExit(1)
    print(f"\n{summary.stop_reason}: {summary.rounds_completed} round(s).")
    print(f"Outputs: {summary.run_dir}")
    print("  metrics.jsonl, privacy_report.json/.md, adapters/round_NNN/, rounds.png, config.yaml")


def simulate_main(argv: list[str]) -> None:
    import hydra

    register_configs()
    directory = config_dir()
    # Hydra has no -v of its own, and would read one as an override.
    verbose = any(arg in VERBOSE_FLAGS for arg in argv)
    sys.argv = [sys.argv[0], *(arg for arg in argv if arg not in VERBOSE_FLAGS)]

    def job(raw_cfg) -> None:  # type: ignore[no-untyped-def]
        _simulate_job(raw_cfg, verbose)

    decorated = hydra.main(
        version_base="1.3",
        config_path=str(directory) if directory else None,
        config_name="config" if directory else "fedtune_schema",
    )(job)
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
