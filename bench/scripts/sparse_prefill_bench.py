"""Sparse prefill benchmark: estimate + block-sparse kernel vs SDPA-flash dense vs FlexAttention on the same blocks.

The one GPU command (H200: the CUDA tests of the sparse-prefill kernels first, then 131072 and 8192 tokens, every
estimator, per-query-head lists unpacked vs per-KV-head lists packed, FlexAttention once per length; < 5 min)::

    LIGHTTRANSFER_TRITON_AUTOTUNE=0 PYTHONPATH=<dir with a lighttransfer link> \\
        python3 bench/scripts/sparse_prefill_bench.py --out DIR --lengths 131072 8192

    ... --lengths 8192 16384 32768 65536 131072 --flex all --no-tests   # the full sweep (flex: ~1 min a compile)
    TRITON_INTERPRET=1 ... sparse_prefill_bench.py --out DIR --tiny --no-tests   # CPU smoke run of every code path

Shape: B = 1, H = 32, Hkv = 8, D = 128, bf16 (the Llama-3-8B full layer), block_q = 128, block_k = 64, one sink
block and two local blocks. Inputs: ``--qkv FILE`` (a ``torch.save`` dict of post-RoPE ``q [1, H, N, D]``,
``k, v [1, Hkv, N, D]`` captured from a real layer, cut to each length) or, by default, synthetic attention with the
structure real long-context heads show: a shared content direction per KV head under RoPE (theta 500000: mass
decays with distance, the local band), a strong first key (the sink) and a few heavy key columns (vertical
stripes). Random Gaussian q/k would give near-uniform attention and a meaningless density; the synthetic density
is recorded, and it is not a real model's.

List layouts (``--layouts``): ``query`` (a list per query head and 128-row query block, one program per query
head: the 4 query heads of a KV head load each K/V tile once each), ``kv-sum`` (a list per KV head from the group's
summed mass, 32-row query blocks, the kernel's packed layout: the group's 4 x 32 rows in one 128-row tile, each K/V
tile loaded once per KV head) and ``kv-sum-unpacked`` (the same lists run unpacked: the packing's own effect). The
three run the same 128 x 64 tiles; their density differs (on SmolLM2 at 4k, alpha 0.95: 0.45 per query head, 0.50
summed per KV head, for the same kept mass, docs/sparse_prefill.md).

Before timing, the sparse-prefill kernel tests run on this GPU (``tests/kernels/test_block_sparse_prefill.py`` and
``test_sparse_estimators.py``, every dtype, the autotuned configs included; ``--no-tests`` skips them); a failure
stops the benchmark. For every length, method and layout: estimate the lists once, check the kernel against
FlexAttention over the same lists (all rows, where flex runs) and the fp32 reference (the last query block), then
time in this one process: the estimation, the kernel, FlexAttention (compiled, ``BlockMask.from_kv_blocks`` from the same
blocks: whole blocks as full blocks, diagonal ones as partial with a causal ``mask_mod``) and SDPA-flash dense
causal. Every sparse total includes the estimation. TFLOP/s
count ``4 * D`` FLOPs per causal (query, key) pair inside the visited blocks (dense: the causal triangle); the
floor is those FLOPs at the measured bf16 matmul rate, and "share of floor" is floor time / measured time.
Writes sparse_prefill.json and sparse_prefill.md into DIR. FlexAttention compiles anew for every run it is timed
on (its mask_mod captures that run's keep mask, ~1 min each), so by default (``--flex first``) it runs only on the
first method and layout of each length; ``--flex all`` on every one, ``--flex none`` never. A flex failure is
recorded per row (``flex_error``) and the other timings still come.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("LIGHTTRANSFER_TRITON_AUTOTUNE", "0")  # pinned configs unless asked otherwise

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lighttransfer.bench.gpu_env import environment, markdown_table, measure_peaks  # noqa: E402
from lighttransfer.kernels.block_lists import BlockLists, block_pairs, keep_mask, visited_pairs  # noqa: E402
from lighttransfer.kernels.sparse_estimators import estimate_lists, make_estimator  # noqa: E402
from lighttransfer.kernels.sparse_prefill import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
)
from lighttransfer.output_files import write_atomically, write_json  # noqa: E402

LENGTHS = (131072, 8192)
METHODS = ("sample", "vslash", "antidiag")
LAYOUTS = ("query", "kv-sum", "kv-sum-unpacked")
GPU_SHAPE = dict(heads=32, kv_heads=8, dim=128, block_q=128, block_k=64, dtype=torch.bfloat16)
TINY_SHAPE = dict(heads=4, kv_heads=2, dim=32, block_q=16, block_k=16, dtype=torch.float32)
TINY_LENGTHS = (160,)


def rope(x: torch.Tensor, theta: float = 500000.0) -> torch.Tensor:
    """Rotary embedding (half-split layout) at positions 0..N-1 of ``x [B, H, N, D]``."""
    n, d = x.shape[2], x.shape[3]
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = torch.arange(n, device=x.device, dtype=torch.float32).view(-1, 1) * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x.float().chunk(2, -1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def synthetic_qkv(n: int, *, heads: int, kv_heads: int, dim: int, dtype, device, seed: int = 0):
    """Structured q, k, v (see the module docstring); ``q [1, H, n, D]``, ``k, v [1, Hkv, n, D]``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    content = torch.randn(1, kv_heads, 1, dim, generator=g)
    content = content / content.norm(dim=-1, keepdim=True) * math.sqrt(dim)
    q = 0.9 * content.repeat_interleave(heads // kv_heads, 1) + torch.randn(1, heads, n, dim, generator=g)
    k = 0.9 * content + torch.randn(1, kv_heads, n, dim, generator=g)
    k[:, :, 0] += 1.5 * content[:, :, 0]  # the sink
    stripes = torch.randint(1, n, (kv_heads, max(4, n // 4096)), generator=g)
    for h in range(kv_heads):
        k[0, h, stripes[h]] += 1.2 * content[0, h, 0]
    v = torch.randn(1, kv_heads, n, dim, generator=g)
    q, k, v = (t.to(device) for t in (q, k, v))
    return rope(q).to(dtype), rope(k).to(dtype), v.to(dtype)


def load_qkv(path: Path, n: int, *, dtype, device):
    saved = torch.load(path, map_location="cpu", mmap=True)
    q, k, v = (saved[name][:, :, :n] for name in ("q", "k", "v"))
    if q.shape[2] < n:
        raise SystemExit(f"{path} holds {q.shape[2]} tokens, fewer than {n}")
    return (t.to(device=device, dtype=dtype).contiguous() for t in (q, k, v))


def fit_to_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int, kv_heads: int, dim: int):
    """Real heads in a larger layer shape, every attention pattern kept exactly.

    ``q [1, Hs, N, Ds]``, ``k, v [1, Hkvs, N, Ds]`` (a capture) -> ``q [1, heads, N, dim]``, ``k, v [1, kv_heads, N,
    dim]``. KV head ``j`` is captured KV head ``j``; its ``heads / kv_heads`` query heads are that KV head's own
    captured query heads, taken round robin (a group larger than the captured one repeats them). The head dim is
    padded with zeros and the queries scaled by ``sqrt(dim / Ds)``, so that ``q·k / sqrt(dim)`` equals the captured
    ``q·k / sqrt(Ds)``: every fitted head has exactly its captured head's softmax, and the first ``Ds`` channels of
    its output are the captured head's output. The kernels then run the larger shape's tiles and FLOPs on real
    attention patterns.
    """
    hs, hkvs, ds = q.shape[1], k.shape[1], q.shape[3]
    if hkvs < kv_heads or ds > dim or hs % hkvs:
        raise SystemExit(f"--fit-shape: the capture has {hkvs} KV heads of dim {ds}; fitting {kv_heads} KV heads of "
                         f"dim {dim} needs at least {kv_heads} of dim <= {dim} (capture more --layers)")
    group_s, group = hs // hkvs, heads // kv_heads
    index = torch.tensor([j * group_s + i % group_s for j in range(kv_heads) for i in range(group)], device=q.device)
    pad = (0, dim - ds)
    q = torch.nn.functional.pad(q.index_select(1, index).float() * math.sqrt(dim / ds), pad).to(q.dtype)
    k, v = (torch.nn.functional.pad(t[:, :kv_heads], pad) for t in (k, v))
    return q.contiguous(), k.contiguous(), v.contiguous()


def timer(device):
    """``time(fn) -> ms``: triton's do_bench median on CUDA, one wall-clock run on the CPU (smoke runs only)."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu


def flex_runner(lists: BlockLists, heads: int, device, compiled: bool):
    """FlexAttention over the same key blocks (``BlockMask.from_kv_blocks``): kept blocks that every row sees in full
    are *full* blocks (no mask_mod), the diagonal and ragged ones *partial* (causal ``mask_mod``). The mask_mod also
    looks the block up in the keep mask, so that eager flex (which applies only the mask_mod, as on the CPU) computes
    the same thing as the compiled kernel (which skips unlisted blocks)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    group = heads // lists.indices.shape[1]
    keep = keep_mask(lists.to(device)).repeat_interleave(group, 1)  # [B, H, QB, KB]
    pairs = block_pairs(lists.q_blocks, block_q=lists.block_q, block_k=lists.block_k, q_offset=lists.q_offset,
                        n_kv=lists.n_kv, n_q=lists.n_q, device=device)
    whole = pairs == lists.block_q * lists.block_k
    if lists.n_q % lists.block_q:  # the ragged last query block has fewer rows: none of its blocks is whole
        whole[-1] = False

    def as_indices(sel):
        kb = torch.arange(sel.shape[-1], device=device, dtype=torch.int32)
        idx = torch.where(sel, kb, kb + sel.shape[-1]).sort(-1).values
        return sel.sum(-1).to(torch.int32), torch.where(idx < sel.shape[-1], idx, 0).to(torch.int32)

    partial_n, partial_idx = as_indices(keep & ~whole)
    full_n, full_idx = as_indices(keep & whole)
    offset, bq, bk = lists.q_offset, lists.block_q, lists.block_k

    def causal_kept(b, h, q_idx, k_idx):
        return (k_idx <= q_idx + offset) & keep[b, h, q_idx // bq, k_idx // bk]

    mask = BlockMask.from_kv_blocks(partial_n, partial_idx, full_n, full_idx, BLOCK_SIZE=(bq, bk),
                                    mask_mod=causal_kept, seq_lengths=(lists.n_q, lists.n_kv))
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return lambda q, k, v: fn(q, k, v, block_mask=mask, enable_gqa=True)


def sdpa_dense(q, k, v):
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def last_block(lists: BlockLists) -> tuple[BlockLists, int]:
    """The lists of the last query block alone (for the fp32 reference at long N), and its first row."""
    first = (lists.q_blocks - 1) * lists.block_q
    return BlockLists(lists.indices[:, :, -1:], lists.counts[:, :, -1:], lists.block_q, lists.block_k,
                      lists.q_offset + first, lists.n_kv, lists.n_q - first), first


def layout_grid(layout: str, shape: dict, heads: int, kv_heads: int) -> dict:
    """``gqa_lists``, ``block_q`` and packing of a list layout: lists per KV head use ``block_q / GROUP`` queries a
    block so that the packed tile keeps ``block_q`` rows."""
    if layout == "query":
        return dict(gqa_lists="query", block_q=shape["block_q"], pack=False)
    rows = max(16, shape["block_q"] // (heads // kv_heads))
    block_q = 1 << (rows.bit_length() - 1)  # a power of two (a group of 3: 32 queries, 96 rows in a 128-row tile)
    return dict(gqa_lists="kv-sum", block_q=block_q, pack=layout == "kv-sum")


def run_kernel_tests() -> None:
    """The sparse-prefill kernel tests on this GPU, through the package's own path (its folder need not be a Python
    identifier: pytest runs from the folder holding the ``lighttransfer`` link); exits on a failure."""
    import subprocess
    import sys

    import lighttransfer

    root = Path(lighttransfer.__file__).parent  # the link, not resolved
    tests = [str(root / "tests" / "kernels" / name) for name in ("test_block_sparse_prefill.py",
                                                                "test_sparse_estimators.py")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), "-c",
           str(root / "pyproject.toml"), *tests]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=root.parent, env={**os.environ, "PYTHONPATH": str(root.parent)})
    print(f"kernel tests: exit {done.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    if done.returncode != 0:
        raise SystemExit("the sparse-prefill kernel tests failed on this GPU; no timings taken")


def bench_length(n: int, *, shape: dict, alpha: float, methods, device, peaks: dict, qkv_file: Path | None,
                 tolerance: float, flex_compiled: bool, flex: str = "first",
                 layouts=("query",), fit: bool = False) -> list[dict]:
    time_ms = timer(device)
    dt = shape["dtype"]
    if qkv_file is not None:
        q, k, v = load_qkv(qkv_file, n, dtype=dt, device=device)
        if fit:
            q, k, v = fit_to_shape(q, k, v, heads=shape["heads"], kv_heads=shape["kv_heads"], dim=shape["dim"])
    else:
        q, k, v = synthetic_qkv(n, heads=shape["heads"], kv_heads=shape["kv_heads"], dim=shape["dim"], dtype=dt,
                                device=device)
    heads, dim = q.shape[1], q.shape[3]
    bq, bk = shape["block_q"], shape["block_k"]
    dense_pairs = int(block_pairs(-(-n // bq), block_q=bq, block_k=bk, q_offset=0, n_kv=n, n_q=n).sum()) * heads
    dense_flops = 4 * dim * dense_pairs
    sdpa_ms = time_ms(lambda: sdpa_dense(q, k, v))
    peak = peaks.get("bf16_matmul_tflops")
    rows = []
    runs = [(m, lay) for m in methods for lay in layouts]
    for i, (method, layout) in enumerate(runs):
        estimator = make_estimator(method)
        grid = layout_grid(layout, shape, heads, k.shape[1])
        lbq = grid["block_q"]

        def estimate(estimator=estimator, grid=grid):
            return estimate_lists(estimator, q, k, alpha=alpha, block_q=grid["block_q"], block_k=bk, sink_blocks=1,
                                  local_blocks=2, gqa_lists=grid["gqa_lists"])

        lists = estimate()
        pack = grid["pack"]

        def kernel(lists=lists, pack=pack):
            return block_sparse_attention(q, k, v, lists, pack_gqa=pack)

        o = kernel()
        flex_fn, flex_error, err_flex = None, None, float("nan")
        if flex == "all" or (flex == "first" and i == 0):
            try:  # a flex failure (an unsupported block size on this torch) must not cost the other numbers
                flex_fn = flex_runner(lists, heads, device, flex_compiled)
                err_flex = rel_err(o, flex_fn(q, k, v))
            except Exception as exc:  # noqa: BLE001 - recorded in the JSON
                flex_fn, flex_error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                print(f"N={n} {method}/{layout}: FlexAttention failed ({flex_error})", flush=True)
        tail, first = last_block(lists)
        ref = block_sparse_attention_reference(q[:, :, first:].float(), k.float(), v.float(), tail)
        err_ref = rel_err(o[:, :, first:], ref)
        if not err_ref < tolerance or (flex_fn is not None and not err_flex < tolerance):
            raise RuntimeError(f"N={n} {method}/{layout}: kernel disagrees (vs flex {err_flex:.2e}, vs fp32 "
                               f"reference {err_ref:.2e})")
        est_ms = time_ms(estimate)
        kernel_ms = time_ms(kernel)
        flex_ms = time_ms(lambda flex_fn=flex_fn: flex_fn(q, k, v)) if flex_fn is not None else float("nan")
        flops = 4 * dim * visited_pairs(lists) * (heads // lists.indices.shape[1])
        total_ms = est_ms + kernel_ms
        row = dict(
            n=n, method=method, layout=layout, gqa_lists=grid["gqa_lists"], block_q=lbq, packed=pack, alpha=alpha,
            heads=heads, kv_heads=k.shape[1], dim=dim,
            density=lists.density(), err_vs_flex=err_flex, err_vs_fp32_reference=err_ref,
            estimate_ms=est_ms, kernel_ms=kernel_ms, total_ms=total_ms, flex_ms=flex_ms, flex_total_ms=est_ms + flex_ms,
            sdpa_ms=sdpa_ms, speedup_vs_sdpa=sdpa_ms / total_ms, speedup_vs_flex=(est_ms + flex_ms) / total_ms,
            kernel_tflops=flops / kernel_ms / 1e9, total_tflops=flops / total_ms / 1e9,
            flex_tflops=flops / flex_ms / 1e9, sdpa_tflops=dense_flops / sdpa_ms / 1e9,
            visited_gflop=flops / 1e9, dense_gflop=dense_flops / 1e9, flex_error=flex_error,
        )
        if peak:
            floor_ms = flops / (peak * 1e9)
            row.update(floor_ms=floor_ms, kernel_share_of_floor=floor_ms / kernel_ms,
                       total_share_of_floor=floor_ms / total_ms, sdpa_share_of_floor=dense_flops / (peak * 1e9) / sdpa_ms)
        rows.append(row)
        print(f"N={n} {method}/{layout}: density {row['density']:.3f}, estimate {est_ms:.3f} ms + kernel "
              f"{kernel_ms:.3f} ms = {total_ms:.3f} ms; flex {flex_ms:.3f} ms; SDPA dense {sdpa_ms:.3f} ms "
              f"(x{row['speedup_vs_sdpa']:.2f} SDPA, x{row['speedup_vs_flex']:.2f} flex)", flush=True)
    return rows


def inputs_label(qkv: Path | None, fit: bool) -> str:
    """What the attention inputs were, for the result: synthetic, or the capture file with its layers and length."""
    if qkv is None:
        return "synthetic"
    saved = torch.load(qkv, map_location="cpu", mmap=True)
    layers = saved.get("layers", [saved.get("layer")])
    where = f"{qkv.name}: layers {layers} of {Path(str(saved.get('model', '?'))).name}, captured at {saved.get('length')}"
    return where + (" tokens, fitted to the benchmark's shape" if fit else " tokens, at the captured shape")


def to_markdown(result: dict) -> str:
    headers = ["N", "method", "lists", "density", "est ms", "kernel ms", "total ms", "flex ms (+est)", "SDPA ms", "x SDPA",
               "x flex", "kernel TFLOP/s", "total TFLOP/s", "share of floor (total)"]
    rows = [[r["n"], r["method"], r["layout"], f"{r['density']:.3f}", f"{r['estimate_ms']:.3f}", f"{r['kernel_ms']:.3f}",
             f"{r['total_ms']:.3f}", f"{r['flex_total_ms']:.3f}", f"{r['sdpa_ms']:.3f}", f"{r['speedup_vs_sdpa']:.2f}",
             f"{r['speedup_vs_flex']:.2f}", f"{r['kernel_tflops']:.0f}", f"{r['total_tflops']:.0f}",
             f"{r.get('total_share_of_floor', float('nan')):.2f}"] for r in result["rows"]]
    env = result["environment"]
    first = result["rows"][0] if result["rows"] else {}
    head = (f"Sparse prefill, alpha {result['alpha']}, H={first.get('heads')}, Hkv={first.get('kv_heads')}, "
            f"D={first.get('dim')}, {result['shape']} on {env.get('gpu', 'CPU')} "
            f"(torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}), inputs: "
            f"{result['inputs']}.\n\n")
    return head + markdown_table(headers, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for sparse_prefill.{json,md}")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths N")
    parser.add_argument("--alpha", type=float, default=0.95, help="mass share kept per (head, query block)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="estimators")
    parser.add_argument("--qkv", type=Path, default=None, help="torch.save dict of real q, k, v (else synthetic)")
    parser.add_argument("--fit-shape", action="store_true",
                        help="with --qkv: run the captured heads in the benchmark's shape (zero-padded head dim, "
                             "the queries rescaled so every head keeps its captured softmax; see fit_to_shape)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS,
                        help="list layouts: per query head, per KV head packed, per KV head unpacked")
    parser.add_argument("--flex", default="first", choices=("first", "all", "none"),
                        help="where FlexAttention is timed (each run compiles it anew: ~1 min each): the first "
                             "method and layout of each length, every one, or none")
    parser.add_argument("--no-tests", action="store_true", help="skip the CUDA kernel tests before timing")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run at a tiny shape (set TRITON_INTERPRET=1 to run the Triton kernel)")
    args = parser.parse_args(argv)
    if args.fit_shape and args.qkv is None:
        parser.error("--fit-shape needs --qkv FILE (a capture to fit)")
    if args.tiny:
        device, shape, lengths, peaks = "cpu", TINY_SHAPE, args.lengths or TINY_LENGTHS, {}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("sparse_prefill_bench needs a CUDA GPU (or --tiny on the CPU)")
        if not args.no_tests:
            run_kernel_tests()
        device, shape, lengths, peaks = "cuda", GPU_SHAPE, args.lengths or LENGTHS, measure_peaks()
    rows = []
    started = time.perf_counter()
    for n in lengths:
        rows += bench_length(n, shape=shape, alpha=args.alpha, methods=args.methods, device=device, peaks=peaks,
                             qkv_file=args.qkv, tolerance=2e-2, flex_compiled=device == "cuda", flex=args.flex,
                             layouts=args.layouts, fit=args.fit_shape)
        if device == "cuda":
            torch.cuda.empty_cache()
    result = {"environment": environment(), "peaks": peaks, "alpha": args.alpha,
              "shape": {key: str(val) for key, val in shape.items()}, "inputs": inputs_label(args.qkv, args.fit_shape),
              "autotune": os.environ.get("LIGHTTRANSFER_TRITON_AUTOTUNE"),
              "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), "layouts": args.layouts,
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    write_json(args.out / "sparse_prefill.json", result)
    md = to_markdown(result)
    write_atomically(args.out / "sparse_prefill.md", md)
    print(md)


if __name__ == "__main__":
    main()
