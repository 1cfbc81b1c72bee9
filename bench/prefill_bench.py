"""Prefill benchmark: the streaming kernel vs dense causal SDPA (flash) vs FlexAttention with the same mask.

    python3 -m lighttransfer.bench.prefill_bench --out DIR

B = 1, H = 32, Hkv = 8, D = 128, bf16 (GQA without repeating K/V). For every (sink, window) and length N, the
outputs are checked first (against FlexAttention over all rows and against the fp32 reference on the first and
last query rows), then each method is timed in this one process, together with the kernel's previous best
config (``prefill_triton.PREVIOUS_DEFAULT``, the sink in a tile of its own) as a same-machine baseline. Effective
TFLOP/s count 4 * D FLOPs per visible (query, key) pair and head: the sink + window band for the streaming
methods, the causal triangle for SDPA. Writes kernels_prefill.json / .md / .png into DIR.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from lighttransfer.bench.gpu_env import (
    environment,
    environment_markdown,
    markdown_table,
    measure_peaks,
)
from lighttransfer.kernels import (
    prefill_triton,
    streaming_attention,
    streaming_attention_reference,
    streaming_visible,
)
from lighttransfer.output_files import write_atomically, write_json

log = logging.getLogger(__name__)

LENGTHS = (4096, 16384, 32768, 131072)
SINK_WINDOWS = ((4, 1020), (64, 4032))
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def streaming_pairs(n: int, sink: int, window: int) -> int:
    """Visible (query, key) pairs of n queries over their own n keys under the sink + window rule."""
    pos = torch.arange(n, dtype=torch.float64)
    in_window = torch.clamp(pos + 1, max=window)
    in_sink = torch.clamp(pos + 1 - window, min=0).clamp(max=sink)
    return int((in_window + in_sink).sum().item())


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _flex_runner(sink: int, window: int, n: int):
    """Compiled FlexAttention with the sink + window block mask (mask_mod derived from streaming_visible)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return streaming_visible(q_idx, kv_idx, sink, window)

    block_mask = torch.compile(create_block_mask)(mask_mod, None, None, n, n, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def _sdpa_runner():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return run


def _check_rows(o: torch.Tensor, q, k, v, sink: int, window: int, rows: int = 128) -> float:
    """Largest relative error of ``o`` against the fp32 reference over the first and last ``rows`` queries."""
    n = q.shape[2]
    worst = 0.0
    for start in (0, n - rows):
        ref = streaming_attention_reference(q[:, :, start:start + rows], k, v, sink=sink, window=window,
                                            q_offset=start)
        worst = max(worst, _rel_err(o[:, :, start:start + rows], ref))
    return worst


def _pinned(q, k, v, sink: int, window: int, config, use_tma: bool = False):
    """The kernel with one tile config and load path, no autotuning."""

    def call():
        return prefill_triton.streaming_attention_triton(
            q, k, v, sink=sink, window=window, q_offset=0, kv_start=None, kv_len=None, scale=HEAD_DIM**-0.5,
            stream_heads=None, return_lse=False, config=config, use_tma=use_tma)[0]

    return call


def _bench_length(n: int, sink_windows, sdpa, peaks: dict, tolerance: float) -> list[dict]:
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    sdpa_ms = do_bench(lambda: sdpa(q, k, v), warmup=25, rep=100, return_mode="median")
    rows = []
    for sink, window in sink_windows:
        def ours(sink=sink, window=window):
            return streaming_attention(q, k, v, sink=sink, window=window)

        flex = _flex_runner(sink, window, n)
        o = ours()
        err_flex = _rel_err(o, flex(q, k, v))
        err_ref = _check_rows(o, q, k, v, sink, window)
        if not (err_flex < tolerance and err_ref < tolerance):
            raise RuntimeError(f"N={n} S={sink} W={window}: kernel disagrees (vs flex {err_flex:.2e}, "
                               f"vs fp32 reference {err_ref:.2e})")
        ours_ms = do_bench(ours, warmup=25, rep=200, return_mode="median")
        config = _tuned_config_name()
        prev = _pinned(q, k, v, sink, window, prefill_triton.PREVIOUS_DEFAULT)
        err_prev = _rel_err(prev(), o)
        if not err_prev < tolerance:
            raise RuntimeError(f"N={n} S={sink} W={window}: previous config disagrees ({err_prev:.2e})")
        prev_ms = do_bench(prev, warmup=25, rep=200, return_mode="median")
        flex_ms = do_bench(lambda flex=flex: flex(q, k, v), warmup=25, rep=200, return_mode="median")
        band = 4 * HEAD_DIM * HEADS * streaming_pairs(n, sink, window)
        causal = 4 * HEAD_DIM * HEADS * causal_pairs(n)
        row = dict(
            n=n, sink=sink, window=window, ours_ms=ours_ms, flex_ms=flex_ms, sdpa_ms=sdpa_ms,
            ours_tflops=band / ours_ms / 1e9, flex_tflops=band / flex_ms / 1e9, sdpa_tflops=causal / sdpa_ms / 1e9,
            speedup_vs_sdpa=sdpa_ms / ours_ms, speedup_vs_flex=flex_ms / ours_ms,
            prev_ms=prev_ms, prev_tflops=band / prev_ms / 1e9, speedup_vs_prev=prev_ms / ours_ms, config=config,
            floor_ms=band / (peaks["bf16_matmul_tflops"] * 1e9),
            err_vs_flex=err_flex, err_vs_fp32_reference=err_ref,
        )
        rows.append(row)
        log.warning("N=%d S=%d W=%d: ours %.3f ms (%.0f TFLOP/s, %s), previous %.3f ms, flex %.3f ms, sdpa %.3f ms",
                    n, sink, window, ours_ms, row["ours_tflops"], config, prev_ms, flex_ms, sdpa_ms)
    return rows


def run(*, lengths=LENGTHS, sink_windows=SINK_WINDOWS, tolerance: float = 2e-2) -> dict:
    """Check, then time, the three methods at every (sink, window, N). Returns the results as a dict."""
    torch._dynamo.config.cache_size_limit = 64
    env, peaks = environment(), measure_peaks()
    sdpa = _sdpa_runner()
    rows = []
    for n in lengths:
        rows += _bench_length(n, sink_windows, sdpa, peaks, tolerance)
        torch.cuda.empty_cache()
    return {"benchmark": "prefill", "format_version": 1, "environment": env, "peaks": peaks,
            "shape": {"batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
            "tuned_config": _tuned_config_name(), "rows": rows}


def _tuned_config_name() -> str:
    launcher = prefill_triton._tuned_launcher(torch.cuda.get_device_capability(), HEAD_DIM,
                                              prefill_triton.autotune_enabled())
    return str(getattr(launcher, "best_config", None))


def to_markdown(result: dict) -> str:
    headers = ["S", "W", "N", "ours ms", "previous ms", "flex ms", "SDPA ms", "x SDPA", "x flex", "x previous",
               "ours TFLOP/s", "previous TFLOP/s", "flex TFLOP/s", "SDPA TFLOP/s (causal)", "floor ms"]
    rows = [[r["sink"], r["window"], r["n"], f"{r['ours_ms']:.3f}", f"{r['prev_ms']:.3f}", f"{r['flex_ms']:.3f}",
             f"{r['sdpa_ms']:.2f}", f"{r['speedup_vs_sdpa']:.1f}", f"{r['speedup_vs_flex']:.2f}",
             f"{r['speedup_vs_prev']:.2f}", f"{r['ours_tflops']:.0f}", f"{r['prev_tflops']:.0f}",
             f"{r['flex_tflops']:.0f}", f"{r['sdpa_tflops']:.0f}", f"{r['floor_ms']:.3f}"] for r in result["rows"]]
    return ("# Prefill: streaming kernel vs SDPA (flash, dense causal) vs FlexAttention (same mask)\n\n"
            + environment_markdown(result["environment"], result["peaks"])
            + f"B=1, H={HEADS}, Hkv={KV_HEADS}, D={HEAD_DIM}, bf16; configs autotuned per size class (JSON: "
            f"`config` per row), last: {result['tuned_config']}. 'previous' = the kernel's previous best config "
            f"pinned (sink in a tile of its own: {_config_text(prefill_triton.PREVIOUS_DEFAULT)}), same run. "
            "TFLOP/s count visible pairs only (band for ours/previous/flex, causal triangle for SDPA); floor = band "
            "FLOPs at the measured matmul rate.\n\n" + markdown_table(headers, rows))


def _config_text(config) -> str:
    return f"{config.kwargs} w{config.num_warps} s{config.num_stages}"


def plot(result: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = result["rows"]
    lengths = sorted({r["n"] for r in rows})
    ax.plot(lengths, [next(r["sdpa_ms"] for r in rows if r["n"] == n) for n in lengths], "k-o",
            label="SDPA flash, dense causal")
    for (sink, window), style in zip(SINK_WINDOWS, ("-", "--"), strict=False):
        sel = [r for r in rows if (r["sink"], r["window"]) == (sink, window)]
        ax.plot([r["n"] for r in sel], [r["ours_ms"] for r in sel], "C0" + style + "o", label=f"ours S={sink} W={window}")
        ax.plot([r["n"] for r in sel], [r["flex_ms"] for r in sel], "C1" + style + "s", label=f"flex S={sink} W={window}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="ms (median)",
           title=f"Prefill, {result['environment'].get('gpu')}, bf16, H=32/8, D=128")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_atomically(path, buf.getvalue())


def sweep(*, n: int, sink: int, window: int, rounds: int = 1) -> list[dict]:
    """Time the previous best config, every H100 candidate and every experimental layout (pointer loads, no
    autotuning) at one shape; check each first. With ``rounds`` > 1 the configs are timed in turn that many
    times (interleaved, so clock and thermal drift hit every config alike) and each row reports the median,
    min and max of its rounds: the layouts of one band differ by 2-5 %, about the spread of a single timing."""
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    band = 4 * HEAD_DIM * HEADS * streaming_pairs(n, sink, window)
    configs = [prefill_triton.PREVIOUS_DEFAULT, *prefill_triton.HOPPER_CONFIGS, *prefill_triton.EXPERIMENTAL_CONFIGS]
    calls, rows = {}, {}
    for config in configs:
        name = f"{_config_text(config)} tma=False"
        call = _pinned(q, k, v, sink, window, config, False)
        try:
            err = _check_rows(call(), q, k, v, sink, window)
        except Exception as exc:  # a config that does not compile on this GPU is reported, not fatal
            rows[name] = dict(config=name, error=str(exc).splitlines()[0][:200])
            continue
        calls[name] = call
        rows[name] = dict(config=name, err=err, rounds_ms=[])
    for _ in range(rounds):
        for name, call in calls.items():
            rows[name]["rounds_ms"].append(do_bench(call, warmup=25, rep=200, return_mode="median"))
    for name in calls:
        row = rows[name]
        times = sorted(row["rounds_ms"])
        row.update(ms=times[len(times) // 2], ms_min=times[0], ms_max=times[-1])
        row["tflops"] = band / row["ms"] / 1e9
        log.warning("%s: %.3f ms (%.3f-%.3f over %d), %.0f TFLOP/s, err %.1e", name, row["ms"], times[0],
                    times[-1], len(times), row["tflops"], row["err"])
    return list(rows.values())


def band_scaling(*, n: int, sink: int, windows: tuple[int, ...]) -> list[dict]:
    """Effective TFLOP/s of the autotuned kernel as the band widens at one length, up to plain causal
    (``window >= n``), beside SDPA-flash causal: how much of the narrow band's shortfall is the per-program cost
    of few tiles (edges, Q load, epilogue) rather than the inner loop."""
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    rows = []
    for window in windows:
        pairs = streaming_pairs(n, sink, window)
        ms = do_bench(lambda w=window: streaming_attention(q, k, v, sink=sink, window=w), warmup=25, rep=200,
                      return_mode="median")
        rows.append(dict(kernel="ours", sink=sink, window=window, ms=ms, tflops=4 * HEAD_DIM * HEADS * pairs / ms / 1e9))
        log.warning("ours S=%d W=%d: %.3f ms, %.0f TFLOP/s", sink, window, ms, rows[-1]["tflops"])
    sdpa = _sdpa_runner()
    ms = do_bench(lambda: sdpa(q, k, v), warmup=25, rep=200, return_mode="median")
    rows.append(dict(kernel="sdpa-flash causal", ms=ms, tflops=4 * HEAD_DIM * HEADS * causal_pairs(n) / ms / 1e9))
    log.warning("sdpa causal: %.3f ms, %.0f TFLOP/s", ms, rows[-1]["tflops"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kernels_prefill.{json,md,png}")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="sequence lengths N")
    parser.add_argument("--sweep", type=int, nargs=3, metavar=("N", "SINK", "WINDOW"),
                        help="instead: time every candidate config and load path at one shape")
    parser.add_argument("--band-scaling", type=int, metavar="N",
                        help="instead: effective TFLOP/s at length N as the band widens from 1k to causal")
    parser.add_argument("--rounds", type=int, default=1, help="with --sweep: interleaved timing rounds per config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("prefill_bench needs a CUDA GPU")
    if args.band_scaling:
        n = args.band_scaling
        rows = band_scaling(n=n, sink=4, windows=(1020, 2044, 4092, 8188, 16380, n))
        write_json(args.out / f"kernels_prefill_band_scaling_{n}.json",
                   {"environment": environment(), "n": n, "rows": rows})
        return
    if args.sweep:
        n, sink, window = args.sweep
        rows = sweep(n=n, sink=sink, window=window, rounds=args.rounds)
        write_json(args.out / f"kernels_prefill_sweep_{n}_{sink}_{window}.json",
                   {"environment": environment(), "n": n, "sink": sink, "window": window, "rounds": args.rounds,
                    "rows": rows})
        return
    result = run(lengths=tuple(args.lengths))
    write_json(args.out / "kernels_prefill.json", result)
    md = to_markdown(result)
    write_atomically(args.out / "kernels_prefill.md", md)
    plot(result, args.out / "kernels_prefill.png")
    print(md)


if __name__ == "__main__":
    main()
