"""Generation stage: llama.cpp's sampler chain over an Engine, with llama.cpp's context shift.

When the context is full, the tokens after the first `n_keep` are halved as llama-cli and
llama-server do (`--context-shift`): the older half is removed and the rest moves back
(`Engine.shift`), so a conversation goes on past the context without prefilling again.
"""
from __future__ import annotations

import codecs
import ctypes
from dataclasses import dataclass, field
from typing import Iterator

from kvq_cli.config import GenerationConfig
from kvq_cli.errors import ContextOverflow
from kvq_cli.runtime.engine import Engine


@dataclass
class Generator:
    """Feeds tokens and samples replies on `engine`'s sequence, shifting the context when full."""

    engine: Engine
    gen: GenerationConfig
    n_keep: int = 0            # tokens at the start a shift never removes (the system prompt)
    n_shifts: int = 0          # context shifts made so far
    n_fed: int = 0             # tokens decoded so far
    _logits_at: int = -1       # n_tokens when the logits of the last cached token were computed
    _chain: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if self.gen.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(self.gen.top_p, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(self.gen.temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(self.gen.seed))
        self._chain = chain

    def close(self) -> None:
        """Free the sampler chain."""
        if self._chain is not None:
            import llama_cpp

            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def fits(self, n_new: int) -> bool:
        """Whether n_new tokens can be fed at once (shifts leave at least the kept tokens)."""
        return self.n_keep + n_new < self.engine.n_ctx

    def feed(self, tokens: list[int]) -> None:
        """Decode `tokens` after the cached ones (logits for the last), shifting when the context is full."""
        e = self.engine
        if not self.fits(len(tokens)):
            raise ContextOverflow(f"the message does not fit the {e.n_ctx}-token context ({len(tokens)} tokens)",
                                  hint="shorten it or raise --ctx")
        i = 0
        while i < len(tokens):
            if e.n_tokens == e.n_ctx:
                self._shift()
            chunk = tokens[i:i + e.n_ctx - e.n_tokens]
            i += len(chunk)
            e.decode(chunk, e.n_tokens, logits_from=len(chunk) - 1 if i == len(tokens) else None)
            self.n_fed += len(chunk)
        if tokens:
            self._logits_at = e.n_tokens

    def _refresh(self) -> None:
        """Logits for the last cached token when there are none (a restored state holds no logits):
        decode it again, as llama-cli and llama-server do after restoring a session."""
        e = self.engine
        if self._logits_at == e.n_tokens:
            return
        if e.n_tokens == 0:
            raise ContextOverflow("nothing to continue from: the context is empty", hint="give a prompt")
        last = int(e.llm.input_ids[e.n_tokens - 1])
        e.decode([last], e.n_tokens - 1, logits_from=0)
        self._logits_at = e.n_tokens

    def _shift(self) -> None:
        n_discard = (self.engine.n_tokens - self.n_keep) // 2
        if n_discard <= 0:
            raise ContextOverflow(f"the context of {self.engine.n_ctx} tokens is full", hint="raise --ctx")
        self.engine.shift(self.n_keep, n_discard)
        self.n_shifts += 1

    def stream(self, prompt: list[int], max_tokens: int) -> Iterator[tuple[int, str]]:
        """Feed `prompt`, then yield (token, text piece) until an end-of-generation token or max_tokens."""
        import llama_cpp

        self.feed(prompt)
        self._refresh()
        ctx = self.engine.llm.ctx
        vocab = llama_cpp.llama_model_get_vocab(self.engine.llm.model)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buf = ctypes.create_string_buffer(256)
        for _ in range(max_tokens):
            tok = llama_cpp.llama_sampler_sample(self._chain, ctx, -1)
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            n = llama_cpp.llama_token_to_piece(vocab, tok, buf, len(buf), 0, False)
            yield tok, utf8.decode(buf.raw[:max(n, 0)])
            self.feed([tok])
        tail = utf8.decode(b"", final=True)
        if tail:
            yield -1, tail
