"""Where a chunked prefill spends its time: torch.profiler over one chunked prefill of the SmolLM2-135M shape.

Builds the layer-level hybrid of ``runtime_gpu_bench.py`` (layers 11..29 streaming, sink 4, window 1020), warms
up at the same shapes, then times one-pass and chunked prefill at 16k tokens for several chunk sizes and
profiles one chunked prefill (2048 tokens a chunk). Prints the profiler's top operators by self CPU and by CUDA
time and writes the timings as JSON.

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/chunked_prefill_profile.py OUT.json [8b]

With ``8b``: the Llama-3-8B shape instead (random bf16 weights, half the layers streaming, 32k tokens), timings
only, to see how much of the chunking cost remains when each chunk has real work.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lighttransfer.compat import cache_keyword  # noqa: E402
from lighttransfer.runtime import make_cache, prefill_chunked  # noqa: E402
from runtime_gpu_bench import build  # noqa: E402

LENGTH = 16384


@torch.no_grad()
def run(model, ids, chunk: int | None) -> float:
    cache = make_cache(model)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if chunk is None:
        keyword = cache_keyword(model)
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{keyword: cache})
    else:
        prefill_chunked(model, ids, chunk_size=chunk, cache=cache)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def build_8b():
    from lighttransfer.bench.shaped_model import build_shaped_model
    from lighttransfer.runtime import enable_hybrid, resolve_layout

    model = build_shaped_model("llama3-8b-shaped", device=torch.device("cuda"), dtype=torch.bfloat16)
    model.set_attn_implementation("sdpa")
    enable_hybrid(model, resolve_layout(model.config, streaming_layers=list(range(1, 32, 2)), sink=4, window=1020))
    return model


def main(path: str, shape: str = "135m") -> None:
    big = shape == "8b"
    model = build_8b() if big else build("layer")
    length = 32768 if big else LENGTH
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    timings = {}
    for chunk in (None, 8192, 4096, 2048, 1024):
        run(model, ids, chunk)
        run(model, ids, chunk)
        timings[str(chunk or "one pass")] = round(min(run(model, ids, chunk) for _ in range(3)), 4)
        print(chunk, timings[str(chunk or "one pass")], flush=True)
    if big:
        out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, length=length, prefill_s=timings,
                   model="Llama-3-8B shape, random bf16 weights, 16 of 32 layers streaming (sink 4, window 1020)")
        Path(path).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(model, ids, 2048)
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    table_cuda = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    print(table_cpu)
    print(table_cuda)
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, length=LENGTH, prefill_s=timings,
               model="SmolLM2-135M shape, random bf16 weights, layers 11-29 streaming (sink 4, window 1020)",
               profile_cpu=table_cpu, profile_cuda=table_cuda)
    Path(path).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "chunked_prefill_profile.json", *sys.argv[2:3])
