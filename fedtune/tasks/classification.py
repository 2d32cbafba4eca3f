"""Sequence classification: labelled texts, a new classification head trained with the adapter.

The head is initialised under ``model.seed`` so that every party starts from the same
one; peft (task_type ``SEQ_CLS``) trains and saves it next to the LoRA tensors, so it is
clipped, noised, sent and averaged like them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.config import DataConfig, FedtuneConfig, ModelConfig
from fedtune.data.demo import demo_classification_corpus, speciality_names
from fedtune.data.encoding import Batch, Example, collate
from fedtune.data.records import DataError, Record, RecordSchema, record_group
from fedtune.errors import require
from fedtune.evaluate import EvalResult, eval_batches, perplexity_of
from fedtune.tasks import Task, TrainingDefaults
from fedtune.tasks.pooling import PooledClassifier, resolve_pooling


@dataclass(frozen=True)
class LabelledExample(Example):
    label: int


@dataclass
class LabelledBatch(Batch):
    # [B] class indices.
    labels: torch.Tensor


def _label_from_json(obj: dict[str, Any], schema: RecordSchema, where: str) -> int:
    label_field = schema.label_field
    raw = obj.get(label_field)
    names = list(schema.label_names) if schema.label_names is not None else None
    if isinstance(raw, bool) or raw is None:
        raise DataError(f'{where}: missing "{label_field}" field. Labelled records look like '
                        f'{{"text": "...", "{label_field}": 1}} (set data.label_field if yours is named otherwise).')
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and names is not None and raw in names:
        return names.index(raw)
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw)
    # The label's value is not quoted: an error must never carry a record's content.
    raise DataError(f'{where}: the "{label_field}" value is neither a class index nor one of data.label_names. '
                    'Use integers 0..num_labels-1, or list the names in data.label_names.')


def class_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """[B, num_labels] logits of a sequence classifier (pooled at each record's last real token)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()


class Classification(Task[LabelledExample, LabelledBatch]):
    """A class per record; held-out loss is the mean cross-entropy per record, with accuracy."""

    name = "classification"
    record_formats = ("labelled",)
    peft_task_type = "SEQ_CLS"
    # Plain SGD with two step sizes (measured on all-MiniLM-L6-v2 / rt-polarity at ε = 8, README
    # "Defaults that learn"): the zero head over unit-norm sentence vectors learns at 1 (0.5 to 2
    # were within noise of it, 8 and above let the noise win); the adapter's noisy steps perturb
    # the features every later layer reads, so it moves 20 times slower.  Adam would scale every
    # noisy coordinate to ≈ lr whatever its signal: with a fresh Adam per round, a random walk.
    training_defaults = TrainingDefaults(optimizer="sgd", learning_rate=0.05, head_learning_rate=1.0)

    def check_config(self, model: ModelConfig, data: DataConfig) -> None:
        require(data.format in self.record_formats, "data.format", f"'{data.format}' records carry no class labels",
                "Set data.format=labelled for model.task=classification "
                '(records like {"text": "...", "label": 1}).')
        require(model.num_labels >= 2, "model.num_labels", f"{model.num_labels} < 2",
                "Use the number of classes, e.g. 2.")
        if data.path is None:
            classes = len(speciality_names())
            require(model.num_labels == classes, "model.num_labels",
                    f"the demo corpus has {classes} classes (specialities), not {model.num_labels}",
                    f"Set model.num_labels={classes}, or give a labelled JSONL in data.path.")
        if data.label_names is not None:
            require(len(data.label_names) == model.num_labels, "data.label_names",
                    f"{len(data.label_names)} names for model.num_labels={model.num_labels}",
                    "List one name per class, in class-index order.")

    def configure(self, cfg: FedtuneConfig) -> None:
        """On the demo corpus the classes are its specialities; a JSONL file sets model.num_labels."""
        super().configure(cfg)
        if cfg.data.path is None:
            cfg.model.num_labels = len(speciality_names())

    def parse_record(self, obj: dict[str, Any], schema: RecordSchema, where: str) -> Record:
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f'{where}: missing or empty "text" field. Labelled records look like '
                            f'{{"text": "...", "{schema.label_field}": 1}}.')
        label = _label_from_json(obj, schema, where)
        group = record_group(obj, schema)
        # Without a group label, the Dirichlet partitioner skews sites by class.
        return Record(prompt="", response=text, group=group if group is not None else str(label), label=label)

    def demo_records(self, data: DataConfig) -> list[Record]:
        return demo_classification_corpus(data.demo_records, seed=data.seed)

    def site_data_problem(self, records: Sequence[Record], model: ModelConfig,
                          declared_classes: Optional[int]) -> Optional[str]:
        if declared_classes is not None and declared_classes != model.num_labels:
            return f"the run has {model.num_labels} classes, this site's data {declared_classes}"
        if declared_classes is None and any(r.label is None or not 0 <= r.label < model.num_labels for r in records):
            return "a record's label is outside model.num_labels"
        return None

    def canary_fields(self, count: int, model: ModelConfig, data: DataConfig, seed: int) -> list[dict[str, Any]]:
        """Random classes: a canary the model can only fit by memorising it."""
        labels = np.random.default_rng([seed, 3]).integers(0, model.num_labels, size=count)
        return [{data.label_field: int(label)} for label in labels]

    def pretrained_model(self, path: Path, model: ModelConfig, tokenizer: PreTrainedTokenizerBase
                         ) -> PreTrainedModel:
        pooling, normalise = resolve_pooling(model.pooling, path)
        if pooling != "head":
            body = AutoModel.from_pretrained(path, dtype=torch.float32)
            if getattr(body, "pooler", None) is not None:
                body.pooler = None  # BERT-style encoders skip a None pooler; its output would go unread
            return PooledClassifier(body, pooling, normalise, model.num_labels)
        loaded = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                                    num_labels=model.num_labels)
        if getattr(loaded.config, "pad_token_id", None) is None:
            # The classifier finds each record's last real token through the padding id.
            loaded.config.pad_token_id = tokenizer.pad_token_id
        return loaded

    def tiny_model(self, config: LlamaConfig, model: ModelConfig) -> PreTrainedModel:
        # The classifier reads the last non-padding token; the body matches the LM's.
        config.num_labels = model.num_labels
        return LlamaForSequenceClassification(config)

    def encode(self, record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int) -> LabelledExample:
        """The text with the tokenizer's own special tokens, cut to fit.

        Each family pools where its pretraining put the summary: BERT-style encoders at
        ``[CLS]`` (first) with ``[SEP]`` closing the text, Llama-style decoders at the last
        real token.  ``tokenizer(text)`` inserts exactly the tokens of that scheme; adding
        BOS/EOS by hand left BERT's ``[CLS]`` out, so its head pooled a word token.
        """
        if record.label is None:
            raise ValueError("a classification record needs a label")
        ids = tokenizer(record.response, truncation=True, max_length=max_length)["input_ids"]
        return LabelledExample(tuple(ids), tuple([0] * len(ids)), label=int(record.label))

    def collate(self, examples: Sequence[LabelledExample], pad_id: int) -> LabelledBatch:
        padded = collate(examples, pad_id)
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        return LabelledBatch(padded.input_ids, padded.attention_mask, padded.target_mask, labels)

    def per_record_loss(self, model: torch.nn.Module, batch: LabelledBatch) -> torch.Tensor:
        """The cross-entropy of each record's class."""
        return torch.nn.functional.cross_entropy(class_logits(model, batch), batch.labels, reduction="none")

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: Sequence[LabelledExample], pad_id: int,
                 batch_size: int) -> EvalResult:
        """Mean cross-entropy per record, exp of it, and the share of records classified right."""
        total, correct = 0.0, 0
        for batch in eval_batches(model, examples, self.collate, pad_id, batch_size):
            logits = class_logits(model, batch)
            total += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == batch.labels).sum())
        n = max(len(examples), 1)
        loss = total / n
        return EvalResult(loss=loss, perplexity=perplexity_of(loss), tokens=sum(len(e.input_ids) for e in examples),
                          accuracy=correct / n)
