"""Prefill against the compute floor: where a 32k-token prefill's time goes, dense vs hybrid, per backend.

The floor of a prefill is its FLOPs over the measured bf16 matmul rate. FLOPs (multiply-adds count 2):

* linear layers: ``2 * n * (q, k, v, o, gate, up, down weights)`` per layer, plus the LM head for the last
  position only (generation keeps one position's logits);
* a full layer's causal attention: ``QK^T`` and ``PV`` over ``n (n + 1) / 2`` (query, key) pairs per head,
  ``2 * 2 * head_dim`` each;
* a streaming layer's: the same over the pairs its rule keeps, ``sum_i min(i + 1, sink + window)``.

:func:`run` times, in one process, the stock model (transformers' SDPA with its default backends), the runtime with
no layer streaming and the hybrid, the runtime rows once per full-layer prefill backend
(:data:`lighttransfer.runtime.ops.FULL_PREFILL_BACKENDS`), and profiles one prefill of each to split the time into
matmuls, attention and the rest.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ..architecture import model_shape
from .gpu_env import environment, measure_peaks

SCHEMA_VERSION = 1


def attention_pairs(n: int, *, sink: int | None = None, window: int | None = None) -> int:
    """(query, key) pairs of causal attention over ``n`` tokens, all of them (``window`` None) or those a sink +
    window rule keeps (query ``i`` sees ``min(i + 1, sink + window)`` keys)."""
    if window is None:
        return n * (n + 1) // 2
    span = sink + window
    head = min(n, span)
    return head * (head + 1) // 2 + (n - head) * span


def prefill_flops(config, n: int, *, streaming_layers: Sequence[int] = (), sink: int = 4, window: int = 1020) -> dict:
    """FLOPs of one prefill of ``n`` tokens (batch 1): ``{"linear", "attention", "total"}``."""
    from ..architecture import text_config

    shape = model_shape(config)
    hidden, heads, kv_heads, dim = int(text_config(config).hidden_size), shape.num_heads, shape.num_kv_heads, \
        shape.head_dim
    inter = int(getattr(text_config(config), "intermediate_size", 4 * hidden))
    per_layer = hidden * (heads * dim) * 2 + hidden * (kv_heads * dim) * 2 + 3 * hidden * inter
    linear = 2 * n * per_layer * shape.num_layers + 2 * hidden * int(text_config(config).vocab_size)
    streaming = set(streaming_layers)
    pairs = sum(attention_pairs(n, sink=sink, window=window) if i in streaming else attention_pairs(n)
                for i in range(shape.num_layers))
    attention = 4 * heads * dim * pairs
    return {"linear": linear, "attention": attention, "total": linear + attention}


def kernel_category(name: str) -> str:
    """``matmul``, ``attention`` or ``other`` for a CUDA kernel's name."""
    low = name.lower()
    if any(s in low for s in ("flash", "fmha", "cudnn", "attn", "attention", "sdpa")):
        return "attention"
    if any(s in low for s in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")):
        return "matmul"
    return "other"


def profile_split(fn: Callable[[], None], *, top: int = 8) -> dict:
    """Run ``fn`` once under the profiler: CUDA time (ms) per category and the ``top`` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    split = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, ms in kernels.items():
        split[kernel_category(name)] += ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"ms": {k: round(v, 2) for k, v in split.items()},
            "top": [{"kernel": k[:120], "ms": round(v, 2), "category": kernel_category(k)} for k, v in ranked]}


def _time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: kernels compile, plans build, memory settles
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(*, n: int = 32768, ratio: float = 0.5, sink: int = 4, window: int = 1020, repeats: int = 3,
        backends: Sequence[str] | None = None, progress: Callable[[str], None] = print) -> dict:
    """Time and profile prefill of ``n`` random tokens on the Llama-3-8B shape (bf16, batch 1), stock and
    runtime rows, in one process; returns a JSON-ready dict (times in s, FLOPs, shares of the compute floor)."""
    from ..hybrid_format import HybridLayout
    from ..runtime import disable_hybrid, enable_hybrid
    from ..runtime.ops import FULL_PREFILL_BACKENDS, full_prefill_backend
    from .shaped_model import build_shaped_model

    backends = list(backends or [b for b in FULL_PREFILL_BACKENDS if b != "auto"])
    env, peaks = environment(), measure_peaks()
    model = build_shaped_model("llama3-8b-shaped", device=torch.device("cuda"), dtype=torch.bfloat16)
    shape = model_shape(model.config)
    layers = shape.num_layers
    k = round(ratio * layers)
    streaming = sorted({round(i * layers / k) for i in range(k)}) if k else []  # evenly spaced: all time alike
    ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))

    def prefill() -> None:
        with torch.inference_mode():
            model(ids, use_cache=True, logits_to_keep=1)

    rows = []

    def measure(name: str, flops: dict, backend: str | None) -> None:
        seconds = _time(prefill, repeats)
        split = profile_split(prefill)
        floor = flops["total"] / (peaks["bf16_matmul_tflops"] * 1e12)
        rows.append({"variant": name, "backend": backend, "seconds": seconds, "flops": flops,
                     "floor_s": floor, "floor_share": floor / seconds,
                     "tflops": flops["total"] / seconds / 1e12, "profile": split})
        progress(f"{name} [{backend}]: {seconds * 1e3:.0f} ms, {floor / seconds:.0%} of the compute floor, "
                 f"profile {split['ms']}")
        torch.cuda.empty_cache()

    dense_flops = prefill_flops(model.config, n)
    hybrid_flops = prefill_flops(model.config, n, streaming_layers=streaming, sink=sink, window=window)
    measure("stock transformers", dense_flops, None)
    for backend in backends:
        with full_prefill_backend(backend):
            enable_hybrid(model, HybridLayout(num_layers=layers, num_kv_heads=shape.num_kv_heads))
            measure("runtime, nothing streaming", dense_flops, backend)
            enable_hybrid(model, HybridLayout(num_layers=layers, num_kv_heads=shape.num_kv_heads,
                                              streaming_layers=tuple(streaming), sink=sink, window=window))
            measure(f"hybrid ratio {ratio}", hybrid_flops, backend)
            disable_hybrid(model)
    stock = rows[0]["seconds"]
    for r in rows:
        r["x_stock"] = stock / r["seconds"]
    return {"benchmark": "prefill_floor", "schema_version": SCHEMA_VERSION, "environment": env, "peaks": peaks,
            "shape": "llama3-8b-shaped", "tokens": n, "ratio": ratio, "sink": sink, "window": window,
            "streaming_layers": streaming, "repeats": repeats, "rows": rows}


def markdown(result: dict) -> str:
    """The rows as a table, then each row's profile split."""
    from .gpu_env import environment_markdown, markdown_table

    head = (f"Prefill of {result['tokens']} tokens, Llama-3-8B shape, bf16, batch 1; hybrid: ratio {result['ratio']}, "
            f"sink {result['sink']} + window {result['window']}, layers {result['streaming_layers']}; median of "
            f"{result['repeats']} after a warm-up. Floor = FLOPs / measured matmul rate.\n\n"
            + environment_markdown(result["environment"], result["peaks"]) + "\n")
    table = markdown_table(
        ["variant", "full-layer prefill", "time (ms)", "x stock", "TFLOP (total / attention)", "floor (ms)",
         "share of floor", "matmul / attention / other (ms, profiled)"],
        [[r["variant"], r["backend"] or "SDPA default", f"{r['seconds'] * 1e3:.0f}", f"{r['x_stock']:.2f}",
          f"{r['flops']['total'] / 1e12:.0f} / {r['flops']['attention'] / 1e12:.0f}", f"{r['floor_s'] * 1e3:.0f}",
          f"{r['floor_share']:.0%}",
          " / ".join(f"{r['profile']['ms'][c]:.0f}" for c in ("matmul", "attention", "other"))]
         for r in result["rows"]])
    tops = "".join(f"\n**{r['variant']} [{r['backend'] or 'SDPA default'}]**: "
                   + "; ".join(f"{t['kernel'][:60]} {t['ms']:.1f} ms" for t in r["profile"]["top"][:5]) + "\n"
                   for r in result["rows"])
    return head + table + "\nLargest kernels per row:\n" + tops


__all__ = ["attention_pairs", "prefill_flops", "kernel_category", "profile_split", "run", "markdown",
           "SCHEMA_VERSION"]
