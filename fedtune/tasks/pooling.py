"""A sentence classifier that pools the way its encoder was trained to be read.

A sentence-embedding checkpoint (sentence-transformers: all-MiniLM, all-mpnet, e5, bge,
gte ...) is trained so that the *mean* of its token states (or its ``[CLS]`` state),
optionally L2-normalised, is the sentence's meaning; its folder says which in
``1_Pooling/config.json`` and ``modules.json``.  Hugging Face's
``AutoModelForSequenceClassification`` ignores that and puts its class's own head on top:
for BERT, the ``[CLS]`` state through a pooler layer the sentence training never shaped.
On all-MiniLM-L6-v2 and rt-polarity a linear probe reads 0.68 from that head's input and
0.78 from the mean: under DP-SGD, where the adapter barely moves the encoder, the head's
input is most of what a run can reach.  So a classifier over such an encoder is the
encoder (``AutoModel``), its own pooling, and a linear head that starts at zero.

The head is named ``classifier``, which peft's ``SEQ_CLS`` task type trains and saves as a
``modules_to_save`` copy, exactly as it does the head of a transformers class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

def sentence_pooling(path: Path) -> Optional[tuple[str, bool]]:
    """(mean|cls, normalise) from a sentence-transformers folder, or None when it is not one.

    Only the plain modes are taken: max or sqrt-length pooling, or a Dense projection
    after the pooling, would not be this model's trained embedding, so such a folder
    falls back to the class's own head (the user may still ask for mean or cls).
    """
    config_file = path / "1_Pooling" / "config.json"
    modules_file = path / "modules.json"
    if not config_file.is_file() or not modules_file.is_file():
        return None
    try:
        pooling = json.loads(config_file.read_text())
        modules = [m.get("type", "") for m in json.loads(modules_file.read_text())]
    except (OSError, ValueError, AttributeError):
        return None
    if any(t.endswith(".Dense") for t in modules):
        return None
    normalise = any(t.endswith(".Normalize") for t in modules)
    if pooling.get("pooling_mode_mean_tokens") and not pooling.get("pooling_mode_max_tokens"):
        return "mean", normalise
    if pooling.get("pooling_mode_cls_token") and not pooling.get("pooling_mode_mean_tokens"):
        return "cls", normalise
    return None


def resolve_pooling(requested: str, path: Path) -> tuple[str, bool]:
    """The pooling a classifier over the model at ``path`` uses, and whether it normalises."""
    found = sentence_pooling(path)
    if requested == "auto":
        return found if found is not None else ("head", False)
    if requested == "head":
        return "head", False
    # An explicit mode keeps the checkpoint's normalisation when it pools the same way.
    return requested, bool(found and found[0] == requested and found[1])


class PooledClassifier(torch.nn.Module):
    """Encoder, pooling of its token states, and a zero-initialised linear head.

    Zero, not random: a random head's first DP steps spend the budget undoing its random
    decision boundary, and with a zero head every class starts equally likely (the
    untrained adapter's loss is exactly log(num_labels)).
    """

    def __init__(self, body: PreTrainedModel, pooling: str, normalise: bool, num_labels: int) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, not {pooling!r}")
        self.body = body
        # peft and fedtune read the base's config (model_type for LoRA targets, pad id).
        self.config = body.config
        self.pooling = pooling
        self.normalise = normalise
        self.classifier = torch.nn.Linear(body.config.hidden_size, num_labels)
        torch.nn.init.zeros_(self.classifier.weight)
        torch.nn.init.zeros_(self.classifier.bias)

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, H] sentence vectors: mean over real tokens, or the first token's state."""
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        pooled = pooled.float()
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalise else pooled

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                **unused: Any) -> SequenceClassifierOutput:
        """Logits only; peft's wrapper passes transformers' keyword set, of which these two matter."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SequenceClassifierOutput(logits=self.classifier(self.pool(states, attention_mask)))
