"""kvq.controller.norm_prior: a controller that normalises its features by running statistics of the
model it runs on, in C as in NumPy, and what that buys (decisions that do not move with feature scale)."""
from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest

from kvq_cli.cli.app import app
from kvq_cli.controller.spec import KNOWN_FEATURES, ControllerSpec, controller_from_reader, load_controller
from kvq_cli.errors import ControllerError
from kvq_cli.gguf.keys import Controller as K
from kvq_cli.gguf.read import read_gguf
from kvq_cli.runtime._lib import kvq_lib
from kvq_cli.runtime.inspector import Inspector
from kvq_cli.runtime.kv import KvqOptions, parse_kv

from .conftest import GOLDEN, TEXT
from .test_errors import assert_one_line_error
from .test_runtime import _adaptive_trace, _controller_gguf, _ptr

FEATURES = ["quality", "attn_entropy", "k_absmax", "v_absmax", "attn_recv"]
# feature statistics of "another model": the tiny random model's K and V are ~5x and ~5.5x larger
OTHER_MEAN, OTHER_STD = [0.1, 0.3, 1.0, 0.5, 0.6], [0.01, 0.1, 0.2, 0.1, 0.3]


def _generic(norm_prior: int, mean=OTHER_MEAN, std=OTHER_STD, granularity="token") -> ControllerSpec:
    """A handmade controller over the K/V scales: large |K| + |V| -> high precision, small -> low; the
    quality/received and entropy/received units shift the boundaries."""
    return ControllerSpec(
        features=FEATURES, precisions=[2, 4, 8, 16],
        w1=[[0, 0, 1, 1, 0], [0, 0, -1, -1, 0], [1, 0, 0, 0, -1], [0, 1, 0, 0, 1]], b1=[0.0] * 4,
        w2=[[-1, 1, 0.5, -0.5], [-0.2, 0.3, 0, 0], [0.4, -0.3, -0.2, 0.3], [1, -1, -0.5, 0.5]], b2=[0, 0.4, 0.2, -0.6],
        feature_mean=list(mean), feature_std=list(std), granularity=granularity, norm_prior=norm_prior).validate()


def _eval(path, x) -> np.ndarray:
    """llama_kvq_controller_eval of the model's controller on rows x (runtime feature order)."""
    x = np.ascontiguousarray(x, np.float32)
    bits = np.zeros(len(x), np.int32)
    with Inspector(path, kv=parse_kv("adaptive"), n_ctx=64) as e:
        assert kvq_lib().llama_kvq_controller_eval(e.llm.model, _ptr(x), len(x), _ptr(bits, ctypes.c_int32)) == 0
    return bits


def _runtime_rows(x) -> np.ndarray:
    """Rows of controller features x (FEATURES order) as runtime feature rows, the others 0."""
    out = np.zeros((len(x), len(KNOWN_FEATURES)), np.float32)
    out[:, [KNOWN_FEATURES.index(f) for f in FEATURES]] = x
    return out


@pytest.mark.parametrize("granularity", ["token", "token_layer"])
def test_online_decisions_normalise_as_numpy_does(tiny_model, tmp_path, granularity):
    """An adaptive decode with norm_prior > 0 decides as ControllerSpec.decide on its trace (raw features,
    in decision order: position, then layer), llama_kvq_controller_eval agrees, and the running statistics
    change decisions against the fixed normalisation."""
    ctrl = _generic(4, granularity=granularity)
    path = _controller_gguf(tmp_path, tiny_model, ctrl.gguf_items())
    tr, x = _adaptive_trace(path, ctrl)
    assert (tr.layer >= 0).all() if granularity == "token_layer" else (tr.layer == -1).all()
    # z is computed in double with the same operations in C and NumPy (equal bits), so only the f32 MLP's
    # summation order could differ: no decision sits that close to a tie here
    np.testing.assert_array_equal(tr.bits, ctrl.decide(x))
    np.testing.assert_array_equal(_eval(path, tr.features), tr.bits)
    fixed = _generic(0, granularity=granularity).decide(x)
    assert (tr.bits != fixed).mean() > 0.2   # the tiny model's K/V scales are not the prior's
    assert len(np.unique(tr.bits)) >= 2


