"""federation.num_sites=null with data.partition=by_field: the number of sites comes from the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.config import FedtuneConfig, load_structured
from fedtune.data.site_count import count_field_sites, resolve_num_sites
from fedtune.errors import ConfigError
from fedtune.experiments.sweep import expand_grid
from fedtune.experiments.utility import UtilitySpec, field_sites
from fedtune.simulation import check_config, check_data, describe_run
from fedtune.validation import validate

from conftest import tiny_config


def _plays(tmp_path: Path) -> Path:
    """Five speakers with enough lines, one with a single line (left out at min_records_per_site=2)."""
    path = tmp_path / "plays.jsonl"
    counts = {"ROMEO": 20, "JULIET": 18, "NURSE": 12, "MERCUTIO": 10, "TYBALT": 8, "PAGE": 1}
    with path.open("w") as out:
        for speaker, count in counts.items():
            for i in range(count):
                out.write(json.dumps({"text": f"{speaker} speaks line {i} of the play", "speaker": speaker}) + "\n")
    return path


def _by_field(tmp_path: Path, num_sites: object = None, **changes: object) -> FedtuneConfig:
    changes = {"data__partition": "by_field", **changes}
    cfg = tiny_config(tmp_path / "run", data__path=str(_plays(tmp_path)), data__group_field="speaker",
                      data__eval_fraction=0.1, **changes)
    cfg.federation.num_sites = num_sites  # type: ignore[assignment]
    return cfg


def test_null_takes_the_number_of_sites_from_the_data(tmp_path: Path) -> None:
    cfg = _by_field(tmp_path, secagg__enabled=True, federation__sites_per_round=3)
    assert count_field_sites(cfg.data) == 5
    check_config(cfg)  # the secure-aggregation and sites_per_round checks see the count
    assert cfg.federation.num_sites == 5
    check_data(cfg)
    resolve_num_sites(cfg)  # idempotent: a resolved number stays
    assert cfg.federation.num_sites == 5
    sites = next(line for line in describe_run(cfg) if line.strip().startswith("sites"))
    assert "5 sites (one per speaker with ≥ 2 training records), 3 a round" in sites


def test_the_harness_gives_by_field_runs_the_data_s_count(tmp_path: Path) -> None:
    base = _by_field(tmp_path, num_sites=3, data__partition="iid")
    spec = UtilitySpec(epsilons=[8.0], partitions=["iid", "by_field"], strategies=["fedavg"], num_sites=[3],
                       centralised=False, seeds=[0])
    settings = expand_grid(spec.epsilons, spec.partitions, spec.strategies, spec.num_sites, spec.seeds, 0.3,
                           False, field_sites=field_sites(spec, base))
    assert [(s.partition, s.num_sites) for s in settings] == [("iid", 3), ("by_field", 5)]
    assert settings[1].key == "byfield-fedavg-5sites-eps8-seed0" and settings[1].group.startswith("by field")


def test_a_number_the_data_does_not_make_names_the_right_one(tmp_path: Path) -> None:
    for check in (check_config, check_data):  # before the settings are printed, and wherever data is split
        with pytest.raises(ConfigError) as err:
            check(_by_field(tmp_path, num_sites=4))
        assert err.value.field == "federation.num_sites"
        assert "data.group_field" in str(err.value) and "federation.num_sites=5" in str(err.value)
    check_config(_by_field(tmp_path, num_sites=5))


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_null_with_another_partition_is_refused(tmp_path: Path, partition: str) -> None:
    cfg = load_structured(FedtuneConfig(), overrides=["federation.num_sites=null", f"data.partition={partition}"])
    for check in (check_config, validate):
        with pytest.raises(ConfigError, match="only data.partition=by_field") as err:
            check(cfg)
        assert err.value.field == "federation.num_sites"


def test_an_unresolved_null_is_refused_where_the_data_is_not_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not count the sites") as err:
        validate(_by_field(tmp_path))
    assert err.value.field == "federation.num_sites"


def test_no_group_large_enough_is_an_error_naming_the_minimum(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        check_config(_by_field(tmp_path, data__min_records_per_site=1000))
    assert err.value.field == "data.min_records_per_site"
