"""Where a batch-1 decode step of the hybrid runtime spends its time, against the dense model.

SmolLM2-135M shape, random bf16 weights (as runtime_gpu_bench.py), 4096-token prompt, sink 4 + window 1020.
Prints per-step wall time for each variant, the host time of one eager ``streaming_decode`` call, and the
torch-profiler table (self CPU time) of 16 decode steps of the layer-level hybrid.

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/runtime_decode_profile.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from lighttransfer import kernels
from lighttransfer.compat import cache_keyword
from torch.profiler import ProfilerActivity, profile

spec = importlib.util.spec_from_file_location("rgb", Path(__file__).with_name("runtime_gpu_bench.py"))
rgb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rgb)


@torch.no_grad()
def step_times(model, variant: str, length: int = 4096, steps: int = 64):

    from lighttransfer.runtime import make_cache
    from transformers import DynamicCache

    keyword = cache_keyword(model)
    ids = torch.randint(3, 49152, (1, length), device="cuda")
    cache = DynamicCache(config=model.config) if variant == "dense" else make_cache(model)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{keyword: cache})
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(4):
        out = model(input_ids=token, use_cache=True, **{keyword: out.past_key_values})
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **{keyword: out.past_key_values})
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    return ms, out, keyword, token


def decode_call_us(calls: int = 200) -> dict:
    q = torch.randn(1, 9, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 3, 1024, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slot_pos = torch.arange(1024, device="cuda", dtype=torch.int32).view(1, -1) + 3000
    q_pos = torch.full((1, 1), 4100, device="cuda", dtype=torch.int32)
    from lighttransfer.runtime.ops import FULL_ATTENTION_BACKENDS
    from torch.nn.attention import sdpa_kernel

    keys = torch.randn(1, 3, 4096 + calls + 20, 64, device="cuda", dtype=torch.bfloat16)
    grow = iter(range(10**9))

    def sdpa_growing():  # the key length changes at every call, as in decoding
        n = 4096 + next(grow) % (calls + 10)
        return torch.nn.functional.scaled_dot_product_attention(q, keys[:, :, :n], keys[:, :, :n], enable_gqa=True)

    def sdpa_growing_no_cudnn():
        with sdpa_kernel(FULL_ATTENTION_BACKENDS):
            return sdpa_growing()

    res = {}
    for name, fn in {
        "sdpa, key length growing, default backends": sdpa_growing,
        "sdpa, key length growing, runtime backends (no cuDNN)": sdpa_growing_no_cudnn,
        "streaming_decode": lambda: kernels.streaming_decode(q, k, v, slot_pos, q_pos, sink=4, window=1020),
        "sdpa (same shapes, gqa)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, enable_gqa=True),
    }.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) / calls * 1e6
        torch.cuda.synchronize()
        res[name] = round(host, 1)
    return res


def main(out_dir: str) -> None:
    out = Path(out_dir)
    result = {"gpu": torch.cuda.get_device_name(), "step_ms": {}, "host_us_per_call": decode_call_us()}
    print(json.dumps(result["host_us_per_call"]), flush=True)
    for variant in ("dense", "layer", "head"):
        model = rgb.build(variant)
        ms, o, keyword, token = step_times(model, variant)
        result["step_ms"][variant] = round(ms, 3)
        print(variant, f"{ms:.2f} ms/step", flush=True)
        if variant in ("layer", "head"):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                with torch.no_grad():
                    for _ in range(16):
                        o = model(input_ids=token, use_cache=True, **{keyword: o.past_key_values})
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            (out / f"profile_{variant}.txt").write_text(table)
            print(table[:6000], flush=True)
        del model
        torch.cuda.empty_cache()
    (out / "runtime_decode_profile.json").write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
