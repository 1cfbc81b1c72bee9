#!/usr/bin/env bash
# The GPU targets of `lighttransfer finetune` (one GPU), each stage writing JSON that names the GPU and versions.
#
#   bench/scripts/finetune_gpu.sh recovery GGUF AUSTEN OUT_DIR   # SmolLM2 at ratio 0.75: gap vs steps, S² and dense
#   bench/scripts/finetune_gpu.sh speed OUT_DIR [LENGTHS]        # S²-Attn vs dense step time, 8B shape (8192,32768)
#
# recovery: the laziest 22 of 30 layers by lazy ratio stream (ratio 0.75, the ranking that loses most on this
# model), sink 4 + window 1020, as the README's quality table; training text: austen_novels.txt from Mansfield
# Park on (lines 16238-73434), evaluation: Emma (lines 1-16237), never trained on. Each curve point is a resumed
# run (the same run continued), merged and evaluated on its own weights by finetune_recovery.py: perplexity at
# EVAL_LENGTHS and passkey, original vs hybrid vs every point, gap recovered per length.
# Environment: SEQ (8192), BATCH (4), LR (2e-4), WARMUP (10; fixed, so that every resumed point continues one schedule), STEPS ("50 100 200 400"), MODES ("s2 dense";
# s2: S²-Attn, dense: --no-s2-attn, s2sink: S²-Attn whose heads also see the first 4 tokens, SinkLoRA-style),
# DATA_EXTRA (synthetic:passkey: retrieval rows in the six training wordings; empty for text only),
# PASSKEY_FORMAT (locker,needle: the two wordings never trained on; each scored, the first as "passkey"), FT_ARGS (more finetune options, e.g. --train-norms), EVAL_LENGTHS (4096,8192), EVAL_WINDOWS (8),
# PASSKEY_TRIALS (5), LAYERS (the 0.75 selection below), SPEED_ARGS (finetune_step_speed.py options),
# REFERENCE (1: also fine-tune the original the same way at every step count, the control for adaptation to the
# training text: on the H200 run without it, every fine-tuned hybrid fell below the original's perplexity; the
# recovery is then read against it, "gap_recovered_vs_control" in the JSON).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
lt() { python3 "$here/bin/lighttransfer" "$@"; }
py() { python3 "$@"; }

stage=$1
case "$stage" in
  recovery)
    gguf=$2 austen=$3 out=$4
    mkdir -p "$out"
    SEQ=${SEQ:-8192} BATCH=${BATCH:-4} LR=${LR:-2e-4} STEPS=${STEPS:-"50 100 200 400"}
    # lazy-ratio ranking of SmolLM2-135M (bench/results/analysis_smollm2_with_gates_w128.json), first 22
    LAYERS=${LAYERS:-25,13,16,18,27,12,22,19,26,17,15,14,21,23,11,28,29,24,20,10,1,2}
    sed -n '1,16237p' "$austen" > "$out/emma_eval.txt"
    sed -n '16238,73434p' "$austen" > "$out/austen_train.txt"
    [[ -d "$out/hybrid" ]] || lt convert "$gguf" --layers "$LAYERS" --sink 4 --window 1020 --out "$out/hybrid" \
      --device cuda --dtype bfloat16
    finetuned=()
    for mode in ${MODES:-s2 dense}; do
      case "$mode" in
        s2) flags=(--s2-attn) ;;
        dense) flags=(--no-s2-attn) ;;
        s2sink) flags=(--s2-attn --s2-sink 4) ;;
        *) echo "unknown mode $mode (s2, dense, s2sink)" >&2; exit 2 ;;
      esac
      state="$out/state_$mode" resume=()
      for steps in $STEPS; do
        lt finetune "$out/hybrid" --data "$out/austen_train.txt" ${DATA_EXTRA-synthetic:passkey} --seq-len "$SEQ" --batch "$BATCH" --lr "$LR" \
          --warmup-steps "${WARMUP:-10}" "${flags[@]}" --steps "$steps" --save-every "$steps" --state-dir "$state" "${resume[@]}" ${FT_ARGS:-} \
          --out "$out/ft_${mode}_$steps" --force --device cuda 2>&1 | tail -4
        resume=(--resume "$state")
        finetuned+=(--finetuned "${mode}_$steps=$out/ft_${mode}_$steps")
      done
    done
    if [[ "${REFERENCE:-0}" = 1 ]]; then
      # the control for adaptation to the training text: the original itself (a checkpoint that streams no layer,
      # so every layer trains as a full layer), fine-tuned the same way at every step count of each mode (the same
      # resumed chain); finetune_recovery.py reads each hybrid point against the control of its mode and steps
      [[ -d "$out/reference" ]] || lt convert "$gguf" --ratio 0.01 --sink 4 --window 1020 --out "$out/reference" \
        --device cuda --dtype bfloat16
      for mode in ${MODES:-s2 dense}; do
        case "$mode" in s2) flags=(--s2-attn) ;; dense) flags=(--no-s2-attn) ;; s2sink) flags=(--s2-attn --s2-sink 4) ;; esac
        state="$out/state_reference_$mode" resume=()
        for steps in $STEPS; do
          lt finetune "$out/reference" --data "$out/austen_train.txt" ${DATA_EXTRA-synthetic:passkey} --seq-len "$SEQ" \
            --batch "$BATCH" --lr "$LR" --warmup-steps "${WARMUP:-10}" "${flags[@]}" --steps "$steps" \
            --save-every "$steps" --state-dir "$state" "${resume[@]}" ${FT_ARGS:-} \
            --out "$out/reference_${mode}_$steps" --force --device cuda 2>&1 | tail -4
          resume=(--resume "$state")
          finetuned+=(--finetuned "reference_${mode}_$steps=$out/reference_${mode}_$steps")
        done
      done
    fi
    py "$here/bench/scripts/finetune_recovery.py" --original "$gguf" --hybrid "$out/hybrid" "${finetuned[@]}" \
      --text "$out/emma_eval.txt" --lengths "${EVAL_LENGTHS:-4096,8192}" --windows "${EVAL_WINDOWS:-8}" \
      --passkey-trials "${PASSKEY_TRIALS:-5}" --passkey-depths 10 --passkey-format "${PASSKEY_FORMAT:-locker,needle}" \
      --device cuda --dtype bfloat16 \
      --out "$out/finetune_recovery_smollm2.json"
    ;;
  speed)
    # one process per length, so that each stays within a 10-minute command (the 8B shape at 32k: ~10 s a step)
    out=$2
    mkdir -p "$out"
    for length in $(echo "${3:-8192,32768}" | tr , ' '); do
      py "$here/bench/scripts/finetune_step_speed.py" "$out/finetune_step_speed_8b_$length.json" --lengths "$length" \
        ${SPEED_ARGS:-}
    done
    ;;
  *) echo "usage: $0 recovery GGUF AUSTEN_TXT OUT_DIR | speed OUT_DIR [LENGTHS]" >&2; exit 2 ;;
esac
