"""Decode benchmark: one new token per sequence against the streaming cache vs SDPA over the full cache.

    python3 -m lighttransfer.bench.decode_bench --out DIR

H = 32, Hkv = 8, D = 128, bf16. The streaming cache holds sink + window slots whatever the context length
(positions of a ring buffer after ``context`` tokens), so its time per step should be flat in context; SDPA
attends all ``context`` cached keys (cells whose cache does not fit on the GPU are skipped and listed).
Each step is timed as a CUDA-graph replay (the kernel time a runtime with graphs sees) and eagerly (Python
launch overhead included). GB/s count the K/V bytes each step must read. Writes kernels_decode.{json,md,png}.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from lighttransfer.bench.gpu_env import (
    environment,
    environment_markdown,
    markdown_table,
    measure_peaks,
    median_us,
)
from lighttransfer.kernels import streaming_decode, streaming_decode_reference
from lighttransfer.output_files import write_atomically, write_json

log = logging.getLogger(__name__)

BATCHES = (1, 16, 64)
CONTEXTS = (4096, 16384, 65536, 262144, 1048576)
SINK_WINDOWS = ((4, 1020), (64, 4032))
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SDPA_CACHE_LIMIT_GIB = 40.0


def ring_slot_positions(tokens: int, sink: int, window: int, device="cuda") -> torch.Tensor:
    """``[sink + window]`` positions a streaming cache holds after ``tokens`` tokens (-1 = empty): sink slot ``c``
    holds position ``c``; ring slot ``r`` holds the latest position ``p >= sink`` with ``(p - sink) % window == r``."""
    slots = torch.arange(sink, device=device)
    slots = torch.where(slots < tokens, slots, -1)
    ring = torch.arange(window, device=device)
    last = tokens - 1 - sink  # ring offset of the newest token
    latest = sink + ring + ((last - ring).div(window, rounding_mode="floor")) * window
    ring_pos = torch.where(ring <= last, latest, -1)
    return torch.cat([slots, ring_pos])


def _bench_streaming(batch: int, sink: int, window: int, contexts, tolerance: float) -> list[dict]:
    slots = sink + window
    g = torch.Generator(device="cuda").manual_seed(batch * 7 + sink)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, KV_HEADS, slots, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, KV_HEADS, slots, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    kv_bytes = 2 * k.numel() * k.element_size()
    rows = []
    for context in contexts:
        slot_pos = ring_slot_positions(context, sink, window).expand(batch, slots).contiguous()
        q_pos = torch.full((batch, 1), context - 1, device="cuda", dtype=torch.long)

        def step(slot_pos=slot_pos, q_pos=q_pos):
            return streaming_decode(q, k, v, slot_pos, q_pos, sink=sink, window=window)

        ref = streaming_decode_reference(q, k, v, slot_pos, q_pos, sink=sink, window=window)
        err = ((step().float() - ref.float()).norm() / ref.float().norm()).item()
        if err >= tolerance:
            raise RuntimeError(f"decode B={batch} S={sink} W={window} context={context}: error {err:.2e}")
        graph_us, eager_us = median_us(step, graph=True), median_us(step, graph=False)
        rows.append(dict(method="streaming", batch=batch, sink=sink, window=window, context=context,
                         slots=slots, us_graph=graph_us, us_eager=eager_us, bytes=kv_bytes,
                         gbps=kv_bytes / graph_us / 1e3, err_vs_fp32_reference=err))
        log.warning("streaming B=%d S=%d W=%d ctx=%d: %.1f us (graph), %.1f us eager, %.0f GB/s", batch, sink,
                    window, context, graph_us, eager_us, kv_bytes / graph_us / 1e3)
    return rows


def _bench_sdpa(batch: int, context: int) -> dict:
    kv_bytes = 2 * batch * KV_HEADS * context * HEAD_DIM * 2
    row = dict(method="sdpa", batch=batch, context=context, bytes=kv_bytes)
    if kv_bytes > SDPA_CACHE_LIMIT_GIB * 2**30:
        row["skipped"] = f"full cache {kv_bytes / 2**30:.0f} GiB > {SDPA_CACHE_LIMIT_GIB:.0f} GiB"
        return row
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    def step():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    graph_us, eager_us = median_us(step, graph=True), median_us(step, graph=False)
    row.update(us_graph=graph_us, us_eager=eager_us, gbps=kv_bytes / graph_us / 1e3)
    log.warning("sdpa B=%d ctx=%d: %.1f us (graph), %.0f GB/s", batch, context, graph_us, row["gbps"])
    return row


def run(*, batches=BATCHES, contexts=CONTEXTS, sink_windows=SINK_WINDOWS, tolerance: float = 2e-2) -> dict:
    env, peaks = environment(), measure_peaks()
    rows = []
    for batch in batches:
        for sink, window in sink_windows:
            rows += _bench_streaming(batch, sink, window, contexts, tolerance)
        for context in contexts:
            rows.append(_bench_sdpa(batch, context))
            torch.cuda.empty_cache()
    for row in rows:
        if "gbps" in row:
            row["fraction_of_copy_peak"] = row["gbps"] / peaks["hbm_copy_gbps"]
    return {"benchmark": "decode", "format_version": 1, "environment": env, "peaks": peaks,
            "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16", "nq": 1},
            "rows": rows}


def to_markdown(result: dict) -> str:
    headers = ["method", "S+W", "B", "context", "us/step (graph)", "us/step (eager)", "GB/s", "% of copy peak"]
    rows = []
    for r in result["rows"]:
        method = "streaming" if r["method"] == "streaming" else "SDPA full cache"
        sw = f"{r['sink']}+{r['window']}" if r["method"] == "streaming" else "-"
        if "skipped" in r:
            rows.append([method, sw, r["batch"], r["context"], "skipped: " + r["skipped"], "", "", ""])
            continue
        rows.append([method, sw, r["batch"], r["context"], f"{r['us_graph']:.1f}", f"{r['us_eager']:.1f}",
                     f"{r['gbps']:.0f}", f"{100 * r['fraction_of_copy_peak']:.0f}"])
    return ("# Decode: streaming cache (sink + window slots) vs SDPA over the full cache\n\n"
            + environment_markdown(result["environment"], result["peaks"])
            + f"H={HEADS}, Hkv={KV_HEADS}, D={HEAD_DIM}, bf16, one query per sequence. GB/s = K/V bytes read per "
            "step / graph-replay time.\n\n" + markdown_table(headers, rows))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = result["rows"]
    for i, batch in enumerate(sorted({r["batch"] for r in rows})):
        sdpa = [r for r in rows if r["method"] == "sdpa" and r["batch"] == batch and "us_graph" in r]
        ax.plot([r["context"] for r in sdpa], [r["us_graph"] for r in sdpa], f"C{i}-o", label=f"SDPA full, B={batch}")
        for sink, window in sorted({(r["sink"], r["window"]) for r in rows if r["method"] == "streaming"}):
            sel = [r for r in rows if r["method"] == "streaming" and r["batch"] == batch
                   and (r["sink"], r["window"]) == (sink, window)]
            style = "--s" if sink + window > 2048 else ":^"
            ax.plot([r["context"] for r in sel], [r["us_graph"] for r in sel], f"C{i}{style}",
                    label=f"streaming {sink}+{window}, B={batch}")
    ax.set(xscale="log", yscale="log", xlabel="context length", ylabel="us per step (graph replay, median)",
           title=f"Decode, {result['environment'].get('gpu')}, bf16, H=32/8, D=128")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_atomically(path, buf.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kernels_decode.{json,md,png}")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS), help="context lengths")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("decode_bench needs a CUDA GPU")
    result = run(batches=tuple(args.batches), contexts=tuple(args.contexts))
    write_json(args.out / "kernels_decode.json", result)
    md = to_markdown(result)
    write_atomically(args.out / "kernels_decode.md", md)
    plot(result, args.out / "kernels_decode.png")
    print(md)


if __name__ == "__main__":
    main()
