#!/usr/bin/env bash
# A slim vLLM 0.26.0 for a GPU machine without network (CUDA 13, torch 2.11.0, Python 3.12), as archive parts
# of at most 60 MiB each, to carry one part per call; then the commands that unpack and install it there.
#
# vLLM 0.26.0 is the newest release whose CUDA wheel pins torch==2.11.0 (0.27.0 and later pin 2.13.0); its
# binaries link libcudart.so.13, as torch 2.11.0+cu130 does. Left out of the slim copy (none of them is
# imported on the path LLM(...) takes for a dense or hybrid Llama/Mistral/Qwen2/Qwen3 in bf16):
#   vllm_flash_attn/_vllm_fa2_C.abi3.so (291 MiB; FlashAttention 2, pre-Hopper GPUs), cute/ (FlashAttention 4,
#   needs nvidia-cutlass-dsl), _moe_C (45 MiB; MoE
#   kernels, import is optional), vllm-rs (41 MiB; the Rust frontend, used only with VLLM_RUST_FRONTEND_PATH),
#   third_party/deep_gemm (35 MiB; FP8 GEMMs) and fmha_sm100 (30 MiB; Blackwell), the MLA / qutlass binaries
#   are kept (small). FlashAttention 3 (_vllm_fa3_C.abi3.so, 146 MiB, ~11 MiB compressed: vLLM's default
#   backend on Hopper) is kept; --without-fa3 drops it, and the full layers then run vLLM's Triton backend. Dependencies: only those the GPU machine lacks that vLLM imports at module level on
#   that path (found by importing vLLM 0.26's offline modules in an environment holding just the GPU
#   machine's packages), plus depyf (imported while compiling with CUDA graphs). Not carried: flashinfer,
#   the server's extras (uvicorn, prometheus-fastapi-instrumentator, mcp, anthropic, opentelemetry),
#   structured-output extras (outlines-core, lm-format-enforcer), mistral-common, compressed-tensors (quantized
#   checkpoints), gguf: `vllm serve` and those features need them.
#
# Usage (here, with network):  bench/scripts/vllm_gpu_slim.sh OUT_DIR [--without-fa3]
#   WHEELS=DIR reuses downloaded wheels (default OUT_DIR/wheels); PYTHON=python3 with pip.
# Wheels tagged up to manylinux_2_35 are taken (assumed: the image's Python 3.12.3 is Ubuntu 24.04's, glibc 2.39;
# --install prints the machine's glibc).
# Writes OUT_DIR/vllm-slim.tar.xz.part-00, -01, ... and OUT_DIR/SHA256SUMS, and prints the sizes.
#
# On the GPU machine, each part copied to /tmp/vllm-parts/ (one carried call each), then:
#   cat /tmp/vllm-parts/vllm-slim.tar.xz.part-* | xz -d | tar -C /tmp/site -xf -   (after mkdir -p /tmp/site)
#   or simply:  bash bench/scripts/vllm_gpu_slim.sh --install /tmp/vllm-parts /tmp/site
# which also writes a lighttransfer entry point into /tmp/site (vLLM finds plugins through installed
# distributions' entry points; the checkout itself is not pip-installed there). Then run with
#   PYTHONPATH=/tmp/site:/tmp/lt   (/tmp/lt/lighttransfer -> the checkout; --install makes that link too).
set -euo pipefail

VLLM_VERSION=0.26.0
# module-level imports of vLLM 0.26 that the GPU image lacks (pins from vLLM 0.26.0's METADATA)
DEPS=(
  "pydantic>=2.12.0" "typing-inspection" "annotated-types" "msgspec" "pyzmq>=25.0.0" "pybase64" "cachetools"
  "cbor2" "openai-harmony>=0.0.3" "openai>=2.0.0,<3" "distro" "jiter" "sniffio" "llguidance>=1.7.0,<1.8.0"
  "xgrammar>=0.2.1,<1.0.0" "apache-tvm-ffi==0.1.10" "fastapi>=0.133.0,<0.137.0" "starlette>=1.0.1"
  "partial-json-parser" "depyf==0.20.0" "astor" "dill" "setproctitle" "blake3"
)

# Three mismatches of the archive built on 2026-12-01 with the H200 image, found on the machine and repaired after
# unpacking (each only where its import fails, so an archive built with matching versions is left alone):
# - openai 3.x imports `httpx2`, which the image lacks: `httpx2` is made an alias of the image's httpx 0.28;
# - xgrammar 0.2.9 calls tvm-ffi 0.1.10's `load_lib_module` with an argument it does not take: xgrammar is set
#   aside for a stand-in (structured output, which the benchmarks never use, is then unavailable);
# - vLLM's GPU sampler imports flashinfer, which is not carried: its FlashInfer probe is made to answer False.
repair_site() {  # SITE
  PYTHONPATH="$1" python3 - "$1" <<'PY'
import importlib, pathlib, re, shutil, sys
site = pathlib.Path(sys.argv[1])
def fails(module):
    try:
        importlib.import_module(module)
        return False
    except Exception as error:
        return error
error = fails("openai")
if error and "httpx2" in str(error):
    (site / "httpx2.py").write_text("import sys\nimport httpx\nsys.modules[__name__] = httpx\n")
    print("repaired: httpx2 -> httpx")
if fails("xgrammar") and (site / "xgrammar").is_dir():
    shutil.move(site / "xgrammar", site / "xgrammar_unused")
    (site / "xgrammar").mkdir()
    (site / "xgrammar" / "__init__.py").write_text(
        '"""Stand-in: structured output is not used by the benchmarks."""\n\n\n'
        "def __getattr__(name):\n    return type(name, (), {})\n")
    print("repaired: xgrammar stand-in")
sampler = site / "vllm/v1/sample/ops/topk_topp_sampler.py"
if fails("flashinfer") and sampler.exists():
    text = sampler.read_text()
    fixed = re.sub(r"(def flashinfer_sampler_supported\([^)]*\)[^:]*:\n)", r"\1    return False  # not carried\n",
                   text, count=1)
    if fixed != text:
        sampler.write_text(fixed)
        print("repaired: FlashInfer sampler off")
PY
}

