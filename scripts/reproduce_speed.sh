#!/usr/bin/env bash
# The benchmark runs quoted in README.md and results/README.md: decode/prefill
# of every policy against stock llama.cpp, side by side in one run per command.
# Usage: bash scripts/reproduce_speed.sh DATA_DIR [STEP...]   (steps 1 2 3 by default; about
# 70 + 35 min on 2 cores; step 4, the peer, needs IK_SRC once: see scripts/peer_bench.py)
set -euo pipefail
data=${1:?usage: reproduce_speed.sh DATA_DIR [STEP...]}
shift
steps=" ${*:-1 2 3} "
step() { [[ $steps == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
kvq=.venv/bin/kvq
# 1. every kvq policy vs stock f16 (flash attention off and on) at 512/2048/8192
step 1 && $kvq bench --kv stock-f16,stock-f16-fa,f16,q8,q4,q2,rule@3.5 --ctx 512,2048,8192 --gen 64 --repeats 3 \
  --vs stock-f16,stock-f16-fa --roofline --data "$data" \
  --plot results/bench_decode.png --json results/bench_decode.json
# 2. each static pool vs the stock cache of the same type at 8192 (stock quantized KV
#    prefills at ~17 tokens/s here, so each policy prefills once and decodes 3 times)
step 2 && $kvq bench --kv stock-f16,stock-q8_0,stock-q4_0,stock-q2_0,f16,q8,q4,q2,rule@3.5 --ctx 8192 --gen 64 \
  --repeats 3 --reuse-prefill --vs stock-q4_0 --roofline --data "$data" --json results/bench_stock_types_8k.json
# 3. the learned controller (shipped, steered to 3.5 and 3 bits) on the current
#    runtime vs stock f16 (flash attention off and on) at 512/2048/8192, with the roofline (the
#    kvq attention's ms/token beside the KV bytes held over the measured read bandwidth), and
#    adaptive@3.5 vs stock q4_0 at 8192 (about 35 min)
if step 3; then
  $kvq bench --kv stock-f16,stock-f16-fa,adaptive@3.5,adaptive@3 --ctx 512,2048,8192 --gen 64 --repeats 3 \
  --vs stock-f16,stock-f16-fa --roofline --data "$data" --json results/bench_adaptive.json
  $kvq bench --kv stock-q4_0,adaptive@3.5 --ctx 8192 --gen 64 --repeats 3 --reuse-prefill --vs stock-q4_0 \
  --data "$data" --json results/bench_adaptive_q4_8k.json
fi
# 4. against ik_llama.cpp (the strongest CPU peer) at 8192: its llama-bench built from a pinned commit
#    (IK_SRC: a git dir holding it; the build is cached outside the repo), beside kvq bench (about 15 min)
step 4 && .venv/bin/python scripts/peer_bench.py ${IK_SRC:+--ik-src "$IK_SRC"} --ctx 8192 --gen 64 --repeats 3 \
  --kv adaptive@3.5,adaptive@3,stock-f16,stock-f16-fa --data "$data" --json results/peer_bench_8k.json
