"""Chat stage: a multi-turn conversation over an Engine that goes on past its context.

Each turn feeds only what the chat template adds to the conversation so far (the end of the
last reply, the new message, the assistant header), so the cache keeps every earlier token; a
session file (llama.cpp's state format) carries a conversation's cache to a later process.
When the context fills, the Generator shifts it as llama.cpp does: the system prompt stays,
the oldest half of the rest goes, and the conversation continues without a new prefill.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

from kvq_cli.config import GenerationConfig
from kvq_cli.errors import ContextOverflow
from kvq_cli.runtime.engine import Engine
from kvq_cli.runtime.generate import Generator

log = logging.getLogger(__name__)

_SENTINEL = "\x00kvq-reply\x00"   # a reply no model writes: marks where a finished turn's text ends


@dataclass
class ChatSession:
    """Conversation history; `reply` streams the assistant's answer and records it."""

    engine: Engine
    gen: GenerationConfig
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    dropped_turns: int = 0     # turns forgotten to fit a conversation that had to be prefilled again
    _continues: bool = False   # the cache holds the conversation up to the end of a reply
    _gen: Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n_keep = 0
        if self.system:   # a shift keeps the system prompt
            n_keep = len(self._tokens(self.engine.render_chat(self._head(), add_generation_prompt=False)))
        self._gen = Generator(self.engine, self.gen, n_keep=min(n_keep, self.engine.n_ctx // 2))

    @property
    def n_shifts(self) -> int:
        """Context shifts made so far."""
        return self._gen.n_shifts

    @property
    def n_fed(self) -> int:
        """Tokens decoded so far (prompts and replies)."""
        return self._gen.n_fed

    def _head(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def messages(self) -> list[dict[str, str]]:
        """System prompt (if any) followed by the kept history."""
        return self._head() + self.history

    def _tokens(self, rendered: tuple[str, bool]) -> list[int]:
        text, add_bos = rendered
        return self.engine.tokenize(text, add_bos=add_bos, special=True)

    def _turn_text(self, user_text: str) -> str | None:
        """What the template adds after a finished reply for a new user message (the reply's end of
        turn, the message, the assistant header), found with a sentinel reply; None if the template
        does not render it as a suffix."""
        msgs = self._head() + [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL},
                               {"role": "user", "content": user_text}]
        text, _ = self.engine.render_chat(msgs)
        cut = text.find(_SENTINEL)
        return text[cut + len(_SENTINEL):] if cut >= 0 and user_text in text[cut:] else None

    def _new_tokens(self) -> list[int]:
        """The tokens the cache still needs for the conversation's next reply."""
        if self._continues and self.engine.n_tokens > 0:
            turn = self._turn_text(self.history[-1]["content"])
            if turn is not None:
                return self.engine.tokenize(turn, special=True)
        # a fresh (or reset) conversation: prefill it, forgetting the oldest turns it cannot hold
        self.engine.truncate(0)
        text, add_bos = self.engine.render_chat(self.messages())
        while True:
            toks = self._tokens((text, add_bos))
            if self._gen.fits(len(toks) + self.gen.max_tokens) or len(self.history) <= 1:
                break
            del self.history[0]
            if len(self.history) > 1 and self.history[0]["role"] == "assistant":
                del self.history[0]
            self.dropped_turns += 1
            log.info("context full: dropped the oldest turn")
            text, add_bos = self.engine.render_chat(self.messages())
        return toks

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the reply to `user_text`; a full context shifts (see the module docstring)."""
        self.history.append({"role": "user", "content": user_text})
        try:
            toks = self._new_tokens()
            if not self._gen.fits(len(toks)):
                raise ContextOverflow(f"the message does not fit the {self.engine.n_ctx}-token context "
                                      f"({len(toks)} tokens)", hint="shorten it or raise --ctx")
        except BaseException:
            self.history.pop()
            raise
        parts: list[str] = []
        try:
            for _, piece in self._gen.stream(toks, self.gen.max_tokens):
                parts.append(piece)
                yield piece
        except BaseException:
            # Stopped early (Ctrl-C) or failed: keep what the model did say, or forget the turn;
            # the next turn prefills the conversation again.
            if parts:
                self.history.append({"role": "assistant", "content": "".join(parts)})
            else:
                self.history.pop()
            self._continues = False
            raise
        self.history.append({"role": "assistant", "content": "".join(parts)})
        self._continues = True

    def reset(self) -> None:
        """Forget the conversation."""
        self.history.clear()
        self._continues = False
        self.engine.truncate(0)

    def save(self, path) -> None:
        """Write the conversation's cache to a session file (llama.cpp's state format)."""
        from kvq_cli.runtime.state import save_state

        save_state(self.engine, path)

    def restore(self, path) -> int:
        """Continue the conversation held by a session file; returns the tokens restored. The
        earlier turns live in the cache only (the history starts empty)."""
        from kvq_cli.runtime.state import load_state

        n = len(load_state(self.engine, path))
        self.history.clear()
        self._continues = n > 0
        return n

    def close(self) -> None:
        """Free the sampler."""
        self._gen.close()
