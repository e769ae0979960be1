"""The lm-eval adapter: lm-eval's own task machinery over kvq agrees with `kvq eval`."""
from __future__ import annotations

import json

import pytest

from .conftest import SHARED_DATA

lm_eval = pytest.importorskip("lm_eval", reason="optional extra kvq-cli[lm-eval] (installed by make setup)")

ARC_YAML = """\
task: kvq_arc_easy_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="evaluation data dir missing (KVQ_TEST_DATA)")
def test_lm_eval_task_matches_kvq_eval(tmp_path, monkeypatch, model_path):
    """ARC-Easy written as an lm-eval YAML task, run by lm-eval on KvqLM, gives kvq eval's per-item results."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from kvq_cli.eval.scoring import EvalConfig, EvalRun
    from kvq_cli.eval.lm_eval_adapter import KvqLM
    from kvq_cli.runtime.kv import parse_kv_list

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arc.yaml").write_text(ARC_YAML.format(path=SHARED_DATA / "arc" / "ARC-Easy-Test.jsonl"))
    n = 12
    lm = KvqLM(kv="q4", ctx=1024)
    try:
        out = simple_evaluate(model=lm, tasks=["kvq_arc_easy_local"], task_manager=TaskManager(include_path=str(tasks)),
                              limit=n, log_samples=True)
    finally:
        lm.engine.close()
    res = out["results"]["kvq_arc_easy_local"]
    ours = EvalRun(EvalConfig(model=model_path, policies=tuple(parse_kv_list("q4")), tasks=("arc-easy",),
                              data=SHARED_DATA, limit=n, ref=None)).run()[0]
    samples = sorted(out["samples"]["kvq_arc_easy_local"], key=lambda s: s["doc_id"])
    assert "".join(str(int(s["acc"])) for s in samples) == ours.state["correct"]
    assert "".join(str(int(s["acc_norm"])) for s in samples) == ours.state["correct_norm"]
    assert res["acc,none"] == pytest.approx(ours.acc) and res["acc_norm,none"] == pytest.approx(ours.acc_norm)
    json.dumps(res)  # plain data


def test_rolling_and_generation(model_path):
    from lm_eval.api.instance import Instance

    from kvq_cli.eval.lm_eval_adapter import KvqLM

    import numpy as np

    lm = KvqLM(kv="f16", ctx=128)
    try:
        short = "The quick brown fox jumps over the lazy dog. " * 5   # one window
        long = short * 4                                               # several windows
        reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in (short, long)]
        one, several = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
        toks = lm.engine.tokenize(short)
        assert len(toks) < 128 < len(lm.engine.tokenize(long))
        # one window = log p(text | EOT) from a single decode
        logits = lm.engine.decode([lm.eot] + toks[:-1], 0, logits_from=0).astype(np.float64)
        lp = logits - logits.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        assert one == pytest.approx(lp[np.arange(len(toks)), toks].sum(), abs=0.05)
        assert several < one < 0
        gen = Instance(request_type="generate_until", doc={}, idx=0,
                       arguments=("Count: one, two, three,", {"until": ["\n"], "max_gen_toks": 8}))
        (reply,) = lm.generate_until([gen], disable_tqdm=True)
        assert isinstance(reply, str) and "\n" not in reply and reply.strip()
    finally:
        lm.engine.close()
