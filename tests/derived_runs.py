"""Trained tiny adapters for the merge, export and distillation tests, built once per test session.

Each speciality run is a real (tiny, in-process) federation of the demo notes of one
speciality on a local Hugging Face copy of the tiny Llama (``model.path``), so its
adapter config names a base model a process without fedtune can load.  Privacy is kept
on but loose (ε 200), because these tests are about what happens to adapters that learnt
something; 2 sites x 2 rounds x 15 steps take a few seconds.  Runs are cached under the
session's base temporary folder, so test files that share a run build it once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import ByT5Tokenizer

from fedtune.data.demo import demo_corpus
from fedtune.experiments.engine import run_inprocess
from fedtune.models import build_tiny_model, build_tokenizer
from fedtune.tasks import get_task
from conftest import tiny_config

SPECIALITIES = ("cardiology", "dermatology")


def _root(factory: pytest.TempPathFactory) -> Path:
    root = factory.getbasetemp() / "derived-runs"
    root.mkdir(exist_ok=True)
    return root


def _write_notes(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps({"text": r.response, "source": r.group}) + "\n" for r in records),
                    encoding="utf-8")
    return path


def base_model_dir(factory: pytest.TempPathFactory, seed: int = 0, name: str = "base", extra_ids: int = 0,
                   **tiny: int) -> Path:
    """The tiny causal Llama (``model.seed``, ``model.tiny.*`` as the tests' config) saved as an HF folder.

    ``extra_ids`` > 0 gives it another vocabulary (the byte tokenizer with sentinel tokens).
    """
    directory = _root(factory) / name
    if not (directory / "config.json").is_file():
        cfg = tiny_config(Path("unused"))
        cfg.model.seed = seed
        for key, value in tiny.items():
            setattr(cfg.model.tiny, key, value)
        tokenizer = ByT5Tokenizer(extra_ids=extra_ids) if extra_ids else build_tokenizer()
        build_tiny_model(get_task("causal_lm"), cfg.model, vocab_size=len(tokenizer)).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def public_notes(factory: pytest.TempPathFactory, speciality: str, count: int = 1000) -> Path:
    """At most ``count`` notes of ``speciality`` from a third seed: the distillation tests' public data."""
    path = _root(factory) / f"public_{speciality}_{count}.jsonl"
    if not path.is_file():
        _write_notes(path, [r for r in demo_corpus(480, seed=11) if r.group == speciality][:count])
    return path


def held_out(factory: pytest.TempPathFactory, speciality: str) -> Path:
    """40 notes of ``speciality`` no run trains on (another seed of the demo generator)."""
    path = _root(factory) / f"held_out_{speciality}.jsonl"
    if not path.is_file():
        _write_notes(path, [r for r in demo_corpus(240, seed=7) if r.group == speciality])
    return path


def speciality_run(factory: pytest.TempPathFactory, speciality: str, **changes: Any) -> Path:
    """A finished federation on the notes of one speciality; ``changes`` as tiny_config's (section__field)."""
    suffix = hashlib.sha256(repr(sorted(changes.items())).encode()).hexdigest()[:10] if changes else "default"
    run_dir = _root(factory) / f"run-{speciality}-{suffix}"
    if (run_dir / "summary.json").is_file():
        return run_dir
    data = _write_notes(_root(factory) / f"train_{speciality}.jsonl",
                        [r for r in demo_corpus(480, seed=3) if r.group == speciality])
    settings: dict[str, Any] = dict(data__path=str(data), train__local_steps=15, privacy__noise_multiplier=0.6,
                                    privacy__target_epsilon=200.0, privacy__sample_rate=0.5,
                                    federation__num_sites=2, model__path=str(base_model_dir(factory)))
    settings.update(changes)
    cfg = tiny_config(run_dir, **settings)
    run_inprocess(cfg)
    return run_dir


def adapter(run_dir: Path, round_number: int = 2) -> Path:
    return run_dir / "adapters" / f"round_{round_number:03d}"
