#!/usr/bin/env bash
# The RULER-style table of SmolLM2-135M-Instruct on one GPU: every row in its own process (the rows are
# independent and a 135M model leaves the GPU mostly idle, so they run side by side), then one merged result.
#
#   bench/scripts/ruler_smollm2_gpu.sh GGUF TEXT REPORT OUT_DIR
#
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf; TEXT: held-out prose (Emma: austen_novels.txt lines 1-16237);
# REPORT: an analysis report with gates (bench/results/quality_h100/analysis_6w_s4w1020.json: sink 4 + window
# 1020, gates trained on Sense and Sensibility). Environment: ROWS (original,lighttransfer,lazy-ratio,random,
# head-level-gates), LENGTHS (2k,4k,8k), SAMPLES (25), BATCH (25), TASKS (all), SINK (4), WINDOW (1020),
# DEVICE (cuda), DTYPE (float32), EVAL_ARGS (more eval options).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
lt() { python3 "$here/bin/lighttransfer" "$@"; }

gguf=$1 text=$2 report=$3 out=$4
ROWS=${ROWS:-original,lighttransfer,lazy-ratio,random,head-level-gates}
tasks=()
[[ -n "${TASKS:-}" ]] && tasks=(--ruler-tasks "$TASKS")
mkdir -p "$out/parts"
pids=() parts=()
for row in ${ROWS//,/ }; do
  part="$out/parts/$row.json"
  parts+=("$part")
  OMP_NUM_THREADS=2 lt -q eval --baseline "$gguf" --report "$report" --text "$text" --suite ruler "${tasks[@]}" \
    --lengths "${LENGTHS:-2k,4k,8k}" --samples "${SAMPLES:-25}" --ruler-batch "${BATCH:-25}" --backend runtime \
    --sink "${SINK:-4}" --window "${WINDOW:-1020}" --ratio 0.5 --rows "$row" --device "${DEVICE:-cuda}" \
    --dtype "${DTYPE:-float32}" ${EVAL_ARGS:-} --out "$part" > "$out/parts/$row.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[[ $status == 0 ]] || { tail -n 5 "$out"/parts/*.log; exit 1; }
lt eval-merge "${parts[@]}" --out "$out/ruler_smollm2.json"