def test_statistics_survive_removed_rows(tiny_model, tmp_path):
    """Rolling cache rows back (seq_rm) keeps the statistics: every decision, before and after, is NumPy's
    over the whole decision sequence, and restarting them at the rollback would have decided otherwise."""
    ctrl = _generic(4)
    path = _controller_gguf(tmp_path, tiny_model, ctrl.gguf_items())
    with Inspector(path, kv=parse_kv("adaptive"), n_ctx=256, kvq=KvqOptions(window=8, trace=True),
                   n_batch=32, n_ubatch=8) as e:
        toks = e.tokenize(TEXT)
        e.llm.eval(toks[:64])
        n_before = len(e.trace().bits)
        e.truncate(40)
        e.llm.eval(toks[100:140])
        tr = e.trace()
    x = tr.features[:, [tr.names.index(f) for f in FEATURES]]
    assert n_before < len(tr.bits) and (np.diff(tr.pos[n_before - 1:n_before + 1]) < 0).all()   # rolled back
    np.testing.assert_array_equal(tr.bits, ctrl.decide(x))
    restarted = np.concatenate([ctrl.decide(x[:n_before]), ctrl.decide(x[n_before:])])
    assert (restarted != tr.bits).any()


def test_decisions_do_not_move_with_the_feature_scale(tiny_model, tmp_path):
    """K and V 10x larger on every row (another model's scale): after the first rows the running statistics
    have caught up (500 rows) and the decisions are those of the unscaled rows; with the fixed normalisation
    they are not."""
    rng = np.random.default_rng(1)
    n = 2000
    x = np.stack([rng.normal(0.1, 0.01, n), np.abs(rng.normal(0.3, 0.1, n)), rng.lognormal(0, 0.3, n),
                  0.5 * rng.lognormal(0, 0.3, n), np.abs(rng.normal(0.6, 0.3, n))], 1).astype(np.float32)
    scaled = x.copy()
    scaled[:, 2:4] *= 10
    mean, std = x.mean(0).tolist(), x.std(0).tolist()   # trained on the unscaled model
    running, fixed = _generic(8, mean, std), _generic(0, mean, std)
    path = _controller_gguf(tmp_path, tiny_model, running.gguf_items())
    bits, bits_scaled = _eval(path, _runtime_rows(x)), _eval(path, _runtime_rows(scaled))
    np.testing.assert_array_equal(bits, running.decide(x))              # C == NumPy over 2000 running updates
    np.testing.assert_array_equal(bits_scaled, running.decide(scaled))
    assert len(np.unique(bits)) == 4
    # the prior's 8 rows sit at the unscaled statistics: their pull on the scaled mean and variance fades as 8 / n
    late = slice(500, None)
    assert (bits_scaled[late] == bits[late]).mean() >= 0.95
    assert (fixed.decide(scaled)[late] == fixed.decide(x)[late]).mean() < 0.5


def test_norm_prior_round_trips_and_validates(tiny_model, tmp_path):
    ctrl = _generic(8)
    assert ControllerSpec.from_json(json.loads(json.dumps(ctrl.to_json()))).norm_prior == 8
    assert controller_from_reader(read_gguf(_controller_gguf(tmp_path, tiny_model, ctrl.gguf_items()))).norm_prior == 8
    plain = load_controller(GOLDEN / "controller_handmade.json")
    assert plain.norm_prior == 0 and "norm_prior" not in plain.to_json()
    assert K.NORM_PRIOR not in {k for k, _, _ in plain.gguf_items()}
    for bad, needle in ((-1, "must be >= 0"), (2.5, "must be an integer"), ("8", "must be an integer")):
        spec = _generic(0)
        spec.norm_prior = bad
        with pytest.raises(ControllerError, match=f"norm_prior {needle}"):
            spec.validate()
    with pytest.raises(ControllerError, match="norm_prior must be >= 0"):
        ControllerSpec.from_json({**ctrl.to_json(), "norm_prior": -3})


@pytest.mark.parametrize("value,kind", [("eight", "str"), (8.0, "f32")])
def test_malformed_norm_prior_is_a_clear_error(runner, tiny_model, tmp_path, value, kind):
    items = _generic(0).gguf_items() + [(K.NORM_PRIOR, value, kind)]
    path = _controller_gguf(tmp_path, tiny_model, items)
    needle = "kvq.controller.norm_prior must be an integer"
    with pytest.raises(ControllerError, match=needle):
        Inspector(path, kv=parse_kv("adaptive"), n_ctx=128)
    r = runner.invoke(app, ["chat", str(path), "--kv", "adaptive", "-p", "hi"])
    assert_one_line_error(r, needle)
    with pytest.raises(ControllerError, match="norm_prior must be an integer"):
        controller_from_reader(read_gguf(path))
