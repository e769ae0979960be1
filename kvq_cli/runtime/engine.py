"""Engine: owns one llama.cpp model + context, frees it deterministically, reports KV usage."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvq_cli.errors import BadOption, ContextOverflow, ControllerError, InvalidGGUF, KvqError, RuntimeMissing
from kvq_cli.gguf.keys import Controller, Llm
from kvq_cli.gguf.preflight import preflight
from kvq_cli.gguf.read import ModelDims, model_dims, read_gguf
from kvq_cli.runtime.kv import KvPolicy, KvqOptions
from kvq_cli.runtime.load_log import load_errors, load_reason

log = logging.getLogger(__name__)

MIB = 1024 * 1024
KVQ_BLOCK = 64   # values per kvq2 block: one head's K or V row is whole blocks (head_dim % 64 == 0)


@dataclass(frozen=True)
class KvStats:
    """KV usage right now: tokens held, bytes they take, and bits per stored element."""

    tokens: int
    bytes_held: int
    bytes_allocated: int
    bits_per_elem: float
    rows: dict[str, int] | None = None   # kvq: token-layer rows per class (window, f16, q8, q4, q2)
    bytes_budget: int = 0
    budget_demotions: int = 0
    policy_ms: float = 0.0
    attn_ms: float = 0.0

    def summary(self, policy: str = "") -> str:
        """One line for stderr after a reply (naming the policy when given)."""
        line = (f"KV{' ' + policy if policy else ''}: {self.tokens} tokens, {self.bytes_held / MIB:.2f} MiB held "
                f"({self.bytes_allocated / MIB:.1f} MiB allocated), "
                f"{self.bits_per_elem:.2f} bits/elem")
        if self.rows:
            total = sum(self.rows.values()) or 1
            mix = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in self.rows.items() if v)
            line += f" [{mix}]"
        return line


@dataclass(frozen=True)
class ModelRef:
    """A GGUF and the controller it runs with: its own embedded one (controller None), or a controller
    file kvq supplies for it (a shipped JSON), which the runtime reads instead of the GGUF's metadata.
    `source` says which (controller.catalog: embedded, shipped, generic or none); None: not looked up
    (the GGUF's own controller, if any; an adaptive Engine looks it up)."""

    path: Path
    controller: Path | None = None
    source: str | None = None

    @classmethod
    def with_controller(cls, path: "str | os.PathLike", alias: str | None = None) -> "ModelRef":
        """The GGUF with the controller controller.catalog.find_controller picks for it."""
        from kvq_cli.controller.catalog import find_controller

        src = find_controller(path, alias)
        return cls(Path(path), src.path, src.kind)

    @property
    def name(self) -> str:
        """The name records carry: the file's, marked with the controller's digest when kvq supplies it
        (the name an embedded copy of the two would have)."""
        if self.controller is None:
            return self.path.name
        import hashlib

        return f"{self.path.stem}.kvq-{hashlib.sha256(self.controller.read_bytes()).hexdigest()[:12]}.gguf"

    def controller_spec(self):
        """The controller this model runs with (ControllerSpec), or None."""
        from kvq_cli.controller.spec import controller_from_reader, load_controller

        if self.controller is not None:
            return load_controller(self.controller)
        return controller_from_reader(read_gguf(self.path))

    @property
    def has_k_center(self) -> bool:
        """Whether its controller carries a K centering (kvq.controller.k_center) the runtime would use."""
        from kvq_cli.gguf.read import metadata_keys

        if self.controller is None and Controller.K_CENTER not in metadata_keys(self.path):
            return False
        try:
            spec = self.controller_spec()
        except KvqError:   # no usable controller: the engines say why where it matters
            return False
        return spec is not None and spec.k_center is not None


def as_model_ref(model: "str | os.PathLike | ModelRef") -> ModelRef:
    """A ModelRef for a path (the GGUF with its own controller, if any)."""
    return model if isinstance(model, ModelRef) else ModelRef(Path(model))


def _meta_str(llama_cpp, model, key: str) -> str | None:
    """A metadata value of the loaded model, as llama.cpp prints it (None when absent)."""
    import ctypes

    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


def _loaded_dims(llama_cpp, model) -> tuple[str, ModelDims]:
    """Architecture and KV dims of a loaded model, from llama.cpp (no second parse of the file)."""
    n_embd, n_head = llama_cpp.llama_model_n_embd(model), llama_cpp.llama_model_n_head(model)
    arch = _meta_str(llama_cpp, model, Llm.ARCHITECTURE) or ""
    key_length = _meta_str(llama_cpp, model, Llm.KEY_LENGTH.format(arch=arch))
    return arch, ModelDims(
        n_layer=llama_cpp.llama_model_n_layer(model), n_embd=n_embd, n_head=n_head,
        n_head_kv=llama_cpp.llama_model_n_head_kv(model),
        head_dim=int(key_length) if key_length else n_embd // max(n_head, 1),
        n_ctx_train=llama_cpp.llama_model_n_ctx_train(model),
        n_vocab=llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))


