"""`kvq bench`: records, honest bytes, bad input."""
from __future__ import annotations

import json

import pytest

from kvq_cli.cli.app import app
from kvq_cli.eval.bench import BenchRecord

from .conftest import TINY_EMBD_KV, TINY_LAYERS
from .test_errors import assert_one_line_error

FIELDS = {"model", "kv", "ctx", "prefill_tok_s", "decode_tok_s", "kv_bytes", "bits_per_elem", "repeats",
          "decode_ms_per_tok", "policy_ms_per_tok", "policy_share", "n_prefill", "n_gen"}


def _kv_elems(model) -> int:
    """K and V elements per token of the tiny model."""
    return 2 * TINY_LAYERS * TINY_EMBD_KV


def test_bench_json_records(runner, tmp_path, tiny_model):
    out = tmp_path / "b.json"
    elems = _kv_elems(tiny_model)
    r = runner.invoke(app, ["bench", str(tiny_model), "--kv", "stock-f16,f16,q4,rule", "--ctx", "96,160", "--gen", "4",
                            "--json", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    recs = json.loads(out.read_text())
    assert [(x["kv"], x["ctx"]) for x in recs] == [(k, c) for c in (96, 160) for k in ("stock-f16", "f16", "q4", "rule")]
    for x in recs:
        assert FIELDS <= set(x)
        assert x["prefill_tok_s"] > 0 and x["decode_tok_s"] > 0 and x["n_gen"] == 4
        assert x["n_prefill"] == x["ctx"] - 4
    by = {(x["kv"], x["ctx"]): x for x in recs}
    for c in (96, 160):
        held = c  # prefill ctx-gen tokens, then gen decoded tokens are evaluated
        assert by[("stock-f16", c)]["kv_bytes"] == held * elems * 2
        assert by[("f16", c)]["kv_bytes"] == held * elems * 2
        assert by[("q4", c)]["kv_bytes"] == held * elems * 18 // 32
        assert by[("q4", c)]["bits_per_elem"] == 4.5
        assert 4.5 < by[("rule", c)]["bits_per_elem"] < 16
        assert by[("stock-f16", c)]["policy_share"] == 0 and by[("rule", c)]["policy_ms_per_tok"] > 0
    assert "decode t/s" in r.stdout and "rule" in r.stdout
    # every record and the header name the machine: its CPU and SIMD level, and kvq's kernel tiles
    from kvq_cli.eval.machine import cpu_name

    assert {x["cpu"] for x in recs} == {cpu_name()} and all(" tiles" in x["simd"] for x in recs)
    assert cpu_name() in " ".join(r.stdout.split()) and recs[0]["simd"] in " ".join(r.stdout.split())


def test_bench_ratios_roofline_plot_reuse_prefill(runner, tmp_path, tiny_model):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    elems = _kv_elems(tiny_model)
    r = runner.invoke(app, ["bench", str(tiny_model), "--kv", "stock-f16,q4", "--ctx", "96", "--gen", "4", "--repeats", "2",
                            "--vs", "stock-f16", "--roofline", "--reuse-prefill", "--plot", str(png),
                            "--json", str(out)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    recs = {x["kv"]: x for x in json.loads(out.read_text())}
    base, q4 = recs["stock-f16"], recs["q4"]
    assert base["decode_vs"] == 1.0 and base["prefill_vs"] == 1.0 and q4["vs"] == "stock-f16"
    assert q4["decode_vs"] == pytest.approx(q4["decode_tok_s"] / base["decode_tok_s"])
    for x in recs.values():
        assert x["reuse_prefill"] and len(x["prefill_tok_s_runs"]) == 1 and len(x["decode_tok_s_runs"]) == 2
        # every repeat decodes the same tokens from the same prefill: same cache size at the end
        assert x["kv_bytes"] == 96 * elems * (2 if x["kv"] == "stock-f16" else 18 / 32)
        assert 0 < x["weight_bytes"] < tiny_model.stat().st_size
        assert x["bytes_per_token"] == x["weight_bytes"] + x["kv_bytes"]
        assert x["bandwidth_gb_s"] > 0.1
        assert x["bound_tok_s"] == pytest.approx(x["bandwidth_gb_s"] * 1e9 / x["bytes_per_token"])
        assert 0 < x["bound_frac"] < 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "decode ×" in r.stdout and "bound t/s" in r.stdout and "attn × bound" in r.stdout
    # the kvq attention beside its own bound: the KV bytes held read once at the measured bandwidth
    rec = BenchRecord(**{**q4, "attn_ms_per_tok": 2.0})
    assert rec.attn_vs_bound == pytest.approx(2.0 / (q4["kv_bytes"] / (q4["bandwidth_gb_s"] * 1e9) * 1e3))
    assert BenchRecord(**base).attn_vs_bound is None   # a stock cache has no kvq attention


@pytest.mark.parametrize("args,needle", [
    (["--kv", "f16,q4", "--vs", "stock-f16"], "--vs stock-f16 is not among the --kv policies"),
    (["--kv", "stock-f16", "--kv-bits", "3"], "--kv-bits/--kv-window/--kv-window-bits/--kv-center apply to kvq policies"),
    (["--kv", "rule@1"], "between 2 and 16"),
    (["--plot", "/nonexistent/dir/p.png"], "does not exist"),
    (["--kv", "f16,q3"], "unknown --kv value 'q3'"),
    (["--ctx", "12,x"], "--ctx takes comma-separated integers"),
    (["--ctx", "8", "--gen", "8"], "leaves no room to prefill"),
    (["--text", "/nonexistent.txt"], "no such text file"),
    (["--data", "/tmp"], "wikitext2"),
])
def test_bench_bad_input(runner, tmp_path, args, needle):
    out = tmp_path / "b.json"
    r = runner.invoke(app, ["bench", *args, "--json", str(out)])
    assert_one_line_error(r, needle)
    assert not out.exists()
