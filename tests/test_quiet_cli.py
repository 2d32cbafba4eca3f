"""``fedtune simulate`` is quiet: settings, the round table and the final lines on the console,
everything else in the run's log.txt; ``-v`` puts it all back on the console.

The end-to-end tests run the real command (Hydra, Flower, Ray); the others drive the CLI's
quiet wrapper in-process with a stand-in simulation, to see where each kind of output lands
(pytest's ``capfd`` is the console: it reads file descriptors 1 and 2).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, TextIO

import pytest

import fedtune.simulation
from fedtune import cli
from fedtune.data.records import DataError
from fedtune.federation.server import ServerSummary
from fedtune.reporting import TABLE_HEADER, RoundTable
from conftest import tiny_config

FEDTUNE = shutil.which("fedtune") or str(Path(sys.executable).parent / "fedtune")
TINY = ["federation.num_sites=3", "federation.num_rounds=1", "data.demo_records=300", "train.local_steps=2",
        "data.max_length=64", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
        "model.tiny.num_heads=2", "secagg.enabled=false"]
SITE_LINE = re.compile(r"site-0(\d) round 1: 2 steps")
TABLE_ROW = re.compile(r"^\s+1\s+3\s+0\s", re.MULTILINE)


def _simulate(run: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS"}
    return subprocess.run([FEDTUNE, "simulate", *flags, *TINY, f"run_dir={run}"], cwd=run.parent, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_console_gets_the_table_and_the_log_gets_the_rest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _simulate(run)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert len(console.split("\n")) < 25, console
    assert "round trained refused" in proc.stdout and TABLE_ROW.search(proc.stdout), console
    assert f"Outputs: {run}" in proc.stdout and f"run dir   {run}" in proc.stdout
    for noise in ("ClientAppActor", "DEPRECATED", "flwr", "INFO", "Warning"):
        assert noise not in console, noise

    log = (run / "log.txt").read_text()
    # Every site's own log line (from its Ray actor), one each: the quiet run turns off Ray's dedup.
    assert sorted(SITE_LINE.findall(log)) == ["0", "1", "2"], log[-3000:]
    assert "base model fingerprint" in log and "DEPRECATED FEATURE" in log


@pytest.mark.slow
def test_verbose_puts_everything_back_on_the_console(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _simulate(run, "-v")
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert SITE_LINE.search(console) and "base model fingerprint" in console
    assert TABLE_ROW.search(proc.stdout), console
    assert not (run / "log.txt").exists()


def _summary(run_dir: Path) -> ServerSummary:
    return ServerSummary(run_dir, 1, "all rounds completed")


def test_quiet_run_shows_only_what_it_hands_the_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")  # the wrapper's default must not override a user's choice

    def fake(cfg: object, progress_file: Optional[TextIO] = None) -> ServerSummary:
        # A library holds the interpreter's own streams (under capfd sys.stdout is pytest's).
        print("a library's print", file=sys.__stdout__)
        print("a warning", file=sys.__stderr__)
        os.write(2, b"a C extension's write\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        assert progress_file is not None
        progress_file.write("    1       3       0\n")
        return _summary(tmp_path / "run")

    monkeypatch.setattr(fedtune.simulation, "simulate", fake)
    summary = cli._simulate_quietly(tiny_config(tmp_path / "run"))
    assert summary.rounds_completed == 1
    out, err = capfd.readouterr()
    assert out == "    1       3       0\n" and err == ""
    log = (tmp_path / "run" / "log.txt").read_text()
    for line in ("a library's print", "a warning", "a C extension's write", "a child process"):
        assert line in log
    assert os.environ["RAY_DEDUP_LOGS"] == "1"
    print("after the run")  # the console is back
    assert capfd.readouterr().out == "after the run\n"


def test_what_a_library_logs_as_it_loads_goes_to_the_log_not_the_console(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    from fedtune.run_log import hold_log_records

    console = logging.StreamHandler(sys.__stderr__)  # as Hydra's handler holds the interpreter's stderr
    logging.getLogger().addHandler(console)
    monkeypatch.setattr(fedtune.simulation, "simulate", lambda cfg, progress_file=None: _summary(tmp_path / "run"))
    try:
        with hold_log_records() as held:  # bitsandbytes warns like this when it is imported
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        assert capfd.readouterr().err == ""
        cli._simulate_quietly(tiny_config(tmp_path / "run"), held)
    finally:
        logging.getLogger().removeHandler(console)
    assert capfd.readouterr().err == ""
    assert "Failed to load CPU gemm_4bit_forward" in (tmp_path / "run" / "log.txt").read_text()


def test_a_crash_is_one_line_on_the_console_and_a_traceback_in_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    def crash(cfg: object, progress_file: Optional[TextIO] = None) -> ServerSummary:
        try:
            raise ValueError("the sites' adapters disagree")
        except ValueError as exc:  # Flower wraps a ServerApp's failure like this
            raise RuntimeError("An error was encountered. Ending simulation.") from exc

    monkeypatch.setattr(fedtune.simulation, "simulate", crash)
    with pytest.raises(SystemExit) as exited:
        cli._simulate_quietly(tiny_config(tmp_path / "run"))
    assert exited.value.code == 1
    out, err = capfd.readouterr()
    log_path = tmp_path / "run" / "log.txt"
    assert out == "" and "ValueError: the sites' adapters disagree" in err and str(log_path) in err
    assert len(err.splitlines()) == 2
    log = log_path.read_text()
    assert "Traceback" in log and "Ending simulation" in log and "adapters disagree" in log


def test_a_data_error_inside_the_quiet_run_reads_as_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    def bad_data(cfg: object, progress_file: Optional[TextIO] = None) -> ServerSummary:
        raise DataError("notes.jsonl line 3: not a JSON object")

    monkeypatch.setattr(fedtune.simulation, "simulate", bad_data)
    with pytest.raises(SystemExit) as exited:
        cli._simulate_quietly(tiny_config(tmp_path / "run"))
    assert exited.value.code == 2
    assert capfd.readouterr().err == "fedtune: notes.jsonl line 3: not a JSON object\n"


def test_verbose_flags_are_taken_out_before_hydra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def job(raw_cfg: object, verbose: bool) -> None:
        seen.update(verbose=verbose, argv=list(sys.argv[1:]), sites=raw_cfg.federation.num_sites)  # type: ignore

    monkeypatch.setattr(cli, "_simulate_job", job)
    monkeypatch.setattr(sys, "argv", ["fedtune"])
    # Hydra's logging left as it is (its default configs would change this process's loggers for later tests).
    overrides = ["federation.num_sites=4", f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null",
                 "hydra/job_logging=none", "hydra/hydra_logging=none"]
    cli.simulate_main(["--verbose", *overrides])
    assert seen == {"verbose": True, "argv": overrides, "sites": 4}
    cli.simulate_main(overrides)
    assert seen["verbose"] is False


def test_the_round_table_goes_where_it_is_told() -> None:
    console = io.StringIO()
    table = RoundTable(True, console)
    for _ in table.bar(range(1, 2)):
        # A non-private run's metrics line carries ε as the JSON string "inf".
        table.row({"round": 1, "participants": ["site-00"], "refusals": [], "train_loss": 3.5, "eval_loss": None,
                   "max_epsilon": "inf"})
    # A console that is not a terminal gets the rows without the bar's redraws.
    assert console.getvalue().splitlines() == [TABLE_HEADER, "    1       1       0     3.5000         -        -     inf"]
    RoundTable(False, console).row({})  # off: nothing is even formatted