def _import_llama_cpp():
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise RuntimeMissing(f"the llama.cpp runtime cannot be loaded ({e})") from None
    return llama_cpp


class Engine:
    """A loaded model with one KV cache policy. Use as a context manager or call close()."""

    def __init__(self, model: str | os.PathLike | ModelRef, *, kv: KvPolicy, n_ctx: int = 2048,
                 seed: int = 0, n_threads: int | None = None, n_batch: int = 512,
                 logits_all: bool = False, flash_attn: bool | None = None, n_ubatch: int = 512,
                 kvq: KvqOptions | None = None):
        self._batch = None   # decode()'s llama_batch, made on first use
        self.model = as_model_ref(model)
        model_path = self.model.path
        head = preflight(model_path)   # missing, not GGUF, damaged or one llama.cpp would crash on: one line, first
        head_dim = model_dims(head)[1].head_dim
        if not kv.is_stock and head_dim % KVQ_BLOCK:
            # (llama.cpp would refuse the placeholder q2_0 cache below with a message about q2_0)
            raise BadOption(f"--kv {kv.name}: kvq needs head_dim % {KVQ_BLOCK} == 0 (its 2-bit blocks hold {KVQ_BLOCK} "
                            f"values of one head); the model's head_dim is {head_dim}",
                            hint="a stock cache runs it, e.g. --kv stock-f16")
        if kv.kvq == "adaptive" and self.model.source is None:
            self.model = ModelRef.with_controller(model_path)   # embedded, else the generic controller
        self.path = Path(model_path)
        self.kv = kv
        self.kvq_opts = kvq or KvqOptions()
        self.window, self.window_bits = 0, 16   # kvq: the window W and its rows' bits (set when kvq is enabled)
        llama_cpp = _import_llama_cpp()
        import jinja2
        # every core for decode and batches (llama-cpp-python would decode on cpu_count // 2)
        n_threads = n_threads or os.cpu_count() or 1
        lib = None
        if not kv.is_stock:
            from kvq_cli.runtime._lib import kvq_lib

            lib = kvq_lib()  # RuntimeMissing before loading anything if this is not our build
        # With kvq the stock cache is never read or written; it is created at its smallest
        # type (q2_0, which llama.cpp only allows with flash attention) and counted honestly.
        stock_type = kv.ggml_type if kv.is_stock else "Q2_0"
        ggml_type = getattr(llama_cpp, f"GGML_TYPE_{stock_type}")
        flash = (kv.needs_flash or bool(flash_attn)) if kv.is_stock else True
        n_ctx = max(n_ctx, 0)   # 0: the model's training context (llama.cpp's default)
        try:
            with load_errors(llama_cpp) as errors:
                self.llm = llama_cpp.Llama(
                    model_path=str(model_path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx) if n_ctx else n_batch,
                    n_ubatch=min(n_ubatch, n_batch, n_ctx) if n_ctx else min(n_ubatch, n_batch), n_threads=n_threads,
                    n_threads_batch=n_threads, seed=seed, type_k=ggml_type, type_v=ggml_type,
                    flash_attn=flash, logits_all=logits_all, verbose=False,
                )
        except ValueError as e:   # llama.cpp refused the file (its reason went to the log) or the context
            raise InvalidGGUF(f"llama.cpp could not load {model_path}: {load_reason(errors) or e}") from None
        except jinja2.TemplateError as e:   # llama-cpp-python compiles the model's chat template as it loads
            raise InvalidGGUF(f"the chat template of {model_path} (tokenizer.chat_template) does not compile: {e}") from None
        self.n_ctx = n_ctx or self.llm.n_ctx()
        self.arch, self.dims = _loaded_dims(llama_cpp, self.llm.model)
        self.controller = None   # a supplied controller (ControllerSpec), checked against this model
        try:
            if self.model.controller is not None and not kv.is_stock:
                from kvq_cli.controller.spec import load_controller

                self.controller = load_controller(self.model.controller)
                self.controller.check_model(self.dims, self.path.name)
        except BaseException:
            self.close()
            raise
        if kv.kvq != "adaptive":
            self.granularity = None
        elif self.controller is not None:
            self.granularity = self.controller.granularity
        else:
            self.granularity = _meta_str(llama_cpp, self.llm.model, Controller.GRANULARITY) or "token"
        self._lib = lib
        if lib is not None:
            try:
                self._enable_kvq(lib)
            except BaseException:
                self.close()
                raise

    def _enable_kvq(self, lib) -> None:
        """Switch the fresh context to kvq pools with this engine's policy (before any decode)."""
        import ctypes

        from kvq_cli.runtime import _lib as L

        kv, opts = self.kv, self.kvq_opts
        p = lib.llama_kvq_default_params()
        p.window = self.window = opts.window_for(kv, self.n_ctx)
        p.window_bits = self.window_bits = opts.window_bits_for(kv)
        budget = opts.budget_for(kv)
        # an oracle's assignment meets its budget by itself; a cap would demote the rows of its
        # all-f16 measuring pass
        p.budget_bits = float(budget or 0.0) if kv.kvq != "assign" else 0.0
        # a controller trained per (token, layer) decides per (token, layer)
        p.per_layer = int(opts.per_layer or self.granularity == "token_layer")
        p.trace = int(opts.trace)
        p.rotate = int(opts.rotate)
        p.attn_ref = int(opts.attn_ref)
        p.record_q = int(opts.record_q)
        if opts.price_step is not None:
            p.price_step = float(opts.price_step)
        p.k_center = int(opts.k_center_for(kv))
        p.v_unbias = int(opts.v_unbias_for(kv))
        if opts.qar_mu is not None:
            p.qar_mu = float(opts.qar_mu)
        if kv.kvq == "static":
            p.policy, p.static_bits = L.POLICY_STATIC, kv.static_bits
        elif kv.kvq == "rule":
            p.policy = L.POLICY_RULE
            # below 4 bits of budget the rule's base precision is 2-bit
            p.rule_base_bits = 2 if budget and budget < 4.0 else 4
        elif kv.kvq == "adaptive":
            p.policy = L.POLICY_LEARNED
            state = 1 if self.controller is not None else lib.llama_kvq_model_controller(self.llm.model)
            if state == 0:
                raise ControllerError(f"{self.path.name} has no kvq controller, needed by --kv adaptive",
                                      hint=f"`kvq calibrate {self.path}` learns one for it")
            if state < 0:
                raise ControllerError(lib.last_error())
        elif kv.kvq == "assign":
            p.policy = L.POLICY_ASSIGN
        if self.controller is None:
            rc = lib.llama_kvq_enable(self.llm.ctx, ctypes.byref(p))
        else:   # the runtime reads a controller file; this one lives only while kvq is enabled
            import tempfile

            from kvq_cli.controller.embed import write_controller_file

            with tempfile.TemporaryDirectory(prefix="kvq-controller-") as tmp:
                path = write_controller_file(self.controller, Path(tmp) / "controller.gguf")
                p.controller_path = str(path).encode()
                rc = lib.llama_kvq_enable(self.llm.ctx, ctypes.byref(p))
        if rc != 0:
            raise BadOption(f"kvq: {lib.last_error()}")

    @property
    def kvq_enabled(self) -> bool:
        return self._lib is not None

    @property
    def kv_label(self) -> str:
        """The policy as banners name it, with its controller's source for adaptive: 'adaptive@3.5
        (controller: shipped for smollm2-135m-instruct)'."""
        if self.kv.kvq != "adaptive":
            return self.kv.name
        from kvq_cli.controller.catalog import ControllerSource

        return f"{self.kv.name} (controller: {ControllerSource(self.model.source, self.model.controller).describe()})"

    # -- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        """Free the llama.cpp context and model now (not at garbage collection)."""
        batch = getattr(self, "_batch", None)
        if batch is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(batch)
            self._batch = None
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

    def last_logits(self):
        """Logits of the last evaluated token (a NumPy view valid until the next decode)."""
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.dims.n_vocab,))

    def truncate(self, n_past: int) -> None:
        """Drop the cached positions >= n_past (the prefix before them stays)."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), 0, n_past, -1)
        self.llm.n_tokens = n_past

    def shift(self, n_keep: int, n_discard: int) -> None:
        """Context shift as llama.cpp does it: drop the n_discard cached tokens after the first
        n_keep and move the rest back by n_discard positions (their K rows re-encoded there)."""
        import llama_cpp

        n = self.n_tokens
        if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= n):
            raise BadOption(f"cannot shift {n_discard} tokens after {n_keep} of {n} cached")
        mem = llama_cpp.llama_get_memory(self.llm.ctx)
        llama_cpp.llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard)
        llama_cpp.llama_memory_seq_add(mem, 0, n_keep + n_discard, n, -n_discard)
        ids = self.llm.input_ids
        ids[n_keep:n - n_discard] = ids[n_keep + n_discard:n].copy()
        self.llm.n_tokens = n - n_discard

    def decode(self, tokens: list[int], n_past: int, logits_from: int | None = None):
        """Drop cached positions >= n_past, decode `tokens` after them; logits of tokens[logits_from:].

        Returns a float32 array (rows = tokens from `logits_from` on; none when it is None).
        This is how scoring reuses a prefilled context: decode the context once, then each
        continuation with n_past = len(context).
        """
        import llama_cpp
        import numpy as np

        llm = self.llm
        if n_past + len(tokens) > self.n_ctx:
            raise ContextOverflow(f"{n_past + len(tokens)} tokens do not fit the context of {self.n_ctx}")
        self.truncate(n_past)
        start = len(tokens) if logits_from is None else logits_from
        rows = []
        if self._batch is None:
            self._batch = llama_cpp.llama_batch_init(llm.n_batch, 0, 1)
        batch = self._batch
        for i in range(0, len(tokens), llm.n_batch):
            chunk = tokens[i:i + llm.n_batch]
            batch.n_tokens = len(chunk)
            n_out = 0
            for j, t in enumerate(chunk):
                batch.token[j] = t
                batch.pos[j] = n_past + i + j
                batch.seq_id[j][0] = 0
                batch.n_seq_id[j] = 1
                batch.logits[j] = i + j >= start
                n_out += i + j >= start
            rc = llama_cpp.llama_decode(llm.ctx, batch)
            if rc != 0:
                raise KvqError(f"llama.cpp could not decode the batch (llama_decode returned {rc})")
            # what llama-cpp-python's own generation reads to reuse a cached prefix
            llm.input_ids[n_past + i:n_past + i + len(chunk)] = chunk
            llm.n_tokens = n_past + i + len(chunk)
            if n_out:
                ptr = llama_cpp.llama_get_logits(llm.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.dims.n_vocab)).copy())
        if not rows:
            return np.zeros((0, self.dims.n_vocab), dtype=np.float32)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    @property
    def n_tokens(self) -> int:
        """Tokens currently held in the KV cache."""
        return int(self.llm.n_tokens)

    def kv_stats(self) -> KvStats:
        """Bytes held by the KV cache for the tokens it holds (block scales included)."""
        if self._lib is not None:
            return self._kvq_stats()
        per_token = self.dims.kv_elems_per_token * self.kv.bits_per_elem / 8
        return KvStats(
            tokens=self.n_tokens,
            bytes_held=int(round(self.n_tokens * per_token)),
            bytes_allocated=int(round(self.n_ctx * per_token)),
            bits_per_elem=self.kv.bits_per_elem,
        )

    def _kvq_stats(self) -> KvStats:
        import ctypes

        from kvq_cli.runtime._lib import POOL_NAMES, KvqStats

        st = KvqStats()
        if self._lib.llama_kvq_get_stats(self.llm.ctx, ctypes.byref(st)) != 0:
            raise RuntimeMissing(f"kvq stats: {self._lib.last_error()}")
        from kvq_cli.runtime.kv import STOCK_POLICIES

        unused_stock = self.n_ctx * self.dims.kv_elems_per_token * STOCK_POLICIES["stock-q2_0"].bits_per_elem / 8
        return KvStats(
            tokens=int(st.n_tokens), bytes_held=int(st.bytes_held),
            bytes_allocated=int(st.bytes_held + unused_stock),
            bits_per_elem=float(st.bits_per_elem), rows=dict(zip(POOL_NAMES, map(int, st.rows))),
            bytes_budget=int(st.bytes_budget), budget_demotions=int(st.n_budget_demotions),
            policy_ms=float(st.t_policy_ms), attn_ms=float(st.t_attn_ms))

    # -- kvq internals (used by runtime.inspector) -------------------------------------
    def _kvq(self):
        if self._lib is None:
            raise BadOption(f"--kv {self.kv.name} is a stock cache: this needs a kvq policy")
        return self._lib

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise BadOption(f"kvq {what}: {self._lib.last_error()}")
        return rc

    # -- chat -----------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> tuple[str, bool]:
        """The model's chat template applied to `messages`: (prompt text, whether to add BOS when tokenizing)."""
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template is None:
            text = "\n".join(m["content"] for m in messages)
            return (text + "\n" if add_generation_prompt else text), True
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

        def text(tok: int) -> str:
            return llama_cpp.llama_vocab_get_text(vocab, tok).decode("utf-8", "replace") if tok != -1 else ""

        fmt = Jinja2ChatFormatter(template=template, eos_token=text(self.llm.token_eos()),
                                  bos_token=text(self.llm.token_bos()), add_generation_prompt=add_generation_prompt)
        try:
            result = fmt(messages=messages)
        except Exception as e:   # the template is the model file's code: raise_exception(), bad indexing, ...
            raise InvalidGGUF(f"the chat template of {self.path} (tokenizer.chat_template) failed: "
                              f"{type(e).__name__}: {e}") from None
        return result.prompt, not result.added_special
