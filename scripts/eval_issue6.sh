#!/usr/bin/env bash
# The accuracy runs of issue 6, the commands that wrote the committed files:
#  1. wikitext-2 (first 32,768 tokens, 64 chunks of 512) perplexity and KL vs stock f16 of the
#     stock and kvq static caches side by side -> results/wikitext2_statics.json (~30 min)
#  2. every static policy side by side on OpenBookQA, ARC-Challenge, ARC-Easy (full test sets)
#     and HellaSwag (first 2000 validation items) -> results/eval_statics.json (~25 min per kvq
#     cache, ~1.5 h for stock f16 on 2 cores; rewritten every 50 items and resumed from it, so it
#     can be stopped and restarted)
# Usage: bash scripts/eval_issue6.sh DATA_DIR [STEP...]   (steps 1 2 by default)
set -euo pipefail
data=${1:?usage: eval_issue6.sh DATA_DIR [STEP...]}
shift
steps=" ${*:-1 2} "
step() { [[ $steps == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
if step 1; then
  .venv/bin/python scripts/perplexity.py --data "$data" --kv stock-f16,stock-q8_0,stock-q4_0,stock-q2_0,f16,q8,q4,q2 \
    --tokens 32768 --ctx 512 --json results/wikitext2_statics.json
fi
if step 2; then
  resume=$([ -f results/eval_statics.json ] && echo --resume || true)
  .venv/bin/kvq eval --task openbookqa,arc-challenge,arc-easy,hellaswag --limit hellaswag=2000 \
    --data "$data" --kv stock-f16,f16,q8,q4,q2 --ref f16 --json results/eval_statics.json $resume
fi
