"""`kvq convert` / `kvq embed`: HF checkpoints to GGUF, faithful, atomic, stock-loadable."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from kvq_cli.cli.app import app
from kvq_cli.controller.spec import controller_from_reader, load_controller
from kvq_cli.gguf.read import read_gguf

from .conftest import GOLDEN, TEXT
from .test_errors import assert_one_line_error

TOKENIZER_PROBE = "Hello 12345 wörld <|im_start|>user\n ÷ 🎉 x=3.14;  tabs\tand  spaces, CamelCase 2026-11-22"


def _llama(path, **kw):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), verbose=False, seed=0, **kw)


def _logits(path, n_tokens=256):
    text = TEXT[:4000]
    llm = _llama(path, n_ctx=512, logits_all=True)
    try:
        toks = llm.tokenize(text.encode(), add_bos=False, special=False)[:n_tokens]
        assert len(toks) == n_tokens
        llm.eval(toks)
        return toks, np.array(llm.scores[:n_tokens], dtype=np.float64)
    finally:
        llm.close()


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_converted_tensors_are_the_original_weights(model_path, converted_f16):
    """Every converted tensor is the original's dequantized value at f16: names, shapes, Q/K order."""
    import gguf

    orig, conv = read_gguf(model_path), read_gguf(converted_f16)
    conv_t = {t.name: t for t in conv.tensors}
    assert set(conv_t) == {t.name for t in orig.tensors}
    for t in orig.tensors:
        c = conv_t[t.name]
        assert list(c.shape) == list(t.shape), t.name
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        got = np.asarray(c.data).reshape(-1)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert c.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(got, want)
        else:
            assert c.tensor_type == gguf.GGMLQuantizationType.F16, t.name
            np.testing.assert_array_equal(got, want.astype(np.float16), err_msg=t.name)


def test_converted_logits_and_tokens_match_original(model_path, converted_f16):
    toks_a, a = _logits(model_path)
    toks_b, b = _logits(converted_f16)
    assert toks_a == toks_b
    pa, pb = _log_softmax(a), _log_softmax(b)
    kl = (np.exp(pa) * (pa - pb)).sum(-1)
    # The original runs Q4_1 x Q8_1-quantized activations, the copy f16 x f16: the weights are
    # identical (test above), so the remaining gap is activation quantization only.
    assert kl.mean() < 0.01, kl.mean()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
    assert np.abs(a - b).mean() < 0.05 * np.abs(a).mean()


