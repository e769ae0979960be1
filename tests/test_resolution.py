"""One controller resolution path (controller.catalog) behind every entry point: chat, bench, eval, the
lm-eval adapter and the Python API run `--kv adaptive` with the GGUF's own controller, else the one kvq
ships for the model's alias, else the generic one; and `adaptive@B` is what they run by default."""
from __future__ import annotations

import json

import pytest

from kvq_cli.cli.app import app
from kvq_cli.controller.catalog import GENERIC, find_controller
from kvq_cli.controller.embed import embed
from kvq_cli.controller.spec import load_controller
from kvq_cli.models.registry import DEFAULT_MODEL, model_ref, resolve
from kvq_cli.runtime.engine import Engine, ModelRef
from kvq_cli.runtime.kv import DEFAULT_KV, parse_kv

from .conftest import GOLDEN, SHARED_DATA, TEXT

GENERIC_NOTE = "has no controller of its own: adaptive runs the generic one"


@pytest.fixture(scope="module")
def tiny_embedded(tiny_model, tmp_path_factory):
    """The tiny model with a controller of its own (the hand-made golden one)."""
    out = tmp_path_factory.mktemp("emb") / "tiny-kvq.gguf"
    embed(tiny_model, load_controller(GOLDEN / "controller_handmade.json"), out)
    return out


def test_catalog_order(tiny_model, tiny_embedded, model_path):
    assert GENERIC.is_file() and load_controller(GENERIC).norm_prior > 0 and load_controller(GENERIC).k_center is None
    assert find_controller(tiny_embedded).kind == "embedded"
    assert find_controller(tiny_model).kind == "generic"
    shipped = find_controller(model_path, DEFAULT_MODEL)
    assert shipped.kind == "shipped" and shipped.path.name == f"{DEFAULT_MODEL}.json"
    assert find_controller(model_path).kind == "generic"   # a path names no alias
    # model_ref: the same order; rule and oracle take only a controller's K centering (the generic has none)
    adaptive, rule = parse_kv("adaptive"), parse_kv("rule")
    assert model_ref(resolve(None), [adaptive]).source == "shipped"
    assert model_ref(resolve(str(tiny_model)), [adaptive]) == ModelRef(tiny_model, GENERIC, "generic")
    assert model_ref(resolve(str(tiny_model)), [rule]) == ModelRef(tiny_model)
    assert model_ref(resolve(str(tiny_embedded)), [adaptive]) == ModelRef(tiny_embedded, None, "embedded")


def test_python_api(tiny_model, tiny_embedded):
    toks = list(range(10, 110))
    with Engine(str(tiny_model), kv=parse_kv("adaptive@3"), n_ctx=512) as e:
        assert e.model.source == "generic" and "generic" in e.kv_label
        e.decode(toks, 0)
        assert e.kv_stats().rows
    with Engine(tiny_embedded, kv=parse_kv("adaptive"), n_ctx=256) as e:
        assert e.model.source == "embedded" and e.kv_label == "adaptive (controller: embedded)"
        e.decode(toks, 0)


def test_chat(runner, tiny_model, tiny_embedded):
    r = runner.invoke(app, ["chat", str(tiny_model), "--kv", "adaptive", "-p", "Hi", "--max-tokens", "4",
                            "--ctx", "128", "--temp", "0"])
    assert r.exit_code == 0, r.output
    assert GENERIC_NOTE in r.stderr and f"kvq calibrate {tiny_model}" in r.stderr and "KV adaptive:" in r.stderr
    r = runner.invoke(app, ["chat", str(tiny_embedded), "-p", "Hi", "--max-tokens", "4", "--ctx", "128"])
    assert r.exit_code == 0, r.output
    assert GENERIC_NOTE not in r.stderr and f"KV {DEFAULT_KV}:" in r.stderr   # the default policy


