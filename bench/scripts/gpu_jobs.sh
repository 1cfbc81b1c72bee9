#!/usr/bin/env bash
# The pending GPU measurements as named jobs, run one after another (each alone on the GPU: side by side they
# slowed each other past their limits), each under its own time limit, with every file under 4 MB a job wrote (no
# checkpoints) packed into OUT_DIR/results.tar.gz after every job, so that a call cut short still returns the
# finished jobs' files, as one file with the folder structure kept inside it.
#
#   bash bench/scripts/gpu_jobs.sh OUT_DIR JOB[:SECONDS] [JOB[:SECONDS] ...]
#
# Jobs (default limits in seconds; on a cold Triton cache the first TokenSelect or routing job compiles for 1-2 min):
#   cuda-tests (240)   the CUDA tests of the TokenSelect step and kernels (Selection Cache lookup, radix top-k,
#                      static steps, CUDA graphs), of the one-launch fused routing kernel, and fine-tuning's
#                      attention paths on CUDA (FlexAttention and grouped S²-Attn against the explicit masks)
#   ts-kernels (240)   tokenselect_kernel_bench.py: every part at 128k, batch 1 and 16, the fused lookup and the
#                      radix top-k beside their predecessors
#   ts-e2e (300)       tokenselect_e2e.py at CONTEXTS (65536,131072), 16 steps; ts-e2e-radix: the same with
#                      LIGHTTRANSFER_SELECT_TOPK=radix
#   hr-kernels (330)   head_routing_kernel_bench.py --batches 1,16 (the fused QAdA step, three launches and one)
#   hr-balanced (330)  the same bench, the three-launch and the balanced bulk pass side by side, full and diagonal
#                      moments (two runs); WAVES="4 6": then batch 16 with diagonal moments at those routed waves
#   hr-quality (540)   head_routing_quality_gpu.sh (needs GGUF, TEXT, REPORT; about four ROWS fit one call)
#   sp-quality (540)   sparse_prefill_quality.py at 8k (needs GGUF, TEXT)
#   sp-real (420)      sparse_prefill_bench.py on real attention: SP_LAYERS (7,4,8: the three least lazy layers)
#                      of SmolLM2 captured at 131072 tokens (16x its trained 8192) and fitted to the 8B shape
#                      (--fit-shape), at 128k (sample, vslash, FlexAttention once) and 64k-8k (GGUF, TEXT)
#   ts-quality (540)   TokenSelect at 8k, the issue's scaled-down budget, then the Selection Cache sweep (GGUF, TEXT,
#                      REPORT)
#   ts-sweep8k (540)   the Selection Cache sweep alone at 8k, both rules (anchor, previous) at THETAS (1.0,0.8,0.75),
#                      PASSKEY_TRIALS (2) x 5 depths (GGUF, TEXT); writes after every theta; AGAINST (both) picks
#                      the rules, RULER_TASKS (none) adds those tasks at RULER_SAMPLES (10) with paired intervals
#   ft-recovery (540)  finetune_gpu.sh recovery with REFERENCE=1 (needs GGUF, TEXT; peft)
#   ft-speed (540)     finetune_gpu.sh speed (the 8B shape, S²-Attn vs dense step time; peft)
#   mg-analyze (400)   with several GPUs: analyze_multi_gpu.py, the 8B shape on one GPU and spread over all (the
#                      reports compared), then the 70B shape (80 layers, more than one GPU holds) spread over all
# Environment: GGUF (SmolLM2-135M-Instruct.Q4_1.gguf), TEXT (austen_novels.txt), REPORT (default
# bench/results/analysis_smollm2_with_gates_w128.json), CONTEXTS, THETAS, PASSKEY_TRIALS, AGAINST, RULER_TASKS,
# RULER_SAMPLES, WAVES, SP_LAYERS.
# OUT_DIR/summary.txt: one line per job (exit status, seconds). Run from the checkout root; python3 must see torch,
# transformers and triton.
set -uo pipefail
out=${1:?usage: gpu_jobs.sh OUT_DIR JOB[:SECONDS] ...}
shift
[ $# -gt 0 ] || { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" >&2; exit 2; }  # the header above
root=$(pwd)
work=$(mktemp -d)
mkdir -p "$out" /tmp/lt-jobs
ln -sfn "$root" /tmp/lt-jobs/lighttransfer
export PYTHONPATH=/tmp/lt-jobs${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LIGHTTRANSFER_TRITON_AUTOTUNE=0
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$root/.triton-cache}
REPORT=${REPORT:-$root/bench/results/analysis_smollm2_with_gates_w128.json}
lt() { python3 "$root/bin/lighttransfer" "$@"; }
need() { for v in "$@"; do [ -n "${!v:-}" ] || { echo "this job needs $v (see the header)" >&2; return 2; }; done; }

job() {  # NAME DIR: the job's commands, writing into DIR
  local name=$1 d=$2
  case "$name" in
    cuda-tests)  # on a GPU the kernel tests run their kernels on it (tests/kernels/kernel_error_policy.py); -v:
      # one line per test, so a run cut by its limit still names the ones that failed
      local t=/tmp/lt-jobs/lighttransfer/tests
      (cd /tmp && python3 -m pytest -v -p no:cacheprovider --rootdir=/tmp/lt-jobs/lighttransfer \
        "$t/kernels/test_selection_cache.py" "$t/kernels/test_topk_rows.py" "$t/test_runtime_token_select_step.py" \
        "$t/test_runtime_token_select_static.py" "$t/kernels/test_fused_routing.py" "$t/test_finetune.py")
      ;;
    ts-kernels) python3 "$root/bench/scripts/tokenselect_kernel_bench.py" --out "$d" ;;
    ts-e2e) python3 "$root/bench/scripts/tokenselect_e2e.py" "$d" "${CONTEXTS:-65536,131072}" 16 ;;
    ts-e2e-radix)
      LIGHTTRANSFER_SELECT_TOPK=radix python3 "$root/bench/scripts/tokenselect_e2e.py" "$d" \
        "${CONTEXTS:-65536,131072}" 16
      ;;
    hr-kernels) python3 "$root/bench/scripts/head_routing_kernel_bench.py" --out "$d" --batches 1,16 ;;
    hr-balanced)
      python3 "$root/bench/scripts/head_routing_kernel_bench.py" --out "$d/full" --batches 1,16 \
        --variants fused,fusedb &&
      python3 "$root/bench/scripts/head_routing_kernel_bench.py" --out "$d/diag" --batches 1,16 \
        --variants fused,fusedb --fused-moments diag &&
      for w in ${WAVES:-}; do  # optional: the routed split rule at other wave counts (WAVES="4 6")
        python3 "$root/bench/scripts/head_routing_kernel_bench.py" --out "$d/waves_$w" --batches 16 \
          --variants fused --fused-moments diag --routed-waves "$w" || return
      done
      ;;
    hr-quality)
      need GGUF TEXT || return
      ROW_LIMIT=${ROW_LIMIT:-500} bash "$root/bench/scripts/head_routing_quality_gpu.sh" "$GGUF" "$TEXT" "$REPORT" "$d"
      ;;
    sp-quality)
      need GGUF TEXT || return
      python3 "$root/bench/scripts/sparse_prefill_quality.py" --out "$d" --model "$GGUF" --text "$TEXT" \
        --device cuda --length 8192
      ;;
    sp-real)
      need GGUF TEXT || return
      local qkv=/tmp/lt-jobs/qkv_${SP_LAYERS:-7,4,8}.pt
      [ -f "$qkv" ] || python3 "$root/bench/scripts/capture_qkv.py" --out "$qkv" --model "$GGUF" --text "$TEXT" \
        --length 131072 --layers "${SP_LAYERS:-7,4,8}" || return
      python3 "$root/bench/scripts/sparse_prefill_bench.py" --out "$d/len_131072" --lengths 131072 --qkv "$qkv" \
        --fit-shape --no-tests --methods sample vslash --layouts query &&
      python3 "$root/bench/scripts/sparse_prefill_bench.py" --out "$d/shorter" --lengths 65536 32768 16384 8192 \
        --qkv "$qkv" --fit-shape --no-tests --methods sample --layouts query --flex none
      ;;
    ts-quality)
      need GGUF TEXT || return
      lt -q eval --baseline "$GGUF" --text "$TEXT" --text-lines 1:16237 --suite perplexity,passkey,ruler \
        --lengths 8k --windows 2 --passkey-lengths 8192 --passkey-depths 5 --passkey-trials 2 \
        --ruler-tasks niah_single_1,niah_multikey_1,niah_multivalue,vt,cwe,fwe --samples 10 --ruler-batch 10 \
        --rows original,tokenselect,lighttransfer,lighttransfer+tokenselect,quest,lighttransfer+quest --report "$REPORT" --ratio 0.5 \
        --sink 4 --window 128 --select-k 512 --select-init 16 --select-local 256 --select-reuse 0.9 \
        --backend runtime --device cuda --dtype float32 --out "$d/tokenselect_smollm2_8k.json" &&
      python3 "$root/bench/scripts/tokenselect_reuse_sweep.py" --baseline "$GGUF" --text "$TEXT" \
        --text-lines 1,16237 --lengths 8192 --thetas 1.0,0.9,0.8 --passkey-lengths 8192 --passkey-depths 5 \
        --passkey-trials 2 --device cuda --dtype float32 --out "$d"
      ;;
    ts-sweep8k)
      need GGUF TEXT || return
      python3 "$root/bench/scripts/tokenselect_reuse_sweep.py" --baseline "$GGUF" --text "$TEXT" \
        --text-lines 1,16237 --lengths 8192 --thetas "${THETAS:-1.0,0.8,0.75}" --windows 1 --passkey-lengths 8192 \
        --passkey-depths 5 --passkey-trials "${PASSKEY_TRIALS:-2}" --backend runtime --device cuda \
        --dtype float32 --against "${AGAINST:-both}" --out "$d" \
        ${RULER_TASKS:+--ruler-tasks "$RULER_TASKS" --ruler-samples "${RULER_SAMPLES:-10}" --ruler-batch 10}
      ;;
    ft-recovery)
      need GGUF TEXT || return
      REFERENCE=1 bash "$root/bench/scripts/finetune_gpu.sh" recovery "$GGUF" "$TEXT" "$d"
      ;;
    ft-speed) bash "$root/bench/scripts/finetune_gpu.sh" speed "$d" ;;
    mg-analyze)
      python3 "$root/bench/scripts/analyze_multi_gpu.py" "$d/analyze_multi_gpu_8b.json" --shape 8b &&
      python3 "$root/bench/scripts/analyze_multi_gpu.py" "$d/analyze_multi_gpu_70b.json" --shape 70b --placements auto
      ;;
    *) echo "unknown job $name (see the header)" >&2; return 2 ;;
  esac
}

