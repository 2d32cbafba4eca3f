"""Where the server evaluates: data.eval_path, the pooled split of a simulation, or nowhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune import reporting
from fedtune.apps import make_client_app
from fedtune.config import FedtuneConfig
from fedtune.data import load_federated_data
from fedtune.federation.evaluator import held_out_records
from fedtune.federation.server import run_server

from conftest import InProcessGrid


def _held_out_file(cfg: FedtuneConfig, path: Path, count: int) -> Path:
    records = load_federated_data(cfg.data, cfg.federation.num_sites).eval_records()[:count]
    path.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in records))
    return path


def _rows(cfg: FedtuneConfig) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_deployment_without_an_eval_file_does_not_evaluate(tiny_cfg: FedtuneConfig, capsys) -> None:
    tiny_cfg.federation.num_rounds = 1
    grid = InProcessGrid(make_client_app(tiny_cfg), 3)
    summary = run_server(grid, tiny_cfg, Path(tiny_cfg.run_dir), show_progress=True, pooled_data=False)
    row = _rows(tiny_cfg)[0]
    assert summary.rounds_completed == 1 and row["participants"] == ["site-00", "site-01", "site-02"]
    assert not {"eval_loss", "eval_perplexity", "eval_accuracy"} & set(row) and row["eval_seconds"] == 0.0
    done = json.loads((Path(tiny_cfg.run_dir) / "summary.json").read_text())
    assert done["initial_eval_loss"] is None and done["final_eval_loss"] is None
    assert (Path(tiny_cfg.run_dir) / "rounds.png").is_file()
    assert reporting.table_row(row).split()[4:6] == ["-", "-"]  # the printed table shows no held-out loss
    assert "-" in capsys.readouterr().out


def test_a_deployment_evaluates_on_its_eval_file(tiny_cfg: FedtuneConfig, tmp_path: Path) -> None:
    tiny_cfg.federation.num_rounds = 1
    tiny_cfg.data.eval_path = str(_held_out_file(tiny_cfg, tmp_path / "held_out.jsonl", 7))
    assert len(held_out_records(tiny_cfg, pooled_data=False) or []) == 7
    run_server(InProcessGrid(make_client_app(tiny_cfg), 3), tiny_cfg, Path(tiny_cfg.run_dir), show_progress=False,
               pooled_data=False)
    row = _rows(tiny_cfg)[0]
    assert row["eval_loss"] > 0 and row["eval_perplexity"] > 1
    assert json.loads((Path(tiny_cfg.run_dir) / "summary.json").read_text())["initial_eval_loss"] > 0


def test_a_simulation_evaluates_on_the_pooled_split_unless_given_a_file(tiny_cfg: FedtuneConfig,
                                                                         tmp_path: Path) -> None:
    split = load_federated_data(tiny_cfg.data, tiny_cfg.federation.num_sites).eval_records()
    assert held_out_records(tiny_cfg, pooled_data=True) == split
    tiny_cfg.data.eval_path = str(_held_out_file(tiny_cfg, tmp_path / "held_out.jsonl", 5))
    given = held_out_records(tiny_cfg, pooled_data=True)
    assert given is not None and len(given) == 5 and len(split) != 5


def test_the_demo_deployment_names_its_eval_file_in_server_yaml(tmp_path: Path) -> None:
    from fedtune.deploy.federation import init_federation, load_federation, write_demo_data
    from fedtune.deploy.operator import load_server_config

    paths = init_federation(tmp_path / "fed", demo_sites=["a", "b", "c"])
    _, fed = load_federation(paths.root)
    write_demo_data(paths, fed, demo_records=200)
    cfg = load_server_config(paths, fed, None, [])
    assert cfg.data.eval_path == str(paths.operator_dir / "eval.jsonl")
    assert len(held_out_records(cfg, pooled_data=False) or []) == 20  # the demo corpus' 10% split
    write_demo_data(paths, fed, demo_records=200)  # again: server.yaml now has a data section, left as it is
    assert paths.server_config.read_text().count("eval_path") == 1


def test_an_eval_path_that_is_not_a_file_is_a_config_error(tiny_cfg: FedtuneConfig, tmp_path: Path) -> None:
    from fedtune.errors import ConfigError
    from fedtune.validation import validate

    tiny_cfg.data.eval_path = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="data.eval_path"):
        validate(tiny_cfg)
