"""Routed decode attention of one full layer against dense flash-decoding, and the cost of the routing decision.

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/head_routing_kernel_bench.py --out DIR
    PYTHONPATH=... python3 bench/scripts/head_routing_kernel_bench.py --tiny --out DIR   # CPU, Triton interpreter

Shape (default): 32 query / 8 KV heads, D = 128, bf16, a 32768-token cache per sequence (a view of larger storage,
as the runtime's full layer holds it), batch 1 and 16, sink 4 + window 1020. Every part is timed as a CUDA-graph
replay (Triton's ``do_bench_cudagraph``; eagerly too), in the same process, after a correctness check against the
fp32 reference:

* ``dense``: ``kernels.full_decode`` over all N keys (the baseline);
* ``routed@s``: ``kernels.routed_decode`` with a share ``s`` of the (sequence, KV head) pairs routed local
  (``s`` in 0, 0.25, 0.5, 0.75, 1; the local pairs drawn at random, exactly ``round(s * B * Hkv)`` of them);
* ``decision``: one decode step's QAdA decision for the layer: the running moments take the key that left the
  window (``Σk``, ``Σkkᵀ`` in fp32, full covariance; ``decision_diag``: diagonal), the local keys' exact
  log-sum-exp (sink + window rows gathered), the Gaussian bulk mass, ``f̂`` and the GQA routing; reported as a
  share of ``dense`` and of ``routed@0.5``;
* ``oracle``: the exact far share (reads every key; for evaluation only);
* ``fused@s``: the fused QAdA step (``kernels.fused_routed_decode``: pass 1 = the sink + window keys of every pair
  and the decision in each pair's last program, moments update included; pass 2 = the bulk keys of the full-routed
  pairs; the merge), decision included, at the same shares: the pairs of ``routed@s`` are made local by the data
  (their query heads point at their first sink key, so ``f̂`` is ~1e-5 against ~0.97 for the others) and
  ``tau = 0.5``, so the decision itself picks exactly those pairs, replay after replay (each replay folds the same
  leaving key again: the shares stay put); ``overhead`` = ``fused@0 / dense - 1`` (every pair full: the decision's
  whole cost over dense attention), ``fused@0.5 / routed@0.5 - 1`` the same at half the pairs local; the
  three-launch variant (``variant="three-launch"``);
* ``fused1@s``: the same step in one launch and the merge (``variant="one-launch"``: every program decides its pair
  redundantly, then attends its chunk of the bulk), same inputs, same checks, same overheads; the table also names
  the variant the launcher's rule picks at each batch (``kernels.fused_routing.pick_variant``); ``fused1w@s``: the
  one-launch kernel on dense attention's wave plan (``plan_wave_splits``: 16 splits at batch 1, 1 at batch 16)
  instead of the routed plan's 32, i.e. half (batch 1) or 1/32 (batch 16) of the redundant decision work;
* ``fusedo@s``: the overlapped launch (``variant="overlap"``: the bulk programs start beside the deciding ones and
  stop once their pair is decided local) on its own plan (dense attention's wave plan for the bulk); ``fusedor@s``:
  the same on the routed plan; ``fusedb@s``: the balanced variant (``variant="balanced"``: the three-launch pass 1,
  then the full pairs' bulk cut into equal pieces over one program per SM, whatever the share). ``--variants`` picks
  the columns (default ``fused,fusedo,fusedor``), ``--poll`` the
  overlapped kernel's keys between two reads of the decision, ``--fused-moments diag`` the diagonal covariance for
  every fused column.

Triton configs are pinned (``LIGHTTRANSFER_TRITON_AUTOTUNE=0``) unless ``--autotune``. Writes
``head_routing_kernels.json`` and ``.md`` into ``--out``, naming the GPU, driver, torch, Triton and CUDA versions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:  # the interpreter must be on before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "--autotune" not in sys.argv:
    os.environ.setdefault("LIGHTTRANSFER_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
FUSED_TAU = 0.5  # between the made-local pairs' far shares (~1e-5) and the others' (~0.97)
# column prefix -> (fused_routed_decode variant, its split plan: None the variant's own, "wave" dense attention's
# wave plan, "routed" the routed kernel's). fused1w: the one-launch kernel on the wave plan (fewer, longer chunks:
# less redundant decision work, less spreading of the full pairs' work); fusedor: the overlapped launch on the
# routed plan (chunks of ~1024 keys: a local pair's bulk programs stop sooner, more programs and partials)
FUSED_VARIANTS = {"fused": ("three-launch", None), "fused1": ("one-launch", None), "fused1w": ("one-launch", "wave"),
                  "fusedo": ("overlap", None), "fusedor": ("overlap", "routed"), "fusedb": ("balanced", None)}
DEFAULT_VARIANTS = "fused,fusedo,fusedor"




def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def bench_batch(batch: int, *, heads: int, kv_heads: int, head_dim: int, n_keys: int, sink: int, window: int,
                dtype, device: str, graph: bool, rounds: int, tolerance: float, seed: int = 0,
                variants: tuple[str, ...] = tuple(DEFAULT_VARIANTS.split(",")), fused_diagonal: bool = False) -> dict:
    from lighttransfer import kernels
    from lighttransfer.bench.gpu_env import median_us
    from lighttransfer.kernels import head_routing as rule

    cuda = device == "cuda"
    g = torch.Generator(device=device).manual_seed(seed + batch)
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, kv_heads, n_keys + 256, head_dim, device=device, dtype=dtype, generator=g)[:, :, :n_keys]
    v = torch.randn(batch, kv_heads, n_keys + 256, head_dim, device=device, dtype=dtype, generator=g)[:, :, :n_keys]
    start = torch.zeros(batch, dtype=torch.long, device=device)
    pairs = batch * kv_heads

    def flags(share: float) -> torch.Tensor:
        order = torch.randperm(pairs, generator=torch.Generator().manual_seed(seed + int(share * 100)))
        local = torch.zeros(pairs, dtype=torch.bool)
        local[order[:round(share * pairs)]] = True
        return local.view(batch, kv_heads).to(device)

    def routed(local):
        return lambda: kernels.routed_decode(q, k, v, local, sink=sink, window=window)

    moments = {d: rule.KeyMoments.zeros(batch, kv_heads, head_dim, diagonal=d, device=device) for d in (False, True)}
    for m in moments.values():
        rule.move_range(m, k, old=(0, 0), new=(0, n_keys - window - 1), floor=start + sink)
    leaving = n_keys - window - 1  # the key that leaves the window at this step
    floor = start + sink
    index = torch.tensor([leaving], device=device)
    n_t = torch.tensor([n_keys], device=device)  # the key count on the device, as a static step has it (no copy)

    def decision(diagonal: bool):
        m = moments[diagonal]

        def step():
            # the graph replays add the same key again and again: the cost is what matters here, not the sums
            rule.accumulate(m, k[:, :, leaving:leaving + 1], rule.range_weight(index, floor=floor))
            far = rule.predicted_far_share(q, k, m, n_keys=n_t, kv_start=start, sink=sink, window=window)
            return rule.route_local(far, 0.1, kv_heads)
        return step

    def oracle():
        return rule.exact_far_share(q, k, n_keys=n_t, kv_start=start, sink=sink, window=window)

    def fused_inputs(share: float):
        """The query and moments of ``fused@share``: the local pairs' query heads point at their first sink key."""
        local = flags(share)
        group = heads // kv_heads
        aligned = 2.0 * k[:, :, 0:1].to(torch.float32).repeat_interleave(group, dim=1)  # [B, H, 1, D]
        pick = local.repeat_interleave(group, dim=1).view(batch, heads, 1, 1)
        qs = torch.where(pick, aligned, q.float()).to(dtype)
        m = rule.KeyMoments(*(t.clone() for t in (moments[fused_diagonal].count, moments[fused_diagonal].first,
                                                  moments[fused_diagonal].second)))
        return local, qs, m

    wave_splits = routed_splits = None
    if cuda:
        from lighttransfer.kernels.decode_launch import multiprocessors
        from lighttransfer.kernels.decode_triton import plan_wave_splits
        from lighttransfer.kernels.routed_decode_triton import routed_splits as routed_plan

        sms = multiprocessors(torch.cuda.current_device())
        wave_splits = plan_wave_splits(batch, kv_heads, n_keys, sms, align=256)[1]
        routed_splits = routed_plan(batch, kv_heads, n_keys, sms, align=256)
    fused_variants = {name: FUSED_VARIANTS[name] for name in variants}

    def splits_of(name: str):
        return {"wave": wave_splits, "routed": routed_splits, None: None}[fused_variants[name][1]]

    def fused(share: float, variant: str, splits):
        from lighttransfer.kernels.fused_routing_triton import FusedWorkspace

        _, qs, m = fused_inputs(share)
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        ws = FusedWorkspace.zeros(batch, kv_heads, device) if cuda or os.environ.get("TRITON_INTERPRET") else None
        return lambda: kernels.fused_routed_decode(qs, k, v, m, tau=FUSED_TAU, sink=sink, window=window,
                                                   counts=counts, workspace=ws, variant=variant, splits=splits)[0]

    # correctness first (the fp32 reference repeats K/V per query head: checked on two sequences)
    errors = {}
    for share in SHARES:
        local = flags(share)
        want = kernels.routed_decode_reference(q[:2], k[:2], v[:2], local[:2], sink=sink, window=window)
        errors[f"routed@{share:g}"] = _rel_err(routed(local)()[:2], want)
    errors["dense"] = _rel_err(kernels.full_decode(q, k, v)[:2], kernels.full_decode_reference(q[:2], k[:2], v[:2]))
    for name, (variant, _) in fused_variants.items():
        for share in SHARES:
            local, qs, m = fused_inputs(share)
            two = rule.KeyMoments(m.count[:2].clone(), m.first[:2].clone(), m.second[:2].clone())
            o, got = kernels.fused_routed_decode(qs, k, v, m, tau=FUSED_TAU, sink=sink, window=window,
                                                 variant=variant, splits=splits_of(name))
            want_o, want = kernels.fused_routed_decode_reference(qs[:2], k[:2], v[:2], two, tau=FUSED_TAU,
                                                                 sink=sink, window=window)
            if not torch.equal(got.cpu(), local.cpu()) or not torch.equal(want.cpu(), local[:2].cpu()):
                raise RuntimeError(f"B={batch}: the {variant} decision at share {share:g} routed {got.tolist()}, "
                                   f"the reference {want.tolist()}, wanted {local.tolist()}")
            # the moments after the step: the two sequences' fold, as the reference's
            if not torch.equal(m.count[:2].cpu(), two.count.cpu()) or \
                    _rel_err(m.second[:2], two.second) > 1e-5 or _rel_err(m.first[:2], two.first) > 1e-5:
                raise RuntimeError(f"B={batch}: the {variant} step's moments differ from the reference's")
            errors[f"{name}@{share:g}"] = _rel_err(o[:2], want_o)
    bad = {name: e for name, e in errors.items() if not e < tolerance}
    if bad:
        raise RuntimeError(f"B={batch} N={n_keys}: relative error above {tolerance}: {bad}")
    parts = {"dense": lambda: kernels.full_decode(q, k, v)}
    for share in SHARES:
        parts[f"routed@{share:g}"] = routed(flags(share))
    parts["decision"] = decision(False)
    parts["decision_diag"] = decision(True)
    parts["oracle"] = oracle
    for name, (variant, _) in fused_variants.items():
        for share in SHARES:
            parts[f"{name}@{share:g}"] = fused(share, variant, splits_of(name))
    from lighttransfer.kernels.fused_routing import pick_variant

    picked = pick_variant(q, k, sink=sink, window=window, diagonal=False) if cuda else None
    row = {"batch": batch, "n_keys": n_keys, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "sink": sink, "window": window, "errors": errors, "launcher_picks": picked, "wave_splits": wave_splits,
           "routed_splits": routed_splits, "variants": {n: list(v) for n, v in fused_variants.items()},
           "bytes_dense": 2 * batch * kv_heads * n_keys * head_dim * q.element_size()}
    for mode in (["graph", "eager"] if cuda and graph else ["eager"]):
        row[f"us_{mode}"] = {name: median_us(fn, graph=mode == "graph", cuda=cuda, rounds=rounds)
                             for name, fn in parts.items()}
        us = row[f"us_{mode}"]
        row[f"speedup_{mode}"] = {name: us["dense"] / t for name, t in us.items()
                                  if name.startswith(("routed", "fused"))}
        over = row[f"fused_overhead_{mode}"] = {}
        for name in fused_variants:
            key = "" if name == "fused" else f"{name}_"
            over[f"{key}of_dense"] = us[f"{name}@0"] / us["dense"] - 1
            over[f"{key}of_routed@0.5"] = us[f"{name}@0.5"] / us["routed@0.5"] - 1
        row[f"decision_share_{mode}"] = {
            "of_dense": us["decision"] / us["dense"], "of_routed@0.5": us["decision"] / us["routed@0.5"],
            "diag_of_dense": us["decision_diag"] / us["dense"]}
    return row


