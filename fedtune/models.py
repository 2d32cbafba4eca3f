"""Base models, tokenizers and LoRA adapters.

Every party (each site and the server) must hold bit-identical frozen base weights,
because only adapter deltas travel.  A local model directory guarantees that by
construction; the built-in tiny model guarantees it by being built from a fixed
config under a fixed seed (deterministic on CPU), so no weights are ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    ByT5Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.config import LoraSettings, ModelConfig, TinyModelConfig

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


TINY_HEAD_STD = 0.3


def build_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer that needs no vocabulary file (UTF-8 bytes + 3 specials)."""
    return ByT5Tokenizer(extra_ids=0)


def build_tiny_model(tiny: TinyModelConfig, vocab_size: int, seed: int, num_labels: Optional[int] = None
                     ) -> PreTrainedModel:
    """The built-in tiny Llama: a causal LM, or (``num_labels``) a sequence classifier."""
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
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if num_labels is not None:
            config.num_labels = num_labels
            # The classifier reads the last non-padding token; the body matches the LM's.
            return LlamaForSequenceClassification(config)
        model = LlamaForCausalLM(config)
        # A random frozen head with the usual std of 0.02 caps every logit near ±1.3,
        # so no adapter could make the model confident (loss floor ~4.5 nats/byte).
        # A wider head gives LoRA the range that a pretrained head would.
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, TINY_HEAD_STD)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def is_classifier(cfg: ModelConfig) -> bool:
    return cfg.task == "classification"


def load_base_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or build) the frozen base model and its tokenizer, on CPU, in float32.

    For ``model.task=classification`` the model carries a new classification head of
    ``model.num_labels`` outputs, initialised under ``model.seed`` so that every party
    starts from the same head (it is trained and averaged with the adapter).
    """
    num_labels = cfg.num_labels if is_classifier(cfg) else None
    if cfg.path is None:
        tokenizer = build_tokenizer()
        model = build_tiny_model(cfg.tiny, vocab_size=len(tokenizer), seed=cfg.seed, num_labels=num_labels)
    else:
        path = Path(cfg.path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        # safetensors weights are memory-mapped by from_pretrained; float32 because
        # DP noise added to low-precision gradients is rounded away.
        if num_labels is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(cfg.seed)
            try:
                model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                                           num_labels=num_labels)
            finally:
                torch.random.set_rng_state(generator_state)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if num_labels is not None and getattr(model.config, "pad_token_id", None) is None:
        # The classifier finds each record's last real token through the padding id.
        model.config.pad_token_id = tokenizer.pad_token_id
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
    raise ValueError(
        f"config error in 'model.lora.target_modules': no default for model family '{family}'. "
        "List the projection modules to adapt, e.g. model.lora.target_modules=[q_proj,v_proj]."
    )


def attach_lora(model: PreTrainedModel, lora: LoraSettings, seed: int = 0, task_type: str = "CAUSAL_LM"
                ) -> PeftModel:
    """Wrap the base model with LoRA; the adapter's initial A is a function of ``seed``.

    The seed matters for FFA-LoRA, where A stays at this shared initialisation forever.
    With ``task_type="SEQ_CLS"`` peft also makes the classification head (``score`` or
    ``classifier``) a trained, saved module next to the LoRA tensors.
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
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed + 1)
    try:
        peft_model = get_peft_model(model, config)
    finally:
        torch.random.set_rng_state(generator_state)
    return peft_model


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
    task_type = "SEQ_CLS" if is_classifier(cfg) else "CAUSAL_LM"
    return FingerprintedModel(attach_lora(model, cfg.lora, seed=cfg.seed, task_type=task_type), tokenizer, fingerprint)


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
