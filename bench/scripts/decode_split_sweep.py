"""How the split count of the decode kernels moves their bandwidth: the full-layer kernel (``full_decode``) and the
streaming layers' kernel (``streaming_decode``) at the batch and context of the decode-floor rows, for a list of
split counts beside the one each planner picks.

    PYTHONPATH=<dir with a lighttransfer link> LIGHTTRANSFER_TRITON_AUTOTUNE=0 \
        python3 bench/scripts/decode_split_sweep.py OUT_DIR [--routed]

Shape: 32 query / 8 KV heads, D = 128, bf16 (the Llama-3-8B shape). Each point is a CUDA-graph replay (Triton's
``do_bench_cudagraph``, median), in one process with the copy bandwidth it is compared with; bytes = the K and V
the kernel must read (the query, output and partials are below 0.2% of it). Writes ``decode_split_sweep.json`` and
``.md`` into OUT_DIR. ``--routed``: the routed kernel (``routed_decode``) instead, at 32k, batch 1 and 16, with
0 / 50 / 75% of the (sequence, KV head) pairs routed local (``routed_split_sweep.json``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("LIGHTTRANSFER_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

HEADS, KV_HEADS, DIM = 32, 8, 128
FULL_POINTS = ((1, 16384), (1, 32768), (51, 16384), (97, 16384), (25, 32768), (50, 32768))
STREAM_POINTS = ((1, 1024), (51, 1024), (97, 1024), (50, 1024))
SPLITS = (1, 2, 3, 4, 7, 8, 10, 13, 16, 29, 32)


def _full_rows(peak_gbps: float) -> list[dict]:
    from lighttransfer.bench.gpu_env import median_us
    from lighttransfer.kernels.decode_launch import multiprocessors
    from lighttransfer.kernels.decode_triton import plan_wave_splits, wave_efficiency
    from lighttransfer.kernels.full_decode_triton import full_decode_triton

    sms = multiprocessors(torch.cuda.current_device())
    rows = []
    for batch, n in FULL_POINTS:
        q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        bytes_read = 2 * k.numel() * k.element_size()
        planned = plan_wave_splits(batch, KV_HEADS, n, sms)[1]
        for splits in sorted(set(SPLITS) | {planned}):
            if splits * 128 > n:
                continue
            us = median_us(functools.partial(full_decode_triton, q, k, v, kv_start=None, scale=DIM**-0.5,
                                             splits=splits), graph=True)
            gbps = bytes_read / us / 1e3
            rows.append({"kernel": "full", "batch": batch, "keys": n, "splits": splits, "planned": splits == planned,
                         "waves": wave_efficiency(batch * KV_HEADS * splits, sms), "us": us, "gbps": gbps,
                         "share_of_copy": gbps / peak_gbps})
            print(f"full b{batch} n{n} s{splits}{' (plan)' if splits == planned else ''}: {us:.1f} us "
                  f"{gbps:.0f} GB/s {gbps / peak_gbps:.0%}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _stream_rows(peak_gbps: float) -> list[dict]:
    from lighttransfer.bench.gpu_env import median_us
    from lighttransfer.kernels.decode_launch import multiprocessors
    from lighttransfer.kernels.decode_triton import streaming_decode_triton, wave_efficiency

    sms = multiprocessors(torch.cuda.current_device())
    rows = []
    sink, window = 4, 1020
    for batch, slots in STREAM_POINTS:
        q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, KV_HEADS, slots, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        position = 20000  # a long sequence: sink slots 0..3, the ring holding the last 1020 positions
        slot_pos = torch.cat([torch.arange(sink), torch.arange(position - window + 1, position + 1)])
        slot_pos = slot_pos.to("cuda").expand(batch, -1).contiguous()
        q_pos = torch.full((batch, 1), position, device="cuda")
        bytes_read = 2 * k.numel() * k.element_size()
        for splits in (1, 2, 3, 4, 6, 8):
            us = median_us(functools.partial(streaming_decode_triton, q, k, v, slot_pos, q_pos, sink=sink,
                                             window=window, scale=DIM**-0.5, stream_heads=None, splits=splits),
                           graph=True)
            gbps = bytes_read / us / 1e3
            rows.append({"kernel": "streaming", "batch": batch, "keys": slots, "splits": splits,
                         "waves": wave_efficiency(batch * KV_HEADS * splits, sms), "us": us, "gbps": gbps,
                         "share_of_copy": gbps / peak_gbps})
            print(f"streaming b{batch} s{splits}: {us:.1f} us {gbps:.0f} GB/s {gbps / peak_gbps:.0%}", flush=True)
    return rows


def _routed_rows(peak_gbps: float) -> list[dict]:
    """The routed kernel at 32k, batch 1 and 16: a share of (sequence, KV head) pairs routed local at random, for
    split counts from the plan up: how many programs the GPU's scheduler needs to balance full and local pairs."""
    from lighttransfer.bench.gpu_env import median_us
    from lighttransfer.kernels.decode_launch import multiprocessors
    from lighttransfer.kernels.decode_triton import plan_wave_splits
    from lighttransfer.kernels.routed_decode import routed_decode

    sms = multiprocessors(torch.cuda.current_device())
    rows, n = [], 32768
    for batch in (1, 16):
        q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, KV_HEADS, n, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        planned = plan_wave_splits(batch, KV_HEADS, n, sms)[1]
        for share in (0.0, 0.5, 0.75):
            order = torch.randperm(batch * KV_HEADS, generator=torch.Generator().manual_seed(int(share * 100)))
            local = torch.zeros(batch * KV_HEADS, dtype=torch.bool)
            local[order[:round(share * batch * KV_HEADS)]] = True
            local = local.view(batch, KV_HEADS).cuda()
            for splits in sorted({planned, 4, 8, 16, 32, 64, 128}):
                us = median_us(functools.partial(routed_decode, q, k, v, local, sink=4, window=1020, splits=splits),
                               graph=True)
                rows.append({"kernel": "routed", "batch": batch, "keys": n, "local_share": share, "splits": splits,
                             "planned": splits == planned, "us": us})
                print(f"routed b{batch} local {share} s{splits}{' (plan)' if splits == planned else ''}: "
                      f"{us:.1f} us", flush=True)
    return rows


def main() -> None:
    from lighttransfer.bench.gpu_env import environment, environment_markdown, markdown_table, measure_peaks

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    env, peaks = environment(), measure_peaks()
    if "--routed" in sys.argv:  # the routed kernel only
        rows = _routed_rows(peaks["hbm_copy_gbps"])
        (out / "routed_split_sweep.json").write_text(json.dumps({"env": env, "peaks": peaks, "rows": rows},
                                                                indent=1))
        return
    rows = _full_rows(peaks["hbm_copy_gbps"]) + _stream_rows(peaks["hbm_copy_gbps"])
    (out / "decode_split_sweep.json").write_text(json.dumps({"env": env, "peaks": peaks, "rows": rows}, indent=1))
    table = markdown_table(
        ["kernel", "batch", "keys", "splits", "planned", "last-wave fill", "us", "GB/s", "share of copy"],
        [[r["kernel"], r["batch"], r["keys"], r["splits"], "yes" if r.get("planned") else "", f"{r['waves']:.3f}",
          f"{r['us']:.1f}", f"{r['gbps']:.0f}", f"{r['share_of_copy']:.1%}"] for r in rows])
    (out / "decode_split_sweep.md").write_text("# Decode kernels: split count against bandwidth\n\n"
                                               + environment_markdown(env, peaks) + "\n" + table)
    print(table)


if __name__ == "__main__":
    main()
