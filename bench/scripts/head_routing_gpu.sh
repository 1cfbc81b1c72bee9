#!/usr/bin/env bash
# Head routing on one GPU, one command (<= 4 min): the CUDA tests of the routed decode kernel and the routing rule,
# then decode attention of one full layer at 32k (8B shape: 32/8 heads, D=128, bf16), batch 1 and 16, at routed
# shares 0 / 0.25 / 0.5 / 0.75 / 1 against kernels.full_decode in the same process, the decision's overhead
# (unfused PyTorch) and the fused QAdA step at the same shares with its overhead over dense
# (CUDA-graph replays, pinned Triton configs). Optionally the SmolLM2 rows at 4k (a few samples per task).
#
#   bench/scripts/head_routing_gpu.sh OUT_DIR [GGUF TEXT REPORT]
#
# OUT_DIR gets cuda_tests.log, head_routing_kernels.json/.md (GPU, driver, torch, Triton, CUDA named inside) and,
# with GGUF (SmolLM2-135M-Instruct.Q4_1.gguf), TEXT (austen_novels.txt) and REPORT (an analysis report with gates
# at the same sink/window: bench/results/analysis_smollm2_with_gates_w128.json), head_routing_smollm2_4k.json/.md.
# Environment: SAMPLES (3), TASKS (niah_single_1,niah_multikey_1,niah_multivalue,vt), WINDOW (128), SHARE (0.5).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
out=$1
mkdir -p "$out"
export LIGHTTRANSFER_TRITON_AUTOTUNE=0
link=$(mktemp -d)
ln -s "$here" "$link/lighttransfer"
export PYTHONPATH="$link${PYTHONPATH:+:$PYTHONPATH}"
cd "$link/lighttransfer"
{ python3 -m pytest -q -p no:cacheprovider --rootdir="$link/lighttransfer" \
    "$link/lighttransfer/tests/kernels/test_routed_decode.py" "$link/lighttransfer/tests/kernels/test_head_routing.py" \
    "$link/lighttransfer/tests/kernels/test_fused_routing.py" \
  && python3 -m pytest -q -p no:cacheprovider --rootdir="$link/lighttransfer" -m cuda \
    "$link/lighttransfer/tests/test_runtime_head_routing.py" "$link/lighttransfer/tests/test_runtime_head_routing_fused.py"; } 2>&1 | tee "$out/cuda_tests.log" \
  || echo "CUDA tests FAILED (see cuda_tests.log); timing anyway"
python3 bench/scripts/head_routing_kernel_bench.py --out "$out"
if [[ $# -ge 4 ]]; then
  timeout 150 python3 bin/lighttransfer -q eval --baseline "$2" --text "$3" --report "$4" --suite passkey,ruler \
    --lengths 4k --passkey-lengths 4096 --passkey-depths 5 --passkey-trials 1 \
    --ruler-tasks "${TASKS:-niah_single_1,niah_multikey_1,niah_multivalue,vt}" --samples "${SAMPLES:-3}" \
    --sink 4 --window "${WINDOW:-128}" --rows original,qada,qada-oracle,qada-random,qada-gates \
    --routing-share "${SHARE:-0.5}" --backend runtime --device cuda --dtype float32 \
    --out "$out/head_routing_smollm2_4k.json" || echo "SmolLM2 rows did not finish within their 150 s"
fi
