"""Convert stage: an HF SmolLM/SmolLM2 checkpoint (safetensors + tokenizer) to GGUF, atomically.

Mirrors llama.cpp's convert_hf_to_gguf.py for the llama architecture: same tensor names,
the same Q/K row permutation (HF stores rotary halves, llama.cpp interleaved pairs), the
same hyperparameter and tokenizer keys, written with the `gguf` package. Tensors stream
one at a time (header first, then data), so memory stays at one tensor.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kvq_cli.controller.spec import ControllerSpec
from kvq_cli.errors import ConversionError
from kvq_cli.gguf.write import add_typed, atomic_output
from kvq_cli.models.safetensors_io import Checkpoint

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
OUTTYPES = ("f16", "q8_0", "q4_0")

# HF tensor name -> GGUF name, per layer ({i} is the block index).
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


@dataclass(frozen=True)
class ConvertResult:
    """What `kvq convert` wrote."""

    out: Path
    outtype: str
    n_tensors: int
    n_params: int
    size_bytes: int
    controller: bool


@dataclass(frozen=True)
class HParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    n_vocab: int
    tied: bool
    name: str


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> llama.cpp's: per head, [2, d/2] rows become [d/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_hparams(model_dir: Path) -> HParams:
    """Hyperparameters from config.json, rejecting architectures we do not convert."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"missing config.json in {model_dir}",
                              hint="SRC must be an HF checkpoint dir (config.json, *.safetensors, tokenizer.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {cfg_path}: {e}") from None
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"unsupported architecture {archs[0]}",
                              hint=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM, SmolLM2)")
    if cfg.get("rope_scaling"):
        raise ConversionError(f"rope_scaling {cfg['rope_scaling']} is not supported")
    try:
        n_head = int(cfg["num_attention_heads"])
        n_embd = int(cfg["hidden_size"])
        return HParams(
            n_layer=int(cfg["num_hidden_layers"]), n_embd=n_embd, n_ff=int(cfg["intermediate_size"]),
            n_head=n_head, n_head_kv=int(cfg.get("num_key_value_heads", n_head)),
            head_dim=int(cfg.get("head_dim") or n_embd // n_head),
            n_ctx=int(cfg.get("max_position_embeddings", 2048)), rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)), n_vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", True)),
            name=str(cfg.get("_name_or_path") or model_dir.name).rstrip("/").split("/")[-1],
        )
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]}") from None


