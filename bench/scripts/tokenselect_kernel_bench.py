"""TokenSelect decode kernels against dense flash-decoding over the same cache (the kernel target).

The one GPU command (about 2-3 minutes on an H200: the TokenSelect CUDA tests, then the benchmark, both logged
into ``$OUT``)::

    LIGHTTRANSFER_TRITON_AUTOTUNE=0 PYTHONPATH=<dir with a lighttransfer link> \
        python3 bench/scripts/tokenselect_kernel_bench.py --run-tests --out $OUT/tokenselect_kernels_h200

    PYTHONPATH=... python3 bench/scripts/tokenselect_kernel_bench.py --tiny --out DIR   # CPU, Triton interpreter

Shape (default): 32 query / 8 KV heads, D = 128, bf16, a 131072-token cache per sequence (a view of larger
storage, as the runtime's full layer holds it), batch 1 and 16; TokenSelect k = 2048, init 128, local 512.
Timed as CUDA-graph replays (every part below is free of host synchronization, so each is captured whole) and
eagerly, every part in the same process, correctness checked first against the fp32 references:

* ``dense``: ``kernels.full_decode`` (GQA split-K flash-decoding) over all N keys: the baseline;
* ``attention``: ``kernels.select_attention`` over the init + k + local listed keys (the target:
  >= 10x faster than ``dense`` at batch 1 and 16);
* ``votes_two_pass``: ``kernels.token_votes`` (the keys read twice, per-KV-head votes) and ``votes``:
  ``kernels.total_votes`` (the keys read once, the votes summed over all heads);
* ``select_old``: the sum over KV heads, ``torch.topk`` (sorted) and the sorted list of ``select_indices``;
  ``select``: ``kernels.fresh_selection`` (unsorted ``torch.topk`` + one launch writing the list);
* ``miss_step_old`` = votes_two_pass + select_old + attention; ``miss_step`` = votes + select + attention (a step
  that rescores); ``runtime_miss_step``: the runtime's ``token_select_attention`` for a step without a usable
  Selection Cache (the same kernels plus the anchor it keeps); ``hit_step`` = the index list from a cached top-k
  + attention (a Selection Cache hit), and the step time averaged at hit rates 0, 50 %, 90 %;
* ``cached_step_hit`` / ``cached_step_miss``: the runtime's decode step with the Selection Cache on (reuse 0.9,
  hits decided on the device, the vote skipped for hits, a list of ``init + k + local + reuse_max_age`` slots),
  at 100 % and 0 % hits. Every replay of ``cached_step_miss`` first sets the anchors to ``-q`` (one copy of
  ``B x H x D`` floats) so that each sequence misses; a hit changes no state. Checked before timing: the same
  selections as the general path (hits decided on the host), outputs within the tolerance of ``hit_step`` and
  ``miss_step``, and the hit counts (B and 0). ``cached_step_hit_unfused`` / ``cached_step_miss_unfused``: the
  same steps with the Selection Cache lookup as separate torch ops (``FUSED_LOOKUP = False``, about fourteen
  launches) instead of ``kernels.selection_lookup``'s one, the baseline of that kernel in the same run;
  ``select_radix``, ``cached_step_hit_radix`` / ``cached_step_miss_radix``: ``select`` and the cached steps with
  the radix-select top-k (``kernels.topk_rows``, which skips the rows that hit) instead of ``torch.topk``
  (``LIGHTTRANSFER_SELECT_TOPK`` picks the runtime's; ``radix`` by default since this comparison, run 3 on an H200).

Bytes per part (floors): dense reads K and V once (``2 * B * Hkv * N * D * 2``); the two-pass votes read the
candidate keys twice, the one-pass votes once plus the float32 scores written and read back; the attention reads
the listed K/V rows and their int32 indices. "share of floor" = the floor time at the copy bandwidth measured in
the same run / the measured time. Triton configs are pinned (the first candidate of each kernel,
``LIGHTTRANSFER_TRITON_AUTOTUNE=0``) unless ``--autotune``. Writes ``tokenselect_kernels.json`` and ``.md`` into
``--out``, naming the GPU, driver, torch, Triton and CUDA versions (and, with ``--run-tests``, ``cuda_tests.log``
and the tests' summary line).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

if "--tiny" in sys.argv:  # the interpreter must be on before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "--autotune" not in sys.argv:
    os.environ.setdefault("LIGHTTRANSFER_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
PARTS = ("dense", "attention", "votes_two_pass", "votes", "select_old", "select", "miss_step_old", "miss_step",
         "runtime_miss_step", "hit_step", "cached_step_hit", "cached_step_miss", "cached_step_hit_unfused",
         "cached_step_miss_unfused", "select_radix", "cached_step_hit_radix", "cached_step_miss_radix")
# the TokenSelect tests that need a GPU (the kernels, and the runtime's CUDA path)
CUDA_TESTS = ("tests/kernels/test_token_select_kernels.py", "tests/test_runtime_token_select.py")




def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    finite = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), finite):
        return float("inf")
    return ((a[finite] - b[finite]).norm() / b[finite].norm().clamp(min=1e-30)).item()


def _attention_fp32(q, k, v, indices):
    """The gather reference's float32 output (its result is cast back to ``q.dtype``): queries in float32, the
    gathered rows cast after the gather."""
    from lighttransfer.kernels import select_attention_reference

    return select_attention_reference(q.float(), k, v, indices)


def _same_keys(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two index lists ``[B, 1, S]`` hold the same keys (any order, ``-1`` slots included)."""
    return torch.equal(a.sort(-1).values, b.sort(-1).values)


