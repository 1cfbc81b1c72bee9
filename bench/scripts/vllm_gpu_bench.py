"""vLLM with lighttransfer's plugin on a GPU: greedy tokens against lighttransfer's runtime, and throughput and
KV capacity of a hybrid against the dense model (see vllm_gpu.sh for the runs and the install).

    python3 vllm_gpu_bench.py tokens   --model SMOLLM2.gguf|HYBRID_DIR --out DIR [--dtype float32]
    python3 vllm_gpu_bench.py build-8b --out DIR [--ratio 0.5] [--sink 4] [--window 1020]
    python3 vllm_gpu_bench.py capacity --dense DIR/src --hybrid DIR/hybrid --context 32768 --out DIR
    python3 vllm_gpu_bench.py run-one  --model DIR --context N ...   (one engine; capacity runs it per model)

Every engine takes ``--tensor-parallel-size`` (default 1): on a machine with several GPUs, vLLM's tensor
parallelism, each GPU holding its share of the KV heads (the capacity reported is then per GPU).

Every command writes one JSON file naming the GPU and the versions of vLLM, torch, transformers and Triton.
Prompts are token ids (no tokenizer needed). Throughput: every request of one ``generate`` call has a prompt
of ``context - new_tokens`` random tokens and ``new_tokens`` greedy tokens (``ignore_eos``); the batch is
the concurrency vLLM reports for that context (``kv_cache_max_concurrency``, its KV capacity), capped by
``--max-requests``. ``wall_s`` and the ``*_tokens_per_s`` over it include prefill and decode; at 32k the wall
time is mostly prefill, so ``run-one`` drives the engine step by step (``LLMEngine.add_request`` / ``step``)
and splits the run where every request has its first token: ``prefill_s`` before (chunked prefill, with the
early requests already decoding), ``decode_s`` after, and ``decode_tokens_per_s`` over the tokens made after
(see ``decode_phase``). That decode phase is only the tail of the run (the early requests are done by then), so
with ``--measure-steps N`` the new tokens are planned to leave N steps in which every request decodes after the
last prefill, the run stops after them, and ``full_batch_tokens_per_s`` (batch / the median of those steps) is
the decode throughput of the largest batch (see ``full_batch_phase``, ``plan_new_tokens``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROMPT_SEED = 1234


def environment() -> dict:
    """The GPU and the versions of what runs."""
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("vllm", "transformers", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # a missing package is reported, not fatal
            env[name] = f"unavailable: {type(exc).__name__}"
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    env["cuda"] = torch.version.cuda
    return env


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def random_prompts(count: int, length: int, vocab: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    """``count`` prompts of ``length`` token ids in ``[10, vocab - 10)``, the same for the same seed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, max(11, vocab - 10), (count, length), generator=gen).tolist()


def _vocab(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))