def test_converted_tokenizer_is_identical(model_path, converted_f16):
    metas = []
    for path in (model_path, converted_f16):
        llm = _llama(path, n_ctx=64)
        try:
            ids = [llm.tokenize(TOKENIZER_PROBE.encode(), add_bos=b, special=s) for b in (False, True) for s in (False, True)]
            meta = {k: v for k, v in llm.metadata.items() if k.startswith("tokenizer.")}
            metas.append((ids, meta))
        finally:
            llm.close()
    assert metas[0][0] == metas[1][0]
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"):
        assert metas[0][1][key] == metas[1][1][key], key
    a, b = read_gguf(model_path), read_gguf(converted_f16)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert a.fields[key].contents() == b.fields[key].contents(), key


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_quantized_outtypes_load_and_generate(runner, hf_checkpoint, tmp_path, outtype):
    import gguf

    out = tmp_path / f"m-{outtype}.gguf"
    r = runner.invoke(app, ["convert", str(hf_checkpoint), "--out", str(out), "--outtype", outtype, "--no-calibrate"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    types = {t.tensor_type.name for t in read_gguf(out).tensors}
    assert types == {"F32", outtype.upper()}
    assert read_gguf(out).fields["general.file_type"].contents() == int(
        getattr(gguf.LlamaFileType, f"MOSTLY_{outtype.upper()}"))
    g = runner.invoke(app, ["chat", str(out), "-p", "Name a fruit.", "--max-tokens", "12", "--ctx", "256"])
    assert g.exit_code == 0 and g.stdout.strip(), g.output


def test_embed_round_trip_and_stock_load(runner, converted_f16, tmp_path, model_path):
    ctrl_file = GOLDEN / "controller_handmade.json"
    out = tmp_path / "with-ctrl.gguf"
    before = converted_f16.stat().st_mtime_ns, converted_f16.stat().st_size
    r = runner.invoke(app, ["embed", str(converted_f16), str(ctrl_file), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (converted_f16.stat().st_mtime_ns, converted_f16.stat().st_size) == before  # input untouched
    reader = read_gguf(out)
    back = controller_from_reader(reader)
    want = load_controller(ctrl_file)
    assert back.features == want.features and back.precisions == want.precisions
    for name in ("w1", "b1", "w2", "b2", "feature_mean", "feature_std"):  # stored as f32, exactly
        np.testing.assert_array_equal(np.float32(getattr(back, name)), np.float32(getattr(want, name)))
    x = np.random.default_rng(0).normal(size=(64, 4)) * np.array(want.feature_std) + np.array(want.feature_mean)
    np.testing.assert_array_equal(back.decide(x), want.decide(x))
    # All other metadata and tensor bytes are carried over unchanged.
    src = read_gguf(converted_f16)
    for t_src, t_out in zip(src.tensors, reader.tensors):
        assert t_src.name == t_out.name
        assert np.array_equal(np.asarray(t_src.data), np.asarray(t_out.data))
    meta = lambda rd: {k: f.contents() for k, f in rd.fields.items()  # noqa: E731
                       if not k.startswith(("GGUF.", "kvq."))}
    assert meta(src) == meta(reader)
    # inspect shows the controller
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert info["controller"] == {"version": 1, "features": want.features, "precisions": [2, 4, 8, 16],
                                  "w1": [3, 4], "w2": [4, 3], "budget_bits": 4.0, "granularity": "token",
                                  "k_center": False, "norm_prior": 0}
    table = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "300"})
    assert "trained for 4 bits" in table.stdout
    # The stock cache path ignores the kvq.* keys; the kvq runtime runs the controller.
    for kv in ("stock-f16", "adaptive"):
        g = runner.invoke(app, ["chat", str(out), "-p", "Say hi.", "--max-tokens", "8", "--ctx", "128", "--kv", kv])
        assert g.exit_code == 0 and g.stdout.strip(), (kv, g.output)
    # Re-embedding replaces, never duplicates, the controller keys.
    out2 = tmp_path / "again.gguf"
    r2 = runner.invoke(app, ["embed", str(out), str(ctrl_file), "--out", str(out2)])
    assert r2.exit_code == 0 and "replaced" in r2.stderr
    keys = [k for k in read_gguf(out2).fields if k.startswith("kvq.")]
    assert len(keys) == len(set(keys)) == 13   # each controller key once, kvq.controller.head included


def test_convert_with_controller(runner, hf_checkpoint, tmp_path):
    out = tmp_path / "c.gguf"
    r = runner.invoke(app, ["convert", str(hf_checkpoint), "-o", str(out),
                            "--controller", str(GOLDEN / "controller_handmade.json")])
    assert r.exit_code == 0, r.output
    assert controller_from_reader(read_gguf(out)).budget_bits == 4.0


def test_pull_converts_calibrates_then_chats_adaptive(tmp_path, hf_checkpoint):
    """End to end: `kvq pull` of an alias kvq ships no controller for downloads (here: HF's offline
    cache), converts, and calibrates a controller into the GGUF (a reduced size here); chat then runs
    `--kv adaptive` with that controller."""
    from kvq_cli.controller.spec import controller_from_reader
    from kvq_cli.train.calibrate import MIN_TOKENS

    from .test_pull import COMMIT, run_kvq

    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in hf_checkpoint.iterdir():
        os.symlink(f, snap / f.name)  # the hub cache itself links snapshots to blobs
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "KVQ_HOME": str(tmp_path / "home")}
    r = run_kvq(["pull", "smollm2-135m", "--calib-tokens", str(MIN_TOKENS)], env, timeout=600)
    assert r.returncode == 0, r.stderr
    gguf_path = tmp_path / "home" / "models" / "smollm2-135m-f16.gguf"
    assert r.stdout.strip() == f"smollm2-135m: {gguf_path}"
    assert "controller embedded in smollm2-135m-f16.gguf" in r.stderr
    ctrl = controller_from_reader(read_gguf(gguf_path))   # the new controller travels in the GGUF
    assert ctrl.granularity == "token_layer" and ctrl.budget_bits == 3.5 and ctrl.k_center is not None
    assert [p for p in gguf_path.parent.iterdir() if p != gguf_path] == []   # no temporary left
    m = run_kvq(["models", "--json"], env)
    status = {row["alias"]: row["status"] for row in json.loads(m.stdout)}
    assert status["smollm2-135m"] == "gguf" and status["smollm2-360m"] == "not downloaded"
    c = run_kvq(["chat", "smollm2-135m", "--kv", "adaptive", "-p", "The sea is", "--max-tokens", "8",
                 "--ctx", "128", "--temp", "0"], env)
    assert c.returncode == 0 and c.stdout.strip(), c.stderr
    assert "generic" not in c.stderr and "KV adaptive:" in c.stderr
    # A model that is neither local nor in the (offline) cache: chat tries to pull, fails in one line.
    c2 = run_kvq(["chat", "smollm2-360m", "-p", "hi"], env)
    assert c2.returncode == 1
    lines = [l for l in c2.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("kvq: error:") and "offline" in lines[-1]
    assert not list((tmp_path / "home" / "models").glob("*360m*"))


# -- bad input: one line, exit 1, no partial file -------------------------------------

def _no_outputs(d: Path):
    return sorted(p.name for p in d.iterdir())


def test_missing_config(runner, hf_checkpoint, tmp_path):
    src = tmp_path / "ck"
    shutil.copytree(hf_checkpoint, src, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = runner.invoke(app, ["convert", str(src), "-o", str(out_dir / "x.gguf")])
    assert_one_line_error(r, "missing config.json")
    assert _no_outputs(out_dir) == []


def test_unsupported_architecture_lists_supported(runner, hf_checkpoint, tmp_path):
    src = tmp_path / "ck"
    src.mkdir()
    cfg = json.loads((hf_checkpoint / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "x.gguf")])
    assert_one_line_error(r, "unsupported architecture MistralForCausalLM", "LlamaForCausalLM")
    assert not (tmp_path / "x.gguf").exists()


def test_truncated_safetensors(runner, hf_checkpoint, tmp_path):
    src = tmp_path / "ck"
    src.mkdir()
    for f in hf_checkpoint.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, src / f.name)
    data = (hf_checkpoint / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 3])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = runner.invoke(app, ["convert", str(src), "-o", str(out_dir / "x.gguf")])
    assert_one_line_error(r, "model.safetensors is truncated")
    assert _no_outputs(out_dir) == []


