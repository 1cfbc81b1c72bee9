#!/usr/bin/env bash
# lighttransfer's vLLM plugin on one GPU (vLLM 0.26.0, slim, unpacked in /tmp/site by vllm_gpu_slim.sh).
#
#   bench/scripts/vllm_gpu.sh install PARTS_DIR             # once per machine: unpack /tmp/site, link /tmp/lt
#   bench/scripts/vllm_gpu.sh tokens  GGUF|HYBRID_DIR OUT   # (a) SmolLM2 hybrid: vLLM vs lighttransfer.load
#   bench/scripts/vllm_gpu.sh build8b DIR                   # (b) the 8B shape, random bf16 weights + hybrid
#   bench/scripts/vllm_gpu.sh capacity DIR OUT CONTEXT      # (b) dense vs hybrid at CONTEXT (16384, 32768)
#   bench/scripts/vllm_gpu.sh tokens8b DIR OUT              # (b) build8b's hybrid: vLLM vs lighttransfer.load, fp32,
#                                                           #     prompts of 100 / 1500 / 3000 tokens past sink + window
#
# Each command stays under ~8 minutes on an H200 (capacity: two engines, each ~1 min to start plus its run;
# lower MAX_REQUESTS or NEW_TOKENS if a run is slow). JSON results go to OUT; each names the GPU and versions.
# Environment: SITE (/tmp/site), DTYPE (tokens: float32), SINK (4), WINDOW (tokens: 128, build8b: 1020),
# RATIO (0.5), NEW_TOKENS (tokens: 200; capacity: 256, used only with MEASURE_STEPS=0), MEASURE_STEPS (capacity: 128
# full-batch decode steps timed after the last prefill), BATCH_POLICY (capacity: blocks, the most requests the
# block pool holds in decode; reported: vLLM's concurrency), MAX_REQUESTS (256), STEP_TOKENS (2048: vLLM's
# max_num_batched_tokens, also what it reserves per request beyond the window), ENFORCE_EAGER (0), TP (1: vLLM's
# tensor_parallel_size; 2 on a machine with two GPUs: tokens8b against the one-GPU runtime, capacity per GPU).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
SITE=${SITE:-/tmp/site}
export PYTHONPATH="$SITE:/tmp/lt${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_ENABLE_V1_MULTIPROCESSING=0   # the engine in the benchmark's process: its KV managers are read
export TOKENIZERS_PARALLELISM=false
eager=()
[ "${ENFORCE_EAGER:-0}" = 1 ] && eager=(--enforce-eager)
bench() { python3 "$here/vllm_gpu_bench.py" "$@"; }

case "${1:-}" in
  install)
    bash "$here/vllm_gpu_slim.sh" --install "${2:?parts dir}" "$SITE"
    ;;
  tokens)
    bench tokens --model "${2:?gguf or hybrid dir}" --out "${3:?out dir}" --dtype "${DTYPE:-float32}" \
      --ratio "${RATIO:-0.5}" --sink "${SINK:-4}" --window "${WINDOW:-128}" --new-tokens "${NEW_TOKENS:-200}" \
      --tensor-parallel-size "${TP:-1}" "${eager[@]}"
    ;;
  tokens8b)
    # fp32: random weights give near-flat logits, whose greedy choice bf16 rounding would decide
    bench tokens --model "${2:?dir of build8b}/hybrid" --out "${3:?out dir}" --dtype "${DTYPE:-float32}" \
      --prompt-lengths "${PROMPTS:-100,1500,3000}" --new-tokens "${NEW_TOKENS:-128}" --name "8b${TP:+_tp$TP}" \
      --tensor-parallel-size "${TP:-1}" "${eager[@]}"
    ;;
  build8b)
    bench build-8b --out "${2:?dir}" --ratio "${RATIO:-0.5}" --sink "${SINK:-4}" --window "${WINDOW:-1020}"
    ;;
  capacity)
    dir=${2:?dir of build8b} out=${3:?out dir} context=${4:?context, e.g. 32768}
    bench capacity --dense "$dir/src" --hybrid "$dir/hybrid" --context "$context" --out "$out" \
      --new-tokens "${NEW_TOKENS:-256}" --measure-steps "${MEASURE_STEPS:-128}" --batch-policy "${BATCH_POLICY:-blocks}" --max-requests "${MAX_REQUESTS:-256}" --max-num-seqs "${MAX_REQUESTS:-256}" \
      --max-num-batched-tokens "${STEP_TOKENS:-2048}" --timeout "${ENGINE_TIMEOUT:-270}" \
      --tensor-parallel-size "${TP:-1}" "${eager[@]}"
    ;;
  *)
    sed -n 2,12p "$0" >&2
    exit 2
    ;;
esac
