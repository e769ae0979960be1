"""kvq2's codebook: 16 magnitude patterns of a group of 4 values (patch 0001, ggml-quants.c).

    python scripts/kvq2_codebook.py [--samples N] [--iters N] [--seed S]

kvq2 codes each group of 4 values of a Hadamard-rotated KV row as one byte: 4 sign bits and one of
16 magnitude patterns, times the block's f16 step (one per 64 values). The patterns come from
Lloyd's algorithm on |x| of unit Gaussian 4-vectors, with the patterns tied to orbits under
permutations of the coordinates (all small; one large; one very large; two large; all large:
1 + 4 + 4 + 6 + 1 = 16), so 8 numbers describe them. Prints those numbers rounded to multiples
of 1/55 (the A_..H_ of ggml-quants.c: a codeword is then an int8 vector over 55, the largest
number 127/55, so integer dot products are exact) and the normalised squared error of blocks of 64 Gaussian
values coded as the runtime codes them (step rms, 3 rounds of nearest patterns and a
least-squares step), next to scalar 2-bit codes with one step per 64 values.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np

# pattern -> parameter index per coordinate, in the order of kvq2_mag
PATTERNS = ([(0, 0, 0, 0)]
            + [tuple(1 if i == j else 2 for i in range(4)) for j in range(4)]
            + [tuple(3 if i == j else 4 for i in range(4)) for j in range(4)]
            + [tuple(5 if i in s else 6 for i in range(4)) for s in itertools.combinations(range(4), 2)]
            + [(7, 7, 7, 7)])
INT_SCALE = 55   # codewords are int8 vectors over 55 (the largest number, about 2.31, is 127/55)
START = np.array([0.35, 1.2, 0.45, 2.2, 0.55, 1.5, 0.55, 1.5])


def table(p: np.ndarray) -> np.ndarray:
    return np.array([[p[k] for k in pat] for pat in PATTERNS])


def nearest(a: np.ndarray, mag: np.ndarray) -> np.ndarray:
    return ((mag ** 2).sum(1)[None] - 2 * a @ mag.T).argmin(1)


def lloyd(samples: int, iters: int, seed: int) -> np.ndarray:
    t = np.abs(np.random.default_rng(seed).standard_normal((samples, 4)))
    p = START.copy()
    for _ in range(iters):
        a = nearest(t, table(p))
        num, den = np.zeros(8), np.zeros(8)
        for ci, pat in enumerate(PATTERNS):
            m = a == ci
            for j, k in enumerate(pat):
                num[k] += t[m, j].sum()
                den[k] += m.sum()
        p = np.where(den > 0, num / np.maximum(den, 1), p)
    return p


def vq_nmse(x: np.ndarray, mag: np.ndarray, rounds: int = 3) -> float:
    d = np.sqrt((x ** 2).mean(1, keepdims=True))
    best = np.full(len(x), np.inf)
    for _ in range(rounds):
        z = (x / d).reshape(-1, 4)
        y = (np.where(z < 0, -1.0, 1.0) * mag[nearest(np.abs(z), mag)]).reshape(x.shape)
        sxy, syy = (x * y).sum(1), (y * y).sum(1)
        best = np.minimum(best, (x ** 2).sum(1) - sxy ** 2 / syy)
        d = (sxy / syy)[:, None]
    return float(best.sum() / (x ** 2).sum())


def scalar_nmse(x: np.ndarray) -> float:
    """Codes (c - 1.5) d, c in 0..3, the best step of a fine search per block."""
    err = np.full(len(x), np.inf)
    rms = np.sqrt((x ** 2).mean(1))
    for f in np.linspace(0.3, 1.6, 131):
        d = (f * rms)[:, None]
        y = np.clip(np.round(x / d + 1.5), 0, 3) - 1.5
        sxy, syy = (x * y).sum(1), (y * y).sum(1)
        err = np.minimum(err, (x ** 2).sum(1) - sxy ** 2 / syy)
    return float(err.sum() / (x ** 2).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2_000_000)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.samples < 1000 or a.iters < 1:
        print("kvq2_codebook: error: need --samples >= 1000 and --iters >= 1", file=sys.stderr)
        return 1
    p = lloyd(a.samples, a.iters, a.seed)
    n = np.round(p * INT_SCALE)
    for name, v, k in zip("ABCDEFGH", p, n):
        print(f"#define {name}_ ({k:.0f}.0f/{INT_SCALE}.0f)   // Lloyd {v:.4f}")
    x = np.random.default_rng(a.seed + 1).standard_normal((8000, 64))
    print(f"normalised MSE, blocks of 64 Gaussian values: codebook {vq_nmse(x, table(n / INT_SCALE)):.4f} "
          f"(unrounded {vq_nmse(x, table(p)):.4f}), scalar 2-bit codes {scalar_nmse(x):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
