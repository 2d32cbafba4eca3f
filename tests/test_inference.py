"""`fedtune evaluate` and `fedtune generate` on the adapters of real (tiny, in-process) runs.

Each run is a federation of the tiny model on the demo corpus (fedtune.experiments.engine's
in-process engine: the same ServerApp and ClientApp as a simulation, without Ray), so the
numbers the commands print can be checked against what the run's own server wrote.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from fedtune import inference
from fedtune.cli import main
from fedtune.data import Record, load_federated_data
from fedtune.experiments.engine import run_inprocess
from fedtune.models import build_tiny_model, build_tokenizer
from fedtune.tasks import get_task
from conftest import tiny_config

# One user turn and the assistant's opening, in the Jinja form Hugging Face tokenizers carry.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPT = "Cardiology clinic note. A 64 year old"


def _rows(run_dir: Path) -> dict[int, dict[str, Any]]:
    return {row["round"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _write_jsonl(path: Path, records: list[Record]) -> Path:
    """Records as the JSONL a user would hand over (text, source and, when labelled, the label)."""
    lines = [json.dumps({"text": r.response, "source": r.group, **({"label": r.label} if r.label is not None else {})})
             for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-round causal-LM federation; its held-out records are written out as held_out.jsonl."""
    cfg = tiny_config(tmp_path_factory.mktemp("lm") / "run")
    run_inprocess(cfg)
    _write_jsonl(Path(cfg.run_dir) / "held_out.jsonl",
                 load_federated_data(cfg.data, cfg.federation.num_sites).eval_records())
    return Path(cfg.run_dir)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-round classification federation (the demo notes' specialities)."""
    cfg = tiny_config(tmp_path_factory.mktemp("cls") / "run", federation__num_rounds=1)
    get_task("classification").configure(cfg)
    run_inprocess(cfg)
    return Path(cfg.run_dir)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local Hugging Face model directory (the tiny Llama under another seed) whose tokenizer has a chat template."""
    cfg = tiny_config(Path("unused"))
    cfg.model.seed = 1
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    directory = tmp_path_factory.mktemp("chat-model")
    build_tiny_model(get_task("causal_lm"), cfg.model, vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory, chat_model: Path) -> Path:
    """A one-round federation of the base model in ``chat_model`` (model.path)."""
    cfg = tiny_config(tmp_path_factory.mktemp("chat") / "run", federation__num_rounds=1)
    cfg.model.path = str(chat_model)
    run_inprocess(cfg)
    return Path(cfg.run_dir)


def _evaluate(args: list[str], out: Path) -> dict[str, Any]:
    main(["evaluate", *args, "--json", str(out)])
    return json.loads(out.read_text())


def test_evaluate_on_the_held_out_records_gives_the_runs_loss(lm_run: Path, tmp_path: Path, capsys) -> None:
    held_out = lm_run / "held_out.jsonl"
    report = _evaluate([str(lm_run / "adapters" / "round_002"), f"data.path={held_out}"], tmp_path / "m.json")
    round_two = _rows(lm_run)[2]
    assert report["metrics"]["loss"] == pytest.approx(round_two["eval_loss"], rel=1e-9)
    assert report["metrics"]["perplexity"] == pytest.approx(round_two["eval_perplexity"], rel=1e-9)
    assert report["round"] == 2 and report["records"] == 24 and str(held_out) in report["data"]
    assert report["baseline"] is None and "accuracy" not in report["metrics"]
    printed = capsys.readouterr().out
    assert "perplexity" in printed and f"{round_two['eval_loss']:.4f}" in printed
    # Without data.path: the run's own held-out split; checkpoint/ is the last round's adapter.
    default = _evaluate([str(lm_run / "checkpoint")], tmp_path / "d.json")
    assert default["metrics"]["loss"] == pytest.approx(round_two["eval_loss"], rel=1e-9)
    assert "held-out split" in default["data"] and default["round"] == 2


def test_baseline_is_the_runs_round_zero_evaluation(lm_run: Path, tmp_path: Path, capsys) -> None:
    report = _evaluate([str(lm_run / "adapters" / "round_001"), "--baseline"], tmp_path / "m.json")
    assert report["baseline"]["loss"] == pytest.approx(_summary(lm_run)["initial_eval_loss"], rel=1e-9)
    assert report["metrics"]["loss"] == pytest.approx(_rows(lm_run)[1]["eval_loss"], rel=1e-9)
    assert "round 0" in capsys.readouterr().out


def test_classification_evaluate_reports_accuracy(cls_run: Path, tmp_path: Path, capsys) -> None:
    records = load_federated_data(inference.locate(cls_run / "checkpoint").cfg.data, 3).eval_records()
    held_out = _write_jsonl(tmp_path / "held_out.jsonl", records)
    report = _evaluate([str(cls_run / "adapters" / "round_001"), f"data.path={held_out}", "--baseline"],
                       tmp_path / "m.json")
    row = _rows(cls_run)[1]
    assert report["task"] == "classification"
    assert report["metrics"]["accuracy"] == pytest.approx(row["eval_accuracy"])
    assert report["metrics"]["loss"] == pytest.approx(row["eval_loss"], rel=1e-6)
    # The untrained head is the one every party built under model.seed: the run's round 0.
    assert report["baseline"]["loss"] == pytest.approx(_summary(cls_run)["initial_eval_loss"], rel=1e-6)
    assert "accuracy" in capsys.readouterr().out


def test_generate_is_deterministic_when_greedy(lm_run: Path, capsys) -> None:
    adapter = str(lm_run / "adapters" / "round_002")
    outputs = []
    for _ in range(2):
        main(["generate", adapter, "--prompt", PROMPT, "--max-new-tokens", "12"])
        outputs.append(capsys.readouterr())
    assert outputs[0].out == outputs[1].out and outputs[0].out.endswith("\n")
    assert "chat template" not in outputs[0].err
    loaded = inference.load_adapter_model(adapter)
    greedy = inference.generate(loaded, PROMPT, max_new_tokens=12)
    assert greedy.text + "\n" == outputs[0].out and 1 <= len(greedy.token_ids) <= 12 and greedy.seed is None
    sampled = [inference.generate(loaded, PROMPT, max_new_tokens=12, temperature=1.0, seed=5) for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].seed == 5 and isinstance(sampled[0].text, str)


def test_generate_wraps_the_prompt_in_the_chat_template(chat_run: Path, chat_model: Path, capsys) -> None:
    main(["generate", str(chat_run / "adapters" / "round_001"), "--prompt", "hello", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert "chat template" in captured.err and captured.out.endswith("\n")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    ids, templated = inference.prompt_ids(tokenizer, "hello")
    assert templated and tokenizer.decode(ids) == "<user>hello\n<assistant>"


def test_evaluate_warns_when_model_path_is_another_base_model(lm_run: Path, chat_model: Path, tmp_path: Path,
                                                              caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="fedtune.inference"):
        _evaluate([str(lm_run / "adapters" / "round_002"), f"model.path={chat_model}"], tmp_path / "m.json")
    assert "fingerprint" in caplog.text and "not the run's base model" in caplog.text


def _copied_adapter(lm_run: Path, tmp_path: Path) -> list[str]:
    """An adapter folder copied out of its run: no config.yaml above it."""
    copy = tmp_path / "loose" / "round_002"
    shutil.copytree(lm_run / "adapters" / "round_002", copy)
    return ["evaluate", str(copy)]


USER_ERRORS: dict[str, tuple[Callable[[Path, Path, Path], list[str]], list[str]]] = {
    "not a folder": (lambda lm, cls, tmp: ["evaluate", str(tmp / "nowhere")], ["ADAPTER", "not a folder"]),
    "not an adapter": (lambda lm, cls, tmp: ["evaluate", str(lm)], ["ADAPTER", "adapters/round_NNN"]),
    "no run config": (lambda lm, cls, tmp: _copied_adapter(lm, tmp), ["ADAPTER", "config.yaml", "--config"]),
    "missing data": (lambda lm, cls, tmp: ["evaluate", str(lm / "checkpoint"), f"data.path={tmp / 'none.jsonl'}"],
                     ["data.path", "not a file"]),
    "missing base model": (lambda lm, cls, tmp: ["evaluate", str(lm / "checkpoint"), f"model.path={tmp}"],
                           ["model.path", "model.path=DIR"]),
    "unknown setting": (lambda lm, cls, tmp: ["evaluate", str(lm / "checkpoint"), "data.max_lenth=8"],
                        ["data.max_lenth"]),
    "classifier asked to generate": (lambda lm, cls, tmp: ["generate", str(cls / "checkpoint"), "--prompt", "hi"],
                                     ["ADAPTER", "classification", "fedtune evaluate"]),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_exit_2_naming_the_argument_and_the_fix(case: str, lm_run: Path, cls_run: Path, tmp_path: Path,
                                                             capsys) -> None:
    build_argv, expected = USER_ERRORS[case]
    with pytest.raises(SystemExit) as exit_info:
        main(build_argv(lm_run, cls_run, tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_fedtune_command_evaluates_an_adapter(lm_run: Path) -> None:
    fedtune = Path(sys.executable).parent / "fedtune"
    done = subprocess.run([str(fedtune), "evaluate", str(lm_run / "adapters" / "round_002"),
                           f"data.path={lm_run / 'held_out.jsonl'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"loss {_rows(lm_run)[2]['eval_loss']:.4f}" in done.stdout
