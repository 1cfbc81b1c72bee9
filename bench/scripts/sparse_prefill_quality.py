"""Quality of sparse prefill on a real model: density vs alpha, then perplexity, passkey and RULER against dense.

The one GPU command (H200, SmolLM2-135M at 8k, the issue's quality target; about 3-4 min)::

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/sparse_prefill_quality.py --out DIR \\
        --device cuda --length 8192

    ... --device cpu --length 2048 --suite perplexity,passkey   # a CPU check (minutes)

Every row runs the same prompts through the runtime with a dense cache (all layers full); the sparse rows prefill
block-sparse wherever a forward has at least ``--min-len`` keys (default: half the length, so that at 8k every
prompt's prefill is sparse; the runtime's default 16384 would leave SmolLM2, 8192 positions, dense). Defaults:
blocks of 64 (``--block``), the ``sample`` estimator at alpha 0.9, 0.95, 0.98 (``--methods``, ``--alphas-eval``;
estimator options scaled to the block: 4 sampled rows a block, the last block of queries for vslash, stride a
quarter block), lists per query head (``--gqa-lists``).

1. Density vs alpha: one prefill of ``--length`` tokens of the text per (method, alpha) of ``--alphas``; the realised
   density (share of causal key blocks visited) of every layer, averaged.
2. The eval suite (``--suite``): perplexity (one window of ``--length``), passkey (``--passkey-depths`` depths),
   RULER-style tasks (``--ruler-samples`` per task, batched ``--ruler-batch``) for the dense model and each
   (method, alpha) of ``--alphas-eval``, through :func:`lighttransfer.evaluation.evaluate`.
3. Against dense: perplexity in percent, passkey and RULER average in points, and *paired flips* (prompts the
   dense row got right and the sparse row wrong, and the reverse): with 12 RULER tasks x 10 samples one prompt is
   0.83 points of the average, so "within 1 point" is read from the flips as much as from the averages.

Writes sparse_prefill_quality.json (with the GPU, versions and every setting) and .md into DIR.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lighttransfer.bench.gpu_env import environment
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


def config(method: str, alpha: float, *, block: int, min_len: int, gqa_lists: str = "query") -> SparsePrefillConfig:
    return SparsePrefillConfig(method=method, alpha=alpha, min_len=min_len, block_q=block, block_k=block,
                               sink_blocks=1, local_blocks=2, options=method_options(method, block),
                               gqa_lists=gqa_lists)


def density_sweep(model, ids, *, methods, alphas, block, min_len, gqa_lists) -> list[dict]:
    layout = resolve_layout(model.config, streaming_layers=[])
    rows = []
    for method in methods:
        for alpha in alphas:
            enable_hybrid(model, layout, sparse_prefill=config(method, alpha, block=block, min_len=min_len,
                                                               gqa_lists=gqa_lists))
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


def flips(dense: list, sparse: list) -> dict:
    """Paired prompts: dense right and sparse wrong (``lost``), the reverse (``gained``); scores > 0 count as right
    for passkey (bools), RULER outcomes are per-sample percentages compared as they are."""
    lost = sum(1 for a, b in zip(dense, sparse, strict=True) if float(a) > float(b))
    gained = sum(1 for a, b in zip(dense, sparse, strict=True) if float(a) < float(b))
    return {"lost": lost, "gained": gained, "n": len(dense)}


def compare(rows: list[dict], length: int) -> list[dict]:
    """Each row against the first (dense): perplexity %, passkey and RULER points, paired flips."""
    base = rows[0]
    out = []
    for r in rows:
        ppl = r["perplexity"][str(length)]["ppl"] if r.get("perplexity") else None
        base_ppl = base["perplexity"][str(length)]["ppl"] if base.get("perplexity") else None
        entry = dict(row=r["name"], density=(r.get("sparse_prefill_density") or {}).get("mean"), ppl=ppl,
                     ppl_vs_dense_pct=None if ppl is None else 100 * (ppl / base_ppl - 1), seconds=r.get("seconds"))
        if "passkey" in r:
            entry.update(passkey=100 * r["passkey"]["accuracy"],
                         passkey_vs_dense_points=100 * (r["passkey"]["accuracy"] - base["passkey"]["accuracy"]),
                         passkey_flips=flips(base["passkey"]["outcomes"], r["passkey"]["outcomes"]))
        if "ruler" in r:
            entry.update(ruler=r["ruler"]["average"], ruler_vs_dense_points=r["ruler"]["average"]
                         - base["ruler"]["average"], ruler_by_task=r["ruler"]["by_task"],
                         ruler_flips=flips(base["ruler"]["outcomes"], r["ruler"]["outcomes"]))
        out.append(entry)
    return out


def to_markdown(result: dict) -> str:
    env = result["environment"]
    s = result["settings"]
    lines = [f"Sparse prefill on {Path(s['model']).name}, {s['length']} tokens, blocks {s['block']}, sparse from "
             f"{s['min_len']} keys, lists per {s['gqa_lists']}; {env.get('gpu') or 'CPU'}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, CUDA {env.get('cuda')}; {result['seconds']:.0f} s.", "",
             "| method | alpha | mean density | layer range |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['alpha']} | {r['mean_density']:.3f} | {r['min_layer']:.2f}-{r['max_layer']:.2f} |"
              for r in result["density_vs_alpha"]]
    lines += ["", "| row | density | perplexity | vs dense | passkey | vs dense (lost/gained) | RULER avg | "
              "vs dense (lost/gained of n) |", "|---|---|---|---|---|---|---|---|"]

    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    def flipped(f, of=False):
        return "" if f is None else f" ({f['lost']}/{f['gained']}" + (f" of {f['n']})" if of else ")")

    for t in result["comparison"]:
        lines.append(
            f"| {t['row']} | {num(t['density'], '.3f')} | {num(t['ppl'], '.3f')} | {num(t['ppl_vs_dense_pct'], '+.2f')}%"
            f" | {num(t.get('passkey'), '.1f')} | {num(t.get('passkey_vs_dense_points'), '+.1f')}"
            f"{flipped(t.get('passkey_flips'))} | {num(t.get('ruler'), '.1f')} | "
            f"{num(t.get('ruler_vs_dense_points'), '+.1f')}{flipped(t.get('ruler_flips'), of=True)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=str(SHARED / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--text", default=str(SHARED / "text" / "austen_novels.txt"))
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=None, help="keys from which prefill goes sparse "
                        "[default: half the length]")
    parser.add_argument("--methods", nargs="+", default=["sample"], choices=METHODS)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--alphas-eval", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--gqa-lists", default="query", choices=("query", "kv-union", "kv-sum"))
    parser.add_argument("--suite", default="perplexity,passkey,ruler")
    parser.add_argument("--passkey-depths", type=int, default=10)
    parser.add_argument("--ruler-samples", type=int, default=10)
    parser.add_argument("--ruler-tasks", default=None, help="comma-separated RULER tasks [default: all 12]")
    parser.add_argument("--ruler-batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    min_len = args.min_len or args.length // 2
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    loaded = load_model(args.model, device=args.device, dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    text = Path(args.text).read_text()
    ids = torch.tensor([tok(text[:400000], add_special_tokens=False)["input_ids"][: args.length]], device=model.device)
    sweep = density_sweep(model, ids, methods=args.methods, alphas=args.alphas, block=args.block, min_len=min_len,
                          gqa_lists=args.gqa_lists)

    shape = dict(num_layers=model.config.num_hidden_layers, num_kv_heads=model.config.num_key_value_heads, sink=0,
                 window=1)
    rows = [EvalRow.of("original", **shape, note="dense")]
    for method in args.methods:
        for alpha in args.alphas_eval:
            rows.append(EvalRow.of(f"sparse-prefill:{method}@{alpha}", **shape,
                                   sparse_prefill=config(method, alpha, block=args.block, min_len=min_len,
                                                         gqa_lists=args.gqa_lists),
                                   note=f"{method}, alpha {alpha}"))
    del model
    suite = [p.strip() for p in args.suite.split(",") if p.strip()]
    result = evaluate(baseline=args.model, text=args.text, lengths=[args.length], rows=rows, max_windows=1,
                      passkey_lengths=[args.length] if "passkey" in suite else [],
                      passkey_depths_count=args.passkey_depths, passkey_trials=1, backend="runtime",
                      suite=suite, ruler_samples=args.ruler_samples, ruler_lengths=[args.length],
                      ruler_tasks=args.ruler_tasks,
                      ruler_batch=args.ruler_batch, device=args.device, dtype=dtype)
    evaluated = result.to_dict()
    out = dict(environment=environment(), seconds=time.perf_counter() - started,
               settings=dict(model=args.model, text=args.text, length=args.length, block=args.block, min_len=min_len,
                             methods=args.methods, alphas=args.alphas, alphas_eval=args.alphas_eval,
                             gqa_lists=args.gqa_lists, suite=suite, passkey_depths=args.passkey_depths,
                             ruler_samples=args.ruler_samples, ruler_tasks=args.ruler_tasks,
                             ruler_batch=args.ruler_batch, dtype=dtype),
               density_vs_alpha=sweep, comparison=compare(evaluated["rows"], args.length), eval_result=evaluated)
    write_json(args.out / "sparse_prefill_quality.json", out)
    md = to_markdown(out)
    write_atomically(args.out / "sparse_prefill_quality.md", md)
    print(md)
    print(json.dumps(out["comparison"]))


if __name__ == "__main__":
    main()
