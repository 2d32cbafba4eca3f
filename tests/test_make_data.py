"""simulations/make_data.py: the README's real-model data recipes, rebuilt from the raw corpora."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from conftest import SHARED_DATA

from fedtune.data import load_jsonl

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "make_data.py"

PLAY = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak.

First Citizen:
You are all resolved rather to die than to famish?

MENENIUS:
What work's, my countrymen, in hand? where go you
With bats and clubs? The matter? speak, I pray you.

a stage direction without a speaker line that is long enough to be a speech

ROMEO:
But soft, what light through yonder window breaks? It is the east.
"""


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_data", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speeches_keep_named_blocks_of_enough_text_with_their_speaker(tmp_path: Path) -> None:
    (tmp_path / "tinyshakespeare.txt").write_text(PLAY, encoding="utf-8")
    records = _script().speech_records(tmp_path, count=3, min_chars=40)
    assert [r["speaker"] for r in records] == ["First Citizen", "First Citizen", "MENENIUS"]
    assert records[2]["text"].startswith("MENENIUS:\nWhat work's")
    assert all(len(r["text"]) >= 40 for r in records)  # "All:\nSpeak." is left out


def test_polarity_is_balanced_shuffled_and_the_same_every_time(tmp_path: Path) -> None:
    for label in ("pos", "neg"):
        lines = [f"{label} sentence {i}\n" for i in range(10)] + ["\n"]
        (tmp_path / f"rt-polarity.{label}").write_text("".join(lines), encoding="latin-1")
    make_data = _script()
    first = make_data.polarity_records(tmp_path, per_label=4, seed=0)
    assert Counter(r["label"] for r in first) == {"pos": 4, "neg": 4}
    assert {r["text"] for r in first} == {f"{lab} sentence {i}" for lab in ("pos", "neg") for i in range(4)}
    assert first == make_data.polarity_records(tmp_path, per_label=4, seed=0)
    assert first != make_data.polarity_records(tmp_path, per_label=4, seed=1)


def test_the_written_file_is_what_fedtune_reads_grouped_by_speaker(tmp_path: Path) -> None:
    (tmp_path / "tinyshakespeare.txt").write_text(PLAY, encoding="utf-8")
    out = tmp_path / "speeches.jsonl"
    make_data = _script()
    make_data.main(["speeches", str(tmp_path), str(out), "--min-chars", "40"])
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    records = load_jsonl(out, group_field="speaker")
    assert [r.group for r in records] == [row["speaker"] for row in rows] == ["First Citizen"] * 2 + ["MENENIUS", "ROMEO"]
    assert [r.response for r in records] == [row["text"] for row in rows]


def test_the_shared_corpora_give_the_readme_sizes(shared_data: Path) -> None:
    make_data = _script()
    speeches = make_data.speech_records(shared_data)
    assert len(speeches) == 400 and len({r["speaker"] for r in speeches}) == 32
    assert len(make_data.polarity_records(shared_data)) == 4000


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "tinyshakespeare.txt").is_file() or not (SHARED_DATA / "rt-polarity.pos").is_file():
        pytest.skip(f"{SHARED_DATA} lacks the corpora")
    return SHARED_DATA
