"""``fedtune evaluate`` and ``fedtune generate``: try a finished run's adapter without writing code.

The logic is :mod:`fedtune.inference`'s; this module parses the arguments, prints the
results (only the continuation goes to stdout for ``generate``, so it can be piped) and
turns every error a user can fix into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from fedtune.data.records import DataError
from fedtune.errors import ConfigError
from fedtune.evaluate import EvalResult

ADAPTER_HELP = "an adapter folder a run wrote: RUN/adapters/round_NNN or RUN/checkpoint"
OVERRIDES_HELP = ("overrides of the run's config.yaml, e.g. model.path=DIR (the base model's copy on this "
                  "machine), data.path=FILE, data.max_length=256, train.eval_batch_size=8")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("adapter", metavar="ADAPTER", help=ADAPTER_HELP + " (evaluate: several, for one table)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help=OVERRIDES_HELP)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="the run's config.yaml (default: the nearest one at or above ADAPTER)")
    return parser


def evaluate_parser() -> argparse.ArgumentParser:
    parser = _parser("fedtune evaluate", "Held-out metrics of a run's adapter, computed as the run's server "
                     "computes them. Evaluates every record of data.path=FILE if given, else the run's own "
                     "held-out set (data.eval_path, or a simulation's held-out split).")
    parser.add_argument("--baseline", action="store_true",
                        help="also evaluate the untrained adapter (the base model; the run's round 0)")
    parser.add_argument("--json", metavar="FILE", type=Path, default=None, help="also write the metrics as JSON")
    return parser


def generate_parser() -> argparse.ArgumentParser:
    parser = _parser("fedtune generate", "Continue a prompt with a causal-LM run's adapter; prints only the "
                     "continuation.")
    parser.add_argument("--prompt", required=True, help="the prompt (a chat model's user turn)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (64)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy decoding (default); > 0: sample at this temperature")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the sampling (default: a fresh one, reported on stderr)")
    return parser


def _metrics_line(label: str, result: EvalResult) -> str:
    second = (f"accuracy {result.accuracy:.4f}" if result.accuracy is not None
              else f"perplexity {result.perplexity:.3f}")
    return f"{label:<9} loss {result.loss:.4f}   {second}"


def _run_guarded(prog: str, body: Callable[[], None]) -> None:
    """Run ``body``; an error the user can fix becomes one line on stderr and exit code 2, not a traceback."""
    from fedtune.inference import UsageError

    try:
        body()
    except (UsageError, ConfigError, DataError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _evaluate_one(adapter: str, overrides: Sequence[str], args: argparse.Namespace) -> tuple[Any, Any]:
    """(the adapter's run, its evaluation) as ``fedtune evaluate ADAPTER`` computes it."""
    from fedtune import inference

    run = inference.locate(adapter, overrides, args.config)
    held_out = inference.evaluation_records(run)
    return run, inference.evaluate_adapter(inference.load_model(run), held_out, baseline=args.baseline)


def _print_one(run: Any, evaluation: Any) -> None:
    round_note = f" (round {run.round})" if run.round is not None else ""
    print(f"adapter   {run.adapter_dir}{round_note}")
    print(f"data      {evaluation.records} records: {evaluation.source}")
    print(_metrics_line("adapter", evaluation.result))
    if evaluation.baseline is not None:
        print(_metrics_line("baseline", evaluation.baseline) + "   (untrained adapter: the run's round 0)")


def _print_table(results: list[tuple[Any, Any]]) -> None:
    """One row per adapter, so merged, exported or distilled adapters read beside their sources."""
    sources = {evaluation.source for _, evaluation in results}
    if len(sources) == 1:
        print(f"data      {results[0][1].records} records: {sources.pop()}")
    width = max(len(str(run.adapter_dir)) for run, _ in results)
    second = "accuracy" if results[0][1].result.accuracy is not None else "perplexity"
    print(f"{'adapter':<{width}}  {'kind':<7} {'loss':>8} {second:>10}")
    for run, evaluation in results:
        kind = (run.record or {}).get("kind") or (f"round {run.round}" if run.round is not None else "-")
        value = evaluation.result.accuracy if second == "accuracy" else evaluation.result.perplexity
        note = f"   ({evaluation.records} records: {evaluation.source})" if len(sources) > 1 else ""
        print(f"{str(run.adapter_dir):<{width}}  {kind:<7} {evaluation.result.loss:>8.4f} {value:>10.4f}{note}")
        if evaluation.baseline is not None:
            base = evaluation.baseline
            value = base.accuracy if second == "accuracy" else base.perplexity
            print(f"{'  its base model (--baseline)':<{width}}  {'base':<7} {base.loss:>8.4f} {value:>10.4f}")


def evaluate_main(argv: Sequence[str]) -> None:
    """``fedtune evaluate ADAPTER [ADAPTER ...] [section.field=value ...] [--baseline] [--json FILE]``.

    Several adapters (e.g. two sources and their merge) are evaluated on the same records
    with the same overrides and printed as one table; ``--json`` then holds a list.
    """
    args = evaluate_parser().parse_intermixed_args(list(argv))
    adapters = [args.adapter, *(item for item in args.overrides if "=" not in item)]
    overrides = [item for item in args.overrides if "=" in item]

    def body() -> None:
        results = [_evaluate_one(adapter, overrides, args) for adapter in adapters]
        if len(results) == 1:
            _print_one(*results[0])
        else:
            _print_table(results)
        if args.json is not None:
            reports = [evaluation.to_json(run) for run, evaluation in results]
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(reports[0] if len(reports) == 1 else {"adapters": reports}, indent=2)
                                 + "\n", encoding="utf-8")
            print(f"metrics   {args.json}")

    _run_guarded("fedtune evaluate", body)


def generate_main(argv: Sequence[str]) -> None:
    """``fedtune generate ADAPTER --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S]``."""
    args = generate_parser().parse_intermixed_args(list(argv))

    def body() -> None:
        from fedtune import inference

        run = inference.locate(args.adapter, args.overrides, args.config)
        inference.check_generative(run)
        generation = inference.generate(inference.load_model(run), args.prompt, args.max_new_tokens,
                                        args.temperature, args.seed)
        if generation.chat_template:
            print("fedtune generate: the prompt is wrapped as one user turn of the tokenizer's chat template",
                  file=sys.stderr)
        if generation.seed is not None:
            print(f"fedtune generate: sampled at temperature {args.temperature} with --seed {generation.seed}",
                  file=sys.stderr)
        print(generation.text)

    _run_guarded("fedtune generate", body)

