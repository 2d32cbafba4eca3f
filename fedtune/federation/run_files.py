"""The files of a run directory that the round loop appends to, and how a restart finds its place.

``metrics.jsonl`` gets one line per round, written when the round's held-out evaluation
ends.  The line is first written to ``pending_round.json`` *before* the round's
checkpoint: a server stopped between the checkpoint and the line (the evaluation takes
a while) finds the pending line on resume and finishes it, instead of losing the round.
``run_id`` names the run in the server ledger and survives a resume.
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from fedtune.checkpoint import append_jsonl, atomic_write_text
from fedtune.evaluate import EvalResult
from fedtune.reporting import RoundTable

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PENDING_ROW = "pending_round.json"
RUN_ID_FILE = "run_id"


def run_id_of(run_dir: Path) -> str:
    """This run's name in the server ledger: made once per run directory, kept when the run resumes.

    A federation's ledger outlives its runs and round numbers start at 1 in each, so a
    charge names its run; a resumed run (same directory, same checkpoint) is the same run.
    """
    path = run_dir / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    atomic_write_text(path, run_id + "\n")
    return run_id


def write_pending(run_dir: Path, row: dict[str, Any]) -> None:
    """The round's line so far, on disk before its checkpoint."""
    atomic_write_text(run_dir / PENDING_ROW, json.dumps(row))


def complete_row(row: dict[str, Any], result: Optional[EvalResult], eval_seconds: float,
                 round_seconds: float) -> dict[str, Any]:
    """The metrics line of a round: the pending row plus the held-out evaluation and the timings.

    Without a held-out set (a deployment that names no ``data.eval_path``) the line has
    no ``eval_*`` metrics at all, rather than made-up ones.
    """
    metrics = ({} if result is None else
               {"eval_loss": result.loss, "eval_perplexity": result.perplexity, "eval_accuracy": result.accuracy,
                **{f"eval_{name}": value for name, value in result.task_metrics.items()}})
    return {**row, **metrics, "round_seconds": round_seconds,
            "aggregation_seconds": row.get("aggregation_seconds", 0.0), "eval_seconds": eval_seconds}


def record_row(run_dir: Path, row: dict[str, Any], table: RoundTable) -> None:
    """Append the finished line, drop the pending one, and show it in the round table."""
    append_jsonl(run_dir / METRICS_FILE, row)
    (run_dir / PENDING_ROW).unlink(missing_ok=True)
    table.row(row)


def logged_rounds(run_dir: Path) -> set[int]:
    """Rounds with a metrics line; a line cut short by a crash mid-write counts as absent."""
    metrics = run_dir / METRICS_FILE
    rounds = set()
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            rounds.add(int(json.loads(line)["round"]))
        except (ValueError, KeyError, TypeError):
            continue
    return rounds


def interrupted_row(run_dir: Path, done: int) -> Optional[dict[str, Any]]:
    """The pending line of round ``done`` if the server stopped after its checkpoint, before its line.

    A pending line of any other round is stale (that round had not checkpointed and will
    run again) and is dropped, as is one whose round already has its line.
    """
    path = run_dir / PENDING_ROW
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
        stale = int(row["round"]) != done
    except (ValueError, KeyError, TypeError):
        stale = True
    if stale or done in logged_rounds(run_dir):
        path.unlink()
        return None
    return row
