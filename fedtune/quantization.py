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
dequantises every layer).  Where bitsandbytes falls short: its native AVX512 NF4
dequantise kernel (0.50.2) returns wrong weights on some CPUs (measured on an AMD EPYC
with AVX512: errors up to 0.87 of a block's absmax, where NF4 rounding allows 0.15), so a
model "trained in 4 bits" there trained on a corrupted base.  Every quantised layer is
therefore checked against its float weights (:func:`check_layer`); when the CPU kernel
fails the check, fedtune routes CPU dequantisation to bitsandbytes' own generic torch
implementation (:func:`_use_generic_cpu_dequantize`, the one use of its internals) and
checks again, and stops with an error if the weights are still wrong.

A quantised layer keeps its weights' device: the model is moved
with ``model.to(device)`` afterwards, which bitsandbytes supports for quantised weights.
"""

from __future__ import annotations

import logging
import warnings

import torch

from fedtune.config import check_quantization_available
from fedtune.errors import ConfigError

log = logging.getLogger(__name__)

# Heads and anything a task trains stay full precision (QLoRA keeps the output layer too).
KEEP_FULL_PRECISION = frozenset({"lm_head", "score", "classifier"})
# NF4's widest gap between two levels is 0.304 of the block's absmax (from -1 to -0.696):
# rounding to the nearest moves a weight by at most half of it.  bitsandbytes' decision
# thresholds are not exact midpoints (0.154 measured), hence the margin; a broken kernel
# is off by far more (0.45 to 0.87 measured).
MAX_NF4_ERROR = 0.17


def nf4_error(layer: torch.nn.Module, original: torch.Tensor) -> float:
    """The largest |dequantised − float| weight, as a fraction of its block's absmax."""
    import bitsandbytes as bnb

    state = layer.weight.quant_state
    weights = bnb.functional.dequantize_4bit(layer.weight.data, state).float()
    blocks = original.float().reshape(-1, state.blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return float(((weights.reshape(-1, state.blocksize) - blocks).abs() / absmax).max())


def _use_generic_cpu_dequantize() -> None:
    """Route bitsandbytes' CPU NF4/FP4 dequantisation to its generic torch implementation.

    Uses two private names of bitsandbytes (the generic kernel and its code table); the
    kernel is registered for the CPU only, so CUDA keeps bitsandbytes' own.
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def dequantize(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: list[int],
                   dtype: torch.dtype) -> torch.Tensor:
        packed = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        return _dequantize_4bit_compute(packed.reshape(-1), absmax, _get_4bit_code(quant_type, packed.device),
                                        blocksize, shape, dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that a registered kernel is overridden: that is the point
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize)


def check_layer(name: str, layer: torch.nn.Module, original: torch.Tensor) -> None:
    """Stop unless ``layer``'s 4-bit weights are NF4 roundings of ``original`` (see the module's docstring)."""
    error = nf4_error(layer, original)
    if error <= MAX_NF4_ERROR:
        return
    if original.device.type == "cpu":
        log.warning("bitsandbytes' CPU 4-bit kernel gave wrong weights for %s (error %.2f of a block's absmax; "
                    "NF4 allows about %.2f): using its generic implementation instead", name, error, MAX_NF4_ERROR)
        _use_generic_cpu_dequantize()
        error = nf4_error(layer, original)
        if error <= MAX_NF4_ERROR:
            return
    raise ConfigError("model.quantization", f"bitsandbytes' 4-bit weights of {name} are off by {error:.2f} of their "
                      f"block's absmax (NF4 rounding allows about {MAX_NF4_ERROR}) on this {original.device.type}, so "
                      "training would use a corrupted base", "Set model.quantization=null, or use another "
                      "bitsandbytes version or device.")


def check_backend(device: str = "cpu") -> None:
    """Quantise one random layer on ``device`` and check it: a broken kernel stops a run before any work."""
    check_quantization_available()
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 128, generator=generator) * 0.02)
    layer.weight.requires_grad_(False)
    layer = layer.to(device)
    check_layer("a test layer", _to_4bit(layer, torch.float32), layer.weight.data)


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
                quantised = _to_4bit(child, compute_dtype)
                check_layer(name, quantised, child.weight.data)
                setattr(parent, name, quantised)
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
