#!/usr/bin/env bash
# How GGML_TYPE_KVQ2's layout was chosen (patches/llama.cpp/0001) and checked.
# Builds the layout simulator (sim.c: normalised MSE and dot-product error of 2-bit
# candidates on Gaussian/Laplace/Student-t data, with and without a 64-point Hadamard
# rotation, vs stock q2_0/q4_0) and the type's test program (test_kvq2.c) against the
# kept runtime build (run `make setup` first), then runs both.
set -euo pipefail
B=${KVQ_BUILD_CACHE:-$HOME/.cache/kvq-build}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
inc="-I$B/src/vendor/llama.cpp/ggml/include -I$B/src/vendor/llama.cpp/ggml/src"
for f in sim test_kvq2; do
  gcc -O2 $inc "$here/$f.c" -o "$out/$f" -L"$B/build/bin" -lggml-base -lggml-cpu -lggml -lm -Wl,-rpath,"$B/build/bin"
done
"$out/test_kvq2"
"$out/sim"
