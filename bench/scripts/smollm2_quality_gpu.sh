#!/usr/bin/env bash
# Quality runs of SmolLM2-135M-Instruct on one GPU: gates optimized on the training wordings, then the
# evaluation of every selection rule on training and held-out wordings, with the same prompts for every row.
#
#   bench/scripts/smollm2_quality_gpu.sh gates GGUF OUT_DIR NAME L1                # analysis + gates
#   bench/scripts/smollm2_quality_gpu.sh eval  GGUF OUT_DIR NAME TEXT FORMAT       # one wording, all rows
#
# GGUF: SmolLM2-135M-Instruct.Q4_1.gguf; TEXT: held-out prose (Emma: austen_novels.txt lines 1-16237);
# the analysis and the gates read the shipped Sense and Sensibility excerpt, so no evaluation text is seen.
# Environment: GATE_STEPS (400), GATE_SAMPLES (32), GATE_FORMATS (analyze's default: the training wordings),
# SINK (4), WINDOW (128), GATE_SEQ (2048), LENGTHS (1024,2048), ROWS (every layer- and head-level row), EVAL_ARGS (more eval options, e.g. --seed 1), EVAL_SUFFIX (file name).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
lt() { python3 "$here/bin/lighttransfer" "$@"; }

SINK=${SINK:-4} WINDOW=${WINDOW:-128} GATE_SEQ=${GATE_SEQ:-2048} LENGTHS=${LENGTHS:-1024,2048}
ALL_ROWS=original,lighttransfer,lazy-ratio,random,least-lazy,head-level,head-level-gates,random-heads,least-lazy-heads
stage=$1 gguf=$2 out=$3 name=$4
report="$out/analysis_smollm2_gates_$name.json"
mkdir -p "$out"
case "$stage" in
  gates)
    l1=$5
    formats=()
    [[ -n "${GATE_FORMATS:-}" ]] && formats=(--gate-formats "$GATE_FORMATS")
    lt analyze "$gguf" --seq-len "$GATE_SEQ" --samples "${GATE_SAMPLES:-32}" --sink $SINK --recent $WINDOW --last 32 \
      --method optimize --gate-steps "${GATE_STEPS:-400}" --gate-l1 "$l1" "${formats[@]}" \
      --device cuda --dtype float32 --out "$report"
    ;;
  eval)
    text=$5 format=$6
    lt eval --baseline "$gguf" --report "$report" --text "$text" \
      --lengths "$LENGTHS" --windows 4 --passkey-lengths "$LENGTHS" --passkey-depths 10 --passkey-trials 5 \
      --passkey-format "$format" --sink $SINK --window $WINDOW --ratio 0.5 --rows "${ROWS:-$ALL_ROWS}" \
      --device cuda --dtype float32 ${EVAL_ARGS:-} --out "$out/eval_smollm2_${name}_$format${EVAL_SUFFIX:-}.json"
    ;;
  *) echo "usage: $0 gates GGUF OUT_DIR NAME L1 | eval GGUF OUT_DIR NAME TEXT FORMAT" >&2; exit 2 ;;
esac