def pre_tokenizer_name(pre: Any) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer` section.

    convert_hf_to_gguf.py identifies it by hashing the tokenizer's output (needs
    transformers); we read the declared structure, which is what that hash stands for.
    """
    def is_bytelevel(p: Any) -> bool:
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if is_bytelevel(pre):
        return "gpt2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and is_bytelevel(parts[1])):
            return "smollm"  # \p{N} split, then the GPT-2 regex: LLAMA_VOCAB_PRE_TYPE_SMOLLM
    raise ConversionError(f"unsupported pre-tokenizer {json.dumps(pre)[:80]}",
                          hint="kvq converts byte-level BPE tokenizers (GPT-2, SmolLM)")


def read_vocab(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name from tokenizer.json (as convert_hf_to_gguf does)."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"missing tokenizer.json in {model_dir}")
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        model = tok["model"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    if model.get("type") != "BPE":
        raise ConversionError(f"unsupported tokenizer model {model.get('type')}", hint="BPE only")
    pre = pre_tokenizer_name(tok.get("pre_tokenizer"))
    reverse = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        reverse[i] = a["content"]
    if reverse and max(reverse) >= n_vocab:
        raise ConversionError(f"tokenizer has token id {max(reverse)} >= vocab_size {n_vocab}")
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(T.NORMAL)
    return tokens, types, pre


def _plan(ckpt: Checkpoint, hp: HParams, outtype: str) -> list[tuple[str, str, Callable | None, Any]]:
    """(gguf name, hf name, transform, ggml type) for every tensor, in llama.cpp's order."""
    import gguf

    Q = gguf.GGMLQuantizationType
    weight_type = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[outtype]
    names = [("token_embd.weight", "model.embed_tokens.weight", None)]
    for i in range(hp.n_layer):
        for hf, gg in LAYER_TENSORS.items():
            fn = None
            if hf == "self_attn.q_proj.weight":
                fn = lambda w: permute_qk(w, hp.n_head)  # noqa: E731
            elif hf == "self_attn.k_proj.weight":
                fn = lambda w: permute_qk(w, hp.n_head_kv)  # noqa: E731
            names.append((f"blk.{i}.{gg}", f"model.layers.{i}.{hf}", fn))
    names.append(("output_norm.weight", "model.norm.weight", None))
    if "lm_head.weight" in ckpt and not hp.tied:
        names.append(("output.weight", "lm_head.weight", None))
    plan = []
    for gg, hf, fn in names:
        if hf not in ckpt:
            raise ConversionError(f"checkpoint lacks tensor {hf}")
        shape = ckpt.shape(hf)
        if len(shape) == 1:
            qtype = Q.F32  # norms stay f32, as in llama.cpp
        elif weight_type != Q.F16 and shape[-1] % gguf.GGML_QUANT_SIZES[weight_type][0] != 0:
            qtype = Q.F16  # rows that do not divide into blocks fall back to f16
        else:
            qtype = weight_type
        plan.append((gg, hf, fn, qtype))
    return plan


def _encode(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return arr.astype(np.float32)
    if qtype == Q.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def convert(model_dir: str | Path, out: str | Path, *, outtype: str = "f16",
            controller: ControllerSpec | None = None,
            on_tensor: Callable[[str, int, int], None] | None = None) -> ConvertResult:
    """Write `out` (GGUF) from the HF checkpoint in `model_dir`; `on_tensor(name, i, n)` reports progress."""
    import gguf

    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown --outtype {outtype}", hint=f"choose one of: {', '.join(OUTTYPES)}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir} is not a checkpoint directory")
    hp = read_hparams(model_dir)
    tokens, toktypes, pre = read_vocab(model_dir, hp.n_vocab)
    ckpt = Checkpoint(model_dir)
    plan = _plan(ckpt, hp, outtype)
    Q = gguf.GGMLQuantizationType
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype]
    out = Path(out)
    n_params = 0
    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="llama")
        w.add_name(hp.name)
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_feed_forward_length(hp.n_ff)
        w.add_block_count(hp.n_layer)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_file_type(ftype)
        w.add_vocab_size(hp.n_vocab)
        w.add_rope_dimension_count(hp.head_dim)
        if hp.head_dim * hp.n_head != hp.n_embd:   # config.json's head_dim (llama.cpp's default is n_embd / n_head)
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
        if outtype != "f16":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(toktypes)
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
        special.add_to_gguf(w, quiet=True)
        if "bos" not in special.add_special_token:
            w.add_add_bos_token(False)
        if controller is not None:
            for key, value, kind in controller.validate().gguf_items():
                add_typed(w, key, value, kind)
        for gg, hf, _fn, qtype in plan:
            shape = ckpt.shape(hf)
            n_params += int(np.prod(shape))
            if qtype == Q.F32:
                w.add_tensor_info(gg, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
            elif qtype == Q.F16:
                w.add_tensor_info(gg, shape, np.dtype(np.float16), int(np.prod(shape)) * 2)
            else:
                bshape = gguf.quant_shape_to_byte_shape(shape, qtype)
                w.add_tensor_info(gg, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (gg, hf, fn, qtype) in enumerate(plan):
            arr = ckpt.load(hf)
            if fn is not None:
                arr = fn(arr)
            w.write_tensor_data(_encode(arr, qtype))
            if on_tensor:
                on_tensor(gg, i + 1, len(plan))
        w.close()
    return ConvertResult(out=out, outtype=outtype, n_tensors=len(plan), n_params=n_params,
                         size_bytes=out.stat().st_size, controller=controller is not None)


def resolve_controller(spec_arg: str | None, alias: str | None) -> ControllerSpec | None:
    """`--controller` value: a controller JSON path, or 'default' for the model's shipped one."""
    from kvq_cli.controller.catalog import shipped_path
    from kvq_cli.controller.spec import load_controller
    from kvq_cli.errors import ControllerError

    if spec_arg is None:
        return None
    if spec_arg == "default":
        path = shipped_path(alias)
        if path is None:
            raise ControllerError(f"no default controller ships for {alias or 'this checkpoint'}",
                                  hint="omit --controller: kvq convert calibrates one for the model")
        return load_controller(path)
    return load_controller(spec_arg)


def pull_and_convert(spec, *, outtype: str = "f16", revision: str | None = None,
                     progress=None, on_tensor=None):
    """`kvq pull`: download a hub checkpoint and convert it to the models dir, with the controller kvq
    ships for the model embedded (None when it ships none: the caller calibrates one)."""
    from kvq_cli.controller.catalog import shipped_path
    from kvq_cli.controller.spec import load_controller
    from kvq_cli.models.hub import pull
    from kvq_cli.models.registry import converted_path

    result = pull(spec, revision=revision, progress=progress)
    if result.source != "hub":
        return result, None
    out = converted_path(spec.alias, outtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    ctrl_path = shipped_path(spec.alias)
    ctrl = load_controller(ctrl_path) if ctrl_path else None
    conv = convert(result.local_dir, out, outtype=outtype, controller=ctrl, on_tensor=on_tensor)
    result.gguf = conv.out
    result.note = None
    return result, conv


def model_dir_for(src: str, outtype: str, progress=None) -> tuple[Path, Path, str | None]:
    """`kvq convert SRC`: (checkpoint dir, default output path, registry alias or None). A registry
    alias or hub id is pulled first (resumable) and converts into the models dir."""
    from kvq_cli.models.hub import pull
    from kvq_cli.models.registry import converted_path, get_spec

    if Path(src).is_dir():
        return Path(src), Path(f"{Path(src).resolve().name}-{outtype}.gguf"), None
    if Path(src).exists():
        raise ConversionError(f"{src} is a file; SRC must be a checkpoint directory or a model name")
    spec = get_spec(src)
    pulled = pull(spec, progress=progress)
    if pulled.local_dir is None:
        raise ConversionError(f"{spec.alias} ships as GGUF ({pulled.gguf}); there is no checkpoint to convert")
    out = converted_path(spec.alias, outtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    return pulled.local_dir, out, spec.alias
