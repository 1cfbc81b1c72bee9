"""Decode at the bandwidth floor: the Llama-3-8B shape (random bf16 weights), batch 1 and the largest batch, at 16k
and 32k, with the floor share of every point. Rows: stock transformers (dynamic cache, eager), stock transformers
with ``StaticCache`` + ``torch.compile(mode="reduce-overhead")`` (batch 1 at the first context, the largest batch
at each), the runtime's dense path and a ratio-0.5 hybrid, each eager and with the decode step replayed from a CUDA
graph.

    PYTHONPATH=<dir with a lighttransfer link> LIGHTTRANSFER_TRITON_AUTOTUNE=0 \
        python3 bench/scripts/decode_floor.py OUT_DIR [CONTEXTS] [COMPILED] [FUSED]

COMPILED: ``inductor`` (default: ``mode="reduce-overhead"``, minutes of compile per shape), ``cudagraphs``
(TorchDynamo's capture-only backend, seconds) or ``none``. FUSED: the runtime rows' fused ops, ``on`` (default, as
``lighttransfer.load`` on CUDA), ``off``, or ``both`` (each runtime row unfused and fused, in one process).

Writes ``OUT_DIR/decode_floor.{json,md,png}`` (lighttransfer.bench's own outputs).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lighttransfer.bench.speed import benchmark, markdown_bench


def main() -> None:
    out = Path(sys.argv[1])
    contexts = tuple(int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "16384,32768").split(","))
    compiled = sys.argv[3] if len(sys.argv) > 3 else "inductor"
    fused = sys.argv[4] if len(sys.argv) > 4 else "on"
    # 48 timed steps: at 16 the same point moved by up to 30% between two machines
    result = benchmark(baseline="llama3-8b-shaped", contexts=contexts, ratios=(0.5,), decode_steps=48, sink=4,
                       window=1020, memory_budget_gb=130, device="cuda", cuda_graphs=True,
                       compiled_baseline=compiled != "none",
                       compiled_backend=compiled if compiled != "none" else "inductor", fused_ops=fused,
                       out=out / "decode_floor.json",
                       progress=lambda line: print(line, flush=True))
    print(markdown_bench(result))


if __name__ == "__main__":
    main()
