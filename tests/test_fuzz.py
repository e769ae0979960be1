"""Bad GGUFs: a seeded subset of scripts/fuzz_gguf.py (inspect, chat, load: no crash, failures in one
line), and each crash the fuzz found in llama.cpp, refused by gguf.preflight before it loads."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvq_cli.cli.app import app
from kvq_cli.gguf.header import read_header
from kvq_cli.gguf.preflight import model_problems

from .conftest import ROOT
from .test_errors import assert_one_line_error

SUBSET = 100   # cases 0..99 of the committed run (results/fuzz_gguf.json: --seed 0)


if str(ROOT / "scripts") not in sys.path:
    sys.path.append(str(ROOT / "scripts"))
import fuzz_gguf as fuzz  # scripts/
import gguf_mutations as M


@pytest.fixture(scope="module")
def base(tmp_path_factory, model_path):
    return fuzz.build_base(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def mutator(base):
    return M.Mutator(base, seed=0)


def test_fuzz_subset_never_crashes_and_fails_in_one_line(base):
    report = fuzz.run_fuzz(base, cases=SUBSET, seed=0, workers=2)
    for path, c in report["paths"].items():
        assert c["crashes"] == 0 and c["unclean"] == 0, (path, report["failures"])
        assert c["ok"] + c["clean_errors"] == SUBSET and c["ok"] > 0 and c["clean_errors"] > 0, (path, c)
        assert all(line.startswith("kvq: error: ") and "\n" not in line for line in c["errors"])
    assert len(report["mutation_kinds"]) >= 8   # the subset covers most kinds of damage


def _kv(key, vtype, value, item_type=None):
    return {key: M.enc_kv(key, vtype, value, item_type)}


def _vector_as(mutator, ttype, dtype):
    ts = list(mutator.image.tensors)
    j = next(i for i, t in enumerate(ts) if t.name == "output_norm.weight")
    data = np.frombuffer(ts[j].data, np.float32).astype(dtype).tobytes()
    ts[j] = M.Tensor(ts[j].name, ts[j].ne, ttype, memoryview(data))
    return ts


def _dup_tokens(mutator):
    toks = M._full_array(mutator.raw, mutator.header.fields["tokenizer.ggml.tokens"])
    toks[5] = toks[6]
    return _kv("tokenizer.ggml.tokens", M.ARRAY, toks, M.STRING)


# Each of these aborts (SIGABRT) the runtime when llama.cpp loads and runs it unchecked: GGML_ASSERTs in
# the hparam loader, the vocab, the norms, the CPU backend's buffer and binary-op kernels.
CRASHES = {
    "eps_nan": (lambda m: dict(kv=_kv("llama.attention.layer_norm_rms_epsilon", M.F32, float("nan"))),
                "layer_norm_rms_epsilon is nan, not >= 0"),
    "eps_negative": (lambda m: dict(kv=_kv("llama.attention.layer_norm_rms_epsilon", M.F32, -1.0)), "is -1.0, not >= 0"),
    "norm_f16": (lambda m: dict(tensors=_vector_as(m, 1, np.float16)), "output_norm.weight is a vector (a norm or bias) of type F16"),
    "norm_i32": (lambda m: dict(tensors=_vector_as(m, 26, np.int32)), "type I32, which is not a weight type"),
    "block_count_0": (lambda m: dict(kv=_kv("llama.block_count", M.U32, 0)), "llama.block_count is 0, outside 1..512"),
    "block_count_600": (lambda m: dict(kv=_kv("llama.block_count", M.U32, 600)), "is 600, outside 1..512"),
    "rope_scaling": (lambda m: dict(kv=_kv("llama.rope.scaling.type", M.STRING, "foo")), "rope.scaling.type is 'foo'"),
    "experts": (lambda m: dict(kv=_kv("llama.expert_used_count", M.U32, 2)), "expert_used_count (2) exceeds"),
    "no_vocab": (lambda m: dict(kv=_kv("tokenizer.ggml.model", M.STRING, "no_vocab")), "has no tokenizer"),
    "dup_tokens": (lambda m: dict(kv=_dup_tokens(m)), "tokenizer.ggml.tokens repeats token"),
    "alignment_1": (lambda m: dict(kv=_kv("general.alignment", M.U32, 1)), "not 32-byte aligned (general.alignment 1)"),
    "experts_unused": (lambda m: dict(kv=_kv("llama.expert_count", M.U32, 3)), "expert_used_count is missing or 0"),
    # an SPM vocabulary without byte tokens: std::out_of_range escapes llama_tokenize (terminate)
    "spm_without_bytes": (lambda m: dict(kv=_kv("tokenizer.ggml.model", M.STRING, "llama")), "needs the byte tokens"),
}


@pytest.mark.parametrize("name", list(CRASHES))
def test_files_llama_cpp_aborts_on_are_refused_first(runner, mutator, tmp_path, name):
    make, needle = CRASHES[name]
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(mutator.rewrite(name, **make(mutator))[1])
    assert any(needle in p for p in model_problems(read_header(path)))
    for args in (["chat", str(path), "-p", "hi"], ["chat", str(path), "-p", "hi", "--kv", "stock-f16"]):
        assert_one_line_error(runner.invoke(app, args), "cannot be loaded", needle)
    r = runner.invoke(app, ["inspect", str(path), "--json"])   # inspect shows the file and says why
    assert r.exit_code == 0 and needle in r.stdout


def test_base_is_clean_and_the_real_cli_prints_one_line(mutator, base, tmp_path):
    assert model_problems(read_header(base)) == []
    path = tmp_path / "eps.gguf"
    path.write_bytes(mutator.rewrite("eps", **CRASHES["eps_nan"][0](mutator))[1])
    r = subprocess.run([sys.executable, "-m", "kvq_cli", "chat", str(path), "-p", "hi"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [f"kvq: error: {path} cannot be loaded: llama.attention.layer_norm_rms_epsilon "
                                     "is nan, not >= 0 (hint: `kvq inspect` lists every problem)"]


@pytest.mark.parametrize("key,entry,needle", [
    ("kvq.controller.features", lambda n: M.enc_kv("kvq.controller.features", M.ARRAY, [1.0] * n, M.F32), "unknown feature"),
    ("kvq.controller.feature_std", lambda n: M.enc_kv("kvq.controller.feature_std", M.ARRAY, ["1"] * n, M.STRING),
     "feature_std has non-numeric"),
])
def test_controller_values_of_the_wrong_type_are_reported(runner, mutator, tmp_path, key, entry, needle):
    # the right count of the wrong type once reached a TypeError in ControllerSpec.validate (an internal error)
    path = tmp_path / "c.gguf"
    path.write_bytes(mutator.rewrite(key, {key: entry(mutator.header.fields[key].count)})[1])
    r = runner.invoke(app, ["inspect", str(path), "--json"])
    assert r.exit_code == 0 and needle in r.stdout
    assert_one_line_error(runner.invoke(app, ["chat", str(path), "-p", "hi", "--ctx", "128"]), "malformed kvq controller")


def test_inspect_shows_a_file_with_an_infinite_block_count(runner, mutator, tmp_path):
    # inf reached int() in ControllerSpec.from_gguf_fields (the K centering's rows): an OverflowError
    path = tmp_path / "inf.gguf"
    path.write_bytes(mutator.rewrite("inf", _kv("llama.block_count", M.F32, float("inf")))[1])
    r = runner.invoke(app, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert "llama.block_count must be an integer" in r.stdout and "controller metadata is incomplete" in r.stdout
