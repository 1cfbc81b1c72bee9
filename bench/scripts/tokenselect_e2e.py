"""End-to-end decode with TokenSelect on the full layers, the Llama-3-8B shape (random bf16 weights), at 64k and 128k,
batch 1 and the largest batch in a 130 GB budget: the target "hybrid + TokenSelect decode >= 2.5x hybrid alone".

Rows (one process, ``lighttransfer.bench.benchmark(decode="tokenselect")``): the runtime's dense path and a ratio-0.5
hybrid (sink 4 + window 1020), each decoding densely and with TokenSelect (k 2048, init 128, local 512, reuse max
age 64) at a forced all-miss and all-hit Selection Cache, eager and replayed from a CUDA graph, fused ops on. Stock
transformers is left out (``original=False``): the target compares the hybrid with itself.

    PYTHONPATH=<dir with a lighttransfer link> LIGHTTRANSFER_TRITON_AUTOTUNE=0 \
        python3 bench/scripts/tokenselect_e2e.py OUT_DIR [CONTEXTS] [STEPS]

CONTEXTS: default ``65536,131072``; STEPS: timed decode steps per row, default 48 (from a cold Selection Cache the
all-hit rows then never reach the age bound: 48 hits of 48, per full layer and sequence).

Measured on one H200: 64k alone with 16 steps took 94 s for the whole call, a cold Triton cache included
(``bench/results/tokenselect_e2e_h200/``); both contexts should take about twice that. The estimate it replaced:

* prefill: each (variant, context) prefills one sequence twice (an untimed warm-up at the same length, then the
  timed one); the largest batch replicates that cache instead of prefilling every sequence. FLOPs per prefill:
  the matmuls ``2 x 6.98e9`` per token (the lm_head on the last token only) and causal attention
  ``2 x T^2 x 4096`` per full layer: at 128k 1.83e15 + 32 x 1.41e14 = 6.3e15 (dense) and 1.83e15 + 16 x 1.41e14 =
  4.1e15 (hybrid), at 64k 2.05e15 and 1.48e15. At ~500 TFLOP/s: 13 + 8 + 4 + 3 s, twice: ~1 minute;
* decode: 6 rows of 51 steps per (variant, context, batch); eager batch-1 steps are bound by launches (~30-60 ms,
  ~10-15 s per point), graphed ones and the largest batch's by bandwidth (~5-30 ms): ~2 minutes in all;
* Triton compiles (pinned configs), building the model, the copy bandwidth: ~1 minute.

Writes ``OUT_DIR/tokenselect_e2e.{json,md,png}`` (lighttransfer.bench's outputs, the TokenSelect summary table
included) and ``OUT_DIR/tokenselect_e2e_target.md`` (the target's verdict per context and batch, graphed rows).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lighttransfer.bench.speed import GRAPHED, markdown_bench
from lighttransfer.output_files import write_atomically

TARGET = 2.5
HYBRID = "ratio 0.5"


def target_lines(result) -> list[str]:
    """Per context and batch (graphed rows): hybrid + TokenSelect over hybrid alone at 0 / 50 / 90 % hits, beside
    the bound the bytes set (the dense-decode row's bytes per step over the TokenSelect step's)."""
    lines = [f"# hybrid + TokenSelect vs hybrid alone (target >= {TARGET}x), CUDA-graph rows", "",
             "| context | batch | " + " | ".join(f"{100 * s:g}% hits: x (bytes bound)" for s in
                                               result.select_hit_shares) + " |",
             "|---|---|" + "---|" * len(result.select_hit_shares)]
    for entry in result.selection_summary:
        if entry["variant"] != HYBRID + GRAPHED:
            continue
        dense = result.point(HYBRID + GRAPHED, entry["context"], largest=entry["largest_batch"])
        cells = []
        for s in entry["shares"]:
            bound = dense["bytes_per_step"] / s["bytes_per_step"] if dense and s["bytes_per_step"] else None
            x = s["x_dense_decode"]
            cells.append(("-" if x is None else f"{x:.2f}x" + (" (met)" if x >= TARGET else ""))
                         + ("" if bound is None else f" ({bound:.2f}x)"))
        lines.append(f"| {entry['context']} | {entry['batch']}{' (max)' if entry['largest_batch'] else ''} | "
                     + " | ".join(cells) + " |")
    return lines


def main() -> None:
    from lighttransfer.bench.speed import benchmark

    out = Path(sys.argv[1])
    contexts = tuple(int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "65536,131072").split(","))
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 48
    result = benchmark(baseline="llama3-8b-shaped", contexts=contexts, ratios=(0.5,), decode_steps=steps, sink=4,
                       window=1020, memory_budget_gb=130, device="cuda", cuda_graphs=True, original=False,
                       fused_ops="on", decode="tokenselect", out=out / "tokenselect_e2e.json",
                       progress=lambda line: print(line, flush=True))
    print(markdown_bench(result))
    verdict = "\n".join(target_lines(result)) + "\n"
    write_atomically(out / "tokenselect_e2e_target.md", verdict)
    print(verdict)


if __name__ == "__main__":
    main()
