"""A simulated stream of cohorts, and `fedtune experiment stream` comparing per-cohort with whole-site budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import FedtuneConfig
from fedtune.data import Record
from fedtune.data.cohorts import CohortedRecords
from fedtune.data.stream import stream_budgets, stream_records
from fedtune.errors import ConfigError
from fedtune.experiments import stream
from fedtune.validation import validate


def test_a_sites_records_split_into_time_ordered_cohorts_that_arrive_one_by_one(tiny_cfg: FedtuneConfig) -> None:
    records = [Record("", f"note {i}") for i in range(10)]
    tiny_cfg.versions.stream_cohorts, tiny_cfg.versions.arrived_cohorts = 3, 2
    data = stream_records(records, tiny_cfg)
    assert isinstance(data, CohortedRecords) and data.names() == ("c01", "c02")
    assert list(data.records) == records[:7] and data.count("c01") == 3 and data.count("c02") == 4
    assert [b.name for b in stream_budgets(tiny_cfg)] == ["c01", "c02"]
    assert {b.epsilon for b in stream_budgets(tiny_cfg)} == {tiny_cfg.privacy.target_epsilon}
    tiny_cfg.versions.per_cohort_budget = False  # the baseline: the arrived records under one budget
    assert stream_records(records, tiny_cfg) == records[:7] and stream_budgets(tiny_cfg) == ()
    for bad in (0, 4):
        tiny_cfg.versions.arrived_cohorts = bad
        with pytest.raises(ConfigError, match="versions.arrived_cohorts"):
            validate(tiny_cfg)
    tiny_cfg.versions.stream_cohorts, tiny_cfg.versions.arrived_cohorts = -1, None
    with pytest.raises(ConfigError, match="versions.stream_cohorts"):
        validate(tiny_cfg)


def test_per_cohort_budgets_keep_training_after_a_whole_site_budget_is_spent(tiny_cfg: FedtuneConfig,
                                                                              tmp_path: Path) -> None:
    tiny_cfg.privacy.noise_multiplier = None  # calibrated: one version's rounds spend one budget
    tiny_cfg.federation.num_rounds = 1
    text = stream.run_stream(stream.StreamSpec(cohorts=2), tiny_cfg, tmp_path / "stream")
    rows = {(r["arm"], r["version"]): r for r in _rows(tmp_path / "stream" / stream.CSV_NAME)}
    assert rows[("per_cohort", "2")]["rounds"] == "1" and rows[("per_cohort", "2")]["promoted"] == "True"
    assert rows[("whole_site", "2")]["rounds"] == "0" and rows[("whole_site", "2")]["promoted"] == "False"
    assert float(rows[("per_cohort", "2")]["eval_loss"]) < float(rows[("whole_site", "2")]["eval_loss"])
    assert "| v0002 |" in text and (tmp_path / "stream" / stream.PLOT_NAME).is_file()


def _rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
