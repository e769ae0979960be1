"""Session files (llama.cpp's state API) of every cache: save -> restore -> continue gives the tokens
the unbroken run gives, a kvq state comes back byte for byte, and a state that is not this cache's
(another policy, stock <-> kvq, corrupted) is refused in one line. Real model."""
from __future__ import annotations

import pytest

from kvq_cli.cli.app import app
from kvq_cli.config import GenerationConfig
from kvq_cli.errors import StateError
from kvq_cli.runtime.engine import Engine
from kvq_cli.runtime.generate import Generator
from kvq_cli.runtime.kv import parse_kv
from kvq_cli.runtime.state import load_state, save_state

from .conftest import TEXT
from .test_errors import assert_one_line_error

GREEDY = GenerationConfig(max_tokens=24, temperature=0.0)
N_CTX = 512


def _prefix(engine: Engine) -> list[int]:
    return engine.tokenize(TEXT)[:300]   # past the window: decided rows in every pool


def _continue(engine: Engine, gen: Generator) -> list[int]:
    return [t for t, _ in gen.stream(engine.tokenize(" The history of the city of Paris begins"), 24)]


@pytest.fixture(scope="module")
def saved(model_path, tmp_path_factory):
    """Per cache: the session file after a 300-token prefix and the tokens the unbroken run went on with."""
    out = {}
    d = tmp_path_factory.mktemp("states")
    for kv in ("stock-f16", "f16", "q4", "q2", "adaptive@3"):
        with Engine(model_path, kv=parse_kv(kv), n_ctx=N_CTX) as e:
            gen = Generator(e, GREEDY)
            gen.feed(_prefix(e))
            path = save_state(e, d / f"{kv}.state")
            out[kv] = (path, _continue(e, gen))
            gen.close()
    return out


@pytest.mark.parametrize("kv", ["stock-f16", "f16", "q4", "q2", "adaptive@3"])
def test_restore_continues_token_for_token(model_path, saved, kv, tmp_path):
    path, expected = saved[kv]
    with Engine(model_path, kv=parse_kv(kv), n_ctx=N_CTX) as e:
        toks = load_state(e, path)
        assert toks == _prefix(e) and e.n_tokens == 300
        if kv != "stock-f16":   # the kvq block comes back byte for byte
            again = save_state(e, tmp_path / "again.state")
            assert again.read_bytes() == path.read_bytes()
        gen = Generator(e, GREEDY)
        assert _continue(e, gen) == expected
        gen.close()


@pytest.mark.parametrize("kv,file_kv,needle", [
    ("adaptive@3.5", "adaptive@3", "saved with another kvq cache or model (saved: adaptive@3.00"),
    ("adaptive@3", "q4", "saved: q4, 30 layers"),
    ("adaptive@3", "stock-f16", "holds a stock llama.cpp cache"),
    ("stock-f16", "q2", "holds a kvq cache; this context has none"),
])
def test_another_cache_is_refused(model_path, saved, kv, file_kv, needle):
    with Engine(model_path, kv=parse_kv(kv), n_ctx=N_CTX) as e:
        with pytest.raises(StateError, match="cannot restore") as ex:
            load_state(e, saved[file_kv][0])
        assert needle in ex.value.one_line() and "\n" not in ex.value.one_line()
        assert e.n_tokens == 0
        gen = Generator(e, GREEDY)   # and the context still works
        assert len(_continue(e, gen)) > 0
        gen.close()


def _corrupt(src, dst, how: str):
    data = bytearray(src.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
    elif how == "truncate":
        data = data[:len(data) - 1000]
    else:   # llama.cpp's session magic
        data[:4] = b"\0\0\0\0"
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("how,needle", [("flip", "corrupted (checksum mismatch)"), ("truncate", "cannot restore"),
                                        ("header", "cannot restore")])
def test_a_corrupted_state_is_refused_in_one_line(runner, tmp_path, how, needle):
    args = ["chat", "--kv", "adaptive@3", "--ctx", str(N_CTX), "--max-tokens", "8"]
    good = tmp_path / "good.state"
    assert runner.invoke(app, [*args, "--session", str(good), "--prompt", TEXT[:1200]]).exit_code == 0
    bad = _corrupt(good, tmp_path / "bad.state", how)
    before = bad.read_bytes()
    r = runner.invoke(app, [*args, "--session", str(bad), "--prompt", "Hello"])
    assert_one_line_error(r, needle)
    assert bad.read_bytes() == before   # a refused file is left as it was


def test_a_chat_session_continues_across_processes(runner, tmp_path):
    """`kvq chat --session`: the second process restores the first one's conversation and answers the
    next message with exactly the reply one interactive process gives."""
    args = ["chat", "--kv", "adaptive@3", "--ctx", str(N_CTX), "--temp", "0", "--max-tokens", "24"]
    sess = tmp_path / "chat.state"
    first = runner.invoke(app, [*args, "--session", str(sess), "--prompt", "Name three colours."])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*args, "--session", str(sess), "--prompt", "Now name three animals."])
    assert second.exit_code == 0, second.output
    assert "restored" in second.stderr
    both = runner.invoke(app, args, input="Name three colours.\nNow name three animals.\n")
    assert both.exit_code == 0, both.output
    replies = [ln.removeprefix(">>> ") for ln in both.stdout.splitlines() if ln.startswith(">>> ") and ln[4:].strip()]
    assert replies == [first.stdout.strip(), second.stdout.strip()]


def test_a_session_path_that_cannot_be_written_is_one_line(runner, tmp_path):
    r = runner.invoke(app, ["chat", "--session", str(tmp_path / "no" / "such" / "x.state"), "--prompt", "Hi"])
    assert_one_line_error(r, "does not exist")
