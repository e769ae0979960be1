#!/usr/bin/env bash
# The accuracy of the static caches: the stock and kvq static caches side by side, into one resumable
# file, results/eval_statics.json (rewritten at checkpoints; a rerun resumes it):
#  1. wikitext-2, first 32,768 tokens in 64 chunks of 512 (second halves scored): perplexity and
#     KL vs kvq f16 with bootstrap intervals over chunks (~20 min)
#  2. OpenBookQA, ARC-Challenge, ARC-Easy (full test sets) and HellaSwag (first 2000 validation
#     items): acc, acc_norm, paired differences vs kvq f16 (~25 min per kvq cache, ~1.5 h for
#     stock f16 on 2 cores)
# Usage: bash scripts/reproduce_statics.sh DATA_DIR [STEP...]   (steps 1 2 by default)
set -euo pipefail
data=${1:?usage: reproduce_statics.sh DATA_DIR [STEP...]}
shift
steps=" ${*:-1 2} "
step() { [[ $steps == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
common=(--data "$data" --kv stock-f16,f16,q8,q4,q2 --ref f16 --json results/eval_statics.json)
resume() { [ -f results/eval_statics.json ] && echo --resume || true; }
if step 1; then
  .venv/bin/kvq eval --task wikitext2 --tokens 32768 "${common[@]}" $(resume)
fi
if step 2; then
  .venv/bin/kvq eval --task openbookqa,arc-challenge,arc-easy,hellaswag --limit hellaswag=2000 "${common[@]}" $(resume)
fi
