"""Engine: owns one llama.cpp model + context, frees it deterministically, reports KV usage."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kvq_cli.errors import ContextOverflow, InvalidGGUF, RuntimeMissing
from kvq_cli.gguf_info import ModelDims, model_dims, read_gguf
from kvq_cli.runtime.kv import KvPolicy

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class KvStats:
    """KV usage right now: tokens held, bytes they take, and bits per stored element."""

    tokens: int
    bytes_held: int
    bytes_allocated: int
    bits_per_elem: float

    def summary(self) -> str:
        """One line for stderr after a reply."""
        return (f"KV: {self.tokens} tokens, {self.bytes_held / MIB:.2f} MiB held "
                f"({self.bytes_allocated / MIB:.1f} MiB allocated), "
                f"{self.bits_per_elem:.2f} bits/elem")


def _import_llama_cpp():
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise RuntimeMissing(f"the llama.cpp runtime cannot be loaded ({e})") from None
    return llama_cpp


class Engine:
    """A loaded model with one KV cache policy. Use as a context manager or call close()."""

    def __init__(self, model_path: str | os.PathLike, *, kv: KvPolicy, n_ctx: int = 2048,
                 seed: int = 0, n_threads: int | None = None, n_batch: int = 512,
                 logits_all: bool = False, flash_attn: bool | None = None):
        reader = read_gguf(model_path)  # clean error for missing/non-GGUF/truncated files
        self.arch, self.dims = model_dims(reader)
        del reader
        if n_ctx <= 0:
            n_ctx = self.dims.n_ctx_train
        self.path = Path(model_path)
        self.kv = kv
        self.n_ctx = n_ctx
        llama_cpp = _import_llama_cpp()
        ggml_type = getattr(llama_cpp, f"GGML_TYPE_{kv.ggml_type}")
        flash = kv.needs_flash if flash_attn is None else (flash_attn or kv.needs_flash)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(model_path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx),
                n_threads=n_threads, n_threads_batch=n_threads, seed=seed, type_k=ggml_type,
                type_v=ggml_type, flash_attn=flash, logits_all=logits_all, verbose=False,
            )
        except ValueError as e:
            raise InvalidGGUF(f"llama.cpp could not load {model_path}: {e}") from None

    # -- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        """Free the llama.cpp context and model now (not at garbage collection)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- tokens and KV --------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of `text` with the model's tokenizer."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        """Text of `tokens`."""
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    @property
    def n_tokens(self) -> int:
        """Tokens currently held in the KV cache."""
        return int(self.llm.n_tokens)

    def kv_stats(self) -> KvStats:
        """Bytes held by the KV cache for the tokens it holds (block scales included)."""
        per_token = self.dims.kv_elems_per_token * self.kv.bits_per_elem / 8
        return KvStats(
            tokens=self.n_tokens,
            bytes_held=int(round(self.n_tokens * per_token)),
            bytes_allocated=int(round(self.n_ctx * per_token)),
            bits_per_elem=self.kv.bits_per_elem,
        )

    # -- chat -----------------------------------------------------------------------
    def chat_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens the chat template turns `messages` into (what the next reply prefills)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if template is None:
            return len(self.tokenize("\n".join(m["content"] for m in messages)))
        model = self.llm._model
        eos, bos = model.token_eos(), model.token_bos()
        fmt = Jinja2ChatFormatter(
            template=template, eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "")
        result = fmt(messages=messages)
        return len(self.llm.tokenize(result.prompt.encode("utf-8"),
                                     add_bos=not result.added_special, special=True))

    def stream_chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
                    top_p: float, seed: int) -> Iterator[str]:
        """Stream reply text for `messages`, formatted with the model's chat template."""
        try:
            chunks = self.llm.create_chat_completion(
                messages=messages, stream=True, max_tokens=max_tokens, temperature=temperature,
                top_p=top_p, seed=seed)
            for chunk in chunks:
                text = chunk["choices"][0]["delta"].get("content")
                if text:
                    yield text
        except ValueError as e:
            if "exceed context window" in str(e):
                raise ContextOverflow(str(e)) from None
            raise