def _greedy_vllm(llm, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# ---------------------------------------------------------------------------------------------------- tokens
def cmd_tokens(args) -> None:
    """A hybrid (a SmolLM2 GGUF converted here, or a hybrid directory such as build-8b's): vLLM vs
    lighttransfer.load + generate, greedy; writes ``OUT/vllm_tokens_<name>.json`` (``--name``; default ``smollm2``
    for a GGUF, else the name of the directory holding the hybrid, e.g. build-8b's ``DIR``)."""
    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = Path(args.out)
    model = Path(args.model)
    if model.suffix == ".gguf":
        from lighttransfer.convert import convert

        hybrid = out / "smollm2-hybrid"
        if not (hybrid / "config.json").exists():
            convert(model, out=hybrid, ratio=args.ratio, sink=args.sink, window=args.window, device=args.device,
                    dtype=args.dtype, force=True)
        model = hybrid
    vocab = _vocab(model)
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
    prompts = [random_prompts(1, n, vocab, seed=PROMPT_SEED + i)[0] for i, n in enumerate(lengths)]

    from lighttransfer.serving.vllm.internals import kv_cache_managers
    from vllm import LLM

    llm = LLM(str(model), skip_tokenizer_init=True, dtype=args.dtype, max_model_len=max(lengths) + args.new_tokens,
              enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, max_num_seqs=len(prompts), block_size=args.block_size,
              tensor_parallel_size=args.tensor_parallel_size)
    start = time.perf_counter()
    got = _greedy_vllm(llm, prompts, args.new_tokens)
    vllm_s = time.perf_counter() - start
    groups = [type(m).__name__ for m in kv_cache_managers(llm)]
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    import lighttransfer

    runtime = lighttransfer.load(model, device=args.device, dtype=getattr(torch, args.dtype))
    runtime.generation_config.eos_token_id = None  # as vLLM's ignore_eos: an EOS is a token like any other
    want = []
    for p in prompts:
        ids = torch.tensor([p], device=args.device)
        with torch.no_grad():
            gen = runtime.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                   do_sample=False, pad_token_id=0)
        want.append(gen[0, len(p):].tolist())
    rows = []
    for p, n, a, b in zip(prompts, lengths, got, want, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        rows.append({"prompt_tokens": n, "new_tokens": args.new_tokens, "equal": a == b,
                     "first_difference": first, "teacher_forced": _teacher_forced(runtime, p, a, args.device),
                     "vllm": a, "runtime": b})
    block = json.loads((model / "config.json").read_text()).get("lighttransfer", {})
    payload = {"what": "greedy tokens, vLLM + lighttransfer plugin vs lighttransfer.load + generate",
               "environment": environment(), "model": str(model), "dtype": args.dtype,
               "sink": block.get("sink"), "window": block.get("window"), "kv_cache_managers": groups,
               "tensor_parallel_size": args.tensor_parallel_size,
               "all_equal": all(r["equal"] for r in rows), "vllm_generate_s": round(vllm_s, 2), "prompts": rows}
    name = args.name or ("smollm2" if Path(args.model).suffix == ".gguf" else model.parent.name or model.name)
    write_json(out / f"vllm_tokens_{name}.json", payload)
    print("all equal:", payload["all_equal"], [(r["prompt_tokens"], r["first_difference"]) for r in rows])
    print("teacher-forced (argmax equal, max gap / own top-2 gap median):",
          [(r["teacher_forced"]["argmax_equal"], r["teacher_forced"]["max_gap"],
            r["teacher_forced"]["own_top2_gap_median"]) for r in rows])


def _teacher_forced(runtime, prompt: list[int], tokens: list[int], device) -> dict:
    """vLLM's greedy ``tokens`` scored by our runtime in one forward over ``prompt + tokens``: at each generated
    position, the gap (in logits) between our best token and vLLM's, next to our own top-2 gap there. Where greedy
    runs part (random weights give near-flat logits), a gap far below the logits' spread means a near-tie decided
    by rounding (the two engines sum in other orders), not a different model."""
    import torch

    ids = torch.tensor([prompt + tokens], device=device)
    with torch.no_grad():
        logits = runtime(ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt) - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
    top2 = logits.topk(2, dim=1).values
    gap = top2[:, 0] - chosen                   # 0 where vLLM's token is our argmax
    own = top2[:, 0] - top2[:, 1]
    spread = logits.std(dim=1)
    missed = gap > 0
    return {"argmax_equal": int((~missed).sum()), "positions": len(tokens),
            "max_gap": float(gap.max()), "max_gap_over_spread": float((gap / spread).max()),
            "own_top2_gap_median": float(own.median()), "logit_spread_median": float(spread.median()),
            "gaps_where_differ": [round(float(g), 6) for g in gap[missed].tolist()]}


# -------------------------------------------------------------------------------------------------- build-8b
def cmd_build_8b(args) -> None:
    """The Llama-3-8B shape with random bf16 weights (``src``) and its hybrid (``hybrid``), on disk."""
    import torch
    from lighttransfer.bench.shaped_model import build_shaped_model
    from lighttransfer.convert import convert

    out = Path(args.out)
    src, hybrid = out / "src", out / "hybrid"
    if not (src / "config.json").exists():
        model = build_shaped_model("llama3-8b-shaped", device=torch.device(args.device), dtype=torch.bfloat16)
        model.config.torch_dtype = "bfloat16"
        model.save_pretrained(src, safe_serialization=True, max_shard_size="5GB")
        del model
        gc.collect()
    num_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    count = round(args.ratio * num_layers)
    # evenly spread over the depth (ratio 0.5 of 32 layers: 1, 3, ..., 31); equal counts group without padding
    layers = sorted({int((i + 0.5) * num_layers / count) for i in range(count)})
    if not (hybrid / "config.json").exists():
        convert(src, out=hybrid, layers=layers, sink=args.sink, window=args.window, force=True)
    write_json(out / "built_8b.json", {"src": str(src), "hybrid": str(hybrid), "streaming_layers": layers,
                                      "sink": args.sink, "window": args.window, "environment": environment()})


# --------------------------------------------------------------------------------------------------- run-one
@dataclass(frozen=True)
class Step:
    """One ``LLMEngine.step()`` of the timed run.

    ``end_s``: seconds from the start of the run (before the first ``add_request``) to the step's return;
    ``seconds``: the step's own duration; ``tokens``: output tokens it produced, all requests together;
    ``started``: requests holding at least one output token after it.
    """

    end_s: float
    seconds: float
    tokens: int
    started: int


def _all_started(steps: list[Step], batch: int) -> int | None:
    """Index of the first step after which every one of the ``batch`` requests has a token, or ``None``."""
    return next((i for i, s in enumerate(steps) if s.started >= batch), None)


def decode_phase(steps: list[Step], batch: int) -> dict:
    """Split a step-by-step run where all ``batch`` requests have their first token.

    The prefill phase runs from the start through the first step after which ``started == batch`` (with chunked
    prefill it also holds the decode steps of the requests whose prompt finished early, and every request's
    first token); the decode phase is every step after it, so a request contributes ``new_tokens - 1`` tokens
    at most. ``decode_s`` is the time from the end of the prefill phase to the end of the last step (what the
    loop spent between steps included, as in ``wall_s``); the median step time is over the decode steps' own
    durations. ``decode_idle_steps`` counts decode steps that produced no token: a request preempted and
    recomputed (its KV did not fit) shows as such steps, and its tokens were then made twice. A run in which some
    request never got a token, or with no step after the split, has no decode rate (``None``).
    """
    split = _all_started(steps, batch)
    if split is None:
        return {"prefill_s": None, "prefill_steps": len(steps), "decode_s": None, "decode_tokens": 0,
                "decode_steps": 0, "decode_idle_steps": 0, "decode_tokens_per_s": None,
                "decode_step_median_ms": None}
    decode = steps[split + 1:]
    prefill_s = steps[split].end_s
    decode_s = steps[-1].end_s - prefill_s
    tokens = sum(s.tokens for s in decode)
    return {"prefill_s": round(prefill_s, 4), "prefill_steps": split + 1, "decode_s": round(decode_s, 4),
            "decode_tokens": tokens, "decode_steps": len(decode), "decode_idle_steps": sum(s.tokens == 0 for s in decode),
            "decode_tokens_per_s": round(tokens / decode_s, 1) if decode and decode_s > 0 else None,
            "decode_step_median_ms": round(1e3 * statistics.median(s.seconds for s in decode), 3) if decode else None}


def full_batch_phase(steps: list[Step], batch: int) -> dict:
    """The steady state of a run: steps after every request has its first token in which each of the ``batch``
    requests made one token (no prefill chunk, nobody finished or preempted), the decode throughput the largest
    batch sustains. ``full_batch_tokens_per_s`` = ``batch`` / the median of those steps' durations.
    """
    split = _all_started(steps, batch)
    full = [s.seconds for s in steps[split + 1:] if s.tokens == batch] if split is not None else []
    median = statistics.median(full) if full else None
    return {"full_batch_steps": len(full),
            "full_batch_step_median_ms": round(1e3 * median, 3) if median else None,
            "full_batch_tokens_per_s": round(batch / median, 1) if median else None}


@dataclass(frozen=True)
class Group:
    """One KV cache group of an engine: ``block_size`` tokens a block; ``window`` None for full attention;
    ``sink`` the first tokens a sink + window group keeps (0 for vLLM's own sliding windows)."""

    block_size: int
    window: int | None = None
    sink: int = 0


def blocks_batch(num_blocks: int, groups: list[Group], context: int, step_tokens: int, prefilling: int = 2) -> int:
    """The most requests of ``context`` tokens the block pool holds in steady decode, without preemption.

    vLLM's reported concurrency charges every request of a windowed group the window plus two steps of
    ``step_tokens`` (the tokens it counts as in flight), what a request holds only while its prompt is chunked in.
    In decode a request holds, per group: full attention ``cdiv(context, block_size)`` blocks; a window group
    ``cdiv(sink, block_size) + cdiv(window + 1, block_size) + 1`` (the window, two decode tokens in flight, one
    block of slack). ``prefilling`` requests at a time hold the chunk reserve on top (with steps much shorter than
    the prompts, one or two), and the pool keeps one null block. All groups draw on one pool.
    """
    def held(g: Group, in_flight: int) -> int:
        if g.window is None:
            return -(-context // g.block_size)
        return -(-g.sink // g.block_size) + -(-(g.window - 1 + in_flight) // g.block_size) + 1

    steady = sum(held(g, 2) for g in groups)
    reserve = prefilling * sum(held(g, 2 * step_tokens) - held(g, 2) for g in groups)
    return max(0, (num_blocks - 1 - reserve) // steady)


def plan_new_tokens(context: int, batch: int, step_tokens: int, measure_steps: int) -> int:
    """New tokens per request so that ``measure_steps`` full-batch steps follow the last prompt's prefill.

    With chunked prefill a step carries every running request's decode token and fills the rest of its
    ``step_tokens`` with prompt chunks, so the ``batch`` prompts take about ``batch * prompt / (step_tokens -
    batch)`` steps, during which the first request already decodes; it must not finish before the measured
    steps are over. Ten per cent and 16 steps of margin; at most half the context.
    """
    if step_tokens <= batch:
        raise ValueError(f"max_num_batched_tokens {step_tokens} leaves no room for prompt chunks at batch {batch}")
    new = measure_steps + 16
    for _ in range(3):  # the prompt shrinks as new grows: a fixed point in a few rounds
        prefill_steps = math.ceil(batch * (context - new) / (step_tokens - batch))
        new = min(context // 2, math.ceil(1.1 * prefill_steps) + measure_steps + 16)
    return new


def count_new_tokens(outputs, counts: dict[str, int], *, cumulative: bool) -> int:
    """Add one step's ``RequestOutput``s to ``counts`` (output tokens per request id); the step's new tokens.

    ``cumulative``: ``outputs[0].token_ids`` holds all of a request's tokens so far (vLLM's default
    ``RequestOutputKind.CUMULATIVE``), else only the step's (``DELTA``).
    """
    new = 0
    for out in outputs:
        n = len(out.outputs[0].token_ids) if out.outputs else 0
        before = counts.get(out.request_id, 0)
        after = n if cumulative else before + n
        counts[out.request_id] = after
        new += after - before
    return new


def _stepwise_params(new_tokens: int):
    """Greedy ``SamplingParams`` asking for each step's tokens only (``DELTA``) where the version has it; with
    whether the outputs will be cumulative."""
    from vllm import SamplingParams

    options = dict(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    try:
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(**options, output_kind=RequestOutputKind.DELTA)
    except (ImportError, AttributeError, TypeError):
        params = SamplingParams(**options)
    kind = getattr(getattr(params, "output_kind", None), "name", "CUMULATIVE")
    if kind == "FINAL_ONLY":
        raise TypeError("SamplingParams gives final outputs only")
    return params, kind != "DELTA"


class StepwiseUnavailable(RuntimeError):
    """The engine cannot be driven step by step as ``run_stepwise`` does (raised before any step ran)."""


def run_stepwise(llm, prompts: list[list[int]], new_tokens: int,
                 measure_steps: int = 0) -> tuple[float, list[Step], dict[str, int]]:
    """All ``prompts`` added to the in-process engine, then ``step()`` until none is unfinished, each step timed;
    with ``measure_steps``, stopped (every request aborted) once that many full-batch steps (see
    :func:`full_batch_phase`) are done.

    Returns the wall time (seconds, from before the first ``add_request``), the steps, and the output tokens per
    request id. Raises ``StepwiseUnavailable`` before any step where the engine has no such API.
    """
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    for name in ("add_request", "step", "has_unfinished_requests"):
        if not callable(getattr(engine, name, None)):
            raise StepwiseUnavailable(f"LLMEngine.{name} is missing")
    try:
        params, cumulative = _stepwise_params(new_tokens)
    except TypeError as exc:
        raise StepwiseUnavailable(str(exc)) from exc
    ids: list[str] = []
    start = time.perf_counter()
    try:
        for i, prompt in enumerate(prompts):
            ids.append(f"bench-{i}")
            engine.add_request(ids[-1], TokensPrompt(prompt_token_ids=prompt), params)
    except (AttributeError, TypeError) as exc:  # another add_request signature
        try:
            engine.abort_request(ids)
        except Exception:  # nothing more to undo; the caller falls back to generate
            pass
        raise StepwiseUnavailable(f"add_request: {type(exc).__name__}: {exc}") from exc
    counts: dict[str, int] = {}
    steps: list[Step] = []
    full = 0  # full-batch steps so far, as full_batch_phase counts them
    while engine.has_unfinished_requests():
        before = time.perf_counter()
        outputs = engine.step()
        after = time.perf_counter()
        new = count_new_tokens(outputs, counts, cumulative=cumulative)
        steps.append(Step(end_s=after - start, seconds=after - before, tokens=new,
                          started=sum(1 for n in counts.values() if n > 0)))
        full += len(steps) > 1 and steps[-2].started >= len(prompts) and new == len(prompts)
        if measure_steps and full >= measure_steps:
            engine.abort_request(ids)
            break
    return time.perf_counter() - start, steps, counts


def cmd_run_one(args) -> None:
    """One engine: its reported KV capacity at ``--context``, then the largest batch, step by step (``generate``
    where the engine has no step API), with its decode phase apart."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = Path(args.model)
    built = time.perf_counter()
    memory = ({"kv_cache_memory_bytes": args.kv_cache_memory_bytes} if args.kv_cache_memory_bytes else
              {"gpu_memory_utilization": args.gpu_memory_utilization})
    llm = LLM(str(model), skip_tokenizer_init=True, dtype=args.dtype, max_model_len=args.context, **memory,
              max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
              enforce_eager=args.enforce_eager, block_size=args.block_size,
              tensor_parallel_size=args.tensor_parallel_size)
    built = time.perf_counter() - built
    cache = llm.llm_engine.vllm_config.cache_config
    concurrency = float(cache.kv_cache_max_concurrency)
    if args.batch_policy == "blocks":
        from lighttransfer.serving.vllm.internals import kv_cache_managers

        groups = [Group(block_size=m.kv_cache_spec.block_size, window=getattr(m.kv_cache_spec, "sliding_window", None),
                        sink=getattr(m.kv_cache_spec, "sink", 0)) for m in kv_cache_managers(llm)]
        fits = blocks_batch(cache.num_gpu_blocks, groups, args.context, args.max_num_batched_tokens)
    else:  # a whole-number concurrency does not quite fit (one block of the pool is vLLM's null block): one
        # request fewer then, or one is preempted and recomputed mid-decode
        groups, fits = [], math.ceil(concurrency) - 1
    batch = max(1, min(args.max_requests, args.max_num_seqs, fits))
    new_tokens = (plan_new_tokens(args.context, batch, args.max_num_batched_tokens, args.measure_steps)
                  if args.measure_steps else args.new_tokens)
    prompt_len = args.context - new_tokens
    prompts = random_prompts(batch, prompt_len, _vocab(model))
    llm.generate([TokensPrompt(prompt_token_ids=p[:512]) for p in prompts[:2]],
                 SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)  # warm-up
    try:
        wall, steps, counts = run_stepwise(llm, prompts, new_tokens, args.measure_steps)
        produced = sum(counts.values())
        phases = {"timing": "stepwise" + (f", stopped after {args.measure_steps} full-batch steps"
                                          if args.measure_steps else ""),
                  **decode_phase(steps, batch), **full_batch_phase(steps, batch),
                  # every step's (output tokens, milliseconds): the run can be read again after the fact
                  "steps": [[st.tokens, round(1e3 * st.seconds, 2)] for st in steps]}
    except StepwiseUnavailable as exc:  # an engine without add_request/step as used here
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        phases = {"timing": f"generate (no decode phase: step-wise driving unavailable: {exc})"}
    result = {"model": str(model), "hybrid": "lighttransfer" in json.loads((model / "config.json").read_text()),
              "context": args.context, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
              "max_num_batched_tokens": args.max_num_batched_tokens, "block_size": args.block_size,
              "enforce_eager": args.enforce_eager, "dtype": args.dtype, **memory,
              "tensor_parallel_size": args.tensor_parallel_size,
              # with tensor parallelism: the blocks of each GPU, every block holding that GPU's share of the KV heads
              "num_gpu_blocks": cache.num_gpu_blocks, "kv_cache_max_concurrency": round(concurrency, 3),
              "batch_policy": args.batch_policy, "kv_cache_groups": [vars(g) for g in groups],
              "batch": batch, "wall_s": round(wall, 3), "engine_start_s": round(built, 1),
              "output_tokens": produced, "output_tokens_per_s": round(produced / wall, 1),
              "total_tokens_per_s": round((produced + batch * prompt_len) / wall, 1), **phases,
              "environment": environment()}
    write_json(Path(args.out), result)


def cmd_capacity(args) -> None:
    """Dense then hybrid, each engine in its own process (all its GPU memory back in between), one JSON."""
    out = Path(args.out)
    rows = {}
    for name, model in (("dense", args.dense), ("hybrid", args.hybrid)):
        part = out / f"vllm_{name}_{args.context}.json"
        cmd = [sys.executable, __file__, "run-one", "--model", model, "--context", str(args.context),
               "--new-tokens", str(args.new_tokens), "--measure-steps", str(args.measure_steps),
               "--batch-policy", args.batch_policy,
               "--max-requests", str(args.max_requests),
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--block-size", str(args.block_size),
               "--dtype", args.dtype, "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes),
               "--tensor-parallel-size", str(args.tensor_parallel_size),
               "--out", str(part)] + (["--enforce-eager"] if args.enforce_eager else [])
        print("+", " ".join(cmd), flush=True)
        code = subprocess.call(cmd, timeout=args.timeout)
        rows[name] = json.loads(part.read_text()) if code == 0 and part.exists() else {"failed": code}
    dense, hybrid = rows["dense"], rows["hybrid"]
    ratio = {}
    if "failed" not in dense and "failed" not in hybrid:
        # the step times (*_ms): below 1 is the hybrid's gain; the others: above 1. full_batch_tokens_per_s is the
        # decode throughput of the largest batch (the target's); the wall-time rates are mostly prefill at 32k
        ratio = {key: round(hybrid[key] / dense[key], 3) for key in
                 ("kv_cache_max_concurrency", "full_batch_tokens_per_s", "full_batch_step_median_ms",
                  "output_tokens_per_s", "total_tokens_per_s", "decode_tokens_per_s", "decode_step_median_ms")
                 if hybrid.get(key) and dense.get(key)}
    payload = {"what": "vLLM hybrid (lighttransfer plugin) vs vLLM dense, one context, the largest batch each",
               "context": args.context, "hybrid_over_dense": ratio, "target": ">= 1.8x (decode) throughput at 32k, ratio 0.5",
               "dense": dense, "hybrid": hybrid, "environment": environment()}
    write_json(out / f"vllm_capacity_{args.context}.json", payload)
    print("hybrid / dense:", ratio)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tokens", help="greedy tokens: vLLM vs lighttransfer's runtime")
    t.add_argument("--model", required=True, help="SmolLM2 .gguf (converted here) or a hybrid directory")
    t.add_argument("--out", required=True)
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--ratio", type=float, default=0.5)
    t.add_argument("--sink", type=int, default=4)
    t.add_argument("--window", type=int, default=128)
    t.add_argument("--prompt-lengths", default="100,700,1500", help="comma-separated prompt lengths (tokens)")
    t.add_argument("--name", default=None, help="names the output file vllm_tokens_NAME.json")
    t.add_argument("--new-tokens", type=int, default=200)
    t.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    t.add_argument("--enforce-eager", action="store_true")
    t.add_argument("--device", default="cuda", help="of lighttransfer's runtime and of the GGUF conversion")
    t.add_argument("--block-size", type=int, default=16)
    t.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vLLM's GPUs (the runtime it is compared with runs on one)")
    b = sub.add_parser("build-8b", help="write the 8B shape (random weights) and its hybrid")
    b.add_argument("--out", required=True)
    b.add_argument("--ratio", type=float, default=0.5)
    b.add_argument("--sink", type=int, default=4)
    b.add_argument("--window", type=int, default=1020)
    b.add_argument("--device", default="cuda")
    for name, helptext in (("run-one", "one engine: KV capacity and throughput"),
                           ("capacity", "dense and hybrid at one context, each in its own process")):
        r = sub.add_parser(name, help=helptext)
        if name == "run-one":
            r.add_argument("--model", required=True)
        else:
            r.add_argument("--dense", required=True)
            r.add_argument("--hybrid", required=True)
            r.add_argument("--timeout", type=int, default=420, help="seconds per engine process")
        r.add_argument("--out", required=True, help="a JSON file (run-one) or a directory (capacity)")
        r.add_argument("--context", type=int, required=True, help="tokens per request, prompt + new")
        r.add_argument("--new-tokens", type=int, default=256)
        r.add_argument("--batch-policy", choices=["reported", "blocks"], default="reported",
                       help="the batch: vLLM's reported concurrency, or the most requests its block pool holds in "
                            "steady decode (blocks_batch)")
        r.add_argument("--measure-steps", type=int, default=0,
                       help="time this many full-batch decode steps after the last prefill, then stop (new tokens "
                            "planned to fit them; 0: run --new-tokens to the end)")
        r.add_argument("--max-requests", type=int, default=512)
        r.add_argument("--max-num-seqs", type=int, default=512)
        r.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="tokens per scheduler step; vLLM sizes the streaming group for window + this")
        r.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        r.add_argument("--block-size", type=int, default=16)
        r.add_argument("--enforce-eager", action="store_true")
        r.add_argument("--dtype", default="bfloat16")
        r.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (vLLM's TP)")
        r.add_argument("--kv-cache-memory-bytes", type=int, default=0,
                       help="a fixed KV cache size instead of --gpu-memory-utilization (both models alike)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    {"tokens": cmd_tokens, "build-8b": cmd_build_8b, "run-one": cmd_run_one, "capacity": cmd_capacity}[
        args.command](args)


if __name__ == "__main__":
    main()
