#!/usr/bin/env bash
# The accuracy results: train the shipped controller on calibration text, then wikitext-2 (test)
# perplexity and KL vs stock f16 for every policy family at several budgets, side by side in one run,
# and the multiple-choice Pareto.
# Usage: bash scripts/reproduce_accuracy.sh DATA_DIR [STEP...]   (steps 1 2 3 by default, 4-7 on request;
# steps 1-3 about 2.5 h on 2 cores, step 4 about 25 min per policy; the eval JSONs are rewritten
# at checkpoints and a rerun resumes them)
set -euo pipefail
data=${1:?usage: reproduce_accuracy.sh DATA_DIR [STEP...]}
shift
steps=" ${*:-1 2 3} "
step() { [[ $steps == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
kvq=.venv/bin/kvq
export KVQ_HOME=${KVQ_HOME:-$(mktemp -d)}   # the embedded copies of the controllers go here
calib="$data/calib/boolq_passages.txt"
cache="$KVQ_HOME/calib-oracle.npz"
# 1. the shipped default controller (per token and layer) and a per-token one for comparison
if step 1; then
  $kvq train --calib "$calib" --budget 3.5 --granularity token_layer --cache "$cache" \
  --out kvq_cli/controller/shipped/smollm2-135m-instruct.json | tee results/train_token_layer.txt
  $kvq train --calib "$calib" --budget 3.5 --granularity token --cache "$cache" \
  --out results/controller_per_token.json --embed "$KVQ_HOME/per-token.gguf" | tee results/train_token.txt
fi
# 2. every family side by side: 8 chunks of 2048 tokens, second halves scored (8,192 tokens)
common=(--data "$data" --task wikitext2 --tokens 16384 --ppl-ctx 2048 --ref stock-f16)
resume() { [ -f "$1" ] && echo --resume || true; }
# Steps 2 and 4 first re-key the records of the policies that read neither the controller nor its
# K centering (static, stock) to the GGUF copy of the current controller (seed_records.py), so
# only the mixed-precision rows (adaptive, rule, oracle) run again after the controller changes
# (WIKI_ADAPTIVE / WIKI_ORACLE / WIKI_ORACLE_K4V2: the budgets of step 2). k4v2 is the static
# pool of K in q4_0 and V in kvq2 (3.375 bits); oracle+k4v2 the oracle with that pool among its choices.
# SEED_EXCEPT (a comma list, e.g. q2,k4v2 after a change to kvq2): static rows not seeded, so scored again.
if step 2; then
  [ -f results/pareto_wikitext2.json ] && .venv/bin/python scripts/seed_records.py results/pareto_wikitext2.json \
    results/pareto_wikitext2.json wikitext2 ${SEED_EXCEPT:+--except "$SEED_EXCEPT"}
  adaptive=$(for b in ${WIKI_ADAPTIVE:-3 3.5 4 4.5 5 6}; do printf ',adaptive@%s' "$b"; done)
  oracle=$(for b in ${WIKI_ORACLE:-3 3.5 4}; do printf ',oracle@%s' "$b"; done)
  oracle_k4v2=$(for b in ${WIKI_ORACLE_K4V2:-3 3.5}; do printf ',oracle+k4v2@%s' "$b"; done)
  $kvq eval "${common[@]}" --json results/pareto_wikitext2.json $(resume results/pareto_wikitext2.json) \
    --kv stock-f16,stock-q8_0,stock-q4_0,f16,q8,q4,k4v2,q2,rule@3,rule@3.5,rule@4,rule@5$adaptive$oracle$oracle_k4v2
fi
# 3. per-token decisions (same chunks, same reference)
if step 3; then
  [ -f "$KVQ_HOME/per-token.gguf" ] || $kvq embed "$(.venv/bin/python -c 'from kvq_cli.models.registry import embedded_path; print(embedded_path())')" \
    results/controller_per_token.json --out "$KVQ_HOME/per-token.gguf"
  $kvq eval "$KVQ_HOME/per-token.gguf" "${common[@]}" --json results/pareto_per_token.json $(resume results/pareto_per_token.json) \
    --kv stock-f16,adaptive@3,adaptive@3.5,adaptive@4,adaptive@5
fi
if step 2 || step 3; then
  # with the adaptive rows of the controller before K centering (results/pareto_wikitext2_uncentered.json)
  .venv/bin/python scripts/plot_pareto.py results/pareto_wikitext2.json results/pareto_wikitext2_uncentered.json \
    results/pareto_per_token.json results/pareto_wikitext2.png
fi
# 4. multiple-choice accuracy of the adaptive policy on the items of the static-cache run (reproduce_statics.sh). Items are short
# (tens of tokens), so W = 0: every context row is decided when the context has been prefilled,
# from the attention it received there (with W = 32 most rows of an item would stay f16).
# The static rows (the paired reference) are those of results/eval_statics.json, copied in by
# seed_records.py (their scoring is deterministic, so they are not run again); the adaptive
# budgets and the rule rows (MC_POLICIES) run side by side in one call (--resume: only the ones
# not yet complete run; oracle@3, the damage-optimal assignment of each item measured on its own
# endings, is the non-causal bound at the bar's budget, about twice an adaptive run). --no-mc-kl:
# the seeded static rows have no KL (so there would be nothing to compare it with), and re-scoring f16 for it would cost
# another policy's time; the side-by-side KL of the tuning is on the dev splits (results/README.md).
# MC_SEED: the file the static rows are seeded from (results/eval_statics.json by default; after
# a run with SEED_EXCEPT=q2 scored q2 again, results/pareto_mc.json itself keeps that new row).
# Give MC_POLICIES at least one mixed policy: the seeded rows are keyed to the copy with the
# controller, and a run of static policies alone evaluates the plain GGUF, so it scores them all again.
if step 4; then
  .venv/bin/python scripts/seed_records.py "${MC_SEED:-results/eval_statics.json}" results/pareto_mc.json mc \
    ${SEED_EXCEPT:+--except "$SEED_EXCEPT"}
  mc=$(for kv in ${MC_POLICIES:-adaptive@3 adaptive@3.5 adaptive@4 adaptive@5 rule@3 rule@4 oracle@3}; do printf ',%s' "$kv"; done)
  $kvq eval --task openbookqa,arc-challenge,arc-easy,hellaswag --limit hellaswag=2000 --data "$data" \
    --kv-window 0 --ref f16 --no-mc-kl --json results/pareto_mc.json --resume --kv stock-f16,f16,q8,q4,q2$mc
  .venv/bin/python scripts/plot_pareto_mc.py results/pareto_mc.json results/pareto_mc.png | tee results/pareto_mc.md
fi
# 5. the KL instrument on HellaSwag, which has no dev split: its first 500 items (a subset of
# step 4's, reported, not tuned on), kvq f16 as the reference, q4 and adaptive side by side.
if step 5; then
  $kvq eval --task hellaswag --limit hellaswag=500 --data "$data" --kv-window 0 --ref f16 \
    --json results/hellaswag_kl.json $(resume results/hellaswag_kl.json) --kv f16,q4,adaptive@4,adaptive@5
fi
# 6. how much an ending's own ubatch matters (OpenBookQA test, short endings). By default an
# ending is decoded in one ubatch, whose rows rule/adaptive keep at f16 until it ends;
# --ending-ubatch 1 decodes it token by token, each row decided before the next token (as
# generation with W = 0 would). Static policies store rows quantized either way.
if step 6; then
  $kvq eval --task openbookqa --data "$data" --kv-window 0 --ref f16 --json results/obqa_ending_ubatch.json \
    --kv f16,q4,adaptive@4
  $kvq eval --task openbookqa --data "$data" --kv-window 0 --ref f16 --json results/obqa_ending_ubatch.json \
    --resume --ending-ubatch 1 --kv f16,q4,adaptive@4
fi
# 7. the headline rows measured afresh into their own file (no resume, no seeded rows): stock f16 as
# the reference, stock q4_0 and the adaptive cache at 3 and 3.5 bits on step 2's chunks. A check that
# a change to the code (not to the controller) leaves the numbers of results/pareto_wikitext2.json.
if step 7; then
  rm -f results/headline_wikitext2.json
  $kvq eval "${common[@]}" --json results/headline_wikitext2.json --kv stock-f16,stock-q4_0,adaptive@3,adaptive@3.5
fi
