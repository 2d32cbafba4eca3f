"""Write a tiny Llama as a GGUF file with the ``gguf`` package, for fast tests of the GGUF path.

The file is laid out as llama.cpp's converter writes one (tensor names, the q/k row
permutation that transformers undoes on load, a byte-level BPE vocabulary in metadata),
with the MLP matrices quantised to Q8_0 so that loading really dequantises.
:func:`expected_state` is what a correct load must produce: the source weights, with the
quantised ones replaced by their dequantised values.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ t", "Ġt he"]
QUANTISED = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def vocabulary() -> list[str]:
    """256 byte-level symbols, the merged tokens, then the control tokens."""
    return list(bytes_to_unicode().values()) + ["he", "Ġt", "Ġthe"] + SPECIALS


def source_model(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(vocabulary()), hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norms, so a mix-up of norm tensors shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k (rotary halves interleaved per head)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = hf_name.split(".", 3)
    module = rest.rsplit(".", 1)[0]
    return f"blk.{index}.{LAYER_NAMES[module]}.weight"


def _write_metadata(writer: gguf.GGUFWriter) -> None:
    tokens = vocabulary()
    writer.add_name("fedtune tiny llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the tiny Llama of ``seed`` to ``path``; returns the state a correct load yields."""
    model = source_model(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer)
    expected: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        data = tensor.detach().numpy().astype(np.float32)
        expected[name] = tensor.detach().clone()
        if name.endswith("q_proj.weight"):
            data = _permute(data, HEADS)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, KV_HEADS)
        if any(part in name for part in QUANTISED):
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0))
        else:
            writer.add_tensor(gguf_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
