"""Preflight: refuse, in one InvalidGGUF line, a GGUF that llama.cpp would crash on.

llama.cpp's GGUF parser rejects damaged headers by itself, and its loader throws (a clean error)
on most inconsistent files; but some values reach a GGML_ASSERT or an unchecked kernel and abort
the process, found by scripts/fuzz_gguf.py. Every model kvq opens is checked here first, from the
header alone (gguf.header, milliseconds): tensor data inside the file, aligned and of a weight type;
hyperparameters of the right type and range; a vocabulary without repeated tokens.
`model_problems` lists what is wrong (kvq inspect shows it); `preflight` raises on the first.
"""
from __future__ import annotations

import os
from typing import Any

from kvq_cli.errors import InvalidGGUF
from kvq_cli.gguf.header import ARRAY, STRING, GGUFHeader, read_header

TENSOR_ALIGNMENT = 32   # ggml maps tensor data in place: every tensor must start 32-byte aligned
MAX_LAYERS = 512        # llama.cpp's LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024      # LLAMA_MAX_EXPERTS
INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}   # GGUF integer value types
# ggml types a model's weights cannot have: the CPU backend has no dot product for them (integer and
# f64 tensors, the activation-only Q8_1 and Q8_K) and aborts mid-decode
NOT_WEIGHT_TYPES = {9: "Q8_1", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}
KVQ_TYPES = {42: (64, 18), 43: (64, 18)}   # the runtime's Q2_0 and KVQ2 (gguf-py does not know them): block, bytes
F32 = 0
TRUNCATED = "ends past the end of the file (truncated)"
EPSILON_KEYS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")
BYTE_FALLBACK = ("llama", "t5", "plamo2")   # tokenizers (SPM, UGM, PLaMo-2) that spell unknown text in byte tokens
ROPE_SCALING = ("none", "linear", "yarn", "longrope")
# (key suffix, required, lowest, highest, per-layer array allowed): llama.cpp's generic hparams; it
# asserts 1 <= block_count <= 512 and expert counts within 1024, the rest keeps sizes sane
HPARAMS = (("block_count", True, 1, MAX_LAYERS, False), ("context_length", True, 0, 1 << 24, False),
           ("embedding_length", True, 1, 1 << 20, False), ("feed_forward_length", False, 0, 1 << 22, True),
           ("attention.head_count", False, 0, 1 << 14, True), ("attention.head_count_kv", False, 0, 1 << 14, True),
           ("attention.key_length", False, 0, 1 << 16, False), ("attention.value_length", False, 0, 1 << 16, False),
           ("rope.dimension_count", False, 0, 1 << 16, False), ("expert_count", False, 0, MAX_EXPERTS, False),
           ("expert_used_count", False, 0, MAX_EXPERTS, True), ("expert_group_count", False, 0, MAX_EXPERTS, False),
           ("expert_group_used_count", False, 0, MAX_EXPERTS, False))


def preflight(path: str | os.PathLike) -> GGUFHeader:
    """The header of a GGUF that is safe to hand to llama.cpp; InvalidGGUF naming the first problem otherwise."""
    head = read_header(path)
    problems = model_problems(head)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' * (len(problems) > 2)})" if len(problems) > 1 else ""
        raise InvalidGGUF(f"{head.path} cannot be loaded: {problems[0]}{more}",
                          hint="`kvq inspect` lists every problem")
    return head


def model_problems(head: GGUFHeader) -> list[str]:
    """Everything in the header that would make llama.cpp fail uncleanly (empty: safe to load)."""
    return tensor_problems(head) + hparam_problems(head) + vocab_problems(head)


