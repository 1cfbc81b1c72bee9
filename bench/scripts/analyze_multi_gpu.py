"""The attention analysis of a model spread over several GPUs, against the same model on one GPU, in one process.

A random-weight Llama of a named shape is built straight onto its devices (no checkpoint on disk: a 70B shape's
140 GB of bf16 weights would not fit the disk), each tensor drawn from a generator seeded by its name on its own
device. A model built twice, once on one GPU and once spread over all, then holds the same values, as long as
the GPUs are of one kind. Placements:

* ``single``: every layer on ``cuda:0`` (only where the model fits one GPU);
* ``auto``: the decoder layers split into contiguous, equal runs over every visible GPU, the embeddings on the
  first, the final norm and LM head on the last. This is how ``device_map="auto"`` places a model that fills every
  GPU, dispatched with accelerate's hooks as ``from_pretrained(..., device_map=...)`` does.

Per placement: analysis seconds, tokens/s and peak allocated memory per GPU; and with both placements, the
largest difference between their reports (per-layer lazy ratios and per-head scores; 0 expected, since the same
kernels run on the same kind of GPU, and a device hop changes no value).

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/analyze_multi_gpu.py OUT.json \\
        [--shape 8b|70b] [--layers N] [--seq-len 4096] [--samples 4] [--placements single,auto]

The CLI does the same for a checkpoint: ``lighttransfer analyze MODEL --device-map auto``. ``--tiny`` builds a
miniature on the CPU (both placements on the CPU): it checks the script and times nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch
from lighttransfer.bench.shaped_model import SHAPES as PUBLISHED

# Llama 3 70B differs from the 8B in width, depth and query heads only (same vocabulary, RoPE and 8 KV heads)
LLAMA3_8B = PUBLISHED["llama3-8b-shaped"]
SHAPES = {
    "8b": LLAMA3_8B,
    "70b": dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "tiny": dict(LLAMA3_8B, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)


def layer_devices(num_layers: int, devices: list[str]) -> list[str]:
    """Contiguous, equal runs of layers per device: layer ``i`` of ``num_layers`` -> its device."""
    return [devices[i * len(devices) // num_layers] for i in range(num_layers)]


def device_map_for(num_layers: int, devices: list[str]) -> dict[str, str]:
    """An accelerate ``device_map`` for a Llama: embeddings on the first device, norm and head on the last."""
    placed = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    placed.update({f"model.layers.{i}": d for i, d in enumerate(layer_devices(num_layers, devices))})
    placed.update({"model.norm": devices[-1], "lm_head": devices[-1]})
    return placed


def build(shape: dict, device_map: dict[str, str]):
    """A bf16 Llama of ``shape`` with seeded random weights, each tensor made on its device of ``device_map``."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    for name, param in list(model.named_parameters()):
        device = next(d for prefix, d in device_map.items() if name.startswith(prefix + "."))
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape, dtype=torch.bfloat16, device=device)
        else:
            gen = torch.Generator(device=device).manual_seed(_seed(name))
            value = torch.empty(param.shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen)
        set_module_tensor_to_device(model, name, device, value=value)
    model.model.rotary_emb.to(device_map["model.rotary_emb"])  # its buffers are made at init (on the CPU)
    if len(set(device_map.values())) > 1:
        model = dispatch_model(model, device_map=device_map)
    return model.eval()


def _peaks(devices: list[str]) -> dict[str, int]:
    return {d: torch.cuda.max_memory_allocated(d) for d in devices if d.startswith("cuda")}


def run_placement(shape: dict, devices: list[str], ids: torch.Tensor, *, sink: int, window: int, last: int) -> dict:
    from lighttransfer.analysis.pipeline import analyze_tokens

    placement = device_map_for(shape["num_hidden_layers"], devices)
    used = sorted(set(devices))
    started = time.perf_counter()
    model = build(shape, placement)
    built = time.perf_counter() - started
    analyze_tokens(model, ids[:1, :512], sink=sink, window=min(window, 256), last=min(last, 8),
                   fingerprint="warm-up")
    for d in used:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
    report = analyze_tokens(model, ids, sink=sink, window=window, last=last, fingerprint="random-weights")
    layers = [placement[f"model.layers.{i}"] for i in range(shape["num_hidden_layers"])]
    row = {"devices": used, "layers_per_device": {d: layers.count(d) for d in used},
           "build_s": round(built, 1), "analysis_s": report.timings["analysis"],
           "tokens_per_s": report.timings["tokens_per_s"], "peak_allocated_bytes": _peaks(used),
           "layer_lazy_ratios": [round(x, 6) for x in report.layer_lazy_ratios()],
           "report": report}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def max_difference(a, b) -> dict:
    """Largest absolute differences between two reports' per-layer lazy ratios and per-KV-head scores."""
    layers = max(abs(x - y) for x, y in zip(a.layer_lazy_ratios(), b.layer_lazy_ratios(), strict=True))
    heads = max(abs(x - y) for ra, rb in zip(a.kv_heads.lazy_ratio, b.kv_heads.lazy_ratio, strict=True)
                for x, y in zip(ra, rb, strict=True))
    return {"layer_lazy_ratio": layers, "kv_head_lazy_ratio": heads,
            "same_ranking": a.ranking == b.ranking}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="8b", choices=["8b", "70b"])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--last", type=int, default=32)
    ap.add_argument("--placements", default="single,auto")
    ap.add_argument("--tiny", action="store_true", help="a miniature on the CPU: checks the script, times nothing")
    args = ap.parse_args(argv)

    from lighttransfer.environment import environment
    from lighttransfer.output_files import write_json

    shape = dict(SHAPES["tiny" if args.tiny else args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    spread = ["cpu", "cpu"] if args.tiny else gpus
    if not spread:
        raise SystemExit("analyze_multi_gpu.py needs CUDA GPUs (or --tiny).")
    ids = torch.randint(0, shape["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows = {}
    for placement in [p for p in args.placements.split(",") if p]:
        devices = {"single": spread[:1], "auto": spread}[placement]
        print(f"{placement}: {len(set(devices))} device(s)", flush=True)
        rows[placement] = run_placement(shape, devices, ids, sink=args.sink, window=args.window, last=args.last)
        print({k: v for k, v in rows[placement].items() if k not in ("report", "layer_lazy_ratios")}, flush=True)
    result = {"benchmark": "analyze_multi_gpu", "format_version": 1, "shape": shape,
              "tiny": args.tiny, "workload": {"samples": args.samples, "seq_len": args.seq_len, "sink": args.sink,
                                               "window": args.window, "last": args.last},
              "environment": environment(gpus[0] if gpus else None), "gpus": [torch.cuda.get_device_name(g) for g in gpus]}
    if "single" in rows and "auto" in rows:
        result["difference_auto_vs_single"] = max_difference(rows["single"]["report"], rows["auto"]["report"])
        print("auto vs single:", result["difference_auto_vs_single"], flush=True)
    result["placements"] = {k: {n: v for n, v in r.items() if n != "report"} for k, r in rows.items()}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
