#!/usr/bin/env bash
# A controller for every model: how long the default calibration takes, the generic controller, and
# what each costs against the shipped controller on wikitext-2 (test, the Pareto chunks of
# reproduce_accuracy.sh), with rule@B beside them; and the budget a multiple-choice run holds.
# Usage: bash scripts/reproduce_calibration.sh DATA_DIR [STEP...]   (steps 1-4 by default, ~1 h on 2 cores)
set -euo pipefail
data=${1:?usage: reproduce_calibration.sh DATA_DIR [STEP...]}
shift
steps=" ${*:-1 2 3 4} "
step() { [[ $steps == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
kvq=.venv/bin/kvq
export KVQ_HOME=${KVQ_HOME:-$(mktemp -d)}
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
model=$(.venv/bin/python -c "from kvq_cli.models.registry import embedded_path; print(embedded_path())")
calibrated="$KVQ_HOME/smollm2-135m-instruct.calibrated.gguf"
# 1. the default calibration of the embedded model from the packaged text, timed (a copy: the package's GGUF stays)
if step 1; then
  { echo "# command: kvq calibrate smollm2-135m-instruct --out $calibrated   ($(date -u +%F), $cpu, $(nproc) threads)"
    start=$(date +%s)
    $kvq calibrate smollm2-135m-instruct --out "$calibrated" 2>&1
    echo "# wall time: $(( $(date +%s) - start )) s"
  } | tee results/calibrate_135m.txt
fi
# 2. the generic controller (kvq_cli/controller/shipped/generic.json)
if step 2; then
  { echo "# command: python scripts/train_generic.py --cache \$KVQ_HOME/generic.npz   ($(date -u +%F), $cpu)"
    .venv/bin/python scripts/train_generic.py --cache "$KVQ_HOME/generic.npz"
  } | tee results/train_generic.txt
fi
# 3. wikitext-2 KL vs stock f16 on the Pareto chunks, one run per controller (each with its own stock f16):
#    the shipped controller (with rule@B on its K centering), the calibrated GGUF of step 1, and the
#    generic controller (the model given by path has no alias, hence no shipped controller; rule@B there
#    has no K centering either)
common=(--data "$data" --task wikitext2 --tokens 16384 --ppl-ctx 2048 --ref stock-f16
        --json results/calibration_wikitext2.json)
resume() { [ -f results/calibration_wikitext2.json ] && echo --resume || true; }
if step 3; then
  $kvq eval smollm2-135m-instruct "${common[@]}" $(resume) --kv stock-f16,rule@3,rule@3.5,adaptive@3,adaptive@3.5
  $kvq eval "$calibrated" "${common[@]}" $(resume) --kv stock-f16,adaptive@3,adaptive@3.5
  $kvq eval "$model" "${common[@]}" $(resume) --kv stock-f16,rule@3,rule@3.5,adaptive@3,adaptive@3.5
fi
# 4. the budget of a multiple-choice run with the defaults (W = 0): adaptive@3 holds <= 3.1 bits after every item
if step 4; then
  $kvq eval --task hellaswag --limit 300 --kv f16,adaptive@3 --data "$data" --json results/budget_hellaswag.json
fi
