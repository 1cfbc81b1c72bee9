#!/usr/bin/env bash
# One GPU run: the CUDA-graph tests, then bench/scripts/decode_floor.py (stock transformers, stock with
# StaticCache + torch.compile, runtime dense and hybrid, each eager and CUDA-graphed; 16k and 32k).
#   bash bench/scripts/decode_floor_graphs.sh OUT_DIR [TEST_SECONDS] [BENCH_SECONDS] [CONTEXTS] [COMPILED]
# (TEST_SECONDS 0 skips the tests; CONTEXTS default 16384,32768; COMPILED inductor|cudagraphs|none, see
# decode_floor.py)
# Run from the checkout root; python3 must see torch, transformers and triton. Writes OUT_DIR/{env.txt,
# cuda_tests.log} and OUT_DIR/run/decode_floor.{json,md,png,log}.
set -o pipefail
out=${1:?usage: decode_floor_graphs.sh OUT_DIR [TEST_SECONDS] [BENCH_SECONDS] [CONTEXTS] [COMPILED]}
root=$(pwd)
mkdir -p "$out/run" /tmp/lt-pkg
ln -sfn "$root" /tmp/lt-pkg/lighttransfer  # the checkout imported as the package `lighttransfer`
export PYTHONPATH=/tmp/lt-pkg PYTHONUNBUFFERED=1 LIGHTTRANSFER_TRITON_AUTOTUNE=0
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/lt-cache/triton} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/lt-cache/inductor}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, transformers, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"
tests=/tmp/lt-pkg/lighttransfer/tests
[ "${2:-170}" = 0 ] || (cd /tmp && timeout "${2:-170}" python3 -m pytest -q -p no:cacheprovider --rootdir=/tmp/lt-pkg/lighttransfer \
  "$tests/test_graphs_cuda.py" "$tests/kernels/test_full_decode.py" -k "graph or replay or generation or device_length" \
  2>&1 | tee "$out/cuda_tests.log" | tail -30)
timeout "${3:-400}" python3 bench/scripts/decode_floor.py "$out/run" "${4:-16384,32768}" "${5:-inductor}" 2>&1 | tee "$out/run/decode_floor.log" \
  | grep -v -i warn | tail -45
