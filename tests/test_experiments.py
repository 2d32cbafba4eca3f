"""The research harness: grid, calibration, validation, and end-to-end sweep and audit."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.data import load_federated_data
from fedtune.experiments import audit, utility
from fedtune.experiments.cli import _quietly
from fedtune.experiments.cli import main as experiment_main
from fedtune.experiments.sweep import (
    INF,
    Setting,
    apply_overrides,
    calibrate_noise,
    config_for,
    expand_grid,
    reject_grid_overrides,
)
from fedtune.privacy.accounting import Charge, epsilon
from fedtune.run_log import HeldRecords


def test_grid_has_every_setting_and_the_centralised_references() -> None:
    settings = expand_grid([1, 2, 4, 8, INF], ["iid", "dirichlet"], ["fedavg", "ffa"], [3, 5], [0, 1], 0.3, True)
    assert len(settings) == 2 * (5 * 2 * 2 * 2 + 5)
    assert len({s.key for s in settings}) == len(settings)
    central = [s for s in settings if s.centralised]
    assert len(central) == 10 and all(s.num_sites == 1 for s in central)
    assert Setting(INF, "ffa", 5, "dirichlet", 1, 0.3).key == "dir0.3-ffa-5sites-epsinf-seed1"
    assert Setting(2.0, "fedavg", 1, "iid", 0, centralised=True).group == "centralised, FedAvg-LoRA"


def test_noise_is_calibrated_to_spend_the_budget() -> None:
    sigma = calibrate_noise(2.0, 1e-5, 0.1, rounds=3, local_steps=8, accountant="rdp")
    spent = epsilon([Charge(r, sigma, 0.1, 8) for r in (1, 2, 3)], 1e-5)
    assert 1.98 <= spent <= 2.0


def test_config_for_a_setting(tmp_path: Path) -> None:
    base = utility.quick_base()
    base.secagg.enabled = True
    private = config_for(Setting(4.0, "ffa", 3, "dirichlet", 7, 0.3), base, tmp_path / "a")
    assert private.privacy.enabled and private.privacy.target_epsilon == 4.0 and private.privacy.noise_multiplier > 0
    assert private.federation.strategy == "ffa" and private.data.partition == "dirichlet"
    assert private.train.seed == private.data.seed == private.federation.seed == 7
    assert private.secagg.enabled
    central = config_for(Setting(INF, "fedavg", 1, "iid", 0, centralised=True), base, tmp_path / "b")
    assert not central.privacy.enabled and central.federation.num_sites == 1 and not central.secagg.enabled
    assert base.federation.num_sites == 5  # the base is not modified


def test_overrides_are_typed_and_grid_fields_refused() -> None:
    cfg = apply_overrides(FedtuneConfig(), ["federation.num_rounds=7", "train.learning_rate=0.02"])
    assert cfg.federation.num_rounds == 7 and cfg.train.learning_rate == 0.02
    with pytest.raises(ConfigError, match="federation.num_rondz"):
        apply_overrides(FedtuneConfig(), ["federation.num_rondz=7"])
    with pytest.raises(ConfigError, match="federation.num_rounds"):
        apply_overrides(FedtuneConfig(), ["federation.num_rounds=many"])
    with pytest.raises(ConfigError, match="--epsilons"):
        reject_grid_overrides(["privacy.target_epsilon=3"])


def test_bad_sweep_stops_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    for argv, field in [(["--epsilons", "0,inf"], "--epsilons"), (["--strategies", "fedprox"], "--strategies"),
                        (["--sites", "1"], "--sites"), (["privacy.delta=2"], "privacy.delta"),
                        (["federation.num_sites=4"], "federation.num_sites")]:
        with pytest.raises(SystemExit) as exc:
            experiment_main(["utility", "--quick", "--out", str(out), *argv])
        assert exc.value.code == 2
        assert f"config error in '{field}'" in capsys.readouterr().err
    assert not out.exists()


QUIET_CHILD = """
import os, sys
from pathlib import Path
from fedtune.experiments.cli import _quietly
from fedtune.run_log import HeldRecords
with _quietly(Path(sys.argv[1]), False, HeldRecords()) as console:
    os.write(1, b"GGUF conversion bar\\n")
    print("a site's warning", file=sys.stderr)
    console.write("runs: 1/2\\n")
