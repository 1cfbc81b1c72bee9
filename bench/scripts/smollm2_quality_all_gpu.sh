#!/usr/bin/env bash
# The SmolLM2-135M quality runs of three methods side by side on one GPU, in one command: the model is small, so
# each run leaves most of an H200 idle (launch-bound small kernels) and they share it well.
#
#   bench/scripts/smollm2_quality_all_gpu.sh GGUF TEXT REPORT OUT_DIR [SECONDS]
#
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf; TEXT: austen_novels.txt; REPORT: an analysis report with KV-head gates
# at sink 4 + window 128 (bench/results/analysis_smollm2_with_gates_w128.json). Each run is cut after SECONDS
# (default 540) and writes into its own folder of OUT_DIR, with its log:
#
# - head_routing/   QAdA and its baselines at one routed share, 4k and 8k (head_routing_quality_gpu.sh)
# - sparse_prefill/ density vs alpha, then perplexity, passkey and the RULER-style tasks at 8k against dense
#                   (sparse_prefill_quality.py)
# - tokenselect/    TokenSelect at 8k with the issue's scaled-down budget (k 512, init 16, local 256): original,
#                   TokenSelect alone, the hybrid (ratio 0.5, sink 4 + window 128) and hybrid + TokenSelect;
#                   perplexity, passkey and retrieval plus aggregation tasks (cwe, fwe), where top-k selection is
#                   known to fail; then the Selection Cache sweep (theta 1 / 0.9 / 0.8) on perplexity and passkey
#
# OUT_DIR/summary.txt: one line per run (exit status, seconds). Exit status 0 only if every run finished.
# Run from the checkout root; python3 must see torch, transformers, triton and gguf.
set -uo pipefail
gguf=${1:?usage: smollm2_quality_all_gpu.sh GGUF TEXT REPORT OUT_DIR [SECONDS]}
text=${2:?text} report=${3:?report} out=${4:?out dir} seconds=${5:-540}
here="$(cd "$(dirname "$0")/../.." && pwd)"
mkdir -p "$out"/{head_routing,sparse_prefill,tokenselect} /tmp/lt-quality
ln -sfn "$here" /tmp/lt-quality/lighttransfer
export PYTHONPATH=/tmp/lt-quality${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LIGHTTRANSFER_TRITON_AUTOTUNE=0
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$here/.triton-cache}
lt() { python3 "$here/bin/lighttransfer" "$@"; }

tokenselect() {
  local d=$out/tokenselect
  lt -q eval --baseline "$gguf" --text "$text" --text-lines 1:16237 --suite perplexity,passkey,ruler \
    --lengths 8k --windows 2 --passkey-lengths 8192 --passkey-depths 5 --passkey-trials 2 \
    --ruler-tasks niah_single_1,niah_multikey_1,niah_multivalue,vt,cwe,fwe --samples 10 --ruler-batch 10 \
    --rows original,tokenselect,lighttransfer,lighttransfer+tokenselect --report "$report" --ratio 0.5 \
    --sink 4 --window 128 --select-k 512 --select-init 16 --select-local 256 --select-reuse 0.9 \
    --backend runtime --device cuda --dtype float32 --out "$d/tokenselect_smollm2_8k.json" &&
  python3 "$here/bench/scripts/tokenselect_reuse_sweep.py" --baseline "$gguf" --text "$text" --text-lines 1,16237 \
    --lengths 8192 --thetas 1.0,0.9,0.8 --passkey-lengths 8192 --passkey-depths 5 --passkey-trials 2 \
    --device cuda --dtype float32 --out "$d"
}

declare -A pids started
run() {  # NAME COMMAND...
  local name=$1
  shift
  started[$name]=$(date +%s)
  timeout "$seconds" "$@" > "$out/$name/$name.log" 2>&1 &
  pids[$name]=$!
}
run head_routing bash "$here/bench/scripts/head_routing_quality_gpu.sh" "$gguf" "$text" "$report" "$out/head_routing"
run sparse_prefill python3 "$here/bench/scripts/sparse_prefill_quality.py" --out "$out/sparse_prefill" \
  --model "$gguf" --text "$text" --device cuda --length 8192
export -f tokenselect lt
export gguf text report out here
run tokenselect bash -c tokenselect

status=0
: > "$out/summary.txt"
for name in head_routing sparse_prefill tokenselect; do
  wait "${pids[$name]}"
  rc=$?
  [ "$rc" = 0 ] || status=1
  note=""
  [ "$rc" = 124 ] && note=" (cut after $seconds s)"
  echo "$name: rc $rc$note, $(( $(date +%s) - started[$name] )) s" | tee -a "$out/summary.txt"
done
exit $status
