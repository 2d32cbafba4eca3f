"""``fedtune merge``, ``fedtune export`` and ``fedtune distil``: one model from many adapters.

The logic is :mod:`fedtune.merging`, :mod:`fedtune.export` and :mod:`fedtune.distil`;
this module parses arguments and prints where the result went.  Errors a user can fix
are one line on stderr and exit code 2 (:func:`fedtune.inference_cli._run_guarded`), and
nothing is written: every output folder is moved into place whole, and an existing
``--out`` is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from fedtune.inference_cli import ADAPTER_HELP, _run_guarded

OVERRIDES_HELP = "overrides of the sources' run config, e.g. model.path=DIR (the base model's copy on this machine)"


def _split(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Positional arguments as (adapter folders, ``key=value`` overrides)."""
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


def merge_parser() -> argparse.ArgumentParser:
    from fedtune.merging import METHODS

    parser = argparse.ArgumentParser(prog="fedtune merge", description="Merge LoRA adapters of one base model "
                                     "into one adapter with peft's merge methods. Merging is post-processing of "
                                     "DP adapters: it costs no privacy.")
    parser.add_argument("items", nargs="+", metavar="ADAPTER", help=f"{ADAPTER_HELP}; also {OVERRIDES_HELP}")
    parser.add_argument("--out", required=True, help="the folder to write (refused if it exists)")
    parser.add_argument("--method", default="linear", choices=list(METHODS),
                        help="linear, ties, dare_*, magnitude_prune combine the A and B factors separately (one "
                        "rank; not the sum of the updates B·A); task_arithmetic, *_svd and cat merge the updates "
                        "(task_arithmetic and cat exactly). Default: linear")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="one weight per adapter (default: an equal average)")
    parser.add_argument("--density", type=float, default=0.5,
                        help="share of each update kept by ties, dare_* and magnitude_prune* (default 0.5)")
    parser.add_argument("--svd-rank", type=int, default=None,
                        help="rank of the *_svd and task_arithmetic results (default: the sum of the sources' "
                        "ranks, which is exact for task_arithmetic)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def merge_main(argv: Sequence[str]) -> None:
    """``fedtune merge A B [C ...] --out DIR [--method M] [--weights W ...]``."""
    args = merge_parser().parse_intermixed_args(list(argv))

    def body() -> None:
        from fedtune.merging import MergeRequest, merge

        adapters, overrides = _split(args.items)
        result = merge(MergeRequest(adapters, args.out, args.method, args.weights, args.density, args.svd_rank,
                                    args.seed, overrides, args.overwrite))
        print(f"merged    {len(adapters)} adapters ({args.method}) into {result.out}")
        print(f"record    {result.record_hash} (parents: {', '.join(h[:12] for h in result.record['parents'])})")
        print(f"evaluate  fedtune evaluate {' '.join(adapters)} {result.out} data.path=FILE")

    _run_guarded("fedtune merge", body)


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune export", description="Write an adapter as files Hugging Face "
                                     "loads without fedtune, with its record (and card) beside them. Exporting "
                                     "costs no privacy.")
    parser.add_argument("items", nargs="+", metavar="ADAPTER", help=f"{ADAPTER_HELP}; also {OVERRIDES_HELP}")
    parser.add_argument("--out", required=True, help="the folder to write (refused if it exists)")
    parser.add_argument("--merge", action="store_true",
                        help="fold the adapter into the base model: a standalone model folder "
                        "(AutoModelForCausalLM.from_pretrained(DIR)); default: a plain peft adapter folder")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def export_main(argv: Sequence[str]) -> None:
    """``fedtune export ADAPTER --out DIR [--merge]``."""
    args = export_parser().parse_intermixed_args(list(argv))

    def body() -> None:
        from fedtune.export import export
        from fedtune.inference import UsageError

        adapters, overrides = _split(args.items)
        if len(adapters) != 1:
            raise UsageError("ADAPTER", f"{len(adapters)} adapter folders given", "Export one adapter at a time "
                             "(merge several first with `fedtune merge`).")
        result = export(adapters[0], args.out, args.merge, overrides, args.overwrite)
        if result.merged:
            print(f"exported  {result.model_class} with the adapter merged in: {result.out}")
            print(f"load      AutoModel*.from_pretrained('{result.out}')")
        else:
            print(f"exported  peft adapter: {result.out}")
            base = result.base_model or "fedtune's built-in tiny model (no files: use --merge)"
            print(f"load      PeftModel.from_pretrained(base, '{result.out}'), base: {base}")

    _run_guarded("fedtune export", body)


def distil_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune distil", description="Train a LoRA adapter on a small student "
                                     "model to imitate a teacher adapter, on data declared public (then it is "
                                     "post-processing of the teacher and costs no privacy).")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help=OVERRIDES_HELP + " (teacher)")
    parser.add_argument("--teacher", required=True, metavar="ADAPTER", help=ADAPTER_HELP)
    parser.add_argument("--student", required=True, metavar="MODEL_DIR", help="a local Hugging Face causal LM")
    parser.add_argument("--data", required=True, metavar="FILE", help="JSONL records in the teacher run's format")
    parser.add_argument("--public", action="store_true", help="declare --data public (required; recorded)")
    parser.add_argument("--out", required=True, help="the folder to write (refused if it exists)")
    parser.add_argument("--steps", type=int, default=50, help="optimiser steps (50)")
    parser.add_argument("--batch-size", type=int, default=8, help="records a step (8)")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="Adam's step size (0.01)")
    parser.add_argument("--temperature", type=float, default=1.0, help="token-level KL temperature (1.0)")
    parser.add_argument("--rank", type=int, default=None, help="the student's LoRA rank (default: the teacher's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order (0)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="sequence-level: tokens the teacher writes a record (48)")
    parser.add_argument("--prompt-chars", type=int, default=24,
                        help="sequence-level: a text record's opening characters the teacher continues (24)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def distil_main(argv: Sequence[str]) -> None:
    """``fedtune distil --teacher ADAPTER --student MODEL_DIR --data FILE --public --out DIR``."""
    args = distil_parser().parse_intermixed_args(list(argv))

    def body() -> None:
        from fedtune.distil import DistilRequest, distil

        result = distil(DistilRequest(args.teacher, args.student, args.data, args.out, args.public, args.steps,
                                      args.batch_size, args.learning_rate, args.temperature, args.rank, args.seed,
                                      args.max_new_tokens, args.prompt_chars, args.overrides, args.overwrite))
        method = result.record["method"]
        print(f"distilled {method['mode']}-level, {method['steps']} steps: loss {method['first_step_loss']:.4f} "
              f"-> {method['final_loss']:.4f}")
        print(f"student   {result.out} (record {result.record_hash[:12]}, teacher {result.record['parents'][0][:12]})")
        print(f"evaluate  fedtune evaluate {args.teacher} {result.out} data.path=FILE --baseline")

    _run_guarded("fedtune distil", body)
