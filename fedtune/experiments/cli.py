"""``fedtune experiment utility|audit|stream|table``: the research harness on the command line."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, TextIO

from fedtune.config import TASKS
from fedtune.data.records import DataError
from fedtune.errors import ConfigError
from fedtune.run_log import LOG_FILE, HeldRecords, hold_log_records, output_to_log

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("runs") / "experiments"


def _floats(text: str) -> list[float]:
    from fedtune.experiments.sweep import parse_epsilon

    try:
        return [parse_epsilon(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers (inf allowed)")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers")


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the small preset (tiny model, few rounds, in-process engine)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default runs/experiments/<kind>[-quick]); rerunning with the "
                             "same directory resumes, skipping finished runs")
    parser.add_argument("--engine", choices=("flower", "inprocess"), default=None,
                        help="flower: Flower's simulation engine (Ray), default for full size; inprocess: the "
                             "same ServerApp/ClientApp code without Ray, default for --quick")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the libraries' and the sites' output here instead of into OUT/log.txt")
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="classification: a sequence-classification head with LoRA over labelled records "
                             "(the demo corpus's specialities by default); sets model.task and data.format")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="overrides of the base configuration, e.g. federation.num_rounds=5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune experiment",
                                     description="Research harness: utility against privacy, and privacy audits.")
    sub = parser.add_subparsers(dest="kind", required=True)

    utility = sub.add_parser("utility", help="sweep ε × partition × strategy × sites (+ centralised references)")
    _common(utility)
    utility.add_argument("--seeds", type=int, default=None, help="repeat every setting with seeds 0..N-1")
    utility.add_argument("--epsilons", type=_floats, default=None, help="e.g. 1,2,4,8,inf (inf = non-private)")
    utility.add_argument("--partitions", type=_words, default=None,
                         help="iid,dirichlet,by_field (by_field: one site per data.group_field value, as many "
                              "sites as the data has such groups; --sites sizes the others)")
    utility.add_argument("--alpha", type=float, default=None, help="Dirichlet α of the non-iid partition (0.3)")
    utility.add_argument("--strategies", type=_words, default=None, help="fedavg,ffa")
    utility.add_argument("--sites", type=_ints, default=None, help="numbers of sites, e.g. 5,10")
    utility.add_argument("--no-centralised", action="store_true", help="skip the one-site references")
    utility.add_argument("--spec", type=Path, default=None,
                         help="rerun the grid and base configuration recorded in an experiment.json")

    audit = sub.add_parser("audit", help="one-run empirical privacy audit (Steinke, Nasr & Jagielski 2023)")
    _common(audit)
    audit.add_argument("--canaries", type=int, default=None, help="number of canaries m (quick 64, full 256)")
    audit.add_argument("--canary-length", type=int, default=None, help="characters per canary (8)")
    audit.add_argument("--epsilons", type=_floats, default=None,
                       help="one federation per ε, e.g. 1,8,inf (inf = non-private)")
    audit.add_argument("--confidence", type=float, default=None, help="confidence of the lower bound (0.95)")
    audit.add_argument("--seed", type=int, default=None, help="seed of the canaries, coins and training (0)")

    stream = sub.add_parser("stream", help="continuous fine-tuning: per-cohort against whole-site budgets, "
                                           "held-out utility per adapter version")
    _common(stream)
    stream.add_argument("--cohorts", type=int, default=None, help="cohorts per site = versions (4)")

    table = sub.add_parser("table", help="regenerate table.md and plots of a utility sweep from its results.csv")
    table.add_argument("directory", type=Path)
    return parser


def _set_log_level(level: str) -> None:
    # The harness runs many federations under one progress bar: per-round INFO lines of
    # every site would bury it, so the presets log at WARNING (override: log_level=INFO).
    logging.getLogger("fedtune").setLevel(level)


@contextmanager
def _quietly(out: Path, verbose: bool, held: HeldRecords) -> Iterator[Optional[TextIO]]:
    """Descriptors 1 and 2 into ``out/log.txt`` for the block; yield the console (None if verbose).

    A grid loads real models run after run: conversion bars, library warnings and every
    site's log lines would bury the one progress bar.  A configuration refused before
    any run leaves nothing behind, not even the log directory the block made for it.
    """
    if verbose:
        held.replay()
        yield None
        return
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with output_to_log(out / LOG_FILE) as console:
            held.replay()
            yield console
    except (ConfigError, DataError):
        if fresh and [p.name for p in out.iterdir()] == [LOG_FILE]:
            shutil.rmtree(out)
        raise


def _print_outputs(out: Path, names: str, verbose: bool) -> None:
    print(f"Outputs: {out.resolve()}")
    print(f"  {names}" + ("" if verbose else f", {LOG_FILE} (-v prints it here instead)"))


def run_utility_command(args: argparse.Namespace) -> None:
    with hold_log_records() as held:  # what the libraries log as they load belongs in log.txt
        from fedtune.experiments import utility
        from fedtune.experiments.sweep import apply_overrides, reject_grid_overrides

    grid_flags = [args.seeds, args.epsilons, args.partitions, args.alpha, args.strategies, args.sites]
    if args.spec is not None:
        if args.overrides or any(v is not None for v in grid_flags) or args.no_centralised or args.quick \
                or args.task is not None:
            raise ConfigError("--spec", "is combined with other grid flags or overrides",
                              "Rerun a recorded experiment with --spec FILE --out DIR only.")
        spec, base = utility.load_experiment_record(args.spec)
    else:
        spec = utility.quick_spec() if args.quick else utility.UtilitySpec()
        base = utility.quick_base() if args.quick else utility.full_base()
        reject_grid_overrides(args.overrides)
        if args.task is not None:
            base = utility.set_task(base, args.task)
        base = apply_overrides(base, args.overrides)
        if args.seeds is not None:
            if args.seeds < 1:
                raise ConfigError("--seeds", f"{args.seeds} < 1", "Use at least one seed, e.g. --seeds 3.")
            spec.seeds = list(range(args.seeds))
        for name, value in (("epsilons", args.epsilons), ("partitions", args.partitions),
                            ("strategies", args.strategies), ("num_sites", args.sites),
                            ("dirichlet_alpha", args.alpha)):
            if value is not None:
                setattr(spec, name, value)
        if args.no_centralised:
            spec.centralised = False
    if args.engine is not None:
        spec.engine = args.engine
    out = args.out or DEFAULT_OUT / ("utility-quick" if args.quick else "utility")
    _set_log_level(base.log_level)
    with _quietly(out, args.verbose, held) as console:
        text = utility.run_utility(spec, base, out, progress=not args.no_progress, progress_file=console)
    print(text)
    _print_outputs(out, f"{utility.CSV_NAME}, {utility.TABLE_NAME}, utility_vs_epsilon.png, utility_vs_round.png, "
                        f"{utility.SPEC_NAME}, runs/", args.verbose)


def run_audit_command(args: argparse.Namespace) -> None:
    with hold_log_records() as held:
        from fedtune.experiments import audit
        from fedtune.experiments.sweep import apply_overrides, reject_grid_overrides

    spec = audit.quick_spec() if args.quick else audit.AuditSpec()
    base = audit.quick_base() if args.quick else audit.full_base()
    reject_grid_overrides([o for o in args.overrides
                           if o.split("=", 1)[0] not in ("federation.strategy", "federation.num_sites",
                                                         "data.partition", "data.dirichlet_alpha")])
    if args.task is not None:
        from fedtune.experiments.utility import set_task

        base = set_task(base, args.task)
    base = apply_overrides(base, args.overrides)
    for name, value in (("canaries", args.canaries), ("canary_length", args.canary_length),
                        ("epsilons", args.epsilons), ("confidence", args.confidence), ("seed", args.seed),
                        ("engine", args.engine)):
        if value is not None:
            setattr(spec, name, value)
    out = args.out or DEFAULT_OUT / ("audit-quick" if args.quick else "audit")
    _set_log_level(base.log_level)
    with _quietly(out, args.verbose, held) as console:
        audit.run_audit(spec, base, out, progress=not args.no_progress, progress_file=console)
    print((out / "audit.md").read_text())
    _print_outputs(out, "audit.md, audit.json, canary_scores.csv, score_histograms.png, canaries.jsonl, "
                        "experiment.json, runs/", args.verbose)


def run_stream_command(args: argparse.Namespace) -> None:
    with hold_log_records() as held:
        from fedtune.experiments import stream
        from fedtune.experiments.sweep import apply_overrides
        from fedtune.experiments.utility import full_base, set_task

    spec = stream.StreamSpec(engine="inprocess" if args.quick else "flower")
    base = stream.quick_base() if args.quick else full_base()
    if args.task is not None:
        base = set_task(base, args.task)
    base = apply_overrides(base, args.overrides)
    if args.cohorts is not None:
        if args.cohorts < 1:
            raise ConfigError("--cohorts", f"{args.cohorts} < 1", "Use at least one cohort, e.g. --cohorts 4.")
        spec.cohorts = args.cohorts
    if args.engine is not None:
        spec.engine = args.engine
    out = args.out or DEFAULT_OUT / ("stream-quick" if args.quick else "stream")
    _set_log_level(base.log_level)
    with _quietly(out, args.verbose, held):
        text = stream.run_stream(spec, base, out)
    print(text)
    _print_outputs(out, f"{stream.CSV_NAME}, {stream.TABLE_NAME}, {stream.PLOT_NAME}, per_cohort/versions/, "
                        "whole_site/versions/", args.verbose)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.kind == "utility":
            run_utility_command(args)
        elif args.kind == "audit":
            run_audit_command(args)
        elif args.kind == "stream":
            run_stream_command(args)
        else:
            from fedtune.experiments.utility import CSV_NAME, render

            if not (args.directory / CSV_NAME).is_file():
                raise ConfigError("directory", f"{args.directory} has no {CSV_NAME}",
                                  "Pass the output directory of `fedtune experiment utility`.")
            print(render(args.directory))
    except (ConfigError, DataError) as exc:
        print(f"fedtune: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
