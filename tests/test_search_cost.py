"""The privacy cost of choosing among a sweep's runs: every run, composed."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from fedtune.experiments.search_cost import run_charge, search_cost_section, search_epsilon

DELTA = 1e-5


def _row(target: float, rounds: int = 4, steps: int = 5, q: float = 0.2, max_site_steps=None) -> dict:
    # σ as a sweep records it; a stand-in for the calibrated one (a smaller ε, more noise).
    sigma = 0.0 if math.isinf(target) else 4.0 / target
    return {"epsilon_target": "inf" if math.isinf(target) else target, "noise_multiplier": sigma,
            "sample_rate": q, "rounds_completed": rounds, "local_steps": steps, "delta": DELTA,
            "max_site_steps": rounds * steps if max_site_steps is None else max_site_steps}


def test_one_run_costs_its_own_epsilon_and_a_grid_costs_the_composition() -> None:
    one = _row(8.0)
    alone = RDPAccountant()
    alone.history.append((one["noise_multiplier"], one["sample_rate"], one["max_site_steps"]))
    assert search_epsilon([one], DELTA) == pytest.approx(alone.get_epsilon(DELTA), rel=1e-6)
    grid = [_row(8.0), _row(8.0, q=0.1), _row(2.0, rounds=6)]
    accountant = RDPAccountant()
    for row in grid:
        accountant.history.append((row["noise_multiplier"], row["sample_rate"], row["max_site_steps"]))
    assert search_epsilon(grid, DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-6)
    assert search_epsilon(grid, DELTA) > max(search_epsilon([r], DELTA) for r in grid)


def test_a_non_private_run_makes_the_choice_non_private() -> None:
    assert math.isinf(search_epsilon([_row(8.0), _row(math.inf)], DELTA))
    assert run_charge(_row(math.inf)).noise_multiplier == 0.0


def test_a_run_is_charged_its_most_trained_sites_steps() -> None:
    assert run_charge(_row(8.0, max_site_steps=7)).steps == 7
    assert run_charge(_row(8.0, max_site_steps=0)) is None  # it trained nothing
    # A results.csv from before the field: every site trained every round at most.
    old = _row(8.0, rounds=3, steps=4)
    old["max_site_steps"] = None
    assert run_charge(old).steps == 12


def test_the_table_names_the_cost_of_each_choice() -> None:
    rows = [_row(2.0), _row(2.0, q=0.1), _row(8.0), _row(math.inf)]
    text = search_cost_section(rows)
    assert "| every run | 4 | ∞ |" in text
    two, eight = search_epsilon(rows[:2], DELTA), search_epsilon(rows[2:3], DELTA)
    assert f"| the runs at ε=2 | 2 | {two:.2f} |" in text and f"| the runs at ε=8 | 1 | {eight:.2f} |" in text