def tensor_problems(head: GGUFHeader) -> list[str]:
    """Tensor types, shapes and data placement (in the file, in order, aligned, no name twice)."""
    import gguf

    out, seen, expect = [], set(), 0
    for t in head.tensors:
        if t.name in seen:
            out.append(f"tensor {t.name} appears twice")
        seen.add(t.name)
        if t.type in NOT_WEIGHT_TYPES:
            out.append(f"tensor {t.name} has type {NOT_WEIGHT_TYPES[t.type]}, which is not a weight type")
        try:
            block, size = KVQ_TYPES.get(t.type) or gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.type)]
        except (ValueError, KeyError):
            out.append(f"tensor {t.name} has unknown ggml type {t.type}")
            continue
        if len(t.ne) == 1 and t.type != F32:   # ggml multiplies/adds them into f32 activations, f32 only
            out.append(f"tensor {t.name} is a vector (a norm or bias) of type {type_name(t.type)}, not F32")
        if any(d < 0 for d in t.ne) or (t.ne and t.ne[0] % block):
            out.append(f"tensor {t.name} has shape {list(t.ne)}, invalid for its type (blocks of {block})")
            continue
        n = 1
        for d in t.ne:
            n *= d
        nbytes = n // block * size
        start = head.data_offset + t.offset
        if t.offset != expect:
            out.append(f"tensor {t.name} starts at data offset {t.offset}, expected {expect}")
        elif start + nbytes > head.file_size:
            out.append(f"tensor {t.name} {TRUNCATED}")
        elif start % TENSOR_ALIGNMENT:
            out.append(f"tensor {t.name}'s data is not {TENSOR_ALIGNMENT}-byte aligned "
                       f"(general.alignment {head.alignment})")
        expect = t.offset + nbytes + (-nbytes % head.alignment)
    return out


def type_name(t: int) -> str:
    """A ggml type id's name (Q4_0, F16, ...; the runtime's own Q2_0 and KVQ2 included)."""
    import gguf

    if t in KVQ_TYPES:
        return {42: "Q2_0", 43: "KVQ2"}[t]
    try:
        return gguf.GGMLQuantizationType(t).name
    except ValueError:
        return f"type {t}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def hparam_problems(head: GGUFHeader) -> list[str]:
    """Hyperparameters llama.cpp asserts on (types, ranges), and the llama graph's own requirements."""
    arch = head.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        return ["general.architecture is missing or not a string"]
    out: list[str] = []
    vals: dict[str, list[int]] = {}
    for suffix, required, lo, hi, per_layer in HPARAMS:
        key = f"{arch}.{suffix}"
        f = head.fields.get(key)
        if f is None:
            if required:
                out.append(f"{key} is missing")
            continue
        items = f.value if f.type == ARRAY and per_layer else [f.value]
        if (f.type == ARRAY and not (per_layer and f.item_type in INT_TYPES)) or \
                (f.type != ARRAY and f.type not in INT_TYPES) or not items:
            out.append(f"{key} must be an integer{' or an array of them' if per_layer else ''}")
            continue
        if not all(_is_int(v) and lo <= v <= hi for v in items):
            bad = next(v for v in items if not (_is_int(v) and lo <= v <= hi))
            out.append(f"{key} is {bad}, outside {lo}..{hi}")
            continue
        vals[suffix] = items
    for suffix in EPSILON_KEYS:   # ggml's norms assert eps >= 0: a NaN or negative epsilon aborts
        eps = head.fields.get(f"{arch}.{suffix}")
        if eps is not None and isinstance(eps.value, float) and not eps.value >= 0.0:
            out.append(f"{arch}.{suffix} is {eps.value}, not >= 0")
    scaling = head.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING:
        out.append(f"{arch}.rope.scaling.type is {scaling!r}, not one of {', '.join(ROPE_SCALING)}")
    out += _expert_problems(arch, vals)
    if not out and arch == "llama":
        out += _llama_problems(vals)
    return out


