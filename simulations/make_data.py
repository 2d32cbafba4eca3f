"""Write the JSONL files behind the README's real-model tables, from ``shared/data``.

The tables name a data recipe, not a file: anyone with the two public corpora (see
``shared/data/README.md`` for their sources and licences) rebuilds byte-identical inputs
with this script, so a figure can be re-measured without the file it was measured on.

    python simulations/make_data.py polarity DATA_DIR polarity.jsonl
    python simulations/make_data.py speeches DATA_DIR speeches.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Iterable


def polarity_records(data_dir: Path, per_label: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """The first ``per_label`` sentences of each rt-polarity file, shuffled by ``seed``.

    The files are Latin-1 and sorted by nothing the labels depend on, so a prefix of each
    is a fair sample and keeps the two classes balanced.
    """
    records: list[dict[str, str]] = []
    for label in ("pos", "neg"):
        with open(data_dir / f"rt-polarity.{label}", encoding="latin-1") as f:
            sentences = [s.strip() for s in f if s.strip()]
        records += [{"text": s, "label": label} for s in sentences[:per_label]]
    random.Random(seed).shuffle(records)
    return records


def speech_records(data_dir: Path, count: int = 400, min_chars: int = 80) -> list[dict[str, str]]:
    """The first ``count`` speeches of Tiny Shakespeare of at least ``min_chars`` characters.

    A speech is a blank-line-separated block whose first line is ``NAME:``; the name becomes
    the record's ``speaker`` (the field a non-iid partition groups by) and the whole block,
    name included, is the text. One-line interjections ("Aye.") are left out because at
    ``data.max_length=64`` they would be mostly padding.
    """
    text = (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")
    records: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        block = block.strip()
        name, _, body = block.partition("\n")
        if not name.endswith(":") or len(block) < min_chars or not body:
            continue
        records.append({"text": block, "speaker": name[:-1]})
        if len(records) == count:
            break
    return records


def write_jsonl(records: Iterable[dict[str, str]], path: Path) -> int:
    """Write one JSON object per line; returns how many were written."""
    lines = [json.dumps(r) + "\n" for r in records]
    path.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", choices=("polarity", "speeches"))
    parser.add_argument("data_dir", type=Path, help="the shared/data directory")
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    parser.add_argument("--count", type=int, default=400, help="speeches: how many (400)")
    parser.add_argument("--min-chars", type=int, default=80, help="speeches: the shortest kept (80)")
    args = parser.parse_args(argv)
    if args.corpus == "polarity":
        records = polarity_records(args.data_dir)
    else:
        records = speech_records(args.data_dir, count=args.count, min_chars=args.min_chars)
    print(f"{args.out}: {write_jsonl(records, args.out)} records")


if __name__ == "__main__":
    main()
