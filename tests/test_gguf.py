"""model.gguf_file: a GGUF checkpoint is dequantised once into a cached safetensors folder.

These tests write a tiny Llama as a real GGUF file (``gguf`` package, see gguf_files.py),
so transformers' own GGUF reader and dequantiser run, in well under a second.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from gguf_files import write_tiny_gguf  # noqa: E402

from fedtune import models  # noqa: E402
from fedtune.config import FedtuneConfig, ModelConfig, validate_model  # noqa: E402
from fedtune.errors import ConfigError  # noqa: E402
from fedtune.models import GGUF_SOURCE_FILE, base_fingerprint, file_sha256, load_base_model  # noqa: E402

NAME = "tiny.Q8_0.gguf"


@pytest.fixture
def gguf_dir(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    expected = write_tiny_gguf(folder / NAME)
    return folder, expected


def gguf_config(folder: Path, cache: Path, **changes: object) -> ModelConfig:
    cfg = ModelConfig(path=str(folder), gguf_file=NAME, cache_dir=str(cache))
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


def test_gguf_is_dequantised_into_a_cached_safetensors_folder(gguf_dir, tmp_path: Path, caplog) -> None:
    folder, expected = gguf_dir
    caplog.set_level(logging.INFO, logger="fedtune.models")
    model, tokenizer = load_base_model(gguf_config(folder, tmp_path / "cache"))
    state = model.state_dict()
    for name, tensor in expected.items():  # q/k un-permuted, Q8_0 matrices dequantised, all float32
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name
    sha = file_sha256(folder / NAME)
    cached = tmp_path / "cache" / sha
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert json.loads((cached / GGUF_SOURCE_FILE).read_text())["sha256"] == sha
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert any("cache miss" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "cache").glob(".*.tmp-*"))


def test_second_load_reuses_the_cache_without_converting(gguf_dir, tmp_path: Path, caplog, monkeypatch) -> None:
    folder, _ = gguf_dir
    cfg = gguf_config(folder, tmp_path / "cache")
    first = base_fingerprint(*load_base_model(cfg))

    def no_conversion(*args: object) -> None:
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="fedtune.models")
    assert base_fingerprint(*load_base_model(cfg)) == first
    messages = [r.getMessage() for r in caplog.records]
    assert any("cache hit" in m for m in messages) and not any("cache miss" in m for m in messages)


def test_every_party_converts_to_the_same_fingerprint(gguf_dir, tmp_path: Path) -> None:
    """Sites compare base fingerprints each round: independent conversions must agree bit for bit."""
    folder, _ = gguf_dir
    a = base_fingerprint(*load_base_model(gguf_config(folder, tmp_path / "site-a")))
    b = base_fingerprint(*load_base_model(gguf_config(folder, tmp_path / "site-b")))
    assert a == b
    bf16 = base_fingerprint(*load_base_model(gguf_config(folder, tmp_path / "site-a", dtype="bfloat16")))
    assert bf16 != a  # the dtype is part of what every party must hold


def test_a_different_gguf_file_is_converted_afresh(gguf_dir, tmp_path: Path) -> None:
    folder, _ = gguf_dir
    cache = tmp_path / "cache"
    first = base_fingerprint(*load_base_model(gguf_config(folder, cache)))
    write_tiny_gguf(folder / NAME, seed=1)  # same name, new content: new SHA-256, new folder
    assert base_fingerprint(*load_base_model(gguf_config(folder, cache))) != first
    assert len([p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2


def test_a_failed_conversion_leaves_nothing_that_looks_cached(gguf_dir, tmp_path: Path, monkeypatch) -> None:
    folder, _ = gguf_dir
    cache = tmp_path / "cache"
    sha = file_sha256(folder / NAME)
    cache.mkdir()
    (cache / f".{sha}.tmp-1-dead").mkdir()  # left by a process killed mid-conversion
    real = models.convert_gguf

    def crash(gguf: Path, out: Path, digest: str) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(models, "convert_gguf", crash)
    with pytest.raises(OSError, match="disk full"):
        load_base_model(gguf_config(folder, cache))
    assert sorted(p.name for p in cache.iterdir()) == [f"{sha}.lock"]
    monkeypatch.setattr(models, "convert_gguf", real)
    load_base_model(gguf_config(folder, cache))
    assert (cache / sha / GGUF_SOURCE_FILE).is_file()


def test_concurrent_loads_convert_once(gguf_dir, tmp_path: Path, monkeypatch) -> None:
    """The sites of a simulation start together: one converts, the others wait and reuse its folder."""
    folder, _ = gguf_dir
    calls: list[Path] = []
    real = models.convert_gguf

    def counted(gguf: Path, out: Path, sha: str) -> None:
        calls.append(out)
        real(gguf, out, sha)

    monkeypatch.setattr(models, "convert_gguf", counted)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(models.cached_gguf_dir(folder / NAME, tmp_path / "c")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_classification_head_over_a_gguf_base(gguf_dir, tmp_path: Path) -> None:
    """The converted folder is a plain Llama folder, so every task's model class loads it."""
    folder, expected = gguf_dir
    model, _ = load_base_model(gguf_config(folder, tmp_path / "cache", task="classification", num_labels=3))
    assert model.score.weight.shape == (3, expected["model.norm.weight"].shape[0])
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])


def test_gguf_settings_are_validated(gguf_dir, tmp_path: Path) -> None:
    folder, _ = gguf_dir
    validate_model(gguf_config(folder, tmp_path / "cache"))  # no config.json needed beside a GGUF file
    bad = {
        "no path": ModelConfig(gguf_file=NAME),
        "not a plain name": gguf_config(folder, tmp_path, gguf_file=f"../{folder.name}/{NAME}"),
        "missing": gguf_config(folder, tmp_path, gguf_file="absent.gguf"),
    }
    for label, cfg in bad.items():
        with pytest.raises(ConfigError, match="model.gguf_file"):
            validate_model(cfg)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="model.cache_dir"):
        validate_model(gguf_config(folder, tmp_path / "a-file"))


def test_default_cache_follows_xdg(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.default_gguf_cache() == tmp_path / "fedtune" / "gguf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.default_gguf_cache() == Path.home() / ".cache" / "fedtune" / "gguf"


def test_run_config_names_the_gguf_fields() -> None:
    cfg = FedtuneConfig()
    assert cfg.model.gguf_file is None and cfg.model.cache_dir is None and cfg.model.dtype == "float32"


def test_the_gguf_config_group_composes_and_validates(gguf_dir, tmp_path: Path) -> None:
    """``fedtune simulate model=gguf model.path=DIR model.gguf_file=NAME`` yields a valid typed config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedtune.config import register_configs

    folder, _ = gguf_dir
    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        composed = compose("config", overrides=["model=gguf", f"model.path={folder}", f"model.gguf_file={NAME}",
                                                 f"model.cache_dir={tmp_path / 'cache'}", "model.dtype=bfloat16"])
    cfg = OmegaConf.to_object(composed)
    assert isinstance(cfg, FedtuneConfig) and cfg.model.gguf_file == NAME and cfg.model.dtype == "bfloat16"
    validate_model(cfg.model)
