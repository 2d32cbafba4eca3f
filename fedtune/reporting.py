"""What a run leaves behind for people: the privacy report, the round table, plots."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, TextIO

from tqdm.auto import tqdm

from fedtune.checkpoint import atomic_write_text

log = logging.getLogger(__name__)

TABLE_HEADER = f"{'round':>5} {'trained':>7} {'refused':>7} {'train loss':>10} {'eval loss':>9} {'ppl':>8} {'max ε':>7}"


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, str):  # a metrics line's JSON "inf" (json_number): a non-private run's ε
        return value
    return format(value, spec)


def table_row(row: dict[str, Any]) -> str:
    return (f"{row['round']:>5} {len(row['participants']):>7} {len(row['refusals']):>7} "
            f"{_fmt(row['train_loss'], '.4f'):>10} {_fmt(row.get('eval_loss'), '.4f'):>9} "
            f"{_fmt(row.get('eval_perplexity'), '.2f'):>8} {_fmt(row['max_epsilon'], '.3f'):>7}")


@dataclass(frozen=True)
class RoundTable:
    """Where the round table and its progress bar go: nowhere, the process's own streams, or ``file``.

    ``file`` is for a caller that has sent the process's stdout and stderr elsewhere: a quiet
    ``fedtune simulate`` points file descriptors 1 and 2 at the run's log.txt (so Ray, Flower
    and every library print there) and hands its copy of the console here.  Bar and rows then
    share one stream, which tqdm needs to clear the bar before a row and redraw it after; a
    ``file`` that is not a terminal (a pipe, ``| tee``) gets the rows without the bar's
    carriage-return redraws.  None keeps tqdm's defaults (bar on sys.stderr, rows on sys.stdout).
    """

    enabled: bool = True
    file: Optional[TextIO] = None

    def bar(self, rounds: Iterable[int]) -> "tqdm[int]":
        """The progress bar over ``rounds``, under the table's header."""
        hidden = not self.enabled or (self.file is not None and not self.file.isatty())
        bar = tqdm(rounds, desc="rounds", unit="round", disable=hidden, file=self.file)
        self.write(TABLE_HEADER)
        return bar

    def row(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self.write(table_row(row))

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=self.file)


def json_number(value: float) -> float | str:
    """JSON has no infinity; a non-private run reports ε as the string "inf"."""
    return value if math.isfinite(value) else "inf"


def _run_name(run: Optional[str]) -> str:
    return f"`{run}`" if run else "unnamed (charged before runs were recorded)"


def runs_covered(report: dict[str, Any]) -> str:
    """The sentence saying which runs the ε figures cover: a federation's ledger outlives one run."""
    runs = report.get("runs", [])
    this = report.get("run")
    if not runs or runs == [this]:
        return f"They cover this run ({_run_name(this)}) only."
    names = ", ".join(_run_name(r) + (" (this run)" if r == this else "") for r in runs)
    return f"They cover {len(runs)} runs of this federation, oldest first: {names}."


def write_privacy_report(run_dir: Path, report: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "privacy_report.json", json.dumps(report, indent=2))
    lines = [
        "# Privacy report",
        "",
        f"Record-level (ε, δ)-DP per site, δ = {report['delta']:g}, accountant: {report['accountant']}. "
        "Each site's ε covers everything it released over all rounds of every run in the server's ledger, "
        f"computed by the server from the parameters it dictated. {runs_covered(report)}",
        "",
        "| site | ε spent | ε budget | rounds | steps | runs | σ (this run) | q (this run) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for site, s in sorted(report["sites"].items()):
        eps = s["epsilon"]
        lines.append(f"| {site} | {eps if isinstance(eps, str) else f'{eps:.3f}'} | {s['budget_epsilon']:g} | "
                     f"{s['rounds']} | {s['steps']} | {len(s.get('runs', []))} | {s['noise_multiplier']} | "
                     f"{s['sample_rate']} |")
    atomic_write_text(run_dir / "privacy_report.md", "\n".join(lines) + "\n")


def write_plots(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Loss/perplexity and ε against rounds, as PNG (skipped if matplotlib is absent).

    A server without a held-out set writes no ``eval_loss``; its plot has the train loss
    (where sites release it) and ε only.
    """
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a dependency, but a run must not fail for a broken plotting install
        log.info("matplotlib not installed: no plots")
        return
    rounds = [r["round"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    if any("eval_loss" in r for r in rows):
        ax1.plot(rounds, [r.get("eval_loss", math.nan) for r in rows], marker="o", label="held-out loss")
    ax1.plot(rounds, [r["train_loss"] if r["train_loss"] is not None else math.nan for r in rows],
             marker="x", label="train loss")
    ax1.set_xlabel("round")
    ax1.set_ylabel("loss (nats/token)")
    ax1.legend()
    accuracy = [a if isinstance(a := r.get("eval_accuracy"), (int, float)) else math.nan for r in rows]
    if not all(math.isnan(a) for a in accuracy):
        # A classifier's accuracy, or DPO's preference accuracy (held-out pairs whose margin is > 0).
        twin = ax1.twinx()
        twin.plot(rounds, accuracy, marker="s", color="tab:green")
        twin.set_ylabel("held-out accuracy", color="tab:green")
        twin.set_ylim(0.0, 1.0)
    ax2.plot(rounds, [r["max_epsilon"] if isinstance(r["max_epsilon"], (int, float)) else math.nan for r in rows],
             marker="o", color="tab:red")
    ax2.set_xlabel("round")
    ax2.set_ylabel("max ε spent")
    fig.tight_layout()
    fig.savefig(run_dir / "rounds.png", dpi=100)
    plt.close(fig)
