"""A classifier over a sentence encoder reads the encoder's own pooling (fedtune.tasks.pooling).

The encoders are tiny BERTs saved offline into sentence-transformers-shaped folders, so
the folder parsing, the model a task builds from it, and the pooled head's gradients are
all exercised without a download.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from fedtune.config import FedtuneConfig, LoraSettings
from fedtune.data.records import Record
from fedtune.errors import ConfigError
from fedtune.models import attach_lora, lora_parameter_names
from fedtune.privacy.dpsgd import DPSGDParams, DPSGDTrainer
from fedtune.tasks import get_task
from fedtune.tasks.pooling import PooledClassifier, resolve_pooling, sentence_pooling
from fedtune.validation import validate
from tests.test_encoders import WORDS, bert_tokenizer

CLASSIFY = get_task("classification")
ST = "sentence_transformers.models."


def sentence_folder(path: Path, mode: str = "mean", modules: tuple[str, ...] = ("Transformer", "Pooling",
                                                                                 "Normalize")) -> Path:
    """A tiny BERT saved as a sentence-transformers model that pools by ``mode``."""
    path.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    bert_tokenizer(path).save_pretrained(path)
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 16, "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": mode == "max"}))
    (path / "modules.json").write_text(json.dumps([{"idx": i, "type": ST + t} for i, t in enumerate(modules)]))
    return path


def test_the_folder_says_how_to_pool(tmp_path) -> None:
    assert sentence_pooling(sentence_folder(tmp_path / "mean")) == ("mean", True)
    assert sentence_pooling(sentence_folder(tmp_path / "cls", "cls", ("Transformer", "Pooling"))) == ("cls", False)
    # Pooling this module cannot reproduce, or no such folder: the class's own head.
    assert sentence_pooling(sentence_folder(tmp_path / "max", "max")) is None
    assert sentence_pooling(sentence_folder(tmp_path / "dense", "mean", ("Transformer", "Pooling", "Dense"))) is None
    assert sentence_pooling(tmp_path / "nothing") is None
    broken = sentence_folder(tmp_path / "broken")
    (broken / "modules.json").write_text("{not json")
    assert sentence_pooling(broken) is None
    assert resolve_pooling("auto", tmp_path / "nothing") == ("head", False)
    assert resolve_pooling("head", tmp_path / "mean") == ("head", False)
    assert resolve_pooling("cls", tmp_path / "mean") == ("cls", False)
    assert resolve_pooling("mean", tmp_path / "nothing") == ("mean", False)


def build(cfg_path: Path, pooling: str = "auto") -> torch.nn.Module:
    cfg = FedtuneConfig()
    cfg.model.task, cfg.model.num_labels, cfg.model.pooling = "classification", 3, pooling
    return CLASSIFY.pretrained_model(cfg_path, cfg.model, bert_tokenizer(cfg_path))


def test_a_sentence_encoder_gets_its_pooling_and_a_zero_head(tmp_path) -> None:
    folder = sentence_folder(tmp_path / "enc")
    pooled = build(folder)
    assert isinstance(pooled, PooledClassifier) and (pooled.pooling, pooled.normalise) == ("mean", True)
    assert "body.pooler.dense.weight" not in pooled.state_dict()
    assert torch.count_nonzero(pooled.classifier.weight) == 0
    # The class's own head when the user asks for it.
    assert isinstance(build(folder, "head"), BertForSequenceClassification)
    # A plain checkpoint keeps its class under auto.
    (folder / "modules.json").unlink()
    assert isinstance(build(folder), BertForSequenceClassification)


def encode(tok, texts: list[str]):
    examples = [CLASSIFY.encode(Record("", t, label=i % 3), tok, max_length=16) for i, t in enumerate(texts)]
    return CLASSIFY.collate(examples, tok.pad_token_id)


def test_mean_pooling_ignores_padding(tmp_path) -> None:
    folder = sentence_folder(tmp_path / "enc")
    model = build(folder)
    torch.nn.init.normal_(model.classifier.weight)
    tok = bert_tokenizer(folder)
    alone = encode(tok, ["great film"])
    padded = encode(tok, ["great film", "a very long and boring story fine plot"])
    with torch.no_grad():
        one = model(input_ids=alone.input_ids, attention_mask=alone.attention_mask).logits[0]
        two = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits[0]
    assert torch.allclose(one, two, atol=1e-5)
    vectors = model.pool(torch.randn(2, 5, 16), torch.ones(2, 5))
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2))


def test_the_pooled_head_trains_with_the_adapter_under_dp(tmp_path) -> None:
    folder = sentence_folder(tmp_path / "enc")
    lora = attach_lora(build(folder), LoraSettings(rank=2, alpha=4.0), seed=0, task_type=CLASSIFY.peft_task_type)
    names = lora_parameter_names(lora)
    assert any(".classifier.modules_to_save." in n for n in names) and any(".lora_B." in n for n in names)
    batch = encode(bert_tokenizer(folder), ["great film", "a dull plot", "very boring"])
    with DPSGDTrainer(CLASSIFY, lora, DPSGDParams(0.0, 1.0, 0.5, 1, 1.0, "sgd"), num_records=3) as trainer:
        grads = trainer.per_record_gradients(batch)
    head = [g for n, g in grads.items() if "classifier" in n and n.endswith("weight")][0]
    # A zero head still gets a gradient from the (non-zero) sentence vectors, one per record.
    assert head.shape[0] == 3 and torch.all(head.flatten(1).norm(dim=1) > 0)


def test_an_unknown_pooling_is_refused_by_name() -> None:
    cfg = FedtuneConfig()
    cfg.model.pooling = "max"
    with pytest.raises(ConfigError, match="model.pooling"):
        validate(cfg)


def _one_step(folder: Path, head_lr: float) -> dict[str, torch.Tensor]:
    """The change one noiseless, unclipped SGD step makes to every trained tensor."""
    from fedtune.privacy.dpsgd import train_locally

    torch.manual_seed(0)
    lora = attach_lora(build(folder), LoraSettings(rank=2, alpha=4.0), seed=0, task_type=CLASSIFY.peft_task_type)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                param.normal_(0, 0.1)  # every tensor gets a gradient
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    tok = bert_tokenizer(folder)
    examples = [CLASSIFY.encode(Record("", t, label=i % 3), tok, 16) for i, t in enumerate(["great film", "dull"])]
    params = DPSGDParams(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=1.0, steps=1, learning_rate=0.1,
                         optimizer="sgd", head_learning_rate=head_lr)
    train_locally(CLASSIFY, lora, examples, params, tok.pad_token_id, seed=0, noise_seed=0)
    return {n: p.detach() - before[n] for n, p in lora.named_parameters() if p.requires_grad}


def test_the_head_steps_with_its_own_learning_rate(tmp_path) -> None:
    folder = sentence_folder(tmp_path / "enc")
    same, tenfold = _one_step(folder, head_lr=0.1), _one_step(folder, head_lr=1.0)
    for name in same:
        ratio = 10.0 if ".modules_to_save." in name else 1.0
        assert same[name].abs().max() > 0, name
        torch.testing.assert_close(tenfold[name], ratio * same[name], rtol=1e-4, atol=1e-7)
