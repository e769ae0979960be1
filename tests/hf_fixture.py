"""Rebuild a real HF-format checkpoint from the embedded SmolLM2-135M GGUF.

Dequantized weights -> safetensors (the Q/K permutation undone), config.json,
tokenizer.json (BPE vocab, merges, SmolLM pre-tokenizer, special tokens) and
tokenizer_config.json (chat template). This is the inverse of `kvq convert`, written
independently from llama.cpp's conventions so that the round trip is a real check.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HF_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp Q/K row order -> HF rotary-halves order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_hf_checkpoint(gguf_path: Path, out: Path, dtype=np.float16) -> Path:
    """Write the HF checkpoint dir `out` from a llama GGUF; returns `out`."""
    import gguf
    from safetensors.numpy import save_file

    r = gguf.GGUFReader(gguf_path)
    get = lambda k: r.fields[k].contents()  # noqa: E731
    n_head, n_head_kv = get("llama.attention.head_count"), get("llama.attention.head_count_kv")
    n_layer = get("llama.block_count")
    tensors = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        arr = arr.reshape([int(x) for x in reversed(t.shape)]) if arr.ndim > 1 else arr.reshape(-1)
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, i, rest = t.name.split(".", 2)
            name = f"model.layers.{i}.{HF_NAMES[rest]}"
            if rest == "attn_q.weight":
                arr = unpermute(arr, n_head)
            elif rest == "attn_k.weight":
                arr = unpermute(arr, n_head_kv)
        tensors[name] = np.ascontiguousarray(arr.astype(dtype))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "hidden_size": get("llama.embedding_length"), "intermediate_size": get("llama.feed_forward_length"),
        "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_head_kv,
        "max_position_embeddings": get("llama.context_length"),
        "rms_norm_eps": float(get("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("llama.rope.freq_base")), "tie_word_embeddings": "lm_head.weight" not in tensors,
    }
    _write_config_and_tokenizer(r, out, config)
    return out


def build_tiny_checkpoint(gguf_path: Path, out: Path, *, n_layer: int = 3, n_head: int = 4, n_head_kv: int = 2,
                          head_dim: int = 64, n_ff: int = 512, seed: int = 0, n_embd: int | None = None) -> Path:
    """A tiny random llama checkpoint (GQA, head_dim 64) with the real model's tokenizer: fast runtime tests.

    Weights are random, with Q/K scaled so that attention is far from uniform (scores of a few units):
    the KV cache and its kernels see varied attention, not the flat one of an untrained model.
    `n_embd` (default n_head * head_dim) other than that writes config.json's head_dim, as models with
    wide attention over a narrow residual stream do."""
    import gguf
    from safetensors.numpy import save_file

    r = gguf.GGUFReader(gguf_path)
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].contents())
    n_q = n_head * head_dim
    n_embd = n_embd or n_q
    rng = np.random.default_rng(seed)

    def w(rows, cols, std):
        return (rng.standard_normal((rows, cols)) * std).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(n_vocab, n_embd, 0.1), "model.norm.weight": np.ones(n_embd, np.float16)}
    for i in range(n_layer):
        pre = f"model.layers.{i}."
        tensors.update({
            pre + "input_layernorm.weight": np.ones(n_embd, np.float16),
            pre + "post_attention_layernorm.weight": np.ones(n_embd, np.float16),
            pre + "self_attn.q_proj.weight": w(n_q, n_embd, 0.25 / np.sqrt(n_embd) * 8),
            pre + "self_attn.k_proj.weight": w(n_head_kv * head_dim, n_embd, 0.25 / np.sqrt(n_embd) * 8),
            pre + "self_attn.v_proj.weight": w(n_head_kv * head_dim, n_embd, 1 / np.sqrt(n_embd)),
            pre + "self_attn.o_proj.weight": w(n_embd, n_q, 0.5 / np.sqrt(n_q)),
            pre + "mlp.gate_proj.weight": w(n_ff, n_embd, 1 / np.sqrt(n_embd)),
            pre + "mlp.up_proj.weight": w(n_ff, n_embd, 1 / np.sqrt(n_embd)),
            pre + "mlp.down_proj.weight": w(n_embd, n_ff, 0.5 / np.sqrt(n_ff)),
        })
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"hidden_size": n_embd, "intermediate_size": n_ff, "num_hidden_layers": n_layer,
              "num_attention_heads": n_head, "num_key_value_heads": n_head_kv, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
              **({"head_dim": head_dim} if n_q != n_embd else {})}
    _write_config_and_tokenizer(r, out, config)
    return out


def _write_config_and_tokenizer(r, out: Path, dims: dict) -> None:
    """config.json (llama, with `dims`), tokenizer.json and tokenizer_config.json of the GGUF's tokenizer."""
    get = lambda k: r.fields[k].contents()  # noqa: E731
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    bos, eos = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
    unk, pad = get("tokenizer.ggml.unknown_token_id"), get("tokenizer.ggml.padding_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", **dims, "rope_scaling": None,
        "vocab_size": len(tokens), "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "torch_dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == 3]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": SMOLLM_PRE_TOKENIZER, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty != 3},
                  "merges": list(get("tokenizer.ggml.merges"))},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": tokens[bos], "eos_token": tokens[eos],
        "unk_token": tokens[unk], "pad_token": tokens[pad], "model_max_length": config["max_position_embeddings"],
        "chat_template": get("tokenizer.chat_template"), "tokenizer_class": "GPT2Tokenizer",
    }, indent=2))
