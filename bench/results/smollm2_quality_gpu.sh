#!/usr/bin/env bash
# Quality runs of SmolLM2-135M-Instruct on one GPU: gates optimized on the training wordings, then the
# evaluation of every selection rule on training and held-out wordings, with the same prompts for every row.
#
#   bench/results/smollm2_quality_gpu.sh gates  GGUF OUT_DIR                 # analysis + gates (two L1 weights)
#   bench/results/smollm2_quality_gpu.sh eval   GGUF OUT_DIR TEXT L1 FORMAT  # one wording, all rows
#
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf; TEXT: held-out prose (Emma: austen_novels.txt lines 1-16237);
# the analysis and the gates read the shipped Sense and Sensibility excerpt, so no evaluation text is seen.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
lt() { python3 "$here/bin/lighttransfer" "$@"; }

SINK=4 WINDOW=128
stage=$1 gguf=$2 out=$3
mkdir -p "$out"
case "$stage" in
  gates)
    for l1 in 0.05 0.01; do
      lt analyze "$gguf" --seq-len 2048 --samples 32 --sink $SINK --recent $WINDOW --last 32 \
        --method optimize --gate-steps 400 --gate-l1 "$l1" --device cuda --dtype float32 \
        --out "$out/analysis_smollm2_gates_l1-$l1.json"
    done
    ;;
  eval)
    text=$4 l1=$5 format=$6
    lt eval --baseline "$gguf" --report "$out/analysis_smollm2_gates_l1-$l1.json" --text "$text" \
      --lengths 1024,2048 --windows 4 --passkey-lengths 1024,2048 --passkey-depths 10 --passkey-trials 5 \
      --passkey-format "$format" --sink $SINK --window $WINDOW --ratio 0.5 \
      --rows original,lighttransfer,lazy-ratio,random,least-lazy,head-level,head-level-gates,random-heads,least-lazy-heads \
      --device cuda --dtype float32 --out "$out/eval_smollm2_l1-${l1}_$format.json"
    ;;
  *) echo "usage: $0 gates|eval GGUF OUT_DIR [TEXT L1 FORMAT]" >&2; exit 2 ;;
esac
