"""Sequence classification with LoRA: labelled records, the head under DP-SGD, accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune.config import FedtuneConfig
from fedtune.data import DataError, load_federated_data, load_jsonl
from fedtune.errors import ConfigError
from fedtune.experiments.engine import run_inprocess
from fedtune.models import build_lora_model, load_base_model, lora_parameter_names, set_trainable
from fedtune.privacy.dpsgd import DPSGDParams, DPSGDTrainer
from fedtune.strategies import FFALoRA
from fedtune.tasks import get_task
from fedtune.validation import validate

from conftest import SHARED_DATA, tiny_config


def _classifier_config(run_dir: Path, **changes: object) -> FedtuneConfig:
    settings: dict[str, object] = {"model__task": "classification", "model__num_labels": 6,
                                   "data__format": "labelled", **changes}
    return tiny_config(run_dir, **settings)


def test_labelled_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"text": "great film", "label": "pos"}\n{"text": "dull", "label": "neg", "source": "a"}\n'
                    '{"text": "fine", "label": 1}\n')
    records = load_jsonl(path, fmt="labelled", group_field="source", label_names=["neg", "pos"])
    assert [(r.response, r.label, r.group) for r in records] == [("great film", 1, "1"), ("dull", 0, "a"),
                                                                 ("fine", 1, "1")]
    path.write_text('{"text": "great film", "label": "superb"}\n')
    with pytest.raises(DataError, match="neither a class index") as err:
        load_jsonl(path, fmt="labelled", label_names=["neg", "pos"])
    assert "superb" not in str(err.value)  # an error never quotes a record's content
    path.write_text('{"text": "no label"}\n')
    with pytest.raises(DataError, match='missing "label"'):
        load_jsonl(path, fmt="labelled")


def test_task_and_format_must_agree(tmp_path: Path) -> None:
    cfg = _classifier_config(tmp_path)
    validate(cfg)
    for field, value, match in [("format", "text", "data.format"), (None, None, "model.num_labels")]:
        bad = _classifier_config(tmp_path)
        if field:
            bad.data.format = value
        else:
            bad.model.num_labels = 2  # the demo corpus has six specialities
        with pytest.raises(ConfigError, match=match):
            validate(bad)
    lm = tiny_config(tmp_path, data__format="labelled")
    with pytest.raises(ConfigError, match="model.task=classification"):
        validate(lm)


def test_head_is_trained_averaged_and_clipped_per_record(tmp_path: Path) -> None:
    cfg = _classifier_config(tmp_path)
    model, tokenizer = build_lora_model(cfg.model)
    names = lora_parameter_names(model)
    head = [n for n in names if ".modules_to_save." in n]
    ffa = FFALoRA().trainable_names(model)
    assert head and all(n in ffa for n in head)
    assert not any(".lora_A." in n for n in ffa)
    set_trainable(model, names)
    data = load_federated_data(cfg.data, 1)
    task = get_task(cfg.model.task)
    examples = task.encode_all(data.site_records(0)[:4], tokenizer, cfg.data.max_length)
    assert all(e.label is not None and e.input_ids[-1] == tokenizer.eos_token_id for e in examples)
    params = DPSGDParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=1, learning_rate=0.01)
    with DPSGDTrainer(task, model, params, num_records=4, noise_seed=0) as trainer:
        grads = trainer.per_record_gradients(task.collate(examples, tokenizer.pad_token_id))
        assert set(grads) == set(names)
        assert grads[head[0]].shape[0] == 4 and float(grads[head[0]].abs().sum()) > 0
        # Record 0's gradient does not depend on its batch-mates.
        alone = trainer.per_record_gradients(task.collate(examples[:1], tokenizer.pad_token_id))
        assert torch.allclose(alone[head[0]][0], grads[head[0]][0], atol=1e-5)


def test_rt_polarity_federation_reports_accuracy(tmp_path: Path) -> None:
    pos, neg = SHARED_DATA / "rt-polarity.pos", SHARED_DATA / "rt-polarity.neg"
    if not (pos.is_file() and neg.is_file()):
        pytest.skip("../shared/data/rt-polarity.* not present")
    lines = []
    # Unequal classes, so that a constant prediction's accuracy differs from its complement's.
    for label, source, count in (("pos", pos, 70), ("neg", neg, 30)):
        text = source.read_text(encoding="utf-8", errors="replace").splitlines()[:count]
        lines += [json.dumps({"text": t, "label": label}) for t in text if t.strip()]
    data = tmp_path / "polarity.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = _classifier_config(tmp_path / "run", model__num_labels=2, data__path=str(data),
                             data__label_names=["neg", "pos"], federation__strategy="ffa",
                             data__partition="iid")
    summary = run_inprocess(cfg)
    assert summary.rounds_completed == 2
    run = Path(cfg.run_dir)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    saved = json.loads((run / "adapters" / "round_002" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "score" in saved["modules_to_save"]
    # The reported accuracy and loss are those of the saved adapter (head included, loaded by
    # peft itself onto the seeded base) on the held-out records, recomputed here one record at
    # a time, without the server's batching, padding or evaluator.
    from peft import PeftModel

    base, tokenizer = load_base_model(cfg.model)
    model = PeftModel.from_pretrained(base, str(run / "adapters" / "round_002")).eval()
    held_out = load_federated_data(cfg.data, cfg.federation.num_sites).eval_records()
    examples = get_task("classification").encode_all(held_out, tokenizer, cfg.data.max_length)
    labels = torch.tensor([e.label for e in examples])
    assert 0 < int(labels.sum()) != len(examples) / 2  # both classes, not balanced
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([e.input_ids])).logits.float() for e in examples])
    assert rows[-1]["round"] == 2
    assert rows[-1]["eval_accuracy"] == pytest.approx(float((logits.argmax(dim=-1) == labels).float().mean()))
    assert rows[-1]["eval_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-4)
