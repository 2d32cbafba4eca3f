"""QLoRA: the frozen base's linear layers stored as 4-bit NF4 (bitsandbytes), LoRA in float32.

Every use of bitsandbytes is in this module.  The base is quantised *after* it has been
loaded and fingerprinted in ``model.dtype`` (:func:`fedtune.models.build_fingerprinted_model`),
so the fingerprint names the checkpoint, not a site's memory choice: a site that trains on
a 4-bit copy, a server that evaluates in bfloat16 and an auditor who merges in float32 all
agree they hold the same base, and the adapter a 4-bit site trains is applied to the
full-precision weights at export and merge, as QLoRA adapters usually are (Dettmers et al.
2023).  The cost is that site's quantisation error, which is stated, not hidden: a site's
forward pass differs from the full-precision one by NF4 rounding (tests bound it).

Why not ``from_pretrained(quantization_config=BitsAndBytesConfig(...))``: transformers
quantises while loading, so the full-precision weights are never seen and could not be
fingerprinted; and the built-in tiny model and the sentence-encoder wrapper are not loaded
through ``from_pretrained`` at all.  Quantising the loaded modules here works for all three.

bitsandbytes from 0.46 quantises and computes NF4 on CPU as well as CUDA, so the 4-bit
path runs (and is tested) on CPU; on CPU it saves memory, not time (each forward pass
dequantises every layer).  A quantised layer keeps its weights' device: the model is moved
with ``model.to(device)`` afterwards, which bitsandbytes supports for quantised weights.
"""

from __future__ import annotations

import logging

import torch

from fedtune.config import check_quantization_available
from fedtune.errors import ConfigError

log = logging.getLogger(__name__)

# Heads and anything a task trains stay full precision (QLoRA keeps the output layer too).
KEEP_FULL_PRECISION = frozenset({"lm_head", "score", "classifier"})


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the dequantised weights are multiplied in: the base's own (model.dtype)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _to_4bit(layer: torch.nn.Linear, compute_dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    quantised = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    # Params4bit quantises on its first move to a real device: here, the layer's own.
    quantised.weight = bnb.nn.Params4bit(layer.weight.data.contiguous(), requires_grad=False, quant_type="nf4")
    if layer.bias is not None:
        quantised.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
    return quantised.to(layer.weight.device)


def quantize_base(model: torch.nn.Module) -> int:
    """Replace every frozen ``nn.Linear`` of ``model`` (not a head) by an NF4 ``Linear4bit``; returns how many.

    Call before LoRA is attached: peft then wraps each quantised layer in its bitsandbytes
    LoRA layer, whose lora_A/lora_B are plain float32 ``nn.Linear`` modules, so Opacus'
    per-record hooks see exactly what they see over a float base.
    """
    check_quantization_available()
    compute_dtype = _compute_dtype(model)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name not in KEEP_FULL_PRECISION:
                if child.weight.requires_grad:
                    raise ValueError(f"{name} is trained; quantise the frozen base before LoRA is attached")
                setattr(parent, name, _to_4bit(child, compute_dtype))
                replaced += 1
    if replaced == 0:
        raise ConfigError("model.quantization", f"{type(model).__name__} has no linear layers to quantise",
                          "Set model.quantization=null for this model.")
    log.info("QLoRA: %d linear layers of the base stored in 4-bit NF4 (compute in %s)", replaced,
             str(compute_dtype).removeprefix("torch."))
    return replaced


def base_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the frozen parameters (quantised ones count their packed storage)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
