"""`kvq chat` on the real embedded model (the default adaptive cache and stock llama.cpp KV types)."""
from __future__ import annotations

import re

import pytest

from kvq_cli.runtime.chat import ChatSession
from kvq_cli.cli.app import app
from kvq_cli.config import GenerationConfig
from kvq_cli.errors import ContextOverflow
from kvq_cli.runtime.engine import Engine
from kvq_cli.runtime.kv import parse_kv

from .test_errors import assert_one_line_error

KV_LINE = re.compile(r"KV ([\w@.+-]+): (\d+) tokens, ([\d.]+) MiB held \(([\d.]+) MiB allocated\), ([\d.]+) bits/elem")


def chat_once(runner, *extra):
    r = runner.invoke(app, ["chat", "--prompt", "Name three colours.", "--max-tokens", "24",
                            "--ctx", "512", *extra])
    assert r.exit_code == 0, r.output
    return r


def test_one_shot_is_deterministic_for_a_seed(runner):
    a = chat_once(runner, "--seed", "7")
    b = chat_once(runner, "--seed", "7")
    assert a.stdout.strip(), "empty reply"
    assert a.stdout == b.stdout
    greedy = chat_once(runner, "--temp", "0")
    assert greedy.stdout.strip()


@pytest.mark.parametrize("kv,bits", [("stock-f16", 16.0), ("stock-q8_0", 8.5), ("stock-q4_0", 4.5)])
def test_kv_summary_line(runner, kv, bits):
    r = chat_once(runner, "--kv", kv, "--seed", "1")
    assert r.stdout.strip()
    m = KV_LINE.search(r.stderr)
    assert m and m[1] == kv, r.stderr
    tokens, held, alloc, got_bits = int(m[2]), float(m[3]), float(m[4]), float(m[5])
    assert got_bits == bits
    # 30 layers x 3 KV heads x 64 dims x (K+V) = 11,520 elements per token.
    assert held == pytest.approx(tokens * 11520 * bits / 8 / 2**20, abs=0.006)
    assert alloc == pytest.approx(512 * 11520 * bits / 8 / 2**20, abs=0.06)
    assert 10 < tokens <= 512


def test_interactive_multi_turn_and_exit(runner):
    r = runner.invoke(app, ["chat", "--ctx", "512", "--max-tokens", "16", "--seed", "3"],
                      input="Hello!\nAnd again?\n/exit\n")
    assert r.exit_code == 0, r.output
    assert [m[1] for m in KV_LINE.finditer(r.stderr)] == ["adaptive@3.5"] * 2   # the default policy
    tokens = [int(m[2]) for m in KV_LINE.finditer(r.stderr)]
    assert tokens[1] > tokens[0]  # the second turn extends the same cache


def test_interactive_eof_exits_cleanly(runner):
    r = runner.invoke(app, ["chat", "--ctx", "256"], input="")
    assert r.exit_code == 0, r.output


def test_prompt_longer_than_context(runner):
    r = runner.invoke(app, ["chat", "--ctx", "64", "--prompt", "word " * 200])
    assert_one_line_error(r, "does not fit the 64-token context", "--ctx")


def test_a_full_context_shifts_and_the_chat_goes_on(model_path):
    gen = GenerationConfig(max_tokens=40, temperature=0.0, seed=0)
    with Engine(model_path, kv=parse_kv("stock-f16"), n_ctx=160) as engine:
        session = ChatSession(engine, gen)
        for i in range(6):
            reply = "".join(session.reply(f"Tell me fact number {i} about the sea."))
            assert reply.strip()
            assert engine.n_tokens <= 160
        assert session.n_shifts > 0 and session.dropped_turns == 0   # shifted, never prefilled again
        assert session.n_fed < sum(len(engine.tokenize(m["content"])) for m in session.history) + 6 * 40
        with pytest.raises(ContextOverflow):
            list(session.reply("sea " * 300))
        # The failed message is not kept; the session still works.
        assert "".join(session.reply("Thanks!")).strip()
