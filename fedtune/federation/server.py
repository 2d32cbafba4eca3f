"""The server's round loop (DESIGN.md, "One round, as data"), on Flower's Grid, as a short recipe.

Each round: select the sites whose budget affords it and that are reachable
(:mod:`.scheduling`, :mod:`.membership`) → run the round protocol (:mod:`.rounds`:
plain or secure aggregation, or a wrapper around one) → aggregate with the strategy
and the server optimiser (:mod:`fedtune.server_optimizers`, on the unmasked mean delta) and
commit the new version (checkpoint, optimiser moments and adapter record, :mod:`.versions`; the
ledgers were charged by the protocol) → hand the evaluation and the metrics line to
the evaluator thread (:mod:`.evaluator`).

The server never trusts a site's report of its own privacy spend: it keeps its own
ledger per site, charged from the σ, q and steps it dictated, for every site that
sent an update *or went silent* (a silent site may have released its update).  A
site that refuses is not charged.  Sites whose next round would pass their budget
are not scheduled; when none is left the run ends with a clear message.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from flwr.serverapp import Grid

from fedtune import adapters, governance
from fedtune.config import FedtuneConfig
from fedtune.checkpoint import peft_key_map
from fedtune.federation import continual, reference, run_files
from fedtune.federation.evaluator import (
    Evaluator,
    RoundFinisher,
    finish_interrupted_round,
    held_out_records,
    log_baseline,
)
from fedtune.federation.membership import SiteDirectory, SiteInfo, note_attendance, open_directory
from fedtune.federation.plain_server import PlainAggregation
from fedtune.federation.report import ServerSummary, round_row, write_failed_summary, write_final_outputs
from fedtune.federation.rounds import RoundContext, RoundOutcome, RoundProtocol
from fedtune.federation.run_files import run_id_of
from fedtune.federation.scheduling import Scheduler, exhausted_reason, round_config
from fedtune.federation.secure_server import SecureAggregation
from fedtune.federation.versions import GlobalAdapter
from fedtune.models import FingerprintedModel, build_fingerprinted_model
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.reporting import RoundTable
from fedtune.server_optimizers import make_server_optimizer
from fedtune.strategies import Strategy, make_strategy
from fedtune.transparency.content import round_content, run_content

__all__ = ["ServerOptions", "ServerSummary", "default_protocol", "round_config", "run_id_of", "run_server"]

log = logging.getLogger(__name__)


def default_protocol(cfg: FedtuneConfig) -> RoundProtocol:
    """The round protocol the config asks for: SecAgg+ unless ``secagg.enabled=false``."""
    return SecureAggregation(cfg) if cfg.secagg.enabled else PlainAggregation()


@dataclass(frozen=True)
class ServerOptions:
    """How this server process runs the loop (the run's own settings are in the config)."""

    wait_timeout_s: float = 120.0
    round_timeout_s: Optional[float] = None
    show_progress: bool = True
    enrolled: Optional[dict[int, str]] = None
    ledger_path: Optional[Path] = None
    round_protocol: Optional[RoundProtocol] = None
    pooled_data: bool = True
    # With versions.enabled: the version this run writes (continual.open_version).
    version: Optional[continual.OpenVersion] = None


@dataclass
class ServerRun:
    """Everything one run of the loop holds; built by :func:`prepare`, driven by :func:`run_server`."""

    grid: Grid
    cfg: FedtuneConfig
    run_dir: Path
    built: FingerprintedModel
    strategy: Strategy
    adapter: GlobalAdapter
    context: RoundContext
    protocol: RoundProtocol
    scheduler: Scheduler
    directory: SiteDirectory = field(init=False)
    # The sites described so far (all, unless a round samples federation.sites_per_round of them).
    sites: list[SiteInfo] = field(default_factory=list)
    # Rounds of this run whose sum changed the global adapter (an abandoned round does not).
    rounds_aggregated: int = 0
    def play(self, round_number: int, finisher: RoundFinisher) -> Optional[str]:
        """One round, start to commit; returns why the run stops, or None to go on."""
        rc = round_config(self.cfg, round_number, self.built.fingerprint)
        selected = self.scheduler.select(self.directory, rc)
        if selected is None:
            reason = exhausted_reason(rc)
            log.warning("stopping: %s", reason)
            return reason
        started = time.perf_counter()
        outcome = self.protocol.run(self.grid, selected, rc, self.adapter.state, self.context)
        note_attendance(selected, outcome)
        # Before the record is made: a disclosing site's per-cohort ε now includes this round.
        self.directory.refresh_disclosures([s for s in selected if s.name in outcome.participants])
        self.commit(round_number, outcome, started, finisher)
        return None

    def commit(self, round_number: int, outcome: RoundOutcome, started: float, finisher: RoundFinisher) -> None:
        """Aggregate, checkpoint and hand the round to the evaluator, in the order a crash needs.

        The metrics line goes to disk (pending) before the checkpoint, so a server stopped
        between the checkpoint and the line is finished on resume, not lost.
        """
        aggregation_started = time.perf_counter()
        row = round_row(round_number, outcome, self.sites, self.context.ledger, self.cfg.privacy.enabled)
        finisher.wait()  # the previous round's line is written (and its error, if any, raised)
        row["round_seconds"] = time.perf_counter() - started
        run_files.write_pending(self.run_dir, row)
        version = None
        if outcome.weighted_sum is not None:
            mean_delta = self.strategy.aggregate(outcome.weighted_sum, outcome.total_weight)
            # The optimiser steps only the tensors the strategy aggregated; apply leaves the rest.
            step = self.adapter.optimizer.update(mean_delta)
            version = self.adapter.commit(round_number, self.strategy.apply(self.adapter.state, step),
                                          outcome.participants,
                                          round_content(self.context.ledger, self.sites, self.cfg.privacy.enabled))
            self.rounds_aggregated += 1
        else:
            log.warning("round %d produced no usable sum; the global adapter is unchanged", round_number)
        row["aggregation_seconds"] = time.perf_counter() - aggregation_started
        snapshot = version.state if version is not None else {n: v.copy() for n, v in self.adapter.state.items()}
        finisher.submit(row, version, snapshot, time.perf_counter() - started)


def prepare(grid: Grid, cfg: FedtuneConfig, run_dir: Path, options: ServerOptions) -> tuple[ServerRun, int]:
    """Model, strategy, resumed adapter, ledger and protocol of a run; returns it and its first round."""
    run_dir.mkdir(parents=True, exist_ok=True)
    built = build_fingerprinted_model(cfg.model)
    # Sites refuse rounds whose fingerprint differs from their own copy's (and may pin it).
    log.info("base model fingerprint %s", built.fingerprint)
    strategy = make_strategy(cfg.federation.strategy)
    identity = governance.run_identity(built.model, cfg.model.path, built.fingerprint, cfg.model.task,
                                       strategy.name)
    optimizer = make_server_optimizer(cfg.federation)
    log.info("server optimiser %s %s", optimizer.title, optimizer.hyper)
    # Part of the method every version's record states, as the strategy is.
    identity["server_optimizer"] = {"name": optimizer.name, **optimizer.hyper}
    identity.update(run_content(cfg))
    plan = options.version.plan if options.version is not None else None
    if plan is not None:
        identity["version"] = continual.version_identity(plan)
    # What the run starts from, read once: DPO's frozen reference, even for a resumed run.
    start = reference.run_start(cfg, plan, peft_key_map(built.model))
    identity.update(reference.reference_identity(cfg, start, plan))
    adapter = GlobalAdapter(built.model, run_dir, identity, optimizer)
    start_round = adapter.resume() + 1
    if plan is not None and start_round == 1:
        # A new version: its parent's adapter and record, rounds numbered on from the federation's last.
        if plan.parent_dir is not None:
            adapter.start_from(plan.parent_dir / "checkpoint", plan.first_round - 1)
        start_round = plan.first_round
    elif start is not None and start_round == 1:
        adapter.begin_at(start.state)
    spec = adapters.UpdateSpec({n: adapter.state[n].shape for n in strategy.trainable_names(built.model)},
                               cfg.federation.max_update_bytes)
    ledger = PrivacyLedger(options.ledger_path or run_dir / "server_ledger.sqlite",
                           accountant=cfg.privacy.accountant, run=run_id_of(run_dir))
    protocol = options.round_protocol or default_protocol(cfg)
    context = RoundContext(ledger=ledger, spec=spec, timeout=options.round_timeout_s,
                           reference=reference.reference_state(cfg, start))
    scheduler = Scheduler(grid, ledger, protocol.min_sites, options.wait_timeout_s, cfg.federation.sites_per_round,
                          options.enrolled, cfg.federation.seed)
    return ServerRun(grid, cfg, run_dir, built, strategy, adapter, context, protocol, scheduler), start_round


def run_server(grid: Grid, cfg: FedtuneConfig, run_dir: Path, wait_timeout_s: float = 120.0,
               round_timeout_s: Optional[float] = None, show_progress: bool = True,
               enrolled: Optional[dict[int, str]] = None, ledger_path: Optional[Path] = None,
               round_protocol: Optional[RoundProtocol] = None, pooled_data: bool = True,
               progress_file: Optional[TextIO] = None) -> ServerSummary:
    """Run the federation to completion and write every output into ``run_dir``.

    ``ledger_path`` is the server's privacy ledger (default: in ``run_dir``); a deployment
    passes the federation's own, so that every run's charges count toward a site's budget.
    ``round_protocol`` replaces the config's (:func:`default_protocol`), e.g. by a wrapper
    around it.  ``pooled_data``: ``cfg.data`` is the pooled data of a simulation, whose
    held-out split the server may evaluate on; a deployment's server holds no site data
    and evaluates only on ``data.eval_path``.  ``progress_file``: where the round table and its
    progress bar go (default: tqdm's, stdout and stderr), e.g. the console of a quiet CLI whose
    own stdout and stderr go to a log file.
    """
    opened = continual.open_version(cfg, run_dir, ledger_path)
    run_dir = opened.run_dir
    options = ServerOptions(wait_timeout_s, round_timeout_s, show_progress, enrolled, opened.ledger_path,
                            round_protocol, pooled_data, opened)
    table = RoundTable(show_progress, progress_file)
    run, start_round = prepare(grid, cfg, run_dir, options)
    evaluator = Evaluator(run.built.model, run.built.tokenizer, cfg, held_out_records(cfg, pooled_data),
                          reference=run.context.reference)
    run.directory = open_directory(grid, cfg.federation.num_sites, wait_timeout_s, enrolled,
                                   describe_all=cfg.federation.sites_per_round is None)
    run.sites = run.directory.sites
    if not run.directory.node_ids:
        summary = ServerSummary(run_dir, 0, "no site connected", rounds_to_play=cfg.federation.num_rounds)
        write_failed_summary(summary, run.context.ledger.run)
        return summary
    skipped = continual.skip_without_new_cohorts(opened, cfg, run.sites, start_round)
    if skipped is not None:
        return ServerSummary(opened.plan.root if opened.plan is not None else run_dir, 0, skipped)
    baseline = evaluator.evaluate(run.adapter.state)
    log_baseline(baseline, start_round)
    continual.note_start(opened, start_round, baseline.result.loss if baseline.result is not None else None)
    finish_interrupted_round(run_dir, run.adapter, baseline, table)
    first = opened.first_round
    summary = ServerSummary(run_dir, start_round - first, "all rounds completed",
                            rounds_to_play=max(0, first + cfg.federation.num_rounds - start_round))
    bar = table.bar(range(start_round, first + cfg.federation.num_rounds))
    last_begun = start_round - 1
    with RoundFinisher(evaluator, run.adapter, run_dir, table) as finisher:
        for round_number in bar:
            last_begun = round_number
            stop = run.play(round_number, finisher)
            if stop is not None:
                summary.stop_reason = stop
                break
            summary.rounds_completed = round_number - first + 1
    bar.close()
    summary.rows = finisher.rows
    summary.rounds_aggregated = run.rounds_aggregated
    write_final_outputs(cfg, summary, run.context.ledger, run.sites, baseline.result)
    continual.close_version(opened, cfg, run.adapter.round, last_begun, run.sites)
    return summary
