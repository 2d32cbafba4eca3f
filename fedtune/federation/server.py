"""The server's round loop (DESIGN.md, "One round, as data"), on Flower's Grid.

The server never trusts a site's report of its own privacy spend: it keeps its own
ledger per site, charged from the σ, q and steps it dictated, for every site that
sent an update *or went silent* (a silent site may have released its update).  A
site that refuses is not charged.  Sites whose next round would pass their budget
are not scheduled; when none is left the run ends with a clear message.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from fedtune import adapters, reporting
from fedtune.checkpoint import append_jsonl, atomic_write_text, atomic_replace_dir, load_checkpoint, save_checkpoint
from fedtune.config import FedtuneConfig
from fedtune.data import load_federated_data
from fedtune.federation import exchange, protocol
from fedtune.secagg.protocol import MIN_SITES
from fedtune.models import build_fingerprinted_model, lora_parameter_names
from fedtune.privacy.accounting import Charge
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.strategies import make_strategy
from fedtune.tasks import get_task

log = logging.getLogger(__name__)


@dataclass
class SiteInfo:
    node_id: int
    name: str
    budget_epsilon: float
    delta: float
    refused: bool = False
    # Did not answer the last round (crashed, restarting, network): asked again before the
    # next round instead of being sent a round it cannot take part in.
    missing: bool = False


@dataclass
class ServerSummary:
    run_dir: Path
    rounds_completed: int
    stop_reason: str
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RoundOutcome:
    """What one round's aggregation step yields, with or without secure aggregation."""

    weighted_sum: Optional[dict[str, np.ndarray]] = None  # Σ n_i Δ_i, or None if nothing usable
    total_weight: float = 0.0
    participants: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    local_train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def record_refusal(reply: Message, site_name: str, round_number: int, out: RoundOutcome) -> bool:
    """If ``reply`` is a refusal, log it and note it in ``out``; refusals are never charged."""
    status = reply.content[protocol.STATUS]
    if status["status"] != protocol.STATUS_REFUSED:
        return False
    log.info("%s refused round %d: %s", site_name, round_number, status["reason"])
    out.refusals.append(site_name)
    return True


def plain_round(grid: Grid, selected: list["SiteInfo"], rc: protocol.RoundConfig, global_state: dict,
                spec: adapters.UpdateSpec, ledger: PrivacyLedger, timeout: Optional[float]) -> RoundOutcome:
    """One round without secure aggregation: the server sees each n_i·Δ_i."""
    charge = _charge_of(rc)
    content = {protocol.GLOBAL_ADAPTER: adapters.to_array_record(global_state),
               protocol.ROUND_CONFIG: rc.to_record()}
    messages = [Message(RecordDict(dict(content)), dst_node_id=s.node_id, message_type=protocol.TRAIN)
                for s in selected]
    replies = exchange.send_and_receive(grid, messages, timeout)
    out = RoundOutcome()
    updates: list[tuple[dict[str, np.ndarray], float]] = []
    for site in selected:
        reply = replies.get(site.node_id)
        if reply is None or reply.has_error():
            reason = "no reply" if reply is None else reply.error.reason
            log.warning("%s failed in round %d (%s); charging it, as its update may have left", site.name,
                        rc.round, reason)
            ledger.charge(site.name, charge)
            out.failures.append(site.name)
            continue
        if record_refusal(reply, site.name, rc.round, out):
            continue
        ledger.charge(site.name, charge)
        try:
            metrics = reply.content[protocol.METRICS]
            state = adapters.validate_update(reply.content[protocol.UPDATE], float(metrics["weight"]), spec)
        except (adapters.UpdateRejected, KeyError, TypeError, ValueError) as exc:
            log.error("rejected the update of %s in round %d: %s; it is not aggregated", site.name, rc.round, exc)
            out.failures.append(site.name)
            continue
        updates.append((state, float(metrics["weight"])))
        out.participants.append(site.name)
        out.local_train_seconds += float(metrics["train_seconds"])
        if "train_loss" in metrics and float(metrics["train_loss"]) >= 0:  # sent only when the site allows it
            out.train_losses.append(float(metrics["train_loss"]))
    if updates:
        out.weighted_sum, out.total_weight = adapters.sum_updates(updates)
    return out


def wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= count or time.monotonic() > deadline:
            return node_ids
        time.sleep(0.5)


def discover_sites(grid: Grid, node_ids: list[int], timeout_s: float,
                   enrolled: Optional[dict[int, str]] = None) -> list[SiteInfo]:
    """Ask every node who it is: its stable site pseudonym and its own budget.

    In a deployment ``enrolled`` maps each enrolled key's node id to the site it was
    issued to; a node claiming another site's name (to spend or hide behind another
    site's budget) is ignored with an error line.  Two nodes claiming one name are too.
    """
    messages = [Message(RecordDict(), dst_node_id=n, message_type=protocol.DESCRIBE) for n in node_ids]
    sites: dict[str, SiteInfo] = {}
    for node, reply in exchange.send_and_receive(grid, messages, timeout_s).items():
        if reply.has_error():
            log.info("node %d did not describe itself: %s", node, reply.error.reason)
            continue
        info = reply.content[protocol.SITE]
        name = str(info["site"])
        if enrolled is not None and enrolled.get(node) != name:
            log.error("node %d claims to be site %r, but its enrolled key was issued to %r; ignoring it", node, name,
                      enrolled.get(node, "no site"))
            continue
        if name in sites:
            log.error("nodes %d and %d both claim to be site %r; ignoring the second", sites[name].node_id, node, name)
            continue
        sites[name] = SiteInfo(node_id=node, name=name, budget_epsilon=float(info["budget_epsilon"]),
                               delta=float(info["delta"]))
    return sorted(sites.values(), key=lambda s: s.name)


def _reachable(grid: Grid, eligible: list[SiteInfo], needed: int, wait_timeout_s: float,
               enrolled: Optional[dict[int, str]]) -> list[SiteInfo]:
    """The eligible sites that can take part now.

    Sites that missed the last round are asked to describe themselves again; those that
    answer are back.  If fewer than ``needed`` remain (secure aggregation needs 3), wait for
    the missing ones up to ``wait_timeout_s`` rather than start a round bound to be abandoned.
    """
    deadline = time.monotonic() + wait_timeout_s
    while True:
        missing = [s for s in eligible if s.missing]
        if missing:
            answered = {s.node_id for s in discover_sites(grid, [s.node_id for s in missing], 10.0, enrolled)}
            for site in missing:
                site.missing = site.node_id not in answered
                if not site.missing:
                    log.info("%s is back", site.name)
        ready = [s for s in eligible if not s.missing]
        if len(ready) >= needed or not any(s.missing for s in eligible) or time.monotonic() >= deadline:
            skipped = [s.name for s in eligible if s.missing]
            if skipped:
                log.warning("not scheduling %s this round: unreachable", ", ".join(skipped))
            return ready
        log.info("waiting for %s to come back (%d of %d needed sites reachable)",
                 ", ".join(s.name for s in eligible if s.missing), len(ready), needed)
        time.sleep(2.0)


def round_config(cfg: FedtuneConfig, round_number: int, base_fingerprint: str) -> protocol.RoundConfig:
    p, t = cfg.privacy, cfg.train
    return protocol.RoundConfig(
        round=round_number, noise_multiplier=p.noise_multiplier if p.enabled else 0.0,
        sample_rate=p.sample_rate, local_steps=t.local_steps, max_grad_norm=p.max_grad_norm,
        learning_rate=t.learning_rate, optimizer=t.optimizer, strategy=cfg.federation.strategy,
        private=p.enabled, base_fingerprint=base_fingerprint,
    )


def _charge_of(rc: protocol.RoundConfig) -> Charge:
    return Charge(round=rc.round, noise_multiplier=rc.noise_multiplier, sample_rate=rc.sample_rate,
                  steps=rc.local_steps)