def run_cuda_tests(out: Path) -> dict:
    """The TokenSelect CUDA tests (``-m cuda``), logged to ``out/cuda_tests.log``; their summary line."""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           "--confcutdir", "tests", *CUDA_TESTS], cwd=repo, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (out / "cuda_tests.log").write_text(log)
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else ""
    print(f"TokenSelect CUDA tests: {summary}", flush=True)
    return {"returncode": proc.returncode, "summary": summary}


def bench_batch(batch: int, *, n_keys: int, k_select: int, init: int, local: int, dtype, device: str,
                graph: bool, rounds: int, tolerance: float, seed: int = 0) -> dict:
    """Check then time every part at one batch size. On the CPU the runtime's steps run its kernel path too
    (``KERNELS_ON_CPU``, under the interpreter), so the runtime parts check the same wiring as on a GPU."""
    from lighttransfer.runtime import token_select as ts

    before = ts.KERNELS_ON_CPU
    ts.KERNELS_ON_CPU = True
    try:
        return _bench_batch(batch, n_keys=n_keys, k_select=k_select, init=init, local=local, dtype=dtype,
                            device=device, graph=graph, rounds=rounds, tolerance=tolerance, seed=seed)
    finally:
        ts.KERNELS_ON_CPU = before


def _bench_batch(batch: int, *, n_keys: int, k_select: int, init: int, local: int, dtype, device: str,
                 graph: bool, rounds: int, tolerance: float, seed: int = 0) -> dict:
    from lighttransfer import kernels
    from lighttransfer.bench.gpu_env import median_us
    from lighttransfer.hybrid_format import TokenSelectConfig
    from lighttransfer.kernels.token_select_onepass import bytes_read_onepass
    from lighttransfer.kernels.token_select_triton import bytes_read
    from lighttransfer.runtime import token_select as ts
    from lighttransfer.runtime.token_select import SelectionState, SelectionStats, token_select_attention

    cuda = device == "cuda"
    g = torch.Generator(device=device).manual_seed(seed + batch)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype, generator=g)
    # views of the first n_keys tokens of larger storage, as the runtime's FullLayer returns them
    k = torch.randn(batch, KV_HEADS, n_keys + 256, HEAD_DIM, device=device, dtype=dtype, generator=g)[:, :, :n_keys]
    v = torch.randn(batch, KV_HEADS, n_keys + 256, HEAD_DIM, device=device, dtype=dtype, generator=g)[:, :, :n_keys]
    config = TokenSelectConfig(k=k_select, init=init, local=local, reuse=1.0)  # every step rescores
    state = SelectionState()

    def votes_two_pass():
        return kernels.token_votes(q, k, init=init, local=local)

    def votes():
        return kernels.total_votes(q, k, init=init, local=local)

    kv_votes, total = votes_two_pass(), votes()
    picked, indices = kernels.fresh_selection(total, k_select=k_select, init=init, local=local)

    def select_old():
        return kernels.select_indices(kv_votes, k_select=k_select, init=init, local=local)

    def select():
        return kernels.fresh_selection(total, k_select=k_select, init=init, local=local)

    def attention():
        return kernels.select_attention(q, k, v, indices)

    def dense():
        return kernels.full_decode(q, k, v)

    def miss_step_old():
        return kernels.select_attention(q, k, v, kernels.select_indices(votes_two_pass(), k_select=k_select,
                                                                        init=init, local=local))

    def miss_step():
        _, idx = kernels.fresh_selection(votes(), k_select=k_select, init=init, local=local)
        return kernels.select_attention(q, k, v, idx)

    def runtime_miss_step():
        return token_select_attention(q, k, v, config=config, state=state, stats=None, kv_start=None, scale=None)

    def hit_step():
        idx = kernels.assemble_indices(picked.unsqueeze(1), n_keys=n_keys, init=init, local=local)
        return kernels.select_attention(q, k, v, idx)

    # the Selection Cache on: states made by a fresh step with q (so q itself hits: cosine 1, age 0)
    cached = TokenSelectConfig(k=k_select, init=init, local=local, reuse=0.9)
    hit_state, miss_state, ref_state = SelectionState(), SelectionState(), SelectionState()
    hit_stats, miss_stats, ref_stats = SelectionStats(), SelectionStats(), SelectionStats()
    for st in (hit_state, miss_state, ref_state):
        token_select_attention(q, k, v, config=cached, state=st, stats=None, kv_start=None, scale=None)
    away = (-q).transpose(1, 2).reshape(batch, -1).float()  # cosine -1 with q: every sequence misses

    def cached_step_hit():
        return token_select_attention(q, k, v, config=cached, state=hit_state, stats=hit_stats, kv_start=None,
                                      scale=None)

    def cached_step_miss():
        miss_state.anchor.copy_(away)
        return token_select_attention(q, k, v, config=cached, state=miss_state, stats=miss_stats, kv_start=None,
                                      scale=None)

    from lighttransfer.kernels import token_select as kts

    def with_topk(step, topk):
        def run():
            before = kts.TOPK
            kts.TOPK = topk  # read while the step runs, so a graph records that top-k
            try:
                return step()
            finally:
                kts.TOPK = before
        return run

    def unfused(step):
        def run():
            fused = ts.FUSED_LOOKUP
            ts.FUSED_LOOKUP = False  # read while the step runs, so a graph records the separate ops
            try:
                return step()
            finally:
                ts.FUSED_LOOKUP = fused
        return run

    cached_step_hit_unfused, cached_step_miss_unfused = unfused(cached_step_hit), unfused(cached_step_miss)
    select_radix = with_topk(select, "radix")
    cached_step_hit_radix = with_topk(cached_step_hit, "radix")
    cached_step_miss_radix = with_topk(cached_step_miss, "radix")
    hit_out, miss_out = cached_step_hit(), cached_step_miss()
    hit_unfused, miss_unfused = cached_step_hit_unfused(), cached_step_miss_unfused()
    hit_radix, miss_radix = cached_step_hit_radix(), cached_step_miss_radix()
    if not _same_keys(select_radix()[1], select()[1]):
        raise RuntimeError(f"B={batch} N={n_keys}: the radix top-k lists other keys than torch.topk")
    device_steps = ts.DEVICE_STEPS
    ts.DEVICE_STEPS = False  # the general path: the reference semantics, hits decided on the host
    try:
        ref_hit = token_select_attention(q, k, v, config=cached, state=ref_state, stats=ref_stats, kv_start=None,
                                         scale=None)
        ref_hit_picks = ref_state.picked.clone()
        ref_state.anchor.copy_(away)
        token_select_attention(q, k, v, config=cached, state=ref_state, stats=ref_stats, kv_start=None, scale=None)
    finally:
        ts.DEVICE_STEPS = device_steps
    if not (_same_keys(hit_state.picked, picked) and _same_keys(hit_state.picked, ref_hit_picks)
            and _same_keys(miss_state.picked, ref_state.picked) and _same_keys(miss_state.picked, picked)):
        raise RuntimeError(f"B={batch} N={n_keys}: the device step's selections differ from the general path's")
    if (hit_stats.hits, hit_stats.lookups, miss_stats.hits, miss_stats.lookups) != (3 * batch, 3 * batch, 0, 3 * batch) \
            or (ref_stats.hits, ref_stats.lookups) != (batch, 2 * batch):
        raise RuntimeError(f"B={batch} N={n_keys}: Selection Cache counts {hit_stats}, {miss_stats}, {ref_stats}")
    hit_stats.reset()
    miss_stats.reset()

    # correctness first, against the fp32 references
    # (the dense reference repeats K/V per query head in float32: checked on two sequences, not 16 x 128k)
    ref_votes = kernels.token_votes_reference(q, k, init=init, local=local)[:, :, 0]
    errors = {
        "votes_two_pass": _rel_err(kv_votes, ref_votes),
        "votes": _rel_err(total, ref_votes.sum(1)),
        "attention": _rel_err(attention(), kernels.select_attention_reference(q, k, v, indices).float()
                              if dtype == torch.float32 else _attention_fp32(q, k, v, indices)),
        "dense": _rel_err(dense()[:2], kernels.full_decode_reference(q[:2], k[:2], v[:2])),
        "miss_step": _rel_err(miss_step(), miss_step_old()),
        "runtime_miss_step": _rel_err(runtime_miss_step(), miss_step()),
        "cached_step_hit": max(_rel_err(hit_out, hit_step()), _rel_err(hit_out, ref_hit)),
        "cached_step_miss": _rel_err(miss_out, miss_step()),
        "cached_step_hit_unfused": _rel_err(hit_unfused, hit_out),
        "cached_step_miss_unfused": _rel_err(miss_unfused, miss_out),
        "cached_step_hit_radix": _rel_err(hit_radix, hit_out),
        "cached_step_miss_radix": _rel_err(miss_radix, miss_out),
    }
    bad = {name: e for name, e in errors.items() if not e < tolerance}
    if bad:
        raise RuntimeError(f"B={batch} N={n_keys}: relative error above {tolerance}: {bad}")
    if not _same_keys(select()[1], select_old()):
        raise RuntimeError(f"B={batch} N={n_keys}: the one-launch list and the sorted list hold different keys")
    n_sel = indices.shape[-1]
    floors = bytes_read(batch=batch, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype_bytes=q.element_size(),
                        n_keys=n_keys, n_selected=n_sel, init=init, local=local)
    one_pass = bytes_read_onepass(batch=batch, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                  dtype_bytes=q.element_size(), n_keys=n_keys, init=init, local=local)
    parts = {"dense": dense, "attention": attention, "votes_two_pass": votes_two_pass, "votes": votes,
             "select_old": select_old, "select": select, "miss_step_old": miss_step_old, "miss_step": miss_step,
             "runtime_miss_step": runtime_miss_step, "hit_step": hit_step, "cached_step_hit": cached_step_hit,
             "cached_step_miss": cached_step_miss, "cached_step_hit_unfused": cached_step_hit_unfused,
             "cached_step_miss_unfused": cached_step_miss_unfused, "select_radix": select_radix,
             "cached_step_hit_radix": cached_step_hit_radix, "cached_step_miss_radix": cached_step_miss_radix}
    row = {"batch": batch, "n_keys": n_keys, "k": k_select, "init": init, "local": local, "selected": n_sel,
           "errors": errors, "bytes": {"dense": floors["dense"], "attention": floors["attention"],
                                       "votes_two_pass": floors["votes"], "votes": one_pass,
                                       "miss_step_old": floors["votes"] + floors["attention"],
                                       "miss_step": one_pass + floors["attention"],
                                       "hit_step": floors["attention"],
                                       "cached_step_hit": floors["attention"],
                                       "cached_step_miss": one_pass + floors["attention"],
                                       "cached_step_hit_unfused": floors["attention"],
                                       "cached_step_miss_unfused": one_pass + floors["attention"],
                                       "cached_step_hit_radix": floors["attention"],
                                       "cached_step_miss_radix": one_pass + floors["attention"]}}
    for mode in (["graph", "eager"] if cuda and graph else ["eager"]):
        row[f"us_{mode}"] = {name: median_us(fn, graph=mode == "graph", cuda=cuda, rounds=rounds)
                             for name, fn in parts.items()}
    row["graphed_parts"] = list(PARTS) if cuda and graph else []
    row["cached_step_counts"] = {"hit": hit_stats.to_dict(), "miss": miss_stats.to_dict()}  # over the timed calls
    return row


