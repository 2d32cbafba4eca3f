"""End to end: the ``fedtune simulate`` command, Hydra, Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FEDTUNE = shutil.which("fedtune") or str(Path(sys.executable).parent / "fedtune")
TINY = ["federation.num_sites=3", "federation.num_rounds=2", "data.demo_records=600", "data.max_length=96",
        "train.local_steps=8", "privacy.sample_rate=0.1", "train.seed=0", "model.tiny.hidden_size=32",
        "model.tiny.num_heads=2", "model.tiny.intermediate_size=64"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", RAY_DEDUP_LOGS="0")
    return subprocess.run([FEDTUNE, "simulate", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_three_sites_two_rounds(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _run([*TINY, f"run_dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Outputs: {run}" in proc.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(len(r["participants"]) == 3 and r["refusals"] == [] for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.1  # held-out loss falls
    for n in (1, 2):
        assert (run / "adapters" / f"round_{n:03d}" / "adapter_model.safetensors").is_file()
        assert (run / "adapters" / f"round_{n:03d}" / "adapter_config.json").is_file()
    report = json.loads((run / "privacy_report.json").read_text())
    assert report["accountant"] == "rdp" and report["delta"] == 1e-5
    assert set(report["sites"]) == {"site-00", "site-01", "site-02"}
    site = report["sites"]["site-00"]
    # σ is calibrated (privacy.noise_multiplier=null): a site that trained every round spent its whole ε.
    assert site["rounds"] == 2 and site["steps"] == 16 and site["noise_multiplier"] > 0
    assert site["budget_epsilon"] - 0.05 <= site["epsilon"] <= site["budget_epsilon"]
    assert rows[-1]["max_epsilon"] == pytest.approx(max(s["epsilon"] for s in report["sites"].values()))
    assert (run / "privacy_report.md").read_text().startswith("# Privacy report")
    assert "num_sites: 3" in (run / "config.yaml").read_text()
    assert (run / "rounds.png").stat().st_size > 1000


def test_budget_too_small_for_one_round(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # A fixed σ: calibrated, so small a budget is refused before the run (test_calibration.py).
    proc = _run([*TINY, "privacy.target_epsilon=0.05", "privacy.noise_multiplier=0.8", f"run_dir={run}"], tmp_path)
    # A run that trained nothing fails, with one line saying why.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "the run trained nothing: no site has privacy budget left for round 1" in proc.stderr
    assert not (run / "adapters").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 0 and "no site has privacy budget left" in summary["failed"]


def test_bad_config_stops_before_any_work(tmp_path: Path) -> None:
    proc = _run([*TINY, "privacy.max_grad_norm=-1", f"run_dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2
    assert "config error in 'privacy.max_grad_norm'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_multirun_sweep(tmp_path: Path) -> None:
    proc = _run(["--multirun", *TINY, "federation.num_rounds=1", "federation.strategy=fedavg,ffa",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "metrics.jsonl").is_file()
    assert "strategy: ffa" in (tmp_path / "sweep" / "1" / "config.yaml").read_text()
