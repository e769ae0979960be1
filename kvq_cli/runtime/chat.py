"""Chat stage: multi-turn conversation state over an Engine, with context-overflow handling."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

from kvq_cli.config import GenerationConfig
from kvq_cli.errors import ContextOverflow
from kvq_cli.runtime.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class ChatSession:
    """Conversation history; `reply` streams the assistant's answer and records it."""

    engine: Engine
    gen: GenerationConfig
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    dropped_turns: int = 0

    def messages(self) -> list[dict[str, str]]:
        """System prompt (if any) followed by the kept history."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def _make_room(self) -> None:
        """Shift: drop the oldest turns until prompt + max_tokens fits the context."""
        n_ctx = self.engine.n_ctx
        while True:
            need = self.engine.chat_prompt_tokens(self.messages())
            if need + self.gen.max_tokens <= n_ctx or len(self.history) <= 1:
                break
            del self.history[0]
            if len(self.history) > 1 and self.history[0]["role"] == "assistant":
                del self.history[0]
            self.dropped_turns += 1
            log.info("context full: dropped the oldest turn")
        if need >= n_ctx:
            self.history.pop()
            raise ContextOverflow(f"the message does not fit the {n_ctx}-token context "
                                  f"({need} tokens)", hint="shorten it or raise --ctx")

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the reply to `user_text`; oldest turns are dropped when the context is full."""
        self.history.append({"role": "user", "content": user_text})
        self._make_room()
        parts: list[str] = []
        try:
            for piece in self.engine.stream_chat(
                    self.messages(), max_tokens=self.gen.max_tokens,
                    temperature=self.gen.temperature, top_p=self.gen.top_p, seed=self.gen.seed):
                parts.append(piece)
                yield piece
        except BaseException:
            # Stopped early (Ctrl-C) or failed: keep what the model did say, or forget the turn.
            if parts:
                self.history.append({"role": "assistant", "content": "".join(parts)})
            else:
                self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": "".join(parts)})

    def reset(self) -> None:
        """Forget the conversation."""
        self.history.clear()