def summarize(row: dict, copy_gbps: float | None) -> None:
    """Ratios to dense, shares of the bandwidth floor, and the step time at a few hit rates, per timing mode."""
    for mode in ("graph", "eager"):
        us = row.get(f"us_{mode}")
        if not us:
            continue
        out = {"dense_over_attention": us["dense"] / us["attention"],
               "dense_over_miss_step": us["dense"] / us["miss_step"],
               "dense_over_miss_step_old": us["dense"] / us["miss_step_old"],
               "dense_over_hit_step": us["dense"] / us["hit_step"]}
        for h in (0.0, 0.5, 0.9):
            step = h * us["hit_step"] + (1 - h) * us["miss_step"]
            out[f"step_us_at_hit_rate_{h:g}"] = step
            out[f"dense_over_step_at_hit_rate_{h:g}"] = us["dense"] / step
            cached_step = h * us["cached_step_hit"] + (1 - h) * us["cached_step_miss"]
            out[f"cached_step_us_at_hit_rate_{h:g}"] = cached_step
            out[f"dense_over_cached_step_at_hit_rate_{h:g}"] = us["dense"] / cached_step
        if copy_gbps:
            for name, nbytes in row["bytes"].items():
                out[f"share_of_floor_{name}"] = (nbytes / copy_gbps / 1e3) / us[name]
        row[f"summary_{mode}"] = out


