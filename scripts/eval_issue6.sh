#!/usr/bin/env bash
# The accuracy run of issue 6: every static policy side by side on HellaSwag (first 2000
# validation items), ARC-Easy, ARC-Challenge, OpenBookQA (full test sets) and wikitext-2
# (first 32,768 tokens). About 1.5 h of CPU per policy on 2 cores; the JSON is rewritten
# every 50 items and the run resumes from it, so it can be stopped and restarted.
# Usage: bash scripts/eval_issue6.sh DATA_DIR
set -euo pipefail
data=${1:?usage: eval_issue6.sh DATA_DIR}
cd "$(dirname "$0")/.."
common=(--data "$data" --kv stock-f16,f16,q8,q4,q2 --ref f16 --json results/eval_statics.json)
resume() { [ -f results/eval_statics.json ] && echo --resume || true; }
# wikitext-2 first (minutes), then the multiple-choice tasks, smallest first
.venv/bin/kvq eval --task wikitext2 --tokens 32768 "${common[@]}" $(resume)
.venv/bin/kvq eval --task openbookqa,arc-challenge,arc-easy,hellaswag --limit hellaswag=2000 \
  "${common[@]}" $(resume)
