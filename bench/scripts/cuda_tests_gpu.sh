#!/usr/bin/env bash
# Every CUDA test in one GPU call: `tests/kernels` (each kernel beside its reference, all dtypes) and the `-m cuda`
# tests elsewhere, in SHARDS pytest processes at once. On a fresh machine the time goes to Triton compiling each
# parametrization on the CPU (a single process took more than 250 s for 40% of `tests/kernels` on an H200 host),
# so shards run side by side on the host's cores; the GPU work of a test is small.
#
#   bash bench/scripts/cuda_tests_gpu.sh OUT_DIR [SHARDS] [SECONDS]
#
# SHARDS (default 6) processes share the test files, largest first, round robin; each is cut after SECONDS
# (default 420). Writes OUT_DIR/shard-N.log, OUT_DIR/env.txt and OUT_DIR/summary.txt (one line per shard: its
# pytest summary, or "cut after SECONDS s" with the last test it reached). Exit status: 0 only if every shard
# passed. Run from the checkout root; python3 must see torch, transformers and triton.
set -uo pipefail
out=${1:?usage: cuda_tests_gpu.sh OUT_DIR [SHARDS] [SECONDS]}
shards=${2:-6}
seconds=${3:-420}
root=$(pwd)
mkdir -p "$out" /tmp/lt-tests
ln -sfn "$root" /tmp/lt-tests/lighttransfer  # the checkout imported as the package `lighttransfer`
pkg=/tmp/lt-tests/lighttransfer
export PYTHONPATH=/tmp/lt-tests PYTHONUNBUFFERED=1 LIGHTTRANSFER_TRITON_AUTOTUNE=0
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$root/.triton-cache}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, transformers, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"

# test files, largest first (bytes as a proxy for their parametrizations), dealt round robin
mapfile -t kernel_files < <(ls -S "$pkg"/tests/kernels/test_*.py)
mapfile -t cuda_files < <(grep -l "mark.cuda" "$pkg"/tests/test_*.py | xargs ls -S)
declare -a lists
i=0
for f in "${kernel_files[@]}" "${cuda_files[@]}"; do
  lists[$((i % shards))]+="$f "
  i=$((i + 1))
done

pids=()
for ((s = 0; s < shards; s++)); do
  [ -n "${lists[$s]:-}" ] || continue
  # kernel files run whole; the others only their CUDA tests (-m cuda keeps every kernel test: they carry no mark
  # but run on the GPU through kernel_error_policy.DEVICE, so the mark filter is applied per file kind)
  k_files="" c_files=""
  for f in ${lists[$s]}; do
    case "$f" in */tests/kernels/*) k_files+="$f " ;; *) c_files+="$f " ;; esac
  done
  (
    cd /tmp || exit 1
    end=$(($(date +%s) + seconds))
    rc=0
    if [ -n "$k_files" ]; then
      timeout "$seconds" python3 -m pytest -v -p no:cacheprovider -rfE --rootdir="$pkg" $k_files || rc=$?
    fi
    left=$((end - $(date +%s)))
    if [ -n "$c_files" ] && [ "$rc" != 124 ]; then
      if [ "$left" -gt 0 ]; then
        timeout "$left" python3 -m pytest -v -p no:cacheprovider -rfE --rootdir="$pkg" -m cuda $c_files || rc=$?
      else
        rc=124
      fi
    fi
    exit $rc
  ) > "$out/shard-$s.log" 2>&1 &
  pids+=("$s:$!")
done

status=0
: > "$out/summary.txt"
for entry in "${pids[@]}"; do
  s=${entry%%:*}
  wait "${entry#*:}"
  rc=$?
  [ "$rc" = 0 ] || status=1
  if [ "$rc" = 124 ]; then
    line="cut after $seconds s, last: $(grep -E '::.* (PASSED|FAILED|SKIPPED|XFAIL|ERROR)' "$out/shard-$s.log" | tail -1)"
  else
    line=$(grep -E '[0-9]+ (passed|failed)' "$out/shard-$s.log" | tail -2 | tr '\n' ' ')
  fi
  echo "shard $s (rc $rc): $line" | tee -a "$out/summary.txt"
done
grep -h -E '^(FAILED|ERROR) ' "$out"/shard-*.log | tee -a "$out/summary.txt"
exit $status