limit_of() {
  case "$1" in
    cuda-tests|ts-kernels) echo 240 ;; ts-e2e|ts-e2e-radix) echo 300 ;; hr-kernels|hr-balanced) echo 330 ;;
    mg-analyze) echo 400 ;; sp-real) echo 420 ;;
    *) echo 540 ;;
  esac
}

status=0
: > "$out/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$work/gpu.txt" 2>&1
for spec in "$@"; do
  name=${spec%%:*}
  seconds=${spec#*:}
  [ "$seconds" = "$spec" ] && seconds=$(limit_of "$name")
  mkdir -p "$work/$name"
  started=$(date +%s)
  export -f job need lt
  export root REPORT
  timeout "$seconds" bash -c 'job "$0" "$1"' "$name" "$work/$name" > "$work/$name/$name.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || status=1
  note=""
  [ "$rc" = 124 ] && note=" (cut after $seconds s)"
  echo "$name: rc $rc$note, $(( $(date +%s) - started )) s" | tee -a "$out/summary.txt"
  tail -n 3 "$work/$name/$name.log"
  cp "$out/summary.txt" "$work/summary.txt"
  # results only: files under 4 MB (checkpoints, optimizer states and tokenizers written by a job stay behind, or the
  # archive outgrows what a call can bring back)
  (cd "$work" && find . -type f -size -4M -print0 | tar czf "$out/results.tar.gz.tmp" --null -T -) &&
    mv "$out/results.tar.gz.tmp" "$out/results.tar.gz"
done
exit $status
