"""`kvq eval`: task formats, scoring vs a direct computation, statistics, resume, end to end."""
from __future__ import annotations

import bz2
import json

import numpy as np
import pytest

from kvq_cli.cli.app import app
from kvq_cli.errors import BadOption
from kvq_cli.eval.scoring import (EvalConfig, EvalRun, Scorer, bootstrap_ci, encode_pair, mc_correct)
from kvq_cli.runtime.engine import Engine
from kvq_cli.runtime.kv import parse_kv, parse_kv_list
from kvq_cli.eval.tasks import McItem, load_mc_task

from .conftest import SHARED_DATA
from .test_errors import assert_one_line_error

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="evaluation data dir missing (KVQ_TEST_DATA)")


def test_hellaswag_prompts_match_llama_cpp_dataset():
    """Our lm-eval preprocessing agrees with llama.cpp's independently built hellaswag text.

    That file keeps ctx_b's case (lm-eval capitalizes it), so contexts compare case-folded.
    """
    items = load_mc_task(SHARED_DATA, "hellaswag", limit=300)
    lines = bz2.open(SHARED_DATA / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8").read().split("\n")
    for i, it in enumerate(items):
        block = lines[6 * i:6 * i + 6]
        assert it.context.lower() == block[0].lower()
        assert it.gold == int(block[1])
        assert list(it.choices) == block[2:6]
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"


def test_arc_and_obqa_prompts():
    arc = load_mc_task(SHARED_DATA, "arc-challenge", limit=3)
    assert all(it.context.startswith("Question: ") and it.context.endswith("\nAnswer:") for it in arc)
    raw = json.loads((SHARED_DATA / "arc" / "ARC-Challenge-Test.jsonl").read_text().splitlines()[0])
    assert arc[0].choices == tuple(c["text"] for c in raw["question"]["choices"])
    assert arc[0].choices[arc[0].gold] == next(c["text"] for c in raw["question"]["choices"] if c["label"] == raw["answerKey"])
    ob = load_mc_task(SHARED_DATA, "openbookqa", limit=2)
    assert ob[1].context == "There is most likely going to be fog around:" and ob[1].choices[ob[1].gold] == "a marsh"
    # numeric answer labels ("1".."4") in ARC-Easy map to the right choice
    easy = load_mc_task(SHARED_DATA, "arc-easy")
    rows = [json.loads(x) for x in (SHARED_DATA / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()]
    numeric = [(it, r) for it, r in zip(easy, rows) if r["answerKey"].isdigit()]
    assert numeric and all(r["question"]["choices"][it.gold]["label"] == r["answerKey"] for it, r in numeric)


def test_acc_norm_divides_by_characters():
    item = McItem("x", "ctx", ("a", "bbbbbbbbbb"), gold=1)
    # raw: choice 0 wins (-2 > -5); per character: -2/1 < -5/10, so choice 1 wins
    assert mc_correct(item, np.array([-2.0, -5.0])) == (False, True)


@pytest.fixture(scope="module")
def stock_engine(model_path):
    e = Engine(model_path, kv=parse_kv("stock-f16"), n_ctx=512)
    yield e
    e.close()


@pytest.fixture(scope="module")
def f16_weights_engine(converted_f16):
    """f16 weights: the Q4_1 model's q8 activation rounding makes logits depend on batch shapes."""
    e = Engine(converted_f16, kv=parse_kv("stock-f16"), n_ctx=512)
    yield e
    e.close()


def _direct_logprob(engine: Engine, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx) from one decode of ctx + cont from an empty cache."""
    seq = ctx + cont
    logits = engine.decode(seq, 0, logits_from=0).astype(np.float64)
    lp = logits - logits.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    return float(sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


@pytest.mark.parametrize("task", ["arc-easy", "hellaswag"])
def test_scoring_matches_direct_computation(f16_weights_engine, task):
    """Context prefilled once and reused for every choice == each (context + choice) from scratch."""
    eng = f16_weights_engine
    scorer = Scorer(eng)
    for it in load_mc_task(SHARED_DATA, task, limit=3):
        lls = scorer.score_item(it)
        for c, ll in zip(it.choices, lls):
            ctx, cont = encode_pair(eng, it.context, " " + c)
            assert ctx + cont == eng.tokenize(it.context + " " + c)
            # batch shapes differ (prefill once + continuation vs one decode): f16 activation
            # rounding differs by ~0.01 nat over a 20-token ending; a wrong position or token
            # would be off by nats
            assert ll == pytest.approx(_direct_logprob(eng, ctx, cont), abs=0.05)
        assert np.all(lls < 0)


@pytest.fixture(scope="module", params=["q4", "rule@3"])
def w0_engine(request, model_path):
    """A static and a rule policy with W = 0, as `kvq eval` runs them on multiple choice."""
    from kvq_cli.runtime.kv import KvqOptions

    e = Engine(model_path, kv=parse_kv(request.param), n_ctx=512, kvq=KvqOptions(window=0))
    yield e
    e.close()


def test_first_token_is_predicted_from_the_decided_context(w0_engine):
    """The first continuation token, like the others, sees the cache as the policy left it.

    A static policy quantizes rows as it stores them, so predicting the first token within the
    context's own ubatch (one decode of the context) or after it (the Scorer) is the same
    computation, bit for bit. A rule/adaptive policy decides rows after each ubatch: within the
    context's ubatch the context is still f16, so the two differ, by far more than rounding.
    """
    from kvq_cli.eval.scoring import mean_kl
    from kvq_cli.train.oracle import log_softmax as _log_softmax

    e = w0_engine
    scorer = Scorer(e)
    for it in load_mc_task(SHARED_DATA, "arc-easy", limit=3):
        ctx, cont = encode_pair(e, it.context, " " + it.choices[0])
        first = scorer.logprobs(ctx, cont)[:1]
        scorer.forget()
        undecided = _log_softmax(e.decode(ctx, 0, logits_from=len(ctx) - 1).astype(np.float64))
        if e.kv.name == "q4":
            assert np.array_equal(first, undecided)
        else:
            assert mean_kl([undecided], [first]) > 0.02      # measured 0.09-0.21 on these items at 3 bits


def test_ending_ubatch_one_scores_as_generation_would(w0_engine):
    """--ending-ubatch 1: each ending token decoded on its own, so a rule/adaptive policy has
    decided the rows before it (one ubatch: they stay f16 until the ending ends). A static
    policy stores rows quantized either way: same log-likelihoods up to batch-shape rounding."""
    e = w0_engine
    whole, single = Scorer(e), Scorer(e, ending_ubatch=1)
    gaps = []
    for it in load_mc_task(SHARED_DATA, "arc-easy", limit=3):
        ctx, cont = encode_pair(e, it.context, " " + it.choices[0])
        assert len(cont) > 1
        a = whole.logprobs(ctx, cont)
        b = single.logprobs(ctx, cont)
        assert a.shape == b.shape == (len(cont), e.dims.n_vocab)
        assert np.array_equal(a[0], b[0])      # the first token: same cache, same one-token ubatch
        gaps.append(float(np.abs(a[1:] - b[1:]).max()))
    if e.kv.name == "q4":
        assert max(gaps) < 0.05
    else:
        assert max(gaps) > 0.1


def test_encode_pair_moves_trailing_space(stock_engine):
    ctx, cont = encode_pair(stock_engine, "The sky is ", "blue")
    assert stock_engine.detokenize(ctx) == "The sky is" and stock_engine.detokenize(cont) == " blue"


def test_bootstrap_interval():
    rng = np.random.default_rng(1)
    x = (rng.random(2000) < 0.4).astype(float)
    lo, hi = bootstrap_ci(x, seed=3)
    assert lo < x.mean() < hi
    assert 0.03 < hi - lo < 0.05          # about 2 x 1.96 x sqrt(.4 x .6 / 2000) = 0.043
    assert bootstrap_ci(x, seed=3) == [lo, hi]
    assert bootstrap_ci(np.zeros(50), seed=0) == [0.0, 0.0]


def test_eval_end_to_end_every_task(runner, tmp_path, tiny_model):
    """--limit 20 on every task, three policies side by side, JSON records with intervals (the tiny model:
    the command's mechanics; the quality of the caches is measured on the real model elsewhere)."""
    out = tmp_path / "eval.json"
    r = runner.invoke(app, ["eval", str(tiny_model), "--data", str(SHARED_DATA), "--task", "all", "--kv", "f16,q4,q2",
                            "--limit", "20", "--tokens", "1024", "--json", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    recs = {(x["task"], x["kv"]): x for x in json.loads(out.read_text())}
    assert set(recs) == {(t, k) for t in ("hellaswag", "arc-easy", "arc-challenge", "openbookqa", "wikitext2")
                         for k in ("f16", "q4", "q2")}
    for (task, kv), x in recs.items():
        assert x["complete"] and x["ref"] == "f16"
        assert x["bits_per_elem"] == pytest.approx({"f16": 16.0, "q4": 4.5, "q2": 2.25}[kv])
        if task == "wikitext2":
            assert x["n"] == 512 and np.isfinite(x["ppl"]) and x["ppl_ci95"][0] <= x["ppl"] <= x["ppl_ci95"][1]
            continue
        assert x["n"] == 20 and 0 <= x["acc"] <= 1 and 0 <= x["acc_norm"] <= 1
        assert x["acc_ci95"][0] <= x["acc"] <= x["acc_ci95"][1]
        assert len(x["state"]["correct"]) == 20
        if kv != "f16":
            d = np.array(list(x["state"]["correct"]), int) - np.array(list(recs[(task, "f16")]["state"]["correct"]), int)
            assert x["diff_acc"] == pytest.approx(d.mean())
            assert len(x["state"]["kl"]) == 20 and x["kl_ci95"][0] <= x["kl"] <= x["kl_ci95"][1]
        else:
            assert x["kl"] is None
    for task in ("hellaswag", "arc-easy", "arc-challenge", "openbookqa"):   # KL orders the caches on 20 items
        assert 0 < recs[(task, "q4")]["kl"] < recs[(task, "q2")]["kl"]
    w = {k: recs[("wikitext2", k)] for k in ("f16", "q4", "q2")}
    assert w["f16"]["kl"] is None and 0 < w["q4"]["kl"] < w["q2"]["kl"]
    assert "hellaswag" in r.stdout and "acc_norm" in r.stdout


def test_resume_continues_and_matches_a_fresh_run(tiny_model, tmp_path):
    pol = tuple(parse_kv_list("stock-f16,q4"))
    base = dict(model=tiny_model, policies=pol, tasks=("arc-easy",), data=SHARED_DATA, ref="stock-f16")
    first = EvalRun(EvalConfig(**base, limit=4)).run()
    saved = json.loads(json.dumps([r.__dict__ for r in first]))
    resumed_run = EvalRun(EvalConfig(**base, limit=7), previous=saved)
    calls = []
    resumed = resumed_run.run(lambda t, i, n: calls.append(i))
    assert calls[0] == 5  # items 1-4 were not scored again
    fresh = EvalRun(EvalConfig(**base, limit=7)).run()
    for a, b in zip(resumed, fresh):
        assert a.n == b.n == 7 and a.complete
        assert a.state["correct"] == b.state["correct"] and a.state["correct_norm"] == b.state["correct_norm"]
        assert a.state["correct"][:4] == saved[[x["kv"] for x in saved].index(a.kv)]["state"]["correct"]
    assert "1" in fresh[0].state["correct"] + fresh[0].state["correct_norm"]  # not a trivial all-wrong run
    # KL vs the reference continues too: items 5-7 of q4 against the reference's logits of this run
    assert resumed[1].state["kl"] == pytest.approx(fresh[1].state["kl"], rel=1e-5) and len(fresh[1].state["kl"]) == 7
    assert resumed[1].kl == pytest.approx(fresh[1].kl, rel=1e-5) and resumed[0].kl is None


def test_ending_ubatch_is_part_of_the_resume_key(tiny_model):
    """Records scored with whole-ending ubatches are not resumed by an --ending-ubatch 1 run."""
    base = dict(model=tiny_model, policies=tuple(parse_kv_list("q4")), tasks=("arc-easy",), data=SHARED_DATA,
                ref=None, limit=2)
    first = EvalRun(EvalConfig(**base)).run()
    saved = json.loads(json.dumps([r.__dict__ for r in first]))
    assert saved[0]["ending_ubatch"] is None and saved[0]["n"] == 2
    again = EvalRun(EvalConfig(**base, ending_ubatch=1), previous=saved)
    assert again.records[0].n == 0 and again.records[0].ending_ubatch == 1
    assert [r.ending_ubatch for r in again.others] == [None]
    assert EvalRun(EvalConfig(**base), previous=saved).records[0].n == 2


def test_window_bits_are_part_of_the_resume_key(model_path):
    """A rule/adaptive record with the q8_0 window (the default since it was added) is not resumed
    from one with the f16 window, whose key (kv_window_bits None) is that of records made before."""
    from kvq_cli.eval.scoring import window_bits_key
    from kvq_cli.runtime.kv import KvqOptions

    rule, q4, stock = parse_kv("rule@3"), parse_kv("q4"), parse_kv("stock-f16")
    assert window_bits_key(KvqOptions(), rule) == 8
    assert window_bits_key(KvqOptions(window_bits=16), rule) is None
    assert window_bits_key(KvqOptions(window=0), rule) is None         # no window, nothing to key
    assert window_bits_key(KvqOptions(), q4) is None and window_bits_key(KvqOptions(), stock) is None
    assert window_bits_key(KvqOptions(window=16, window_bits=8), q4) == 8
    base = dict(model=model_path, policies=(rule,), tasks=("wikitext2",), data=SHARED_DATA, ref=None)
    old = EvalRun(EvalConfig(**base, kvq=KvqOptions(window_bits=16))).records[0]
    assert old.kv_window_bits is None and old.kv_window == 32
    saved = json.loads(json.dumps([old.__dict__]))
    saved[0]["n"] = 7
    assert EvalRun(EvalConfig(**base), previous=saved).records[0].n == 0
    assert EvalRun(EvalConfig(**base, kvq=KvqOptions(window_bits=16)), previous=saved).records[0].n == 7


def test_oracle_on_multiple_choice(model_path):
    """oracle@B on multiple choice: each item's context rows get the damage-optimal bits for that
    item's endings; the cache as the last ending leaves it holds B bits (the ending rows, used
    at f16 inside their ubatch, get 2); at the static 4-bit cache's bits it has lower KL."""
    from kvq_cli.runtime.inspector import Inspector
    from kvq_cli.runtime.kv import KvqOptions
    from kvq_cli.train.oracle import oracle_mc_assignment

    cfg = EvalConfig(model=model_path, policies=tuple(parse_kv_list("f16,q4,oracle@4.5", online=False)), tasks=("openbookqa",),
                     data=SHARED_DATA, split="dev", limit=6, ref="f16", kvq=KvqOptions(window=0))
    f16, q4, oracle = EvalRun(cfg).run()
    assert oracle.n == 6 and oracle.complete and oracle.bits_per_elem == pytest.approx(4.5, abs=0.05)
    assert max(abs(b - 4.5) for b in oracle.state["bits"]) < 0.1     # every item, not only on average
    assert q4.bits_per_elem == pytest.approx(4.5) and 0 < oracle.kl < 0.5 * q4.kl   # measured 0.013 vs 0.086
    item = load_mc_task(SHARED_DATA, "openbookqa", split="dev", limit=1)[0]
    opts = KvqOptions(window=0, per_layer=True, record_q=True)
    with Inspector(model_path, kv=parse_kv("oracle@3"), n_ctx=512, kvq=opts) as e:
        pairs = [encode_pair(e, item.context, " " + c) for c in item.choices]
        ctx, seqs = pairs[0][0], [pairs[0][0][-1:] + cont[:-1] for _, cont in pairs]
        bits = oracle_mc_assignment(e, ctx[:-1], seqs, 3.0)
        n0 = len(ctx) - 1
        assert bits.shape == (n0 + max(map(len, seqs)), 30) and (bits[n0:] == 2).all()
        assert len(set(bits[:n0].ravel().tolist())) > 1     # a mix, decided per (position, layer)
        e.decode(ctx[:-1], 0)
        e.decode(seqs[-1], n0)
        assert e.kv_stats().bits_per_elem == pytest.approx(3.0, abs=0.1)
        with pytest.raises(BadOption, match="leave out --ending-ubatch"):
            Scorer(e, ending_ubatch=1)


def test_mc_kl_when_the_reference_was_scored_earlier(tiny_model, monkeypatch):
    """A policy added to a file whose reference is complete: the reference's logits are computed again."""
    base = dict(model=tiny_model, tasks=("openbookqa",), data=SHARED_DATA, ref="f16", limit=5)
    both = EvalRun(EvalConfig(**base, policies=tuple(parse_kv_list("f16,q2")))).run()
    only_ref = EvalRun(EvalConfig(**base, policies=tuple(parse_kv_list("f16")))).run()
    saved = json.loads(json.dumps([r.__dict__ for r in only_ref]))
    later = EvalRun(EvalConfig(**base, policies=tuple(parse_kv_list("f16,q2"))), previous=saved).run()
    assert later[0].state["correct"] == both[0].state["correct"] and later[0].kl is None
    assert len(later[1].state["kl"]) == 5 and later[1].kl == pytest.approx(both[1].kl, rel=1e-5) and later[1].kl > 0.01
    # a resumed record scored without KL keeps its items and reports no KL rather than a partial one
    old = json.loads(json.dumps([r.__dict__ for r in both]))
    del old[1]["state"]["kl"]
    again = EvalRun(EvalConfig(**{**base, "limit": 6}, policies=tuple(parse_kv_list("f16,q2"))), previous=old).run()
    assert again[1].n == 6 and again[1].state["kl"] is None and again[1].kl is None
    # --no-mc-kl: the reference is not scored again for items it has, and no KL is reported
    import kvq_cli.eval.scoring as ev

    calls = []
    score = ev.Scorer.score_item_lps
    monkeypatch.setattr(ev.Scorer, "score_item_lps", lambda self, item: calls.append(1) or score(self, item))
    for mc_kl, n_calls in ((False, 5), (True, 10)):
        calls.clear()
        saved = json.loads(json.dumps([r.__dict__ for r in only_ref]))
        res = EvalRun(EvalConfig(**base, policies=tuple(parse_kv_list("f16,q2")), mc_kl=mc_kl), previous=saved).run()
        assert len(calls) == n_calls and res[1].state["correct"] == both[1].state["correct"]
        assert (res[1].kl is None) == (not mc_kl)


@pytest.mark.parametrize("args,needle", [
    (["--task", "hellaswag", "--split", "dev"], "hellaswag has no dev split"),
    (["--task", "squad"], "unknown task 'squad'"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--limit", "piqa=3"], "--limit names tasks not in --task"),
    (["--kv", "f16,f16"], "lists a policy twice"),
    (["--kv", "q4", "--ref", "q9"], "unknown --kv value 'q9'"),
    (["--resume"], "--resume needs --json"),
    (["--ending-ubatch", "0"], "--ending-ubatch must be >= 1"),
    (["--kv", "oracle@3", "--task", "arc-easy", "--ending-ubatch", "1"], "leave out --ending-ubatch"),
])
def test_eval_bad_input(runner, args, needle):
    r = runner.invoke(app, ["eval", "--data", str(SHARED_DATA), *args])
    assert_one_line_error(r, needle)


def test_eval_bad_data_and_resume_file(runner, tmp_path):
    assert_one_line_error(runner.invoke(app, ["eval", "--data", str(tmp_path / "nope")]), "is not a directory")
    assert_one_line_error(runner.invoke(app, ["eval", "--data", str(tmp_path), "--task", "arc-easy"]),
                          "no arc/ARC-Easy-Test.jsonl under")
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "ARC-Easy-Test.jsonl").write_text('{"id": 1}\n')
    assert_one_line_error(runner.invoke(app, ["eval", "--data", str(tmp_path), "--task", "arc-easy"]),
                          "not in the expected arc-easy layout")
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    assert_one_line_error(runner.invoke(app, ["eval", "--data", str(SHARED_DATA), "--json", str(bad), "--resume"]),
                          "--resume: cannot read")
    assert bad.read_text() == "{not json"


def test_interrupt_keeps_every_record_of_the_resumed_file(runner, tmp_path, monkeypatch):
    """Ctrl-C writes the scored items and keeps the resumed file's records of other tasks."""
    import kvq_cli.eval.scoring as ev

    out = tmp_path / "r.json"
    args = ["eval", "--data", str(SHARED_DATA), "--kv", "q4", "--ref", "none", "--json", str(out)]
    assert runner.invoke(app, [*args, "--task", "openbookqa", "--limit", "2"]).exit_code == 0
    first = json.loads(out.read_text())
    calls = []
    score = ev.Scorer.score_item_lps

    def interrupted(self, item):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return score(self, item)

    monkeypatch.setattr(ev.Scorer, "score_item_lps", interrupted)
    r = runner.invoke(app, [*args, "--task", "arc-easy", "--limit", "10", "--resume"])
    assert r.exit_code == 130 and "kvq: interrupted" in r.stderr
    recs = {(x["task"], x["kv"]): x for x in json.loads(out.read_text())}
    assert recs[("openbookqa", "q4")]["state"] == first[0]["state"]
    assert recs[("arc-easy", "q4")]["n"] == 3 and not recs[("arc-easy", "q4")]["complete"]
