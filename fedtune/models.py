"""Base models, tokenizers and LoRA adapters.

Every party (each site and the server) must hold bit-identical frozen base weights,
because only adapter deltas travel.  A local model directory guarantees that by
construction; the built-in tiny model guarantees it by being built from a fixed
config under a fixed seed (deterministic on CPU), so no weights are ever downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.config import LoraSettings, ModelConfig
from fedtune.errors import ConfigError
from fedtune.quantization import quantize_base
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


TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Written last into a converted GGUF folder: where its weights came from.
GGUF_SOURCE_FILE = "fedtune-gguf.json"


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


def default_gguf_cache() -> Path:
    """``$XDG_CACHE_HOME/fedtune/gguf``, i.e. ``~/.cache/fedtune/gguf`` by default."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedtune" / "gguf"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (GGUF files run to gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model_dir(cfg: ModelConfig) -> Optional[Path]:
    """The local Hugging Face folder that ``model.path`` (with ``model.gguf_file``) stands for.

    None for the built-in tiny model.  A GGUF checkpoint is converted once into a
    safetensors folder named by the file's SHA-256 under ``model.cache_dir`` and that
    folder is returned, so every task loads a GGUF model exactly as it loads any other
    local directory.  Keying by content (not by name or path) means a changed file is
    converted afresh and two copies of the same file share one conversion.
    """
    if cfg.path is None:
        return None
    if cfg.gguf_file is None:
        return Path(cfg.path)
    gguf = Path(cfg.path) / cfg.gguf_file
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else default_gguf_cache()
    return cached_gguf_dir(gguf, root)


def cached_gguf_dir(gguf: Path, cache_root: Path) -> Path:
    """``cache_root/<sha256>``, converting ``gguf`` into it first unless an earlier run did.

    Several processes may start at once (the sites of a simulation): an exclusive lock on
    ``<sha256>.lock`` lets one convert while the others wait and then reuse its folder.
    The conversion is written to a temporary folder and renamed into place, so a crash
    never leaves a half-written folder where a later run would take it for a finished one.
    """
    sha = file_sha256(gguf)
    target = cache_root / sha
    if (target / GGUF_SOURCE_FILE).is_file():
        log.info("GGUF %s: cache hit, reusing %s", gguf.name, target)
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with (cache_root / f"{sha}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / GGUF_SOURCE_FILE).is_file():
            log.info("GGUF %s: cache hit (another process wrote it), reusing %s", gguf.name, target)
            return target
        for stale in cache_root.glob(f".{sha}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a crashed conversion; we hold the lock
        started = time.perf_counter()
        scratch = cache_root / f".{sha}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            convert_gguf(gguf, scratch, sha)
            if target.exists():
                shutil.rmtree(target)  # a folder without its source file is an unfinished copy
            os.rename(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("GGUF %s: cache miss, dequantised to float32 into %s in %.1f s", gguf.name, target,
             time.perf_counter() - started)
    return target


def convert_gguf(gguf: Path, out: Path, sha: str) -> None:
    """Dequantise ``gguf`` through transformers and save it to ``out`` as a float32 safetensors folder.

    transformers refuses to save a model it loaded from GGUF (the model keeps the GGUF
    quantiser), so the weights move into a model rebuilt from the same config without
    ``quantization_config``.  The rebuild happens on the meta device and takes the loaded
    tensors as they are, so nothing is initialised at random and nothing is copied twice.
    The conversion is always float32: one cached copy serves every ``model.dtype``.
    """
    import transformers

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    rebuilt.tie_weights()
    out.mkdir(parents=True)
    rebuilt.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    source = {"gguf_file": gguf.name, "sha256": sha, "dtype": "float32",
              "transformers": transformers.__version__}
    (out / GGUF_SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def cast_base_weights(model: PreTrainedModel, dtype: str) -> None:
    """Store the frozen parameters in ``model.dtype``; buffers keep theirs.

    Parameters only: a float buffer such as Llama's rotary ``inv_freq`` is kept float32 by
    transformers itself (its forward upcasts it), and casting it would lose RoPE precision.
    Casting after a float32 load (rather than loading in the dtype) keeps the tasks' model
    loading one code path for every dtype; round-to-nearest is deterministic, so every
    party casts to the same bits.
    """
    target = TORCH_DTYPES[dtype]
    if target == torch.float32:
        return
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(target)


def load_base_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or build) the frozen base model and its tokenizer, on CPU, in ``model.dtype``.

    The model class is the task's (``model.task``); a head the task adds (a classifier's)
    is initialised under ``model.seed`` so that every party starts from the same head (it
    is trained and averaged with the adapter).  A GGUF checkpoint arrives here as its
    converted folder (:func:`resolve_model_dir`), so the tasks never see GGUF.
    """
    task = get_task(cfg.task)
    source = resolve_model_dir(cfg)
    tokenizer = build_tokenizer() if source is None else AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if source is None:
        model = build_tiny_model(task, cfg, vocab_size=len(tokenizer))
    else:
        with seeded(cfg.seed):
            model = task.pretrained_model(source, cfg, tokenizer)
    cast_base_weights(model, cfg.dtype)
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
        wrapped = get_peft_model(model, config, autocast_adapter_dtype=True)
    keep_trained_in_float32(wrapped)
    return wrapped


def _inputs_to_float32(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def keep_trained_in_float32(model: PeftModel) -> None:
    """Make every trained tensor float32 over a low-precision base (``model.dtype``).

    DP-SGD's noise and small updates added to bfloat16/float16 weights would mostly round
    away, and the wire format is float32.  peft already upcasts the LoRA tensors
    (``autocast_adapter_dtype``) and casts their input; a trained copy of a head
    (``modules_to_save``) is a plain copy of the base's low-precision module, so it is
    upcast here and given a pre-hook that casts its input to float32 (Opacus' hooks then
    see float32 activations, and so float32 per-record gradients).
    """
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad and p.dtype != torch.float32 for p in own):
            for param in own:
                param.data = param.data.float()
            module.register_forward_pre_hook(_inputs_to_float32)


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
    """The LoRA model a party trains or evaluates, with the fingerprint of its base in ``model.dtype``.

    The fingerprint is taken before ``model.quantization`` (fedtune.quantization), so that it
    names the checkpoint whichever memory form each party keeps it in.
    """
    model, tokenizer = load_base_model(cfg)
    fingerprint = base_fingerprint(model, tokenizer)
    if cfg.quantization is not None:
        quantize_base(model)
    lora = attach_lora(model, cfg.lora, seed=cfg.seed, task_type=get_task(cfg.task).peft_task_type)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lora)
    return FingerprintedModel(lora, tokenizer, fingerprint)


def _checkpointable_models(model: torch.nn.Module) -> list[PreTrainedModel]:
    """The outermost Hugging Face models inside ``model`` (the encoder under a PooledClassifier)."""
    found: list[PreTrainedModel] = []

    def visit(module: torch.nn.Module) -> None:
        if isinstance(module, PreTrainedModel):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model.get_base_model() if isinstance(model, PeftModel) else model)
    return found


def enable_gradient_checkpointing(model: PeftModel) -> None:
    """Checkpoint every layer in the *reentrant* mode, the one Opacus' hooks survive.

    Opacus records each LoRA layer's input in a forward hook and pops it in the backward
    hook.  transformers' default, non-reentrant checkpointing runs the layer's forward
    twice with gradients on (once in the forward pass, again when the backward pass
    recomputes it), so every hook fires twice: a stale input is left behind on every
    layer, and on the next batch Opacus sizes the per-record gradients from it or finds
    none (measured: ``grad_sample`` is None after one step).  The reentrant mode runs the
    first forward under ``no_grad``, when Opacus records nothing, so each layer's input is
    recorded exactly once, by the recomputation, just before its backward hook reads it;
    tests/test_gradient_checkpointing.py checks the per-record gradients equal those without it.
    (Reentrant checkpointing propagates gradients only through inputs that require them;
    transformers marks the frozen embeddings' output so for models that read ``input_ids``.)
    """
    targets = _checkpointable_models(model)
    unsupported = [type(m).__name__ for m in targets if not m.supports_gradient_checkpointing]
    if not targets or unsupported:
        raise ConfigError("model.gradient_checkpointing",
                          f"{', '.join(unsupported) or type(model).__name__} does not support gradient checkpointing",
                          "Set model.gradient_checkpointing=false for this model.")
    for target in targets:
        target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})


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