install_parts() {  # on the GPU machine: PARTS_DIR SITE
  local parts=$1 site=$2 checkout
  checkout=$(cd "$(dirname "$0")/../.." && pwd)
  mkdir -p "$site"
  (cd "$parts" && sha256sum -c SHA256SUMS)
  cat "$parts"/vllm-slim.tar.xz.part-* | xz -d | tar -C "$site" -xf -
  local info="$site/lighttransfer-0+checkout.dist-info"
  mkdir -p "$info" /tmp/lt
  printf 'Metadata-Version: 2.1\nName: lighttransfer\nVersion: 0+checkout\n' > "$info/METADATA"
  printf '[vllm.general_plugins]\nlighttransfer = lighttransfer.serving.vllm:register\n' > "$info/entry_points.txt"
  ln -sfn "$checkout" /tmp/lt/lighttransfer
  ldd --version | sed -n 1p   # not head: under pipefail, ldd killed by SIGPIPE would end the install here
  repair_site "$site"
  PYTHONPATH="$site:/tmp/lt" python3 -c "import vllm, importlib.metadata as m; print('vllm', vllm.__version__, 'plugins', [e.name for e in m.entry_points(group='vllm.general_plugins')])"
}

if [ "${1:-}" = "--repair" ]; then  # SITE: only the repairs, on an unpacked site
  repair_site "${2:?site dir}"
  exit 0
fi
if [ "${1:-}" = "--install" ]; then
  install_parts "${2:?parts dir}" "${3:?site dir}"
  exit 0
fi

OUT=${1:?usage: $0 OUT_DIR [--without-fa3]  |  $0 --install PARTS_DIR SITE_DIR}
WITH_FA3=1
[ "${2:-}" = "--without-fa3" ] && WITH_FA3=0
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$OUT/wheels}
mkdir -p "$OUT" "$WHEELS"
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
pip_download() { "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps "${TARGET[@]}" -d "$WHEELS" "$@"; }

pip_download "vllm==$VLLM_VERSION"
pip_download "${DEPS[@]}"
# pydantic-core must be the exact version this pydantic asks for
PYDANTIC_WHEEL=$(ls "$WHEELS"/pydantic-2*.whl | sort -V | tail -1)
CORE_PIN=$(unzip -p "$PYDANTIC_WHEEL" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: pydantic-core\s*\(==[^ ;]*\).*/pydantic-core\1/p' | head -1)
pip_download "${CORE_PIN:?no pydantic-core pin in $PYDANTIC_WHEEL}"

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
SITE=$STAGE/site
mkdir -p "$SITE"
# a wheel is a zip of its install tree; purelib/platlib under NAME.data/ go to the top, scripts are not needed.
# One wheel per project: the newest in WHEELS, except pydantic-core, which is the one pydantic pins.
declare -A CHOSEN
for wheel in $(ls "$WHEELS"/*.whl | sort -V); do
  CHOSEN[$(basename "$wheel" | cut -d- -f1 | tr 'A-Z-' 'a-z_')]=$wheel
done
CHOSEN[pydantic_core]=$(ls "$WHEELS"/pydantic_core-"${CORE_PIN#pydantic-core==}"-*.whl | head -1)
for wheel in "${CHOSEN[@]}"; do
  unzip -q -o "$wheel" -d "$SITE"
done
for data in "$SITE"/*.data; do
  [ -d "$data" ] || continue
  for sub in purelib platlib; do [ -d "$data/$sub" ] && cp -a "$data/$sub/." "$SITE/"; done
  rm -rf "$data"
done
V=$SITE/vllm
rm -f "$V/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$V"/_moe_C*.so "$V/vllm-rs"
rm -rf "$V/vllm_flash_attn/cute" "$V/third_party/deep_gemm" "$V/third_party/fmha_sm100"
[ "$WITH_FA3" = 1 ] || rm -f "$V/vllm_flash_attn/_vllm_fa3_C.abi3.so"
find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$SITE" -name '*.dist-info' -type d -exec rm -f {}/RECORD \;  # the files differ from the wheels' now

rm -f "$OUT"/vllm-slim.tar.xz.part-* "$OUT/SHA256SUMS"
tar -C "$SITE" -cf - . | xz -T0 -6 | split -b 60M -d -a 2 - "$OUT/vllm-slim.tar.xz.part-"
(cd "$OUT" && sha256sum vllm-slim.tar.xz.part-* > SHA256SUMS)
echo "unpacked: $(du -sm "$SITE" | cut -f1) MiB ($(ls "$WHEELS"/*.whl | wc -l) wheels); parts:"
ls -l "$OUT"/vllm-slim.tar.xz.part-* | awk '{printf "  %s %.1f MiB\n", $NF, $5 / 1048576}'
