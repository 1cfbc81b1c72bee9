#!/usr/bin/env bash
# One GPU run for the fused ops mode (runtime/fused_ops.py), about 4 minutes on an H200:
#   1. the CUDA tests of the fused kernels and of the fused runtime (graph capture past the ring wrap, bf16);
#   2. decode at 16k on the Llama-3-8B shape, batch 1 and the largest batch in 130 GB, runtime dense and the
#      ratio-0.5 hybrid, eager and CUDA-graphed, each unfused and fused in one process (decode_floor.py ... both);
#   3. the per-kernel profile of one replayed batch-1 step, unfused and fused (fused_decode_profile.py).
#   bash bench/scripts/fused_ops_gpu.sh OUT_DIR [TEST_SECONDS] [BENCH_SECONDS] [PROFILE_SECONDS]
# Run from the checkout root. Writes OUT_DIR/{env.txt,cuda_tests.log}, OUT_DIR/floor/decode_floor.{json,md,png,log},
# OUT_DIR/profile/{profile_*.txt,fused_decode_profile.json,log}.
set -o pipefail
out=${1:?usage: fused_ops_gpu.sh OUT_DIR [TEST_SECONDS] [BENCH_SECONDS] [PROFILE_SECONDS]}
root=$(pwd)
mkdir -p "$out/floor" "$out/profile" /tmp/lt-pkg
ln -sfn "$root" /tmp/lt-pkg/lighttransfer  # the checkout imported as the package `lighttransfer`
export PYTHONPATH=/tmp/lt-pkg PYTHONUNBUFFERED=1 LIGHTTRANSFER_TRITON_AUTOTUNE=0
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/lt-cache/triton}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, transformers, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"
tests=/tmp/lt-pkg/lighttransfer/tests
[ "${2:-70}" = 0 ] || (cd /tmp && timeout "${2:-70}" python3 -m pytest -q -p no:cacheprovider --rootdir=/tmp/lt-pkg/lighttransfer \
  "$tests/kernels/test_fused_ops.py" "$tests/test_fused_ops_runtime.py" \
  2>&1 | tee "$out/cuda_tests.log" | tail -25)
timeout "${3:-135}" python3 bench/scripts/decode_floor.py "$out/floor" 16384 none both 2>&1 | tee "$out/floor/decode_floor.log" \
  | grep -v -i warn | tail -30
timeout "${4:-45}" python3 bench/scripts/fused_decode_profile.py "$out/profile" 16384 2>&1 | tee "$out/profile/log" \
  | grep -v -i warn | tail -8
