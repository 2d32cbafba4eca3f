"""``fedtune record verify DIR``: check the hash chain of adapter records and the files they name.

Every round's ``adapter_record.json`` under DIR (a run directory, or a federation root with
its ``versions/``) is read; a derived adapter's (``fedtune merge``: no round) is not a link of
the chain and is left out.  The checks, each a line of the report when it fails:

* the chain: a record's ``parent`` is the SHA-256 of another record of an earlier round
  (versions branch when a version is not promoted, so the chain is a tree); only the
  earliest round may have none.  A rewritten record changes its hash, so its child no
  longer finds its parent;
* the files: the weights (as tensors) and ``adapter_config.json`` hash to the record's
  ``files``; ``ADAPTER_CARD.md`` names the record's hash;
* the anchors: each ``checkpoint/`` holds in its own metadata a record of the set, so the
  newest record cannot be rewritten alone either.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from fedtune import governance
from fedtune.checkpoint import CONFIG_FILE, WEIGHTS_FILE, checkpoint_record
from fedtune.transparency.card import CARD_FILE, RECORD_HASH_LINE
from fedtune.transparency.digests import tensors_sha256, text_sha256

USAGE = "usage: fedtune record verify DIR   (a run directory or a federation root)"


def _records(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(root.rglob(governance.RECORD_FILE)):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # a directory still being written or replaced
        record = json.loads(path.read_text())
        # A derived adapter's record (fedtune merge: round null, several parents) is not a round's.
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            found.append((path.parent, record))
    return found


def _file_problems(directory: Path, record: dict[str, Any]) -> list[str]:
    from safetensors.numpy import load_file

    files = record.get("files")
    if not isinstance(files, dict):
        return [f"{directory}: the record states no file hashes (made before fedtune recorded them?)"]
    problems = []
    weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if not weights.is_file() or tensors_sha256(load_file(str(weights))) != files.get("weights_sha256"):
        problems.append(f"{weights}: missing, or its tensors do not hash to the record's weights_sha256")
    if not config.is_file() or text_sha256(config.read_text(encoding="utf-8")) != files.get("adapter_config_sha256"):
        problems.append(f"{config}: missing, or it does not hash to the record's adapter_config_sha256")
    card = directory / CARD_FILE
    if card.is_file() and f"{RECORD_HASH_LINE}`{governance.record_hash(record)}`" not in card.read_text():
        problems.append(f"{card}: does not name this record's hash")
    return problems


def _chain_problems(records: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    by_hash = {governance.record_hash(r): r for _, r in records}
    first = min(int(r["round"]) for _, r in records)
    problems = []
    for directory, record in records:
        parent: Optional[str] = record.get("parent")
        if parent is None:
            if int(record["round"]) != first:
                problems.append(f"{directory}: round {record['round']} names no parent, but it is not the first")
        elif parent not in by_hash:
            problems.append(f"{directory}: its parent {parent[:12]}… is no record here (a rewritten parent?)")
        elif int(by_hash[parent]["round"]) >= int(record["round"]):
            problems.append(f"{directory}: its parent is not of an earlier round")
    return problems


def _anchor_problems(root: Path, hashes: set[str]) -> list[str]:
    problems = []
    for checkpoint in sorted(root.rglob("checkpoint")):
        if not checkpoint.is_dir() or any(p.startswith(".") for p in checkpoint.relative_to(root).parts):
            continue
        record = checkpoint_record(checkpoint)
        if record is not None and governance.record_hash(record) not in hashes:
            problems.append(f"{checkpoint}: its record is none of the adapter records (a rewritten latest record?)")
    return problems


def verify(root: Path) -> tuple[int, list[str]]:
    """(records checked, problems found) for every record under ``root``."""
    records = _records(root)
    if not records:
        return 0, [f"{root}: no {governance.RECORD_FILE} found"]
    problems = _chain_problems(records)
    for directory, record in records:
        problems += _file_problems(directory, record)
    problems += _anchor_problems(root, {governance.record_hash(r) for _, r in records})
    return len(records), problems


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "verify":
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    root = Path(argv[1])
    if not root.is_dir():
        print(f"fedtune: {root} is not a directory\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    count, problems = verify(root)
    for problem in problems:
        print(f"FAILED {problem}")
    if problems:
        print(f"{len(problems)} problem(s) in {count} record(s) under {root}")
        raise SystemExit(1)
    print(f"ok: {count} record(s) under {root}: the hash chain is intact and every file matches its record")
