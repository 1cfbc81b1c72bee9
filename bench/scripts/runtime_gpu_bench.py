"""Peak GPU memory and speed of the hybrid runtime against the dense model, on a SmolLM2-135M-shaped Llama.

Random weights in bf16 (the real GGUF does not travel to the GPU machine; memory and speed do not depend on the
weights). Variants, all at the same KV budget where they stream: dense (SDPA, DynamicCache); layer-level (layers
11..29 stream, 19/30); head-level (57 of the 90 KV heads stream, spread over the layers); online (19/30 layers
chosen per prompt); layer-level again with a chunked prefill (2048 tokens a chunk); head-level without reordering
the heads (gathers per step instead of views). Sink 4, window 1020.
For each prompt length: prefill time, decode tokens/s over 128 greedy steps, KV-cache bytes at the end, and the allocator's peak over prefill + decode.

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/runtime_gpu_bench.py OUT.json [VARIANT ...]
"""

from __future__ import annotations

import json
import sys
import time

import torch
import transformers
import triton
from lighttransfer.compat import cache_keyword
from lighttransfer.runtime import enable_hybrid, make_cache, prefill_chunked, resolve_layout
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

SINK, WINDOW, NEW, CHUNK = 4, 1020, 128, 2048
LENGTHS = (4096, 16384)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
               max_position_embeddings=32768, tie_word_embeddings=True)


def build(variant: str):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2), ).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    if variant in ("layer", "layer-chunked"):
        enable_hybrid(model, resolve_layout(model.config, streaming_layers=list(range(11, 30)), sink=SINK,
                                            window=WINDOW))
    elif variant in ("head", "head-gather"):
        masks = {i: [True, True, False] for i in range(1, 29)}
        masks[29] = [True, False, False]  # 28 * 2 + 1 = 57 streaming KV heads = 19 layers' worth
        # "head" reorders each mixed layer's heads in the weights (views); "head-gather" keeps the order (gathers)
        enable_hybrid(model, resolve_layout(model.config, head_masks=masks, sink=SINK, window=WINDOW),
                      reorder_heads=variant == "head")
    elif variant == "online":
        enable_hybrid(model, resolve_layout(model.config, online_ratio=19 / 30, sink=SINK, window=WINDOW))
    return model


def kv_bytes(cache) -> int:
    if hasattr(cache, "kv_bytes"):
        return cache.kv_bytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


@torch.no_grad()
def measure(model, variant: str, length: int) -> dict:
    keyword = cache_keyword(model)
    ids = torch.randint(3, 49152, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cache = DynamicCache(config=model.config) if variant == "dense" else make_cache(model)
    t0 = time.perf_counter()
    if variant.endswith("chunked"):
        out = prefill_chunked(model, ids, chunk_size=CHUNK, cache=cache)
    else:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{keyword: cache})
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(NEW):
        out = model(input_ids=token, use_cache=True, **{keyword: out.past_key_values})
        token = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    decode = time.perf_counter() - t0
    cache = out.past_key_values
    return dict(variant=variant, prompt_tokens=length, new_tokens=NEW, prefill_s=round(prefill, 4),
                decode_tokens_per_s=round(NEW / decode, 1), kv_bytes=kv_bytes(cache),
                peak_allocated_bytes=torch.cuda.max_memory_allocated() - base,
                streaming_layers=getattr(cache, "streaming_layer_indices", lambda: [])())


VARIANTS = ("dense", "layer", "layer-chunked", "head", "head-gather", "online")


def main(path: str, variants=VARIANTS) -> None:
    rows = []
    for variant in variants:
        model = build(variant)
        for length in LENGTHS:
            measure(model, variant, length)  # warm-up at this shape: Triton compilation and autotuning
            row = measure(model, variant, length)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                  triton=triton.__version__, model="SmolLM2-135M shape, random bf16 weights", sink=SINK,
                  window=WINDOW, rows=rows)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runtime_gpu_bench.json", tuple(sys.argv[2:]) or VARIANTS)
