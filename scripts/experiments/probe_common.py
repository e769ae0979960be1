"""What the controller probes (feature_probe.py, objective_probe.py, damage_tail.py) share.

KL of an installed allocation: the oracle engine decodes a chunk with every row at f16 (the
reference), then once per arm with the arm's bits per (position, layer) installed by
set_assignment; KL is over the second half of the chunk, as `kvq eval --task wikitext2` scores it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvq_cli.controller.spec import ControllerSpec
from kvq_cli.errors import run_script
from kvq_cli.train.oracle import log_softmax as _log_softmax
from kvq_cli.gguf.write import atomic_output
from kvq_cli.models.registry import embedded_path
from kvq_cli.runtime.inspector import Inspector
from kvq_cli.train.damage import EFF_BITS, PRECISIONS, costs_of
from kvq_cli.train.oracle import ORACLE, allocate
from kvq_cli.train.fit import _forward

CONTROLLER = Path(__file__).resolve().parents[2] / "kvq_cli/controller/shipped/smollm2-135m-instruct.json"


def shipped_controller() -> ControllerSpec:
    return ControllerSpec.from_json(json.loads(CONTROLLER.read_text()))


def shipped_damage(spec: ControllerSpec, x: np.ndarray) -> np.ndarray:
    """The controller's own damage estimate per precision [n, 4] (its logits are -(damage / lambda + bits); f16 0)."""
    params = [np.array(spec.w1), np.array(spec.b1), np.array(spec.w2), np.array(spec.b2)]
    pred = -(_forward(params, (x - np.array(spec.feature_mean)) / np.array(spec.feature_std))[2] + EFF_BITS[None, :])
    pred[:, 3] = 0.0
    return pred


def controller_damage(spec: ControllerSpec, x: np.ndarray) -> np.ndarray:
    """damage_p / lambda per precision [n, 4] of a controller of either head, from its f32 logits as the
    runtime computes them (both heads' logits are -(damage_p / lambda) - bits_p), layer weights not applied. shipped_damage is the
    f64 form for the logits head that the earlier probes' committed outputs used."""
    return -(spec.logits(x).astype(np.float64) + EFF_BITS[None, :])


def with_f16(pred: np.ndarray) -> np.ndarray:
    """Predicted damage at 2/4/8 bits [n, 3] with the f16 column (0) appended."""
    return np.concatenate([pred, np.zeros((len(pred), 1))], 1)


def chunk_log_probs(e, chunk: list[int], half: int) -> np.ndarray:
    """Log-probabilities of positions half-1 .. end of `chunk` decoded from position 0 on `e`."""
    e.clear_trace()
    return _log_softmax(e.decode(chunk, 0, logits_from=half - 1).astype(np.float64))


def held_out_chunks(e, text: str, a) -> list[list[int]]:
    """The held-out calibration chunks of add_kl_args (a.kl_chunks chunks of a.kl_len tokens from token
    a.kl_offset, each with BOS first) in `text`, tokenized by `e`."""
    toks = e.tokenize(text)
    per = a.kl_len - 2
    if len(toks) < a.kl_offset + a.kl_chunks * per:
        raise ValueError(f"the text has {len(toks)} tokens, too few for the held-out chunks")
    bos = e.llm.token_bos()
    return [[bos] + toks[a.kl_offset + ci * per:a.kl_offset + (ci + 1) * per] for ci in range(a.kl_chunks)]


def f16_reference(e, chunk: list[int]) -> np.ndarray:
    """chunk_log_probs of the chunk's second half on an oracle engine with every row at f16 (the reference)."""
    e.set_assignment(np.zeros(0, np.int32))
    return chunk_log_probs(e, chunk, len(chunk) // 2)


def oracle_refs(text: str, a, opts, k_center):
    """An oracle engine (embedded model, opts, 32-token ubatches, k_center) over the held-out chunks of
    add_kl_args: yields (engine, chunk index, chunk, its f16_reference) for each chunk in turn."""
    with Inspector(embedded_path(), kv=ORACLE, n_ctx=a.kl_len, n_batch=a.kl_len, n_ubatch=32, kvq=opts) as e:
        e.set_k_center(np.asarray(k_center, np.float32))
        for ci, c in enumerate(held_out_chunks(e, text, a)):
            yield e, ci, c, f16_reference(e, c)


def kl_of(ref_lp: np.ndarray, lp: np.ndarray) -> float:
    """Mean KL(ref || lp) over positions of two [n, vocab] log-probability arrays."""
    return float((np.exp(ref_lp) * (ref_lp - lp)).sum(1).mean())


def allocation_kl(e, chunk: list[int], half: int, ref_lp: np.ndarray, damage: np.ndarray, pos: np.ndarray,
                  layer: np.ndarray, per_row: float, n_layer: int,
                  precisions: tuple[int, ...] = PRECISIONS) -> tuple[float, float]:
    """(mean KL vs ref_lp, bits/element held) of `chunk` with its rows (pos, layer) allocated by `damage`
    [n, len(precisions)] at per_row bits and every other row at f16."""
    bits = np.full((len(chunk), n_layer), 16, np.int32)
    bits[pos, layer] = np.asarray(precisions)[allocate(damage, per_row, costs_of(precisions))]
    e.set_assignment(bits.reshape(-1))
    lp = chunk_log_probs(e, chunk, half)
    return kl_of(ref_lp, lp), float(e.kv_stats().bits_per_elem)


def add_kl_args(ap, kl_chunks: int) -> None:
    """The held-out calibration chunks the KL probes score (--kl-chunks chunks of --kl-len tokens from
    token --kl-offset), the budget and the output file."""
    ap.add_argument("--kl-chunks", type=int, default=kl_chunks)
    ap.add_argument("--kl-len", type=int, default=2048)
    ap.add_argument("--kl-offset", type=int, default=100_000)
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--json", required=True)


def write_json(path: str, out: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(out, indent=1))


run = run_script   # (kept under its old name for the probes)