def test_chat_default_is_adaptive_on_the_embedded_model(runner):
    h = runner.invoke(app, ["chat", "--help"], env={"COLUMNS": "200"})
    assert h.exit_code == 0 and f"[default: ({DEFAULT_KV}" in " ".join(h.stdout.split())
    r = runner.invoke(app, ["chat", "--ctx", "256", "--max-tokens", "8", "--seed", "1"], input="Hello!\n/exit\n")
    assert r.exit_code == 0, r.output
    assert f"KV {DEFAULT_KV} (controller: shipped for {DEFAULT_MODEL})" in r.stderr
    assert f"KV {DEFAULT_KV}: " in r.stderr


def test_bench(runner, tiny_model, tmp_path):
    out, text = tmp_path / "b.json", tmp_path / "t.txt"
    text.write_text(TEXT)
    r = runner.invoke(app, ["bench", str(tiny_model), "--ctx", "160", "--gen", "4", "--repeats", "1",
                            "--text", str(text), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert GENERIC_NOTE in r.stderr
    recs = json.loads(out.read_text())
    assert [x["kv"] for x in recs] == ["stock-f16", DEFAULT_KV]   # bench's default comparison
    assert all(x["model"] == ModelRef(tiny_model, GENERIC).name for x in recs)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="evaluation data dir missing (KVQ_TEST_DATA)")
def test_eval_runs_generic_and_holds_the_budget(runner, tiny_model, tmp_path):
    """Multiple choice defaults to W = 0: every row is decided after its ubatch, and the rows of one
    ubatch hold the budget on their own, so adaptive@3 holds <= 3.1 bits after every item; the record
    says what the cache held (and the table would name a run over its budget)."""
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", str(tiny_model), "--data", str(SHARED_DATA), "--task", "hellaswag", "--limit", "8",
                            "--kv", "f16,adaptive@3", "--json", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    recs = {x["kv"]: x for x in json.loads(out.read_text())}
    a = recs["adaptive@3"]
    assert a["model"] == ModelRef(tiny_model, GENERIC).name and a["kv_window"] == 0
    assert a["bits_per_elem"] <= a["bits_max"] == max(a["state"]["bits"])
    assert a["bits_max"] <= 3.1 and a["over_budget"] is False and recs["f16"]["over_budget"] is None
    assert "adaptive@3 (held" not in r.stdout


def test_lm_eval_adapter(tiny_model):
    pytest.importorskip("lm_eval", reason="optional extra kvq-cli[lm-eval]")
    from kvq_cli.eval.lm_eval_adapter import KvqLM

    lm = KvqLM(model=str(tiny_model), kv="adaptive", ctx=128)
    try:
        assert lm.engine.model.source == "generic" and lm.engine.window == 0
    finally:
        lm.engine.close()
    lm = KvqLM(ctx=128)   # the defaults: the embedded model, adaptive@3.5 with its shipped controller
    try:
        assert lm.engine.kv.name == DEFAULT_KV and lm.engine.model.source == "shipped"
    finally:
        lm.engine.close()


def test_adaptive_without_any_controller_says_how_to_get_one(runner, tiny_model, monkeypatch, tmp_path):
    """A build without the generic controller: one line naming `kvq calibrate`."""
    import kvq_cli.controller.catalog as catalog

    monkeypatch.setattr(catalog, "GENERIC", tmp_path / "missing.json")
    r = runner.invoke(app, ["chat", str(tiny_model), "--kv", "adaptive", "-p", "hi"])
    assert r.exit_code == 1 and "has no kvq controller" in r.stderr and f"kvq calibrate {tiny_model}" in r.stderr


def test_a_run_over_its_budget_says_so(capsys):
    """A record that held more than B + 0.1 after some item is marked, and the table names it."""
    from kvq_cli.cli.render import eval_table
    from kvq_cli.eval.scoring import EvalRecord, _finalize_mc

    r = EvalRecord(task="hellaswag", kv="rule@3", split="test", model="m", ctx=1024, kv_bits=3.0, kv_window=0,
                   state={"correct": "10", "correct_norm": "11", "bits": [3.0, 3.25]})
    _finalize_mc(r, None, seed=0)
    assert (r.bits_per_elem, r.bits_max, r.over_budget) == (3.125, 3.25, True)
    eval_table([r], "t")
    assert "rule@3 (held 3.25)" in capsys.readouterr().out
