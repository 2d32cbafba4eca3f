from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune.privacy.accounting import Charge, check_budget, epsilon
from fedtune.privacy.ledger import PrivacyLedger

HISTORY = [Charge(1, 1.1, 0.01, 100), Charge(2, 1.1, 0.01, 100), Charge(3, 0.9, 0.02, 50)]


@pytest.mark.parametrize("name,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_matches_opacus_stepping_the_same_history(name: str, cls: type) -> None:
    reference = cls()
    for charge in HISTORY:
        for _ in range(charge.steps):
            reference.step(noise_multiplier=charge.noise_multiplier, sample_rate=charge.sample_rate)
    assert epsilon(HISTORY, 1e-5, name) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-3)


def test_epsilon_grows_and_budget_check(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    assert ledger.epsilon("s", 1e-5) == 0.0
    ledger.charge("s", HISTORY[0])
    one = ledger.epsilon("s", 1e-5)
    ledger.charge("s", HISTORY[1])
    two = ledger.epsilon("s", 1e-5)
    assert 0 < one < two < 2 * one  # composition is sub-linear: never summed by hand
    decision = ledger.check("s", HISTORY[2], budget=two + 1e-9, delta=1e-5)
    assert not decision.allowed and decision.epsilon_after > two
    assert check_budget([], HISTORY[0], budget=one + 1e-6, delta=1e-5).allowed
    assert ledger.history("other") == []


def test_charge_survives_a_killed_process(tmp_path: Path) -> None:
    """A process charged, then died before it could release (SIGKILL, no cleanup)."""
    path = tmp_path / "site.sqlite"
    script = textwrap.dedent(f"""
        import os, signal
        from fedtune.privacy.accounting import Charge
        from fedtune.privacy.ledger import PrivacyLedger
        ledger = PrivacyLedger({str(path)!r})
        ledger.charge("site-00", Charge(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10))
        os.kill(os.getpid(), signal.SIGKILL)  # between charge and release
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9
    reopened = PrivacyLedger(path)
    assert reopened.history("site-00") == [Charge(1, 1.0, 0.1, 10)]
    assert reopened.epsilon("site-00", 1e-5) > 0
