"""Selection Cache sweep: TokenSelect's hit rate and its quality cost over the reuse threshold theta.

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/tokenselect_reuse_sweep.py \
        --baseline /work/shared/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --text /work/shared/assets/text/austen_novels.txt --text-lines 1,16237 --lengths 2048 \
        --thetas 0.5,0.7,0.8,0.9,1.0 --against both --out bench/results/tokenselect_reuse_sweep_cpu

For each theta one evaluation (``lighttransfer.evaluation.evaluate``, the exact masked backend or ``--backend runtime``, the same windows
and passkey prompts for every theta) of the ``tokenselect`` row with the given ``k / init / local`` (default
the issue's scaled-down 512 / 16 / 256 for SmolLM2), plus the ``original`` row once. Per theta: the Selection
Cache's hit rate (hits / lookups over every full layer, sequence and query of the perplexity continuation and
the passkey answers), perplexity per length and its change against theta = 1 (no cache: every query rescored)
and against the original model, and passkey accuracy (points). Target of the issue: >= 50 % hits with at most
0.5 point of loss. ``--against`` says what the Selection Cache compares each query with: the selection's
``anchor`` query (the default; row ``tokenselect``), the ``previous`` query (row ``tokenselect-prev``), or
``both``, the two rows side by side in each theta's evaluation (at theta = 1 the cache is off and the rule changes
nothing: one row, the no-cache reference of both). With ``--ruler-tasks`` every evaluation also runs those
RULER-style tasks (``--ruler-samples`` per task and length, at ``--lengths``): their average per point and, as for
passkey, the paired difference against no cache with its 95% interval (the same prompts in every point, so a
fraction of a point becomes judgeable with enough prompts). Writes ``tokenselect_reuse_sweep.json`` and ``.md``
into ``--out``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

# --against: the rules each theta runs, and the row of each (its point's label in the table)
AGAINST = {"anchor": ("anchor",), "previous": ("previous",), "both": ("anchor", "previous")}
ROW_NAMES = {"anchor": "tokenselect", "previous": "tokenselect-prev"}
LABELS = {"anchor": "", "previous": " (previous)"}


def sweep(*, baseline: str, text: str, text_lines, lengths: list[int], thetas: list[float], k: int, init: int,
          local: int, windows: int, passkey_lengths: list[int], passkey_depths: int, passkey_trials: int,
          device: str, dtype: str, backend: str = "masked", against: str = "anchor", on_point=None,
          ruler_tasks: list[str] | None = None, ruler_samples: int = 10, ruler_batch: int = 1) -> dict:
    """The sweep's result (see the module docstring); ``on_point(result)``, when given, receives the result so far
    after every theta (its ``complete`` false until the last), so a run cut short keeps its finished thetas."""
    from lighttransfer.architecture import model_shape
    from lighttransfer.evaluation.eval_suite import evaluate
    from lighttransfer.evaluation.rows import standard_rows
    from lighttransfer.hybrid_format import TokenSelectConfig
    from lighttransfer.loading import load_config, resolve_model_source

    if against not in AGAINST:
        raise ValueError(f"against must be one of {', '.join(AGAINST)}, got {against!r}")
    arch = model_shape(load_config(resolve_model_source(baseline)))

    def rows_at(theta: float, rules: tuple[str, ...], original: bool):
        rows = []
        for rule in rules:
            # nothing streams: the lazy ratios only feed rows this sweep does not build
            names = ["original", "tokenselect"] if original and not rows else ["tokenselect"]
            built = standard_rows(lazy_ratios=[0.0] * arch.num_layers, ratio=0.0, num_kv_heads=arch.num_kv_heads,
                                  sink=4, window=1020, names=names,
                                  selection=TokenSelectConfig(k=k, init=init, local=local, reuse=theta,
                                                              reuse_against=rule))
            rows += [replace(r, name=ROW_NAMES[rule]) if r.name == "tokenselect" else r for r in built]
        return rows

    common = dict(baseline=baseline, text=text, text_lines=text_lines, lengths=lengths, max_windows=windows,
                  passkey_lengths=passkey_lengths, passkey_depths_count=passkey_depths,
                  passkey_trials=passkey_trials, device=device, dtype=dtype, backend=backend)
    if ruler_tasks:
        common.update(suite=("perplexity", "passkey", "ruler"), ruler_tasks=list(ruler_tasks),
                      ruler_samples=ruler_samples, ruler_batch=ruler_batch)
    points, original = [], None

    def result_of(points: list[dict], complete: bool) -> dict:
        fresh = next((p for p in points if p["theta"] >= 1.0), None)
        points = [{**p, "vs_original": _deltas(p, original), "vs_no_cache": _deltas(p, fresh) if fresh else None}
                  for p in points]
        return {"benchmark": "tokenselect_reuse_sweep", "format_version": 1, "baseline": baseline, "text": text,
                "text_lines": list(text_lines) if text_lines else None, "lengths": lengths, "k": k, "init": init,
                "local": local, "windows": windows, "passkey_lengths": passkey_lengths,
                "passkey_depths": passkey_depths, "passkey_trials": passkey_trials,
                "ruler_tasks": list(ruler_tasks or []), "ruler_samples": ruler_samples if ruler_tasks else None,
                "device": device,
                "dtype": dtype, "backend": backend, "against": against, "complete": complete,
                "original": original, "points": points}

    for i, theta in enumerate(sorted(set(thetas), reverse=True)):
        rules = AGAINST[against][:1] if theta >= 1.0 else AGAINST[against]  # no cache: the rule changes nothing
        t0 = time.perf_counter()
        result = evaluate(rows=rows_at(theta, rules, original=i == 0), **common)
        if i == 0:
            original = _summary(result.row("original"))
        seconds = round(time.perf_counter() - t0, 1)  # the evaluation's, shared by its rows
        for rule in rules:
            row = result.row(ROW_NAMES[rule])
            point = {"theta": theta, "against": rule, **_summary(row), "selection_cache": row.get("selection_cache"),
                     "seconds": seconds}
            points.append(point)
            print(f"theta {theta:g}{LABELS[rule]}: hit rate {point['selection_cache']['hit_rate']:.3f}, perplexity "
                  f"{point['perplexity']}, passkey {point['passkey']}", flush=True)
        if on_point is not None:
            on_point(result_of(points, complete=False))
    return result_of(points, complete=True)


def _summary(row: dict) -> dict:
    ppl = {str(n): v["ppl"] for n, v in (row.get("perplexity") or {}).items()}
    passkey = row.get("passkey") or {}
    ruler = row.get("ruler") or {}
    summary = {"perplexity": ppl, "passkey": 100.0 * passkey["accuracy"] if passkey.get("n") else None}
    if ruler:
        summary["ruler"] = ruler["average"]
    # per-prompt outcomes (passkey: pass/fail; RULER: scores in points), for the paired differences
    outcomes = {"passkey": [float(x) for x in passkey.get("outcomes") or []],
                "ruler": [float(x) / 100.0 for x in ruler.get("outcomes") or []]}
    summary["outcomes"] = {name: xs for name, xs in outcomes.items() if xs}
    return summary


def _deltas(point: dict, base: dict | None) -> dict | None:
    from lighttransfer.evaluation.stats import paired_difference

    if base is None:
        return None
    ppl = {n: 100.0 * (v / base["perplexity"][n] - 1.0) for n, v in point["perplexity"].items()
           if n in base["perplexity"]}
    passkey = None if point["passkey"] is None or base["passkey"] is None else point["passkey"] - base["passkey"]
    deltas = {"perplexity_percent": ppl, "passkey_points": passkey}
    if point.get("ruler") is not None and base.get("ruler") is not None:
        deltas["ruler_points"] = point["ruler"] - base["ruler"]
    paired = {}
    for name, xs in (point.get("outcomes") or {}).items():
        ys = (base.get("outcomes") or {}).get(name)
        if ys and len(ys) == len(xs):  # the same prompts in both: a paired difference in points, with its interval
            paired[name] = {"points": [100.0 * x for x in paired_difference(xs, ys)], "n": len(xs)}
    if paired:
        deltas["paired"] = paired
    return deltas


def to_markdown(result: dict) -> str:
    lengths = [str(n) for n in result["lengths"]]
    ruler = bool(result.get("ruler_tasks"))
    against = {"anchor": "", "previous": ", against the previous query",
               "both": ", against the anchor and the previous query"}[result.get("against", "anchor")]
    lines = [f"# Selection Cache sweep (TokenSelect k={result['k']}, init={result['init']}, local={result['local']}"
             f"{against})",
             "", f"`{Path(result['baseline']).name}`, {result['device']} {result['dtype']}, {result['backend']} backend; "
             f"perplexity over {result['windows']} window(s) per length, passkey at {result['passkey_lengths']} "
             f"({result['passkey_depths']} depths x {result['passkey_trials']} trials)."
             + ("" if result.get("complete", True) else " Partial: the thetas finished before the run ended."), "",
             "| theta | hit rate | " + " | ".join(f"ppl {n} (vs no cache, vs original)" for n in lengths)
             + " | passkey (vs no cache, vs original) |" + (" RULER avg (vs no cache, paired 95% CI) |" if ruler else ""),
             "|---|---|" + "---|" * len(lengths) + "---|" + ("---|" if ruler else "")]
    orig = result["original"]
    lines.append("| original | - | " + " | ".join(f"{orig['perplexity'].get(n, float('nan')):.3f}" for n in lengths)
                 + f" | {_fmt(orig['passkey'])} |" + (f" {_fmt(orig.get('ruler'))} |" if ruler else ""))
    for p in result["points"]:
        cells = []
        for n in lengths:
            nc = (p["vs_no_cache"] or {}).get("perplexity_percent", {}).get(n)
            vo = p["vs_original"]["perplexity_percent"].get(n)
            cells.append(f"{p['perplexity'][n]:.3f} ({_pct(nc)}, {_pct(vo)})")
        pk_nc = (p["vs_no_cache"] or {}).get("passkey_points")
        label = LABELS[p.get("against", "anchor")]  # results written before --against: the anchor
        row = (f"| {p['theta']:g}{label} | {100 * p['selection_cache']['hit_rate']:.1f}% | " + " | ".join(cells)
               + f" | {_fmt(p['passkey'])} ({_pts(pk_nc)}, {_pts(p['vs_original']['passkey_points'])}) |")
        if ruler:
            ci = ((p["vs_no_cache"] or {}).get("paired") or {}).get("ruler")
            interval = "" if ci is None else f", {ci['points'][1]:+.1f}..{ci['points'][2]:+.1f}"
            row += f" {_fmt(p.get('ruler'))} ({_pts((p['vs_no_cache'] or {}).get('ruler_points'))}{interval}) |"
        lines.append(row)
    if ruler:
        lines += ["", f"RULER tasks: {', '.join(result['ruler_tasks'])}, {result['ruler_samples']} samples per task "
                      "and length; the interval is the paired difference over the same prompts."]
    return "\n".join(lines) + "\n"


def _fmt(x):
    return "-" if x is None else f"{x:.1f}"


def _pct(x):
    return "-" if x is None else f"{x:+.2f}%"


def _pts(x):
    return "-" if x is None else f"{x:+.1f} pt"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="The model (directory or GGUF file).")
    parser.add_argument("--text", required=True, help="Long real text for perplexity and the passkey haystack.")
    parser.add_argument("--text-lines", default=None, help="Use only these lines of --text, e.g. 1,16237.")
    parser.add_argument("--lengths", default="2048", help="Comma-separated perplexity lengths (tokens).")
    parser.add_argument("--thetas", default="0.5,0.7,0.8,0.9,1.0", help="Comma-separated reuse thresholds.")
    parser.add_argument("--k", type=int, default=512, help="TokenSelect: selected candidates.")
    parser.add_argument("--init", type=int, default=16, help="TokenSelect: initial tokens kept.")
    parser.add_argument("--local", type=int, default=256, help="TokenSelect: recent tokens kept.")
    parser.add_argument("--windows", type=int, default=1, help="Perplexity windows per length.")
    parser.add_argument("--passkey-lengths", default="", help="Comma-separated passkey lengths (none: no passkey).")
    parser.add_argument("--passkey-depths", type=int, default=5, help="Passkey depths.")
    parser.add_argument("--passkey-trials", type=int, default=1, help="Passkey trials per depth and length.")
    parser.add_argument("--device", default="cpu", help="Device (cpu, cuda, auto).")
    parser.add_argument("--dtype", default="float32", help="Model dtype.")
    parser.add_argument("--backend", default="masked", choices=["masked", "runtime"],
                        help="masked: the exact reference (N x N masks, short lengths); runtime: the kernels' path.")
    parser.add_argument("--against", default="anchor", choices=list(AGAINST),
                        help="Selection Cache: compare each query with the selection's anchor query, the previous "
                             "query, or both side by side (rows tokenselect and tokenselect-prev) [default: anchor].")
    parser.add_argument("--ruler-tasks", default="", help="Comma-separated RULER-style tasks to add (none: no RULER).")
    parser.add_argument("--ruler-samples", type=int, default=10, help="RULER samples per task and length.")
    parser.add_argument("--ruler-batch", type=int, default=1, help="RULER prompts per forward.")
    parser.add_argument("--out", required=True, help="Directory for tokenselect_reuse_sweep.json and .md.")
    args = parser.parse_args(argv)

    from lighttransfer.output_files import write_atomically, write_json

    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    lines = tuple(ints(args.text_lines)) if args.text_lines else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        write_json(out / "tokenselect_reuse_sweep.json", result)
        write_atomically(out / "tokenselect_reuse_sweep.md", to_markdown(result))

    result = sweep(baseline=args.baseline, text=args.text, text_lines=lines, lengths=ints(args.lengths),
                   thetas=[float(x) for x in args.thetas.split(",") if x.strip()], k=args.k, init=args.init,
                   local=args.local, windows=args.windows, passkey_lengths=ints(args.passkey_lengths),
                   passkey_depths=args.passkey_depths, passkey_trials=args.passkey_trials, device=args.device,
                   dtype=args.dtype, backend=args.backend, against=args.against, on_point=save,
                   ruler_tasks=[t.strip() for t in args.ruler_tasks.split(",") if t.strip()],
                   ruler_samples=args.ruler_samples, ruler_batch=args.ruler_batch)
    save(result)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
