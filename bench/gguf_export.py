"""Write a Qwen2-shaped Hugging Face folder (float32 safetensors) as a GGUF file for
llama.cpp: tensors under llama.cpp's names, ``qwen2`` metadata, the byte-level BPE
vocabulary and merges of its ``tokenizer.json``.

Only what ``bench/vs_llamacpp.py`` needs: Qwen2 architecture, float32, default RoPE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Hugging Face tensor name (after "model.layers.N.") -> llama.cpp's (after "blk.N.")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(name: str) -> str:
    """llama.cpp's name for a Hugging Face Qwen2 tensor; ValueError for any other."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    raise ValueError(f"no llama.cpp name for tensor {name!r}")


def export_qwen2(folder: Path, target: Path) -> Path:
    """Write ``folder``'s Qwen2 model to ``target`` (a .gguf file) and return it."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures") != ["Qwen2ForCausalLM"]:
        raise ValueError(
            f"{folder}: expected a Qwen2ForCausalLM, got {config.get('architectures')}"
        )
    writer = gguf.GGUFWriter(str(target), "qwen2")
    _write_metadata(writer, gguf, config)
    _write_vocabulary(writer, gguf, folder, config["vocab_size"])
    tensors = load_file(str(folder / "model.safetensors"))
    for name in sorted(tensors):
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(tensors[name], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _write_metadata(writer, gguf, config: dict) -> None:
    rope = config.get("rope_parameters") or {}
    writer.add_name("prefixcache-qwen2-random")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _write_vocabulary(writer, gguf, folder: Path, vocab_size: int) -> None:
    """Tokens by id, their types, and the BPE merges, as llama.cpp's "gpt2" tokenizer."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    tokens = dict(spec["model"]["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        tokens[added["content"]] = added["id"]
        special.add(added["id"])
    by_id = {i: t for t, i in tokens.items()}
    if sorted(by_id) != list(range(vocab_size)):
        raise ValueError(f"{folder}: token ids are not exactly 0..{vocab_size - 1}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([by_id[i] for i in range(vocab_size)])
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    writer.add_token_types([control if i in special else normal for i in range(vocab_size)])
    writer.add_token_merges(merges)