def _expert_problems(arch: str, vals: dict[str, list[int]]) -> list[str]:
    """llama.cpp's asserts on the mixture-of-experts counts (llama_model_base::load_hparams)."""
    n_expert = vals.get("expert_count", [0])[0]
    used = max(vals.get("expert_used_count", [0]))
    groups, groups_used = vals.get("expert_group_count", [0])[0], vals.get("expert_group_used_count", [0])[0]
    if used > n_expert:
        return [f"{arch}.expert_used_count ({used}) exceeds {arch}.expert_count ({n_expert})"]
    if n_expert == 0:
        return [f"{arch}.expert_group_count is {groups} without experts"] if groups else []
    if used == 0:
        return [f"{arch}.expert_count is {n_expert} but {arch}.expert_used_count is missing or 0"]
    if groups >= n_expert or (groups > 1 and (n_expert % groups or not 0 < groups_used < groups)):
        return [f"{arch}.expert_group_count ({groups}) and expert_group_used_count ({groups_used}) do not divide "
                f"{n_expert} experts"]
    return []


def _llama_problems(vals: dict[str, list[int]]) -> list[str]:
    """The llama graph's requirements: heads, GQA groups, equal K/V head sizes and the rotary size."""
    n_layer, n_embd = vals["block_count"][0], vals["embedding_length"][0]

    def per_layer(key: str, default: list[int]) -> list[int]:
        v = vals.get(key, default)
        return v * n_layer if len(v) == 1 else v   # other lengths: llama.cpp refuses the array itself

    heads = per_layer("attention.head_count", [0])
    heads_kv = per_layer("attention.head_count_kv", heads)
    if min(heads) < 1:
        return ["llama.attention.head_count must be >= 1 in every layer"]
    if min(heads_kv) < 1 or any(h % kv for h, kv in zip(heads, heads_kv)):
        return [f"llama.attention.head_count ({heads[0]}) must be a multiple of head_count_kv ({heads_kv[0]}) "
                "in every layer"]
    if "attention.key_length" not in vals and n_embd % heads[0]:
        return [f"llama.embedding_length ({n_embd}) is not a multiple of head_count ({heads[0]})"]
    head_dim = vals.get("attention.key_length", [n_embd // heads[0]])[0]
    v_dim = vals.get("attention.value_length", [n_embd // heads[0]])[0]
    if head_dim < 1 or v_dim != head_dim:
        return [f"llama key and value head sizes must be equal and >= 1 (got {head_dim} and {v_dim})"]
    n_rot = vals.get("rope.dimension_count", [head_dim])[0]
    if n_rot != head_dim:
        return [f"llama.rope.dimension_count ({n_rot}) must equal the head size ({head_dim})"]
    return []


def vocab_problems(head: GGUFHeader) -> list[str]:
    """No tokenizer (llama.cpp loads the model, then asserts on the first text), or a vocabulary whose
    tokens repeat (llama.cpp asserts every token maps to its own id)."""
    model = head.get("tokenizer.ggml.model")
    if model in ("none", "no_vocab"):
        return [f"tokenizer.ggml.model is {model!r}: the model has no tokenizer, and kvq runs text"]
    f = head.fields.get("tokenizer.ggml.tokens")
    if f is None or f.type != ARRAY or f.item_type != STRING:
        return []   # llama.cpp reports a missing or mistyped vocabulary by itself
    seen: set[bytes] = set()
    for i, tok in enumerate(head.strings("tokenizer.ggml.tokens")):
        tok = tok or f"[EMPTY_{i}]".encode()   # what llama.cpp names an empty token
        if tok in seen:
            return [f"tokenizer.ggml.tokens repeats token {tok.decode('utf-8', 'replace')!r} (id {i})"]
        seen.add(tok)
    if model in BYTE_FALLBACK:   # text the vocabulary cannot spell falls back to byte tokens, looked up unchecked
        missing = [b for b in range(256) if f"<0x{b:02X}>".encode() not in seen
                   and (model == "plamo2" or bytes([b]) not in seen)]
        if missing:
            return [f"tokenizer.ggml.model {model!r} needs the byte tokens <0x00>..<0xFF> "
                    f"({len(missing)} missing, e.g. <0x{missing[0]:02X}>)"]
    return []