"""


def test_a_quiet_experiment_keeps_the_console_for_its_bar(tmp_path: Path) -> None:
    """What libraries and sites write, by descriptor or stream, goes to OUT/log.txt; the bar to the console.

    A child process, because pytest's capture replaces the streams a real process has.
    """
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", QUIET_CHILD, str(out)], capture_output=True, text=True,
                           timeout=120, check=True)
    assert child.stdout == "runs: 1/2\n" and child.stderr == ""
    log_text = (out / "log.txt").read_text()
    assert "GGUF conversion bar" in log_text and "a site's warning" in log_text

    with _quietly(tmp_path / "verbose", True, HeldRecords()) as console:
        assert console is None  # -v: everything stays on the console, nothing is made
    assert not (tmp_path / "verbose").exists()


def test_a_refused_experiment_leaves_no_log_behind_but_keeps_earlier_results(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError):
        with _quietly(fresh, False, HeldRecords()):
            raise ConfigError("--sites", "1 < 2", "Use at least 2 sites.")
    assert not fresh.exists()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.csv").write_text("key\n")
    with pytest.raises(ConfigError):
        with _quietly(earlier, False, HeldRecords()):
            raise ConfigError("--sites", "1 < 2", "Use at least 2 sites.")
    assert (earlier / "results.csv").is_file()


def test_canaries_join_one_site_only(tmp_path: Path) -> None:
    canaries, _ = audit.make_canaries(20, 4, seed=0)
    path = tmp_path / "canaries.jsonl"
    audit.write_canaries(path, canaries)
    cfg = audit.quick_base()
    plain = load_federated_data(cfg.data, 3)
    cfg.data.canary_path, cfg.data.canary_site = str(path), 1
    data = load_federated_data(cfg.data, 3)
    sizes = [len(s) for s in data.site_indices]
    assert sizes == [len(plain.site_indices[0]), len(plain.site_indices[1]) + 20, len(plain.site_indices[2])]
    assert [r.response for r in data.site_records(1)[-20:]] == canaries
    assert data.eval_indices == plain.eval_indices


@pytest.mark.slow
def test_quick_sweep_of_two_settings_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    argv = ["utility", "--quick", "--out", str(out), "--epsilons", "2,inf", "--partitions", "iid",
            "--strategies", "fedavg", "--sites", "3", "--no-centralised", "--seeds", "1", "--no-progress"]
    experiment_main(argv)
    printed = capsys.readouterr().out
    assert "| iid, FedAvg-LoRA, 3 sites |" in printed
    assert "log.txt (-v prints it here instead)" in printed and (out / "log.txt").is_file()

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["epsilon_target"] for r in rows] == ["2.0", "inf"]
    dp, plain = rows
    assert 1.9 < float(dp["epsilon_spent"]) <= 2.0 and plain["epsilon_spent"] == "inf"
    for row in rows:
        assert int(row["rounds_completed"]) == 4
        assert int(row["max_site_steps"]) == 4 * 10  # every site trained every round's 10 steps
        assert float(row["final_eval_loss"]) < float(row["initial_eval_loss"])
        assert len(json.loads(row["eval_loss_by_round"])) == 5
        assert (out / row["run_dir"] / "metrics.jsonl").is_file()
    table = (out / "table.md").read_text()
    assert "Held-out loss" in table and "Held-out perplexity" in table and "± 0.000" in table
    # Choosing between a private and a non-private run on the same records is not private.
    assert "| every run | 2 | ∞ |" in table
    for png in ("utility_vs_epsilon.png", "utility_vs_round.png"):
        assert (out / png).stat().st_size > 5000
    record = json.loads((out / "experiment.json").read_text())
    assert record["versions"]["fedtune"] and record["spec"]["epsilons"] == [2.0, "inf"]
    assert record["base_config"]["federation"]["num_rounds"] == 4

    # Resumable: a second invocation reuses both runs and rewrites the same table.
    marker = out / "runs" / dp["run_dir"].split("/")[-1] / "metrics.jsonl"
    before = marker.stat().st_mtime_ns
    experiment_main(argv)
    assert marker.stat().st_mtime_ns == before
    assert (out / "table.md").read_text() == table
    # The table is regenerated from the CSV alone, and a recorded spec reruns the same grid.
    (out / "table.md").unlink()
    experiment_main(["table", str(out)])
    assert (out / "table.md").read_text() == table
    spec, base = utility.load_experiment_record(out / "experiment.json")
    assert spec.epsilons == [2.0, INF] and spec.engine == "inprocess" and base.data.demo_records == 600


@pytest.mark.slow
def test_audit_separates_a_non_private_run_from_a_private_one(tmp_path: Path) -> None:
    spec = audit.quick_spec()
    spec.epsilons = [1.0, INF]
    runs = audit.run_audit(spec, audit.quick_base(), tmp_path / "audit", progress=False)
    private, plain = runs
    assert private["claimed_epsilon"] == pytest.approx(1.0, abs=0.01) and math.isinf(plain["claimed_epsilon"])
    lb_private = private["audit"]["epsilon_lower_bound"]
    lb_plain = plain["audit"]["epsilon_lower_bound"]
    # Same canaries, coins and seed: the non-private model memorises, the ε=1 one does not.
    assert lb_plain > lb_private + 0.5
    assert lb_private <= private["claimed_epsilon"]  # a larger bound would refute the guarantee
    report = (tmp_path / "audit" / "audit.md").read_text()
    assert "claimed ε (ledger)" in report and "| ∞ |" in report
    assert (tmp_path / "audit" / "score_histograms.png").stat().st_size > 5000
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert summary["runs"][1]["claimed_epsilon"] == "inf"


@pytest.mark.slow
def test_flower_engine_gives_the_same_run_as_in_process(tmp_path: Path) -> None:
    """The in-process engine used by --quick runs the same apps as Flower's simulation engine."""
    from fedtune.experiments.engine import run_federation

    base = utility.quick_base()
    base.federation.num_rounds = 1
    setting = Setting(4.0, "fedavg", 3, "iid", 0)
    results = [run_federation(config_for(setting, base, tmp_path / engine), engine).rows[-1]["eval_loss"]
               for engine in ("inprocess", "flower")]
    assert results[0] == pytest.approx(results[1], rel=1e-6)
