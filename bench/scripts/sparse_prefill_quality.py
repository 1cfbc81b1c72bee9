"""Quality of sparse prefill on a real model: density vs alpha, then perplexity and passkey against dense.

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/sparse_prefill_quality.py --out DIR \\
        [--model /path/SmolLM2-135M-Instruct.Q4_1.gguf] [--text austen_novels.txt] [--length 2048] [--device cpu]

Blocks, threshold and estimator options are scaled to the length (``--block``, threshold half the length, 4
sampled rows a block, the last block of queries for vslash, stride a quarter block) so that a short CPU run
exercises the same selection as a long GPU run.

1. Density vs alpha: one prefill of ``--length`` tokens of the text per (method, alpha); the realised density
   (share of causal key blocks visited) of every full layer, averaged.
2. The eval suite (perplexity on the same windows, passkey on the same prompts) for the dense model and each method
   at ``--alphas-eval``, all rows through ``lighttransfer.evaluation.evaluate``.
Writes sparse_prefill_quality.json and .md into DIR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lighttransfer.evaluation.eval_suite import evaluate
from lighttransfer.evaluation.rows import EvalRow
from lighttransfer.hybrid_format import SparsePrefillConfig
from lighttransfer.loading import load_model
from lighttransfer.output_files import write_atomically, write_json
from lighttransfer.runtime import disable_hybrid, enable_hybrid, resolve_layout, sparse_prefill_stats

SHARED = Path(__file__).resolve().parents[3] / "shared" / "assets"
METHODS = ("sample", "vslash", "antidiag")


def method_options(method: str, block: int) -> dict:
    """Estimator options scaled to the block: 4 sampled rows a block, last_q = one block, 4 groups a block."""
    return {"sample": {"share": 4 / block}, "vslash": {"last_q": block}, "antidiag": {"stride": block // 4}}[method]


def config(method: str, alpha: float, *, block: int, min_len: int) -> SparsePrefillConfig:
    return SparsePrefillConfig(method=method, alpha=alpha, min_len=min_len, block_q=block, block_k=block,
                               sink_blocks=1, local_blocks=2, options=method_options(method, block))


def density_sweep(model, ids, *, alphas, block, min_len) -> list[dict]:
    layout = resolve_layout(model.config, streaming_layers=[])
    rows = []
    for method in METHODS:
        for alpha in alphas:
            enable_hybrid(model, layout, sparse_prefill=config(method, alpha, block=block, min_len=min_len))
            with torch.no_grad():
                model(ids, use_cache=False)
            stats = sparse_prefill_stats(model)
            by_layer = stats.density_by_layer()
            rows.append(dict(method=method, alpha=alpha, mean_density=stats.mean_density(),
                             min_layer=min(by_layer.values()), max_layer=max(by_layer.values()),
                             by_layer={str(k): v for k, v in by_layer.items()}))
            print(f"{method} alpha {alpha}: density {stats.mean_density():.3f} "
                  f"(layers {rows[-1]['min_layer']:.2f}-{rows[-1]['max_layer']:.2f})", flush=True)
            disable_hybrid(model)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=str(SHARED / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--text", default=str(SHARED / "text" / "austen_novels.txt"))
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.99])
    parser.add_argument("--alphas-eval", type=float, nargs="+", default=[0.95])
    parser.add_argument("--passkey-depths", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    min_len = args.length // 2
    loaded = load_model(args.model, device=args.device, dtype="float32" if args.device == "cpu" else "auto")
    model, tok = loaded.model, loaded.tokenizer
    text = Path(args.text).read_text()
    ids = torch.tensor([tok(text[:200000], add_special_tokens=False)["input_ids"][: args.length]], device=model.device)
    sweep = density_sweep(model, ids, alphas=args.alphas, block=args.block, min_len=min_len)

    shape = dict(num_layers=model.config.num_hidden_layers, num_kv_heads=model.config.num_key_value_heads, sink=0,
                 window=1)
    rows = [EvalRow.of("original", **shape, note="dense")]
    for method in METHODS:
        for alpha in args.alphas_eval:
            rows.append(EvalRow.of(f"sparse-prefill:{method}@{alpha}", **shape,
                                   sparse_prefill=config(method, alpha, block=args.block, min_len=min_len),
                                   note=f"{method}, alpha {alpha}"))
    del model
    result = evaluate(baseline=args.model, text=args.text, lengths=[args.length], rows=rows, max_windows=1,
                      passkey_lengths=[args.length], passkey_depths_count=args.passkey_depths, passkey_trials=1,
                      device=args.device, dtype="float32" if args.device == "cpu" else "auto")
    table = []
    for r in result.rows:
        ppl = r["perplexity"][str(args.length)]["ppl"]
        density = (r.get("sparse_prefill_density") or {}).get("mean")
        table.append(dict(row=r["name"], ppl=ppl, passkey=r["passkey"]["accuracy"], density=density))
    out = dict(model=args.model, length=args.length, block=args.block, min_len=min_len, density_vs_alpha=sweep,
               eval=table, eval_result=result.to_dict())
    write_json(args.out / "sparse_prefill_quality.json", out)
    dense_ppl = table[0]["ppl"]
    lines = [f"Sparse prefill on {Path(args.model).name}, {args.length} tokens, blocks {args.block}, dense below "
             f"{min_len} keys, {args.device}.", "", "| method | alpha | mean density | layer range |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['alpha']} | {r['mean_density']:.3f} | {r['min_layer']:.2f}-{r['max_layer']:.2f} |"
              for r in sweep]
    lines += ["", "| row | perplexity | vs dense | passkey | density |", "|---|---|---|---|---|"]
    lines += [f"| {t['row']} | {t['ppl']:.3f} | {100 * (t['ppl'] / dense_ppl - 1):+.2f}% | {t['passkey']:.2f} | "
              f"{'' if t['density'] is None else format(t['density'], '.3f')} |" for t in table]
    md = "\n".join(lines) + "\n"
    write_atomically(args.out / "sparse_prefill_quality.md", md)
    print(md)
    print(json.dumps(table))


if __name__ == "__main__":
    main()