def privacy_report(cfg: FedtuneConfig, ledger: PrivacyLedger, sites: list[SiteInfo]) -> dict[str, Any]:
    """Each site's ε over its whole history in ``ledger``: every run that charged it, not only this one.

    ``runs`` lists those runs oldest first (``null``: charges from before runs were named);
    ``run`` is this one.
    """
    site_runs = {s.name: ledger.runs(s.name) for s in sites}
    covered = {run for runs in site_runs.values() for run in runs}
    report: dict[str, Any] = {"accountant": cfg.privacy.accountant, "delta": cfg.privacy.delta, "run": ledger.run,
                              "runs": [r for r in ledger.runs() if r in covered], "ledger": str(ledger.path),
                              "sites": {}}
    for site in sites:
        history = ledger.history(site.name)
        eps = ledger.epsilon(site.name, site.delta) if cfg.privacy.enabled else (math.inf if history else 0.0)
        report["sites"][site.name] = {
            "runs": site_runs[site.name],
            "epsilon": reporting.json_number(eps),
            "budget_epsilon": site.budget_epsilon,
            "delta": site.delta,
            "rounds": len(history),
            "steps": sum(c.steps for c in history),
            "noise_multiplier": cfg.privacy.noise_multiplier if cfg.privacy.enabled else 0.0,
            "sample_rate": cfg.privacy.sample_rate,
        }
    return report


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
    import secrets
    from datetime import datetime, timezone

    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    atomic_write_text(path, run_id + "\n")
    return run_id


def _complete_row(row: dict[str, Any], result: Any, eval_seconds: float, round_seconds: float) -> dict[str, Any]:
    """The metrics line of a round: the pending row plus the held-out evaluation and the timings."""
    return {**row, "eval_loss": result.loss, "eval_perplexity": result.perplexity, "eval_accuracy": result.accuracy,
            "round_seconds": round_seconds, "aggregation_seconds": row.get("aggregation_seconds", 0.0),
            "eval_seconds": eval_seconds}


def _record_row(run_dir: Path, row: dict[str, Any], show_progress: bool) -> None:
    append_jsonl(run_dir / "metrics.jsonl", row)
    (run_dir / PENDING_ROW).unlink(missing_ok=True)
    if show_progress:
        tqdm.write(reporting.table_row(row))


def _finish_interrupted_round(run_dir: Path, done: int, model: Any, state: dict[str, np.ndarray], result: Any,
                              eval_seconds: float, show_progress: bool) -> None:
    """After a crash between a round's checkpoint and its metrics line, write what is missing.

    The resumed server has just evaluated the checkpointed adapter, which is exactly the
    evaluation the interrupted round still owed.  A pending row of any other round is stale
    (that round had not checkpointed and will run again) and is dropped.
    """
    path = run_dir / PENDING_ROW
    if not path.is_file():
        return
    try:
        row = json.loads(path.read_text())
        stale = int(row["round"]) != done
    except (ValueError, KeyError, TypeError):
        stale = True
    if stale or done in _logged_rounds(run_dir / "metrics.jsonl"):
        path.unlink()
        return
    adapter_dir = run_dir / "adapters" / f"round_{done:03d}"
    if not adapter_dir.is_dir():
        save_adapter(model, state, adapter_dir)
    log.info("round %d was checkpointed before the server stopped; writing its metrics line now", done)
    _record_row(run_dir, _complete_row(row, result, eval_seconds, float(row.get("round_seconds", 0.0))),
                show_progress)


def _logged_rounds(metrics: Path) -> set[int]:
    """Rounds with a metrics line; a line cut short by a crash mid-write counts as absent."""
    rounds = set()
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            rounds.add(int(json.loads(line)["round"]))
        except (ValueError, KeyError, TypeError):
            continue
    return rounds


def save_adapter(model: Any, state: dict[str, np.ndarray], directory: Path) -> None:
    """peft ``save_pretrained`` into a temporary folder, moved into place atomically."""
    adapters.load_lora_state(model, state)
    tmp = directory.with_name(f".{directory.name}.tmp")
    model.save_pretrained(str(tmp))
    atomic_replace_dir(tmp, directory)


