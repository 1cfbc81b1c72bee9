"""Per-kernel profile of one batch-1 decode step of the ratio-0.5 hybrid, fused ops off and on: the "before/after"
of runtime/fused_ops.py.

Llama-3-8B shape (random bf16 weights), 16k-token prompt, sink 4 + window 1020, every other layer streaming. For
each setting: the step replayed from a CUDA graph (StaticDecoder), timed over 32 replays with CUDA events, then one
replay under torch.profiler (kernel table, kernel count, summed kernel time), then one eager static step under
torch.profiler (the same kernels, launched from Python: shows what the graph saves on the host).

    PYTHONPATH=<dir with a lighttransfer link> LIGHTTRANSFER_TRITON_AUTOTUNE=0 \
        python3 bench/scripts/fused_decode_profile.py OUT_DIR [CONTEXT]

Writes OUT_DIR/profile_{unfused,fused}_{graph,eager}.txt and OUT_DIR/fused_decode_profile.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lighttransfer.bench.shaped_model import build_shaped_model
from lighttransfer.compat import cache_keyword, output_cache
from lighttransfer.runtime import StaticDecoder, disable_hybrid, enable_hybrid, make_cache, resolve_layout
from torch.profiler import ProfilerActivity, profile

REPLAYS = 32


def _table(prof, rows: int = 70) -> str:
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return prof.key_averages().table(row_limit=rows)


def _kernels(prof) -> tuple[int, float]:
    """(kernel launches, summed kernel microseconds) of a profile."""
    count, total = 0, 0.0
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            count += 1
            total += e.time_range.elapsed_us()
    return count, total


@torch.inference_mode()
def measure(model, ids, fused: bool, out: Path) -> dict:
    name = "fused" if fused else "unfused"
    context = ids.shape[1]
    reserve = context + REPLAYS + 16
    key = cache_keyword(model)
    res = model(ids, use_cache=True, logits_to_keep=1, **{key: make_cache(model, max_tokens=reserve)})
    cache, token = output_cache(res), res.logits[:, -1].argmax(-1)
    del res
    decoder = StaticDecoder(model, cache, tokens=reserve)
    for _ in range(3):  # eager warm-up, capture, first replay
        token = decoder(token).argmax(-1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(REPLAYS):
        token = decoder(token).argmax(-1)
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / REPLAYS
    row = {"fused_ops": fused, "context": context, "graph_ms_per_step": round(step_ms, 3), "path": decoder.path}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        token = decoder(token).argmax(-1)
        torch.cuda.synchronize()
    (out / f"profile_{name}_graph.txt").write_text(_table(prof))
    row["graph_kernels"], row["graph_kernel_us"] = _kernels(prof)
    decoder.close()
    eager = StaticDecoder(model, cache, tokens=reserve, cuda_graphs=False)
    token = eager(token).argmax(-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        token = eager(token).argmax(-1)
        torch.cuda.synchronize()
    (out / f"profile_{name}_eager.txt").write_text(_table(prof))
    row["eager_kernels"], row["eager_kernel_us"] = _kernels(prof)
    eager.close()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    context = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
    model = build_shaped_model("llama3-8b-shaped", device=torch.device("cuda"), dtype=torch.bfloat16)
    layers = model.config.num_hidden_layers
    layout = resolve_layout(model.config, streaming_layers=list(range(0, layers, 2)), sink=4, window=1020)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
    rows = []
    for fused in (False, True):
        enable_hybrid(model, layout, fused_ops=fused)
        rows.append(measure(model, ids, fused, out))
        disable_hybrid(model)
        torch.cuda.empty_cache()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    (out / "fused_decode_profile.json").write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