def test_no_write_permission(runner, hf_checkpoint, tmp_path):
    if os.geteuid() == 0:
        target = Path("/sys")  # read-only to root too (CI runs as root)
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o555)
    r = runner.invoke(app, ["convert", str(hf_checkpoint), "-o", str(target / "x.gguf")])
    assert_one_line_error(r, "permission denied")
    assert not (target / "x.gguf").exists()


def test_disk_full_leaves_no_partial_file(runner, hf_checkpoint, tmp_path, monkeypatch):
    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def fill_disk(self, tensor, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 20:  # part of the file is already on disk when the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fill_disk)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = runner.invoke(app, ["convert", str(hf_checkpoint), "-o", str(out_dir / "x.gguf")])
    assert_one_line_error(r, "no space left on device")
    assert calls["n"] == 21
    assert _no_outputs(out_dir) == []


def test_interrupted_conversion_leaves_no_file(hf_checkpoint, tmp_path):
    from kvq_cli.models.convert import convert

    def interrupt(name, i, n):
        if i == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(hf_checkpoint, tmp_path / "x.gguf", on_tensor=interrupt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(w1=d["w1"][:2]), "w1 must be 3x4"),
    (lambda d: d["b2"].__setitem__(0, float("nan")), "non-finite"),
    (lambda d: d.update(version=7), "unsupported controller version 7"),
    (lambda d: d.update(features=["token_freq", "quality", "attn_var", "moon_phase"]), "unknown feature"),
    (lambda d: d.update(head="softmax"), "controller head 'softmax' must be one of logits, log_damage"),
    (lambda d: d.update(damage_floor=[4.0, float("inf"), 1.0]), "damage_floor must be finite and >= 0"),
    (lambda d: d.update(damage_floor=[4.0, 1.0, 1.0], precisions=[2, 8, 4, 16]), "precisions in ascending order"),
    (lambda d: d.pop("w2"), "lacks field 'w2'"),
])
def test_malformed_controller_is_rejected(runner, converted_f16, tmp_path, mutate, needle):
    d = json.loads((GOLDEN / "controller_handmade.json").read_text())
    mutate(d)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    out = tmp_path / "o.gguf"
    r = runner.invoke(app, ["embed", str(converted_f16), str(bad), "--out", str(out)])
    assert_one_line_error(r, needle)
    assert not out.exists()


def test_embed_refuses_in_place(runner, converted_f16):
    r = runner.invoke(app, ["embed", str(converted_f16), str(GOLDEN / "controller_handmade.json"),
                            "--out", str(converted_f16)])
    assert_one_line_error(r, "never edits a GGUF in place")


def test_malformed_controller_in_gguf_is_reported(runner, tmp_path):
    from kvq_cli.gguf.keys import Controller as K

    from .conftest import write_tiny_gguf

    p = write_tiny_gguf(tmp_path / "t.gguf", {K.VERSION: 1, K.HIDDEN: 3, K.FEATURES: ["quality"],
                                              K.PRECISIONS: [4, 8], K.W1: [1.0, 2.0], K.W2: [1.0] * 6,
                                              K.B1: [0.0] * 3, K.B2: [0.0] * 2,
                                              K.FEATURE_MEAN: [0.0], K.FEATURE_STD: [1.0]})
    info = json.loads(runner.invoke(app, ["inspect", str(p), "--json"]).stdout)
    assert "w1 2 != 3x1" in info["controller"]["error"]


def test_bf16_safetensors_are_read_exactly(tmp_path):
    from kvq_cli.models.safetensors_io import SafetensorsFile

    vals = np.array([1.0, -2.5, 3.140625, 1e-3], dtype=np.float32)
    bf16 = (vals.view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"t": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bf16.tobytes())
    got = SafetensorsFile(tmp_path / "m.safetensors").load("t")
    np.testing.assert_array_equal(got, (bf16.astype(np.uint32) << 16).view(np.float32))
    assert got[1] == -2.5
