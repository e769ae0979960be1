"""Context shift on the real model: a chat goes on past its context (kvq's ChatSession and `kvq chat`,
and llama-server with --context-shift), with flat memory; the shifted kvq cache predicts as the stock
cache shifted the same way does."""
from __future__ import annotations

import json
import urllib.request

import pytest

from kvq_cli.cli.app import app
from kvq_cli.eval.shift import F16, long_chat, shift_kl
from kvq_cli.models.registry import model_ref, resolve
from kvq_cli.runtime.engine import Engine
from kvq_cli.runtime.kv import parse_kv
from kvq_cli.runtime.server import ServeConfig, Server

from .conftest import TEXT


def test_a_chat_goes_on_to_three_times_its_context(model_path):
    with Engine(model_path, kv=parse_kv("adaptive@3"), n_ctx=512) as e:
        r = long_chat(e, 3 * 512, max_tokens=48)
    assert r.tokens >= 3 * 512 and r.shifts >= 2
    assert r.empty_replies == 0
    assert r.rss_max_mib - r.rss_after_first_shift_mib < 16   # shifting allocates nothing new


def test_kvq_chat_says_when_it_shifts(runner):
    questions = "".join(f"Tell me fact number {i} about the sea.\n" for i in range(12))
    r = runner.invoke(app, ["chat", "--kv", "adaptive@3.5", "--ctx", "256", "--max-tokens", "32", "--seed", "1"],
                      input=questions)
    assert r.exit_code == 0, r.output
    assert r.stderr.count("context full: shifted") >= 2
    replies = [ln for ln in r.stdout.split(">>> ") if ln.strip()]
    assert len(replies) == 12


def test_the_kvq_shift_predicts_as_the_stock_shift(model_path):
    """wikitext-like text through a 128-token cache that shifts twice: the kvq f16 cache's next tokens
    match stock f16 shifted the same way, and kvq q4 stays within 1.5x of the f16 shift's cost."""
    with Engine(model_path, kv=parse_kv(F16), n_ctx=64) as e:
        toks = e.tokenize(TEXT)[:384]
    recs = {r.policy: r for r in shift_kl(model_path, [toks], ["f16", "q4"], n_ctx=128, n_keep=4)}
    assert recs["f16"].shifts >= 2 and recs["f16"].tokens_scored == 384 - 128
    assert recs["f16"].kl_vs_f16_shifted < 0.02
    assert recs["q4"].kl_vs_full <= 1.5 * recs[F16].kl_vs_full


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_llama_server_context_shift_keeps_answering(model_path):
    policy = parse_kv("adaptive@3.5")
    cfg = ServeConfig(policy, parallel=1, ctx=256, port=0, threads=2, extra=("--context-shift",))
    with Server(model_ref(resolve(str(model_path)), [policy]), cfg) as srv:
        status, r = _post(srv.url + "/completion", {"prompt": "Write a long story about a dragon who learns to cook.",
                                                   "n_predict": 768, "temperature": 0, "ignore_eos": True})
        log = srv.log_path.read_text()
    assert status == 200 and r["tokens_predicted"] == 768
    assert log.count("slot context shift") >= 2
    assert len(set(r["content"].split())) > 20


@pytest.fixture(scope="module")
def slot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slots")


@pytest.mark.parametrize("kv", ["f16", "q4", "q2", "adaptive@3"])
def test_server_slot_restore_continues_token_for_token(model_path, slot_dir, kv):
    """/slots/0?action=save, then a new server restores the slot: the next request gets the text the
    first server gives without the save and restore."""
    policy = parse_kv(kv)
    ref = model_ref(resolve(str(model_path)), [policy])
    cfg = ServeConfig(policy, parallel=1, ctx=1024, port=0, threads=2, extra=("--slot-save-path", str(slot_dir)))
    first = " ".join(TEXT.split()[:150])
    body = {"n_predict": 24, "temperature": 0, "cache_prompt": True, "id_slot": 0}
    with Server(ref, cfg) as srv:
        status, a = _post(srv.url + "/completion", {"prompt": first, **body})
        assert status == 200
        assert _post(srv.url + "/slots/0?action=save", {"filename": f"{kv}.bin"})[0] == 200
        then = first + a["content"] + " Later,"
        expected = _post(srv.url + "/completion", {"prompt": then, **body})[1]["content"]
    with Server(ref, cfg) as srv:
        status, r = _post(srv.url + "/slots/0?action=restore", {"filename": f"{kv}.bin"})
        assert status == 200 and r["n_restored"] > 150
        assert _post(srv.url + "/completion", {"prompt": then, **body})[1]["content"] == expected
    if kv == "q4":   # restoring into another cache is refused with kvq's reason in the log
        other = ServeConfig(parse_kv("q2"), parallel=1, ctx=1024, port=0, threads=2,
                            extra=("--slot-save-path", str(slot_dir)))
        with Server(ref, other) as srv:
            status, _ = _post(srv.url + "/slots/0?action=restore", {"filename": "q4.bin"})
            log = srv.log_path.read_text()
        assert status != 200 and "saved with another kvq cache" in log