def to_markdown(result: dict) -> str:
    env, peaks = result["environment"], result.get("peaks") or {}
    lines = [f"# TokenSelect decode kernels vs dense flash-decoding ({result['shape']['dtype']}, "
             f"{HEADS}/{KV_HEADS} heads, D={HEAD_DIM})", "",
             f"{env.get('gpu', 'CPU (Triton interpreter)')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"CUDA {env.get('cuda')}, driver {env.get('driver')}; copy bandwidth "
             f"{peaks.get('hbm_copy_gbps', float('nan')):.0f} GB/s; autotune {result['autotune']}.", ""]
    if result.get("cuda_tests"):
        lines += [f"TokenSelect CUDA tests: {result['cuda_tests']['summary']}", ""]
    for mode in ("graph", "eager"):
        rows = [r for r in result["rows"] if f"us_{mode}" in r]
        if not rows:
            continue
        lines += [f"## {mode} (us per call)", "",
                  "| B | N | listed | dense | attention | votes 2-pass / 1-pass | select old / new | miss step old / "
                  "new / runtime | hit step | cached step 100 / 0 % hits (lookup in torch ops; radix top-k) | "
                  "select, radix top-k | dense / attention | "
                  "dense / step at 0 / 50 / 90 % hits | share of "
                  "floor: dense, attention, votes 2-pass, votes 1-pass |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            us, s = r[f"us_{mode}"], r[f"summary_{mode}"]
            shares = ", ".join(f"{100 * s[f'share_of_floor_{n}']:.0f}%" if f"share_of_floor_{n}" in s else "-"
                               for n in ("dense", "attention", "votes_two_pass", "votes"))
            lines.append(
                f"| {r['batch']} | {r['n_keys']} | {r['selected']} | {us['dense']:.1f} | {us['attention']:.1f} | "
                f"{us['votes_two_pass']:.1f} / {us['votes']:.1f} | {us['select_old']:.1f} / {us['select']:.1f} | "
                f"{us['miss_step_old']:.1f} / {us['miss_step']:.1f} / {us['runtime_miss_step']:.1f} | "
                f"{us['hit_step']:.1f} | {us['cached_step_hit']:.1f} / {us['cached_step_miss']:.1f} "
                f"({us['cached_step_hit_unfused']:.1f} / {us['cached_step_miss_unfused']:.1f}; "
                f"{us['cached_step_hit_radix']:.1f} / {us['cached_step_miss_radix']:.1f}) | {us['select_radix']:.1f} | "
                f"{s['dense_over_attention']:.1f}x | "
                f"{s['dense_over_step_at_hit_rate_0']:.2f} / {s['dense_over_step_at_hit_rate_0.5']:.2f} / "
                f"{s['dense_over_step_at_hit_rate_0.9']:.2f} | {shares} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Directory for tokenselect_kernels.json and .md.")
    parser.add_argument("--context", type=int, default=131072, help="Cached tokens per sequence.")
    parser.add_argument("--batches", default="1,16", help="Comma-separated batch sizes.")
    parser.add_argument("--k", type=int, default=2048, help="TokenSelect: selected candidates.")
    parser.add_argument("--init", type=int, default=128, help="TokenSelect: initial tokens kept.")
    parser.add_argument("--local", type=int, default=512, help="TokenSelect: recent tokens kept.")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU run in the Triton interpreter at a tiny shape (fp32): checks the script end to end.")
    parser.add_argument("--autotune", action="store_true", help="Autotune the kernels instead of pinned configs.")
    parser.add_argument("--no-graph", action="store_true", help="Eager timings only.")
    parser.add_argument("--rounds", type=int, default=2, help="Timed calls per part on the CPU.")
    parser.add_argument("--tolerance", type=float, default=2e-2, help="Largest relative error accepted.")
    parser.add_argument("--run-tests", action="store_true",
                        help="Run the TokenSelect CUDA tests first (logged to cuda_tests.log in --out).")
    args = parser.parse_args(argv)

    from lighttransfer.bench.gpu_env import environment, measure_peaks
    from lighttransfer.kernels.decode_launch import autotune_enabled
    from lighttransfer.output_files import write_atomically, write_json

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        parser.error("no CUDA GPU here: pass --tiny for the CPU check of the script")
    if args.tiny:
        n_keys, k_select, init, local, dtype, device = 240, 32, 8, 24, torch.float32, "cpu"
        batches = [1, 2]
    else:
        n_keys, k_select, init, local, dtype, device = args.context, args.k, args.init, args.local, torch.bfloat16, \
            "cuda"
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tests = run_cuda_tests(out) if args.run_tests and cuda else None
    env = environment()
    peaks = measure_peaks() if cuda else None
    rows = []
    for batch in batches:
        row = bench_batch(batch, n_keys=n_keys, k_select=k_select, init=init, local=local, dtype=dtype,
                          device=device, graph=not args.no_graph, rounds=args.rounds, tolerance=args.tolerance)
        summarize(row, peaks["hbm_copy_gbps"] if peaks else None)
        rows.append(row)
        print(f"B={batch}: " + ", ".join(f"{k} {v:.1f} us" for k, v in (row.get("us_graph") or row["us_eager"]).items()),
              flush=True)
        if cuda:
            torch.cuda.empty_cache()
    result = {"benchmark": "tokenselect_kernels", "format_version": 2, "environment": env, "peaks": peaks,
              "autotune": autotune_enabled(), "tiny": args.tiny, "cuda_tests": tests,
              "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                        "dtype": str(dtype).replace("torch.", ""), "nq": 1},
              "rows": rows}
    write_json(out / "tokenselect_kernels.json", result)
    write_atomically(out / "tokenselect_kernels.md", to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
