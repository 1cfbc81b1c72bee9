"""Cost of the attention analysis against plain forward passes over the same tokens, same process.

A Llama-3-8B-shaped model (random bf16 weights; the cost does not depend on the values) analyses
``samples x seq_len`` random tokens; the baselines are plain forward passes over the same rows:
  * ``decoder``: the decoder stack alone (what the analysis runs: it needs no logits), the like-for-like one;
  * ``causal_lm``: the whole causal LM with logits for every position (what a user's forward costs).
Baselines are timed before and after the analysis, and the faster of the two is used, so that clock or
thermal drift cannot favour the analysis.

    cd /tmp && python -m lighttransfer.bench.analysis_bench --samples 16 --seq-len 8192 --out-dir results/

(Run it from outside the repository root: there, the root's ``kernels/`` folder shadows the ``kernels``
package that transformers probes for on import.)

Needs a CUDA GPU with room for the model (about 16 GB of bf16 weights plus activations). Free of rich/click.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lighttransfer.environment import device_facts, software_versions

LLAMA3_8B_SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)


# a miniature of the same layout, for a smoke run of this script on a CPU
TINY_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=1024)


def build_model(*, layers: int | None = None, device: str = "cuda", tiny: bool = False):
    """A random-weight bf16 Llama with Llama-3-8B's shape (sdpa attention), in eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(LLAMA3_8B_SHAPE, **(TINY_SHAPE if tiny else {}))
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _peak(fn) -> tuple[float, int]:
    if not torch.cuda.is_available():
        return _timed(fn), 0
    torch.cuda.reset_peak_memory_stats()
    seconds = _timed(fn)
    return seconds, torch.cuda.max_memory_allocated()


def run(*, samples: int, seq_len: int, batch: int, layers: int | None, sink: int, window: int,
        last: int, tiny: bool = False) -> dict:
    from lighttransfer.analysis.pipeline import analyze_tokens

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(layers=layers, device=device, tiny=tiny)
    ids = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    rows = [ids[i : i + batch].to(device) for i in range(0, samples, batch)]

    @torch.inference_mode()
    def decoder_pass():
        for r in rows:
            model.model(input_ids=r, use_cache=False)

    @torch.inference_mode()
    def causal_lm_pass():
        for r in rows:
            model(input_ids=r, use_cache=False)

    report = {}

    def analysis_pass():
        report["r"] = analyze_tokens(model, ids, sink=sink, window=window, last=last, batch=batch,
                                     fingerprint="random-weights")

    with torch.inference_mode():  # warm up kernels and the allocator
        model.model(input_ids=rows[0], use_cache=False)
        model(input_ids=rows[0], use_cache=False)
    analyze_tokens(model, ids[:batch], sink=sink, window=window, last=last, batch=batch, fingerprint="warmup")

    before_decoder, peak_decoder = _peak(decoder_pass)
    before_lm, peak_lm = _peak(causal_lm_pass)
    analysis, peak_analysis = _peak(analysis_pass)
    after_decoder = _timed(decoder_pass)
    after_lm = _timed(causal_lm_pass)
    decoder = min(before_decoder, after_decoder)
    causal_lm = min(before_lm, after_lm)
    r = report["r"]
    versions, facts = software_versions(), device_facts(device)
    return {
        "gpu": facts.get("gpu") or facts.get("cpu"),
        "versions": {**{k: versions[k] for k in ("python", "torch", "transformers")}, "cuda": torch.version.cuda},
        "model": {"shape": "tiny" if tiny else "Llama-3-8B", **LLAMA3_8B_SHAPE, **(TINY_SHAPE if tiny else {}),
                  "num_hidden_layers": model.config.num_hidden_layers, "dtype": "bfloat16",
                  "attn_implementation": "sdpa", "weights": "random"},
        "workload": {"samples": samples, "seq_len": seq_len, "batch": batch, "sink": sink, "window": window,
                     "last": last, "tokens": samples * seq_len},
        "seconds": {"analysis": round(analysis, 3), "decoder_forward": round(decoder, 3),
                    "decoder_forward_runs": [round(before_decoder, 3), round(after_decoder, 3)],
                    "causal_lm_forward": round(causal_lm, 3),
                    "causal_lm_forward_runs": [round(before_lm, 3), round(after_lm, 3)]},
        "ratio_vs_decoder_forward": round(analysis / decoder, 4),
        "ratio_vs_causal_lm_forward": round(analysis / causal_lm, 4),
        "peak_memory_bytes": {"analysis": peak_analysis, "decoder_forward": peak_decoder,
                              "causal_lm_forward": peak_lm},
        "analysis_peak_extra_memory_bytes_reported": r.peak_extra_memory_bytes,
        "tokens_per_s": {"analysis": round(samples * seq_len / analysis, 1),
                         "decoder_forward": round(samples * seq_len / decoder, 1)},
        "layer_lazy_ratio_range": [round(min(r.layer_lazy_ratios()), 4), round(max(r.layer_lazy_ratios()), 4)],
    }


def to_markdown(result: dict) -> str:
    s, w, p = result["seconds"], result["workload"], result["peak_memory_bytes"]
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    return "\n".join([
        f"# Analysis cost vs plain forward passes ({result['gpu']})",
        "",
        f"Model: Llama-3-8B shape ({result['model']['num_hidden_layers']} layers, 32 q / 8 kv heads, hidden 4096), "
        f"random bf16 weights, sdpa. Workload: {w['samples']} samples x {w['seq_len']} tokens, batch {w['batch']}, "
        f"sink {w['sink']}, window {w['window']}, last {w['last']}.",
        f"Versions: torch {result['versions']['torch']} (CUDA {result['versions']['cuda']}), transformers "
        f"{result['versions']['transformers']}, Python {result['versions']['python']}.",
        "",
        "| pass | seconds | peak memory |",
        "| --- | ---: | ---: |",
        f"| analysis (decoder + lazy-ratio capture) | {s['analysis']:.2f} | {gib(p['analysis'])} |",
        f"| plain decoder forward (best of {s['decoder_forward_runs']}) | {s['decoder_forward']:.2f} | "
        f"{gib(p['decoder_forward'])} |",
        f"| plain causal-LM forward with logits (best of {s['causal_lm_forward_runs']}) | "
        f"{s['causal_lm_forward']:.2f} | {gib(p['causal_lm_forward'])} |",
        "",
        f"Ratio analysis / decoder forward: **{result['ratio_vs_decoder_forward']:.3f}** "
        f"(analysis / causal-LM forward: {result['ratio_vs_causal_lm_forward']:.3f}). Requirement: <= 1.3.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", "--recent", dest="window", type=int, default=1020)
    parser.add_argument("--last", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="a miniature model: smoke-test the script on a CPU")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--name", default="analysis_llama3_8b_shape")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("analysis_bench needs a CUDA GPU (or --tiny for a smoke run)")
    result = run(samples=args.samples, seq_len=args.seq_len, batch=args.batch, layers=args.layers,
                 sink=args.sink, window=args.window, last=args.last, tiny=args.tiny)
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    print(to_markdown(result))
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{args.name}.json").write_text(text + "\n")
        (args.out_dir / f"{args.name}.md").write_text(to_markdown(result))


if __name__ == "__main__":
    main()