def run_server(grid: Grid, cfg: FedtuneConfig, run_dir: Path, wait_timeout_s: float = 120.0,
               round_timeout_s: Optional[float] = None, show_progress: bool = True,
               enrolled: Optional[dict[int, str]] = None, ledger_path: Optional[Path] = None) -> ServerSummary:
    """Run the federation to completion and write every output into ``run_dir``.

    ``ledger_path`` is the server's privacy ledger (default: in ``run_dir``).  A deployment
    passes the federation's own, so that every run's charges count toward a site's budget.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = cfg.federation
    built = build_fingerprinted_model(cfg.model)
    model, tokenizer = built.model, built.tokenizer
    # Sites refuse rounds whose fingerprint differs from their own copy's (and may pin it).
    log.info("base model fingerprint %s", built.fingerprint)
    all_names = lora_parameter_names(model)
    strategy = make_strategy(fed.strategy)
    aggregated = strategy.trainable_names(model)
    global_state = adapters.lora_state(model, all_names)
    start_round = 1
    checkpoint = load_checkpoint(run_dir / "checkpoint")
    if checkpoint is not None:
        done, global_state = checkpoint
        start_round = done + 1
        log.info("resuming from the checkpoint of round %d", done)
    spec = adapters.UpdateSpec({n: global_state[n].shape for n in aggregated}, fed.max_update_bytes)

    data = load_federated_data(cfg.data, fed.num_sites)
    task = get_task(cfg.model.task)
    eval_examples = task.encode_all(data.eval_records(), tokenizer, cfg.data.max_length)
    pad_id = tokenizer.pad_token_id
    ledger = PrivacyLedger(ledger_path or run_dir / "server_ledger.sqlite", accountant=cfg.privacy.accountant,
                           run=run_id_of(run_dir))

    node_ids = wait_for_nodes(grid, fed.num_sites, wait_timeout_s)
    sites = discover_sites(grid, node_ids, timeout_s=wait_timeout_s, enrolled=enrolled)
    # Enrolled nodes are known before they are online (a site still starting, or
    # reconnecting after the server restarted): ask again until num_sites answered.
    deadline = time.monotonic() + wait_timeout_s
    while len(sites) < fed.num_sites and time.monotonic() < deadline:
        time.sleep(2.0)
        known_nodes, known_names = {s.node_id for s in sites}, {s.name for s in sites}
        found = discover_sites(grid, [n for n in grid.get_node_ids() if n not in known_nodes], 10.0, enrolled)
        sites = sorted(sites + [s for s in found if s.name not in known_names], key=lambda s: s.name)
    log.info("%d sites connected: %s", len(sites), ", ".join(s.name for s in sites))
    if not sites:
        return ServerSummary(run_dir, 0, "no site connected")
    rng = random.Random(fed.seed)

    eval_started = time.perf_counter()
    adapters.load_lora_state(model, global_state)
    baseline = task.evaluate(model, eval_examples, pad_id, cfg.train.eval_batch_size)
    log.info("held-out loss before round %d: %.4f (perplexity %.2f)", start_round, baseline.loss, baseline.perplexity)
    _finish_interrupted_round(run_dir, start_round - 1, model, global_state, baseline,
                              time.perf_counter() - eval_started, show_progress)

    rows: list[dict[str, Any]] = []

    def finish_round(row: dict[str, Any], state: dict[str, np.ndarray], round_seconds: float,
                     adapter_dir: Optional[Path]) -> None:
        """Save the round's adapter, evaluate it and write its metrics line (on the evaluator thread)."""
        if adapter_dir is not None:
            save_adapter(model, state, adapter_dir)
        started = time.perf_counter()
        adapters.load_lora_state(model, state)
        result = task.evaluate(model, eval_examples, pad_id, cfg.train.eval_batch_size)
        done = _complete_row(row, result, time.perf_counter() - started, round_seconds)
        _record_row(run_dir, done, show_progress)
        rows.append(done)

    # The held-out evaluation of round r runs while the sites train round r+1: with a real
    # model it takes minutes, and the sites would otherwise sit idle.  One thread owns the
    # server's model from here on; at most one evaluation is outstanding, so the pending
    # metrics line on disk always belongs to the latest checkpoint.
    evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedtune-eval")
    evaluating: Optional[Future] = None
    stop_reason = "all rounds completed"
    rounds_completed = start_round - 1
    bar = tqdm(range(start_round, fed.num_rounds + 1), desc="rounds", unit="round", disable=not show_progress)
    if show_progress:
        tqdm.write(reporting.TABLE_HEADER)
    try:
        for round_number in bar:
            rc = round_config(cfg, round_number, built.fingerprint)
            charge = _charge_of(rc)
            eligible = []
            for site in sites:
                if site.refused:
                    continue
                if not cfg.privacy.enabled:
                    eligible.append(site)
                    continue
                decision = ledger.check(site.name, charge, site.budget_epsilon, site.delta)
                if decision.allowed:
                    eligible.append(site)
                else:
                    log.info("not scheduling %s: round %d would raise its ε from %.3f to %.3f (budget %g)",
                             site.name, round_number, decision.epsilon_before, decision.epsilon_after,
                             site.budget_epsilon)
            if not eligible:
                stop_reason = (f"no site has privacy budget left for round {round_number}: one more round of "
                               f"σ={rc.noise_multiplier}, q={rc.sample_rate}, {rc.local_steps} steps would exceed "
                               "every site's ε budget. Raise privacy.target_epsilon or privacy.noise_multiplier, "
                               "or lower privacy.sample_rate or train.local_steps.")
                log.warning("stopping: %s", stop_reason)
                break
            eligible = _reachable(grid, eligible, MIN_SITES if cfg.secagg.enabled else 1, wait_timeout_s, enrolled)
            selected = sorted(rng.sample(eligible, min(len(eligible), fed.sites_per_round or len(eligible))),
                              key=lambda s: s.name)

            round_started = time.perf_counter()
            if cfg.secagg.enabled:
                from fedtune.federation.secure_server import secure_round

                outcome = secure_round(grid, selected, cfg, rc, global_state, aggregated, ledger, round_timeout_s)
            else:
                outcome = plain_round(grid, selected, rc, global_state, spec, ledger, round_timeout_s)
            for site in selected:
                if site.name in outcome.refusals:
                    site.refused = True
                site.missing = site.name in outcome.failures

            aggregation_started = time.perf_counter()
            epsilons = [ledger.epsilon(s.name, s.delta) for s in sites] if cfg.privacy.enabled else [math.inf]
            row: dict[str, Any] = {
                "round": round_number,
                "participants": outcome.participants,
                "refusals": outcome.refusals,
                "failures": outcome.failures,
                "train_loss": float(np.mean(outcome.train_losses)) if outcome.train_losses else None,
                "max_epsilon": reporting.json_number(max(epsilons)),
                "local_train_seconds": outcome.local_train_seconds,
                **outcome.extra,
            }
            if evaluating is not None:
                evaluating.result()  # the previous round's line is written (and its error, if any, raised)
                evaluating = None
            # The row goes to disk before the checkpoint: a crash between the checkpoint and the
            # metrics line (the evaluation takes a while) is finished on resume, not lost.
            row["round_seconds"] = time.perf_counter() - round_started
            atomic_write_text(run_dir / PENDING_ROW, json.dumps(row))
            adapter_dir = None
            if outcome.weighted_sum is not None:
                mean_delta = strategy.aggregate(outcome.weighted_sum, outcome.total_weight)
                global_state = strategy.apply(global_state, mean_delta)
                save_checkpoint(run_dir / "checkpoint", round_number, global_state)
                adapter_dir = run_dir / "adapters" / f"round_{round_number:03d}"
            else:
                log.warning("round %d produced no usable sum; the global adapter is unchanged", round_number)
            row["aggregation_seconds"] = time.perf_counter() - aggregation_started
            snapshot = {n: v.copy() for n, v in global_state.items()}
            evaluating = evaluator.submit(finish_round, row, snapshot, time.perf_counter() - round_started, adapter_dir)
            rounds_completed = round_number
        if evaluating is not None:
            evaluating.result()
    finally:
        evaluator.shutdown(wait=True)
    bar.close()

    reporting.write_privacy_report(run_dir, privacy_report(cfg, ledger, sites))
    atomic_write_text(run_dir / "summary.json", json.dumps({
        "rounds_completed": rounds_completed,
        "stop_reason": stop_reason,
        "initial_eval_loss": baseline.loss,
        "final_eval_loss": rows[-1]["eval_loss"] if rows else baseline.loss,
        "sites": [s.name for s in sites],
        "run_id": ledger.run,
    }, indent=2))
    reporting.write_plots(run_dir, rows)
    log.info("%s after %d rounds; outputs in %s", stop_reason, rounds_completed, run_dir)
    return ServerSummary(run_dir, rounds_completed, stop_reason, rows)

