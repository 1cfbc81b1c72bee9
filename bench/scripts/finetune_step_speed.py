"""Fine-tuning step time: S²-Attn (FlexAttention block masks) against dense causal attention (SDPA flash), in one run.

A Llama-3-8B-shaped model with random bf16 weights (speed does not depend on the values), LoRA r 8 on q/k/v/o,
gradient checkpointing, batch 1, AdamW; each variant trains ``--steps`` timed steps after ``--warmup`` untimed
ones (the first compiles FlexAttention and builds the block masks). Variants:

* ``dense``: every layer full, dense causal attention (SDPA, flash on CUDA) -- the baseline;
* ``s2``: every layer full, S²-Attn (groups of a quarter of the length, half the heads shifted, never wrapping),
  as causal attention over the groups (``training/s2_grouped.py``, SDPA's flash kernel per group);
* ``s2-flex``: the same pattern through FlexAttention block masks (``grouped_s2=False``);
* ``hybrid-dense`` / ``hybrid-s2``: half the layers streaming (sink 4 + window 1020, FlexAttention), the rest as
  ``dense`` / ``s2`` -- how ``lighttransfer finetune`` trains a ratio-0.5 hybrid.

Reported per (variant, length): mean and min step seconds, tokens/s, peak allocated GiB, the visible (query, key)
pairs of each layer kind relative to dense causal, and ``speedup_vs_dense`` (dense step time / this one).

Beside the steps, ``attention_only`` times one layer's attention alone, forward + backward, at each length: SDPA's
causal kernel against S²-Attn grouped (what the training runs) and through FlexAttention (``[1, 32, N, 128]``
queries, 8 KV heads, bf16, CUDA events, the median of ``--attn-iters``). The step's speed-up is bounded by the
share of the step that is attention; this row shows the attention's own.

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/finetune_step_speed.py OUT.json \
        [--lengths 8192,32768] [--layers 32] [--variants dense,s2,hybrid-dense,hybrid-s2]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from lighttransfer.environment import environment
from lighttransfer.output_files import write_json
from lighttransfer.runtime import resolve_layout
from lighttransfer.training import TrainingAttention, training_attention
from lighttransfer.training.lora import add_lora
from lighttransfer.training.masks import layer_rules, s2_group_size
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=131072, tie_word_embeddings=False)
# a smoke-test shape for checking the script on a CPU (--tiny); its timings mean nothing
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            vocab_size=512, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
            tie_word_embeddings=False)
SINK, WINDOW = 4, 1020


def _pair_share(seq_len: int, heads: int, **kw) -> float:
    """Visible pairs of one layer's rule / dense causal pairs (counted row-block-wise, no N x N tensor)."""
    rules = layer_rules(heads, sink=SINK, window=WINDOW, **kw)
    return rules.visible_pairs(seq_len) / (heads * seq_len * (seq_len + 1) / 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(model, variant: str, seq_len: int, steps: int, warmup: int) -> dict:
    layers = model.config.num_hidden_layers
    streaming = list(range(0, layers, 2)) if variant.startswith("hybrid") else []
    layout = resolve_layout(model.config, streaming_layers=streaming, sink=SINK, window=WINDOW)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    state = TrainingAttention(layout=layout, s2_attn="s2" in variant, backend="flex" if cuda else "dense",
                              grouped_s2=not variant.endswith("-flex"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with training_attention(model, state):
        for i in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    del opt
    mean = sum(times) / len(times)
    return {"variant": variant, "seq_len": seq_len, "step_s_mean": mean, "step_s_min": min(times),
            "step_s_all": times, "tokens_per_s": seq_len / mean, "backend": state.backend,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "streaming_layers": len(streaming)}


def attention_only(seq_len: int, *, heads: int, kv_heads: int, head_dim: int, iters: int) -> dict:
    """One layer's attention, forward + backward, dense causal (SDPA) vs S²-Attn grouped and through FlexAttention,
    ms (median)."""
    from lighttransfer.training.attention import _flex
    from lighttransfer.training.masks import flex_block_mask
    from lighttransfer.training.s2_grouped import s2_grouped_attention

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, seq_len, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, kv_heads, seq_len, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, kv_heads, seq_len, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    grad = torch.randn(1, heads, seq_len, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    group = s2_group_size(seq_len, 0.25)
    rules = layer_rules(heads, streaming_heads=[False] * heads, sink=SINK, window=WINDOW, s2_group=group)
    mask = flex_block_mask(rules, seq_len, device=device)
    flex = _flex()
    fns = {"dense": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                             enable_gqa=True),
           "s2": lambda: s2_grouped_attention(q, k, v, group=group),
           "s2_flex": lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)}
    out = {}
    for name, fn in fns.items():
        times = []
        for i in range(iters + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn().backward(grad)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
            q.grad = k.grad = v.grad = None
        out[f"{name}_ms"] = sorted(times)[len(times) // 2]
    out["speedup"] = out["dense_ms"] / out["s2_ms"]
    out["speedup_flex"] = out["dense_ms"] / out["s2_flex_ms"]
    out["pair_share"] = _pair_share(seq_len, heads, streaming_heads=[False] * heads, s2_group=group)
    return {"seq_len": seq_len, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32: the full 8B shape)")
    ap.add_argument("--variants", default="dense,s2,s2-flex,hybrid-dense,hybrid-s2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attn-iters", type=int, default=10, help="timed repeats of the attention-only row (0: skip)")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU: checks the script, times nothing")
    args = ap.parse_args()

    torch.manual_seed(0)
    shape = TINY if args.tiny else LLAMA3_8B
    device = "cpu" if args.tiny else "cuda"
    config = LlamaConfig(**shape, num_hidden_layers=args.layers)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float32 if args.tiny else torch.bfloat16)
    model.config.use_cache = False
    model = add_lora(model, r=8, alpha=16)
    if not args.tiny:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    rows = []
    heads = config.num_attention_heads
    for seq_len in (int(x) for x in args.lengths.split(",")):
        shares = {"s2": _pair_share(seq_len, heads, streaming_heads=[False] * heads,
                                    s2_group=s2_group_size(seq_len, 0.25)),
                  "streaming": _pair_share(seq_len, heads, streaming_heads=[True] * heads, s2_group=None)}
        for variant in args.variants.split(","):
            try:
                row = run_variant(model, variant, seq_len, args.steps, args.warmup)
            except torch.OutOfMemoryError as exc:
                row = {"variant": variant, "seq_len": seq_len, "error": f"out of memory: {str(exc)[:200]}"}
            row["pair_share_vs_dense"] = shares
            rows.append(row)
            print({k: v for k, v in row.items() if k != "step_s_all"}, flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        base = next((r for r in rows if r["seq_len"] == seq_len and r["variant"] == "dense" and "error" not in r), None)
        for r in rows:
            if r["seq_len"] == seq_len and base is not None and "error" not in r:
                r["speedup_vs_dense"] = base["step_s_mean"] / r["step_s_mean"]

    attention = []
    if device == "cuda" and args.attn_iters > 0:
        for seq_len in (int(x) for x in args.lengths.split(",")):
            attention.append(attention_only(seq_len, heads=heads, kv_heads=config.num_key_value_heads,
                                            head_dim=config.head_dim, iters=args.attn_iters))
            print(attention[-1], flush=True)
    write_json(args.out, {"schema_version": 1, "shape": dict(shape, num_hidden_layers=args.layers),
                          "smoke_test_only": bool(args.tiny),
                          "lora": {"r": 8, "alpha": 16, "targets": "q,k,v,o"}, "batch": 1,
                          "gradient_checkpointing": True, "dtype": "bfloat16 (autocast), LoRA fp32",
                          "sink": SINK, "window": WINDOW, "rows": rows, "attention_only": attention,
                          "environment": environment(device)})


if __name__ == "__main__":
    main()
