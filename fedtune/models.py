"""Base models, tokenizers and LoRA adapters.

Every party (each site and the server) must hold bit-identical frozen base weights,
because only adapter deltas travel.  A local model directory guarantees that by
construction; the built-in tiny model guarantees it by being built from a fixed
config under a fixed seed (deterministic on CPU), so no weights are ever downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoTokenizer, ByT5Tokenizer, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedtune.config import LoraSettings, ModelConfig
from fedtune.errors import ConfigError
from fedtune.tasks import Task, get_task

log = logging.getLogger(__name__)

# Attention and MLP projections: adapting all of them beats q/v only at the same
# rank (LoRA paper §7.1, QLoRA), and none are embeddings, which Opacus cannot clip
# per sample under LoRA.  Families not listed fall back to peft's own mapping.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
}


def build_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer that needs no vocabulary file (UTF-8 bytes + 3 specials)."""
    return ByT5Tokenizer(extra_ids=0)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under torch seed ``seed``, leaving the caller's generator state as it was.

    Every newly initialised tensor (the tiny model, a classification head, LoRA's A) must be
    the same at every party, and building a model must not shift anyone else's draws.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(generator_state)


def build_tiny_model(task: Task[Any, Any], cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    """The built-in tiny Llama (shape ``cfg.tiny``), in the model class of ``task``, under ``cfg.seed``."""
    tiny = cfg.tiny
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    with seeded(cfg.seed):
        return task.tiny_model(config, cfg)


def load_base_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or build) the frozen base model and its tokenizer, on CPU, in float32.

    The model class is the task's (``model.task``); a head the task adds (a classifier's)
    is initialised under ``model.seed`` so that every party starts from the same head (it
    is trained and averaged with the adapter).
    """
    task = get_task(cfg.task)
    tokenizer = build_tokenizer() if cfg.path is None else AutoTokenizer.from_pretrained(Path(cfg.path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.path is None:
        model = build_tiny_model(task, cfg, vocab_size=len(tokenizer))
    else:
        with seeded(cfg.seed):
            model = task.pretrained_model(Path(cfg.path), cfg, tokenizer)
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer


def target_modules_for(model: PreTrainedModel, lora: LoraSettings) -> list[str]:
    if lora.target_modules is not None:
        return list(lora.target_modules)
    family = getattr(model.config, "model_type", "")
    if family in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[family]
    if family in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[family])
    raise ConfigError("model.lora.target_modules", f"no default for model family '{family}'",
                      "List the projection modules to adapt, e.g. model.lora.target_modules=[q_proj,v_proj].")


def attach_lora(model: PreTrainedModel, lora: LoraSettings, seed: int, task_type: str) -> PeftModel:
    """Wrap the base model with LoRA; the adapter's initial A is a function of ``seed``.

    The seed matters for FFA-LoRA, where A stays at this shared initialisation forever.
    ``task_type`` is the task's (``Task.peft_task_type``): with ``"SEQ_CLS"`` peft also makes
    the classification head (``score`` or ``classifier``) a trained, saved module next to
    the LoRA tensors.
    """
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules_for(model, lora),
        use_dora=False,
        bias="none",
        task_type=task_type,
    )
    with seeded(seed + 1):
        return get_peft_model(model, config)


def build_lora_model(cfg: ModelConfig) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    built = build_fingerprinted_model(cfg)
    return built.model, built.tokenizer


@dataclass
class FingerprintedModel:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    # base_fingerprint of the frozen weights and tokenizer, taken before LoRA was attached.
    fingerprint: str


def build_fingerprinted_model(cfg: ModelConfig) -> FingerprintedModel:
    model, tokenizer = load_base_model(cfg)
    fingerprint = base_fingerprint(model, tokenizer)
    lora = attach_lora(model, cfg.lora, seed=cfg.seed, task_type=get_task(cfg.task).peft_task_type)
    return FingerprintedModel(lora, tokenizer, fingerprint)


def base_fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 over every frozen tensor (name, dtype, shape, bytes, in name order) and the vocabulary.

    Only adapter deltas travel, so a site whose base weights differ from the server's
    (another checkpoint, a corrupted or tampered copy, another tokenizer) would train an
    adapter that means something else.  Hashing the loaded state rather than the files
    makes the tiny built-in model, a safetensors directory and a GGUF file comparable.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(data.dtype), list(data.shape)]).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    vocab = sorted(tokenizer.get_vocab().items())
    digest.update(json.dumps([type(tokenizer).__name__, vocab, tokenizer.all_special_tokens]).encode())
    return digest.hexdigest()


_SITE_MODELS: dict[str, FingerprintedModel] = {}


def site_model(cfg: ModelConfig) -> FingerprintedModel:
    """The site's LoRA model for ``cfg``, built once per process and reused round after round.

    Safe to reuse because a site loads the *whole* global adapter (every LoRA and head
    tensor, checked by exact key set) into it before each round, which overwrites whatever
    the previous round trained; the frozen base weights never change.  One entry: a site
    trains one model at a time, and a real base model is hundreds of MB.
    """
    key = repr(cfg)
    if key not in _SITE_MODELS:
        _SITE_MODELS.clear()
        _SITE_MODELS[key] = build_fingerprinted_model(cfg)
    return _SITE_MODELS[key]


def lora_parameter_names(model: PeftModel) -> list[str]:
    """Names (as in ``named_parameters``) of the adapter's tensors, in a fixed order.

    The LoRA tensors, plus the trained copy of a classification head (peft's
    ``modules_to_save``), which travels and is averaged like them.  Which of them a site
    trains is the aggregation rule's choice (``fedtune.strategies``).
    """
    return [n for n, _ in model.named_parameters()
            if ".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n]


def set_trainable(model: PeftModel, names: list[str]) -> None:
    """Train exactly ``names``; FFA-LoRA uses this to freeze every lora_A."""
    wanted = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