def markdown(result: dict) -> str:
    from lighttransfer.bench.gpu_env import markdown_table

    env = result["environment"]
    mode = "graph" if "us_graph" in result["rows"][0] else "eager"
    how = "CUDA-graph replays" if mode == "graph" else "eager calls (CPU: the Triton interpreter, not a timing)"
    lines = [f"# Routed decode attention vs dense ({env.get('gpu', env.get('device', 'cpu'))})", "",
             f"{result['shape']}; {how} (us, median); pinned configs: {result['pinned_configs']}; "
             f"torch {env.get('torch')}, Triton {env.get('triton')}, CUDA {env.get('cuda')}.", ""]
    headers = ["batch", "dense", *[f"routed@{s:g}" for s in SHARES], "decision (full cov)", "decision (diag)",
               "decision / dense", "oracle"]
    rows = []
    for r in result["rows"]:
        us = r[f"us_{mode}"]
        rows.append([r["batch"], f"{us['dense']:.1f}",
                     *[f"{us[f'routed@{s:g}']:.1f} ({r[f'speedup_{mode}'][f'routed@{s:g}']:.2f}x)" for s in SHARES],
                     f"{us['decision']:.1f}", f"{us['decision_diag']:.1f}",
                     f"{100 * r[f'decision_share_{mode}']['of_dense']:.1f}%", f"{us['oracle']:.1f}"])
    lines.append(markdown_table(headers, rows))
    waves = ", ".join(f"{r['batch']}: {r.get('wave_splits')}" for r in result["rows"])
    routed = ", ".join(f"{r['batch']}: {r.get('routed_splits')}" for r in result["rows"])
    lines += ["", "Fused QAdA step (decision included; `kernels.fused_routed_decode`): fused = three launches, "
              "fused1 = one launch (and the merge) on the routed split plan, fused1w = one launch on dense "
              f"attention's wave plan (splits per batch: {waves}), fusedo = the overlapped launch (the bulk beside "
              f"the decision) on the wave plan, fusedor = the same on the routed plan ({routed}), fusedb = the "
              "balanced bulk pass (equal pieces of the full pairs' keys over one program per SM):", ""]
    headers = ["batch", "variant", "dense", *[f"@{s:g}" for s in SHARES], "overhead (@0 / dense - 1)",
               "@0.5 / routed@0.5 - 1", "launcher picks"]
    rows = []
    for r in result["rows"]:
        us, over = r[f"us_{mode}"], r[f"fused_overhead_{mode}"]
        for name, (variant, _) in FUSED_VARIANTS.items():
            if f"{name}@0" not in us:
                continue
            key = "" if name == "fused" else f"{name}_"
            rows.append([r["batch"], f"{name} ({variant})", f"{us['dense']:.1f}",
                         *[f"{us[f'{name}@{s:g}']:.1f} ({r[f'speedup_{mode}'][f'{name}@{s:g}']:.2f}x)"
                           for s in SHARES],
                         f"{100 * over[f'{key}of_dense']:+.1f}%", f"{100 * over[f'{key}of_routed@0.5']:+.1f}%",
                         "yes" if r.get("launcher_picks") == variant and FUSED_VARIANTS[name][1] is None else ""])
    lines.append(markdown_table(headers, rows))
    lines += ["", "routed@s: a share s of the (sequence, KV head) pairs attends sink + window, the rest every key; "
              "(Nx): speed-up over dense. decision: one step's QAdA routing of the layer (moments update, local "
              "log-sum-exp, Gaussian bulk mass, f-hat, GQA routing), unfused PyTorch. fused@s: the fused step at share s "
              "(the same local pairs, chosen by the decision itself), decision and moments update included; fused1@s: "
              "the same step in one launch (every program decides its pair itself), on the routed kernel's split plan; "
              "fused1w@s: the same on dense attention's wave plan. launcher picks: what fused_routed_decode runs "
              "by default at that batch (GPU only).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (Triton interpreter)")
    parser.add_argument("--autotune", action="store_true")
    parser.add_argument("--keys", type=int, default=32768)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"fused step columns, of {','.join(FUSED_VARIANTS)} (default {DEFAULT_VARIANTS})")
    parser.add_argument("--fused-moments", choices=["full", "diag"], default="full",
                        help="the fused steps' covariance (default full)")
    parser.add_argument("--poll", type=int, default=None, help="the overlapped kernel's keys between state reads")
    parser.add_argument("--balanced-per-sm", type=int, default=None,
                        help="the balanced bulk pass's programs per SM (fusedb; default 1)")
    parser.add_argument("--routed-waves", type=int, default=None,
                        help="waves of programs the routed split rule asks for (routed_splits; default 8)")
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in FUSED_VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {','.join(FUSED_VARIANTS)}")
    if args.poll is not None:
        from lighttransfer.kernels import fused_routing_overlap_triton

        fused_routing_overlap_triton.POLL_KEYS = args.poll
    if args.balanced_per_sm is not None:
        if args.balanced_per_sm < 1:
            parser.error("--balanced-per-sm must be at least 1")
        from lighttransfer.kernels import fused_routing_balanced_triton

        fused_routing_balanced_triton.PROGRAMS_PER_SM = args.balanced_per_sm
    if args.routed_waves is not None:
        if args.routed_waves < 1:
            parser.error("--routed-waves must be at least 1")
        from lighttransfer.kernels import routed_decode_triton

        routed_decode_triton.ROUTED_WAVES = args.routed_waves
        routed_decode_triton.routed_splits.cache_clear()
    from lighttransfer.bench.gpu_env import environment

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    if args.tiny:
        shape = dict(heads=4, kv_heads=2, head_dim=32, n_keys=600, sink=4, window=100)
        dtype, batches = torch.float32, [1, 2]
    else:
        shape = dict(heads=32, kv_heads=8, head_dim=128, n_keys=args.keys, sink=4, window=1020)
        dtype, batches = torch.bfloat16, [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(), "pinned_configs": os.environ.get("LIGHTTRANSFER_TRITON_AUTOTUNE") == "0",
              "shape": f"{shape['heads']}/{shape['kv_heads']} heads, D={shape['head_dim']}, {dtype}, "
                       f"N={shape['n_keys']}, sink {shape['sink']} + window {shape['window']}",
              "poll_keys": args.poll, "fused_moments": args.fused_moments,
              "balanced_per_sm": args.balanced_per_sm, "routed_waves": args.routed_waves, "rows": []}
    for b in batches:  # written after every batch: a run cut by a time limit keeps the batches it finished
        start = time.perf_counter()
        result["rows"].append(bench_batch(b, **shape, dtype=dtype, device=device, graph=cuda,
                                          rounds=3 if args.tiny else 20,
                                          tolerance=1e-2 if dtype != torch.float32 else 1e-4, variants=variants,
                                          fused_diagonal=args.fused_moments == "diag"))
        (out / "head_routing_kernels.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
        (out / "head_routing_kernels.md").write_text(markdown(result))
        print(f"batch {b}: done in {time.perf_counter() - start:.0f} s (compiles included)", flush=True)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
