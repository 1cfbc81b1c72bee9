#!/usr/bin/env bash
# Head routing quality on SmolLM2-135M, one GPU, one command: every routing row at one routed share (ROUTING_SHARE
# 0.5: thresholds calibrated per layer for it on held-out prompts of the evaluated kinds, 12 of each), retrieval
# at 4k and 8k, the realised share rho per row, then one merged table.
#
#   bench/scripts/head_routing_quality_gpu.sh GGUF TEXT REPORT OUT_DIR
#
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf; TEXT: austen_novels.txt; REPORT: an analysis report with KV-head gates at
# the same sink + window (bench/results/analysis_smollm2_with_gates_w128.json: sink 4 + window 128; the qada-gates
# row needs its gates). OUT_DIR gets parts/<row>.json|.log and head_routing_quality.json/.md (merged; each routing
# row's head_routing_realised is rho, its routing_calibration the thresholds).
#
# Rows: original (dense), qada (bulk stats, full covariance), qada-local (moments of the window keys), qada-diag
# (diagonal covariance), qada-pages (qada + the pages needle guard), qada-heads (qada + the highest-gate quarter of the
# KV heads always full), qada-oracle (exact far share), qada-random, qada-gates (the lowest-gate KV heads always
# local). Every row keeps the whole cache; routed-local heads read sink 4
# + window 128 (WINDOW) of it.
#
# Tests: RULER-style TASKS (retrieval: niah_single_1,niah_multikey_1,niah_multivalue,vt), SAMPLES (20) per task and
# length, generated BATCH (20) at a time; passkey at the same lengths, 5 depths x PASSKEY_TRIALS (2) = 10 per length.
# Per row: 4 x 20 x 2 = 160 RULER prompts + 20 passkey prompts, the same prompts in every row, so the differences to
# the original are paired (the report's paired 95% intervals). 180 paired prompts resolve a 1-point difference only
# where rows disagree on very few prompts (half-width ~ 1.96 sqrt(disagreeing share / 180): 1 point needs <= 0.5%
# disagreement, 2% gives ~2 points); for a firm 1 point, run it twice with SEED=1 (EVAL_ARGS="--seed 1") and merge.
#
# dtype float32, as the other SmolLM2 GPU scripts: the 135M model is small enough that fp32 costs little on an
# H200, the Q4_1 weights dequantize to fp32 exactly, and the rows then differ by their routing, not by bf16
# rounding of the routed kernel against SDPA.
#
# Time on one H200 (measured, bench/results/head_routing_smollm2_h200/timed_out_run): with all 8 rows side by side,
# qada-random and qada-gates (no calibration) finished in 182 / 185 s; the original (stock transformers' decode,
# slower than the runtime's kernels) and the five calibrated rows (12 held-out prompts per kind at each length first)
# were still running at 340 s. So one 10-minute call holds about four rows: run the rest in a second call with ROWS
# and merge every part with `lighttransfer eval-merge` (parts of different calls merge like parts of one). The
# default ROW_LIMIT (540) lets a row use most of a call.
# Where a call returns only a few files, run it as `gpu_jobs.sh OUT hr-quality` (which packs every part into one
# archive) rather than directly: each row leaves five files.
# Environment: ROWS, TASKS, SAMPLES, BATCH, PASSKEY_TRIALS, LENGTHS (4k,8k), WINDOW (128), ROUTING_SHARE (0.5),
# ROW_LIMIT (540), DEVICE (cuda), DTYPE (float32), EVAL_ARGS (more eval options).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
link=$(mktemp -d)
ln -s "$here" "$link/lighttransfer"
export PYTHONPATH="$link${PYTHONPATH:+:$PYTHONPATH}"
export LIGHTTRANSFER_TRITON_AUTOTUNE=0
lt() { python3 -m lighttransfer "$@"; }

gguf=$1 text=$2 report=$3 out=$4
ROWS=${ROWS:-original,qada,qada-local,qada-diag,qada-pages,qada-heads,qada-oracle,qada-random,qada-gates}
TASKS=${TASKS:-niah_single_1,niah_multikey_1,niah_multivalue,vt}
LENGTHS=${LENGTHS:-4k,8k}
passkey_lengths=$(python3 -c "import sys; print(','.join(str(int(p[:-1]) * 1024 if p.lower().endswith('k') else int(p)) for p in sys.argv[1].split(',')))" "$LENGTHS")
mkdir -p "$out/parts"
start=$(date +%s)
pids=() parts=() names=()
for row in ${ROWS//,/ }; do
  part="$out/parts/$row.json"
  names+=("$row")
  parts+=("$part")
  OMP_NUM_THREADS=2 timeout "${ROW_LIMIT:-540}" python3 -m lighttransfer -q eval --baseline "$gguf" --text "$text" \
    --report "$report" --suite passkey,ruler --lengths "$LENGTHS" --ruler-tasks "$TASKS" \
    --samples "${SAMPLES:-20}" --ruler-batch "${BATCH:-20}" --passkey-lengths "$passkey_lengths" \
    --passkey-depths 5 --passkey-trials "${PASSKEY_TRIALS:-2}" --sink 4 --window "${WINDOW:-128}" --rows "$row" \
    --routing-share "${ROUTING_SHARE:-0.5}" --backend runtime --device "${DEVICE:-cuda}" --dtype "${DTYPE:-float32}" \
    ${EVAL_ARGS:-} --out "$part" > "$out/parts/$row.log" 2>&1 &
  pids+=($!)
done
done_parts=()
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    done_parts+=("${parts[$i]}")
  else
    echo "row ${names[$i]} did not finish (exit $?; see $out/parts/${names[$i]}.log):" >&2
    tail -n 3 "$out/parts/${names[$i]}.log" >&2 || true
  fi
done
echo "rows finished: ${#done_parts[@]} of ${#parts[@]} in $(( $(date +%s) - start )) s" >&2
[[ ${#done_parts[@]} -gt 0 ]] || exit 1
lt eval-merge "${done_parts[@]}" --out "$out/head_routing_quality.json"
python3 - "$out/head_routing_quality.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    rho = (r.get("head_routing_realised") or {}).get("local_share")
    print(f"{r['name']:12s} rho={'-' if rho is None else f'{rho:.3f}'} seconds={r.get('seconds')}")
EOF
