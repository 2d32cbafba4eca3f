"""End to end through the real CLI: ``fedtune simulate`` with secure aggregation on and off.

Same seed, same sites, same DP noise: the two global adapters may differ only by the
quantisation that secure aggregation adds, which the run reports per round as
``quantization_error_bound`` (a bound on each coordinate of the averaged delta).
Plain runs are bitwise reproducible under ``train.seed``; secure runs are not quite
(stochastic rounding draws from the OS, never from the torch stream that seeds the
DP noise and the sampling), which is why the comparison is against the bound.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow

FEDTUNE = shutil.which("fedtune") or str(Path(sys.executable).parent / "fedtune")
TINY = ["federation.num_sites=3", "federation.num_rounds=1", "data.demo_records=240", "data.max_length=64",
        "train.local_steps=3", "privacy.sample_rate=0.2", "train.seed=0", "model.tiny.hidden_size=32",
        "model.tiny.num_heads=2", "model.tiny.intermediate_size=64"]


def _simulate(run: Path, secagg: bool) -> dict[str, np.ndarray]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", RAY_DEDUP_LOGS="0")
    proc = subprocess.run([FEDTUNE, "simulate", *TINY, f"secagg.enabled={str(secagg).lower()}", f"run_dir={run}"],
                          cwd=run.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(run / "adapters" / "round_001" / "adapter_model.safetensors"))


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _worst_excess(plain: dict[str, np.ndarray], secure: dict[str, np.ndarray], bound: float) -> float:
    """Largest |secure − plain| − allowed over all coordinates (≤ 0 means within the bound).

    Allowed: the reported bound, plus one float32 spacing of the value for the
    storage of each adapter in safetensors.
    """
    assert plain.keys() == secure.keys()
    worst = -np.inf
    for name in plain:
        a, b = plain[name].astype(np.float64), secure[name].astype(np.float64)
        slack = 2 * np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float32)).astype(np.float64)
        worst = max(worst, float(np.max(np.abs(a - b) - (bound + slack))))
    return worst


def test_secure_and_plain_cli_runs_agree_within_the_quantisation_bound(tmp_path: Path) -> None:
    plain = _simulate(tmp_path / "plain", secagg=False)
    secure = _simulate(tmp_path / "secure", secagg=True)

    plain_rows, secure_rows = _rows(tmp_path / "plain"), _rows(tmp_path / "secure")
    assert "quantization_error_bound" not in plain_rows[0]
    assert secure_rows[0]["participants"] == plain_rows[0]["participants"] == ["site-00", "site-01", "site-02"]
    bound = secure_rows[0]["quantization_error_bound"]
    assert 0 < bound < 1e-4

    # The adapter moved by far more than the bound (peft starts lora_B at zero), so
    # agreement within the bound means the same training, not two idle runs.
    moved = max(float(np.max(np.abs(v))) for n, v in plain.items() if "lora_B" in n)
    assert moved > 100 * bound
    # Secure aggregation really quantised (the adapters are not bitwise equal) ...
    diff = max(float(np.max(np.abs(plain[n].astype(np.float64) - secure[n]))) for n in plain)
    assert diff > 0
    # ... and stayed within what it reported.
    assert _worst_excess(plain, secure, bound) <= 0, (diff, bound)

    # The check is not vacuous: an error of three times the bound in one coordinate is caught.
    name = next(n for n in secure if "lora_B" in n)
    tampered = dict(secure)
    tampered[name] = secure[name].copy()
    tampered[name].flat[0] += np.float32(3 * bound)
    assert _worst_excess(plain, tampered, bound) > 0

    # Same DP noise and sampling on both paths: the held-out loss agrees to the quantisation.
    assert secure_rows[0]["eval_loss"] == pytest.approx(plain_rows[0]["eval_loss"], abs=1e-3)
    assert secure_rows[0]["max_epsilon"] == pytest.approx(plain_rows[0]["max_epsilon"])
