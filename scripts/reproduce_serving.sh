#!/usr/bin/env bash
# llama.cpp's own tools on the kvq cache, side by side with kvq's measurements:
#  1. llama-perplexity --kl-divergence on the kvq cache against kvq eval's wikitext-2 KL (the same
#     text, 8 chunks of 2,048 tokens, second halves scored; stock f16 without flash attention as the base);
#  2. a bounded load run of llama-server: stock f16 and q4_0 caches and kvq adaptive@3, 4 slots x 2,048;
#  3. llama-bench with --kvq: pp512/tg128 at depth 0 and 4096.
# Usage: bash scripts/reproduce_serving.sh DATA_DIR [STEP...]   (steps 1-3 by default; 1 is 1a then 1b)
set -euo pipefail
data=${1:?usage: reproduce_serving.sh DATA_DIR [STEP...]}
shift
steps=" ${*:-1 2 3} "
step() { [[ $steps == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
kvq=.venv/bin/kvq
bin=.venv/bin
export KVQ_HOME=${KVQ_HOME:-$(mktemp -d)}
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
model=$(.venv/bin/python -c "from kvq_cli.models.registry import embedded_path; print(embedded_path())")
# the embedded model with the controller kvq ships for it embedded (llama.cpp's tools read it from the GGUF)
shipped=$(.venv/bin/python -c "from kvq_cli.controller.catalog import shipped_path; print(shipped_path('smollm2-135m-instruct'))")
mkvq="$KVQ_HOME/smollm2-135m-instruct.kvq.gguf"
[ -f "$mkvq" ] || $kvq embed "$model" "$shipped" --out "$mkvq" >/dev/null
text="$data/wikitext2/wiki.test.nonempty-lf.raw"
# 1a: kvq eval's KL (its method: windowed policies decode in 32-token ubatches, rows decided as in a chat)
if step 1 || step 1a; then
  $kvq eval "$mkvq" --data "$data" --task wikitext2 --tokens 16384 --ppl-ctx 2048 --ref stock-f16 \
    --kv stock-f16,q4,adaptive@3 --json results/llama_perplexity_kl.json
fi
# 1b: llama-perplexity on the same chunks, with the same ubatches (-ub 32 for adaptive, 512 for q4), and
#     adaptive@3 also at llama-perplexity's default 512-token ubatch, where rows are decided 512 at a time
if step 1 || step 1b; then
  base="$KVQ_HOME/f16.kld"
  { echo "# llama-perplexity -m $(basename "$mkvq") -f wiki.test.nonempty-lf.raw -c 2048 -b 2048 --chunks 8 -t 2   ($(date -u +%F), $cpu, $(nproc) threads)"
    echo "# base: -fa off --kl-divergence-base f16.kld (stock f16 KV, as kvq eval's stock-f16); then --kvq POLICY --kl-divergence"
    $bin/llama-perplexity -m "$mkvq" -f "$text" -c 2048 -b 2048 --chunks 8 -t 2 -fa off --kl-divergence-base "$base" 2>&1 \
      | grep -E "Final estimate" | sed 's/^/stock-f16 /'
    for run in "q4 512" "adaptive@3 32" "adaptive@3 512"; do
      set -- $run
      $bin/llama-perplexity -m "$mkvq" -f "$text" -c 2048 -b 2048 -ub "$2" --chunks 8 -t 2 --kvq "$1" --kl-divergence \
        --kl-divergence-base "$base" 2>&1 | grep -E "^Mean +KLD|Final estimate|^Mean +PPL\(Q\)" | sed "s/^/$1 -ub $2 /"
    done
  } | tee results/llama_perplexity_kl.txt
  .venv/bin/python - <<'PY' | tee -a results/llama_perplexity_kl.txt
import json, re
recs = {r["kv"]: r for r in json.load(open("results/llama_perplexity_kl.json")) if r["task"] == "wikitext2"}
txt = open("results/llama_perplexity_kl.txt").read()
for kv, ub in (("q4", 512), ("adaptive@3", 32), ("adaptive@3", 512)):
    m = re.search(rf"^{re.escape(kv)} -ub {ub} Mean +KLD: +([\d.]+)", txt, re.M)
    ours = recs[kv]["kl"]
    print(f"# {kv} -ub {ub}: llama-perplexity mean KLD {float(m.group(1)):.5f}, kvq eval KL {ours:.5f}: "
          f"{float(m.group(1)) / ours - 1:+.1%}")
PY
fi
if step 2; then
  .venv/bin/python scripts/serve_load.py --kv stock-f16,stock-q4_0,adaptive@3 --parallel 4 --ctx 2048 --clients 8 \
    --requests 25 --max-tokens 64 --prompt-tokens 1800 --threads 2 --json results/serve_load.json | tee results/serve_load.txt
fi
if step 3; then
  { echo "# llama-bench -m $(basename "$mkvq") --kvq off,q4,adaptive@3.5 -p 512 -n 128 -d 0,4096 -t 2 -r 3   ($(date -u +%F), $cpu)"
    $bin/llama-bench -m "$mkvq" --kvq off,q4,adaptive@3.5 -p 512 -n 128 -d 0,4096 -t 2 -r 3 2>/dev/null
  } | tee results/llama_bench_kvq.md
fi
