"""``benchmark``: prefill latency, decode throughput, peak memory and KV-cache bytes, hybrid vs original.

One process, one set of weights: the original model and each hybrid ratio run on the same loaded model (the
runtime is switched on in place with :func:`lighttransfer.runtime.enable_hybrid`), so the baseline is always
measured beside the hybrid on the same machine.

Per variant and context length:

* batch 1: a timed prefill of ``context`` random tokens (after one untimed warm-up at the same length), then
  ``decode_steps`` timed decode steps;
* the largest batch that fits the memory budget: the batch-1 cache is replicated along the batch (as if each
  sequence had been prefilled on its own, which is how a server fills a batch) and ``decode_steps`` decode
  steps are timed. The batch is estimated from the measured per-sequence KV bytes and confirmed by running it;
  on out-of-memory it shrinks by 10 % until it fits.

Decode throughput is ``batch * steps / seconds``; KV bytes are what the cache holds after the prefill (the
runtime's :meth:`~lighttransfer.runtime.cache.HybridCache.kv_bytes`, or the dense cache's tensors).

With ``cuda_graphs=True`` every runtime variant is measured a second time, on the same cache right after its eager
steps, with the decode step replayed from a CUDA graph (:class:`~lighttransfer.runtime.StaticDecoder`; the cache
is reserved for both runs at the prefill, so neither copies the history); the row says how its steps ran
(``decode_path``). With ``compiled_baseline=True`` the original model runs a second time as the fastest stock
transformers a user has: ``StaticCache`` + ``torch.compile(mode="reduce-overhead")`` (CUDA only; at batch 1 on the
first context and at the original's largest batch at every context, so each compiled shape is one compile).

With ``decode="tokenselect"`` every runtime variant is then decoded with TokenSelect on its full layers, on the same
cache again, at a forced all-miss and all-hit Selection Cache, eagerly and (``cuda_graphs``) graphed
(:mod:`lighttransfer.bench.token_select_rows`: the forced settings, the realised hit counts, the interpolation to
a hit share and the bytes such a step reads). Every row that continues a cache continues its greedy generation
(each row's ``tokens``: sequence 0's), and the cache is reserved at the prefill for all of them.

The physical floor of a decode step is the bytes it must read once: every weight matrix (the input embedding
only as the rows it gathers, which is nothing to speak of) plus the KV cache it holds, over the device's copy
bandwidth measured in the same run (bytes read + written of a large device-to-device copy). Every point reports
``bytes_per_step`` and ``floor_share = floor time / step time``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..architecture import model_shape
from ..compat import cache_keyword, output_cache
from ..environment import environment
from ..errors import LightTransferError
from ..output_files import check_output_target, publish_together, write_json

log = logging.getLogger(__name__)
SCHEMA_VERSION = 2  # 2: TokenSelect rows (decode, select_* fields, token_select, selection_summary)
READ_VERSIONS = (1, 2)
GIB = 1024**3
RUNTIME_DENSE = "runtime, 0 streaming"
ORIGINAL_COMPILED = "original, static cache + compile"
GRAPHED = ", cuda graph"  # suffix of a runtime variant's rows whose decode step is a CUDA-graph replay
FUSED = ", fused ops"  # suffix of a runtime variant run with fused ops (``fused_ops="both"``)
FUSED_OPS_CHOICES = ("auto", "on", "off", "both")
# untimed decode steps first: kernels compile for the new shapes, the allocator settles
WARMUP_STEPS = 3


@dataclass
class SpeedPoint:
    """One measurement: a variant (``original`` or a ratio) at one context length and batch size.

    Times in seconds, throughput in tokens/s, memory in bytes. ``peak_memory`` is the CUDA allocator's peak
    during the decode steps (``None`` on the CPU); ``prefill_peak_memory`` the peak during the batch-1 prefill.
    """

    variant: str
    ratio: float
    streaming_layers: int
    context: int
    batch: int
    decode_tokens_per_s: float
    decode_ms_per_step: float
    kv_bytes: int
    peak_memory: int | None
    prefill_s: float | None = None
    prefill_tokens_per_s: float | None = None
    prefill_peak_memory: int | None = None
    kv_fraction_expected: float | None = None
    largest_batch: bool = False
    bytes_per_step: int | None = None
    floor_share: float | None = None
    decode_path: str | None = None
    fused_ops: bool = False
    # the full layers' decode: "dense" or "tokenselect" (rows of bench/token_select_rows.py)
    decode: str = "dense"
    # TokenSelect rows: the forced Selection Cache setting ("all miss", "all hit", "no cache"), the realised
    # lookups and hits of the timed steps (per full layer and sequence), and the bytes a step reads when every
    # sequence misses / hits (weights included; bytes_per_step is the mix at the realised hit share)
    select_setting: str | None = None
    select_lookups: int | None = None
    select_hits: int | None = None
    select_bytes_miss: int | None = None
    select_bytes_hit: int | None = None
    # sequence 0's greedy tokens of this row (warm-up steps included): the rows of one cache continue one generation
    tokens: list[int] | None = None


@dataclass
class BenchResult:
    """Everything one benchmark measured; saved as JSON with sorted keys."""

    model_id: str
    contexts: list[int]
    ratios: list[float]
    sink: int
    window: int
    decode_steps: int
    memory_budget_bytes: int | None
    dtype: str
    points: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    layer_choice: str = ""
    weight_bytes_per_step: int | None = None
    copy_gbps: float | None = None
    # TokenSelect rows: their settings (TokenSelectConfig.to_fields), the hit shares interpolated, and the summary
    # of bench/token_select_rows.py's selection_summary
    token_select: dict[str, Any] | None = None
    select_hit_shares: list[float] = field(default_factory=list)
    selection_summary: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BenchResult:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LightTransferError(f"cannot read benchmark result '{path}': {exc}") from exc
        if data.get("schema_version") not in READ_VERSIONS:
            raise LightTransferError(f"benchmark result schema_version {data.get('schema_version')} is not one of "
                                     f"{READ_VERSIONS}; rerun bench.")
        data["schema_version"] = SCHEMA_VERSION  # version 1 lacks only the TokenSelect fields, which default
        return cls(**data)

    def point(self, variant: str, context: int, *, largest: bool) -> dict[str, Any] | None:
        for p in self.points:
            if p["variant"] == variant and p["context"] == context and p["largest_batch"] == largest:
                return p
        return None


# ---- small helpers -----------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    # only device memory is measured; a full collection costs ~0.5 s with transformers loaded
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def cache_kv_bytes(cache) -> int:
    """Bytes of keys and values a cache holds (the runtime's cache reports them; a dense one is summed)."""
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@torch.inference_mode()
def _prefill(model, ids: torch.Tensor, reserve: int | None = None):
    """Batch-1 prefill; ``reserve``: tokens per sequence the runtime's cache allocates at once (for the
    static steps of the graphed rows)."""
    kwargs = {}
    if reserve is not None:
        from ..runtime import make_cache

        kwargs[cache_keyword(model)] = make_cache(model, max_tokens=reserve)
    out = model(ids, use_cache=True, logits_to_keep=1, **kwargs)
    return output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)


@dataclass
class DecodeRun:
    """What a row's decode steps did: ``seconds`` of the timed steps, the ``token`` ``[batch, 1]`` to feed next
    (the next row continues the same greedy generation), sequence 0's greedy ``tokens`` (warm-up steps included)
    and how the steps ran (``path``)."""

    seconds: float
    token: torch.Tensor
    tokens: list[int]
    path: str = "eager"


@torch.inference_mode()
def _decode(model, cache, token: torch.Tensor, steps: int, device: torch.device, *,
            before_timing: Callable[[], None] | None = None) -> DecodeRun:
    """``steps`` timed greedy decode steps after :data:`WARMUP_STEPS` untimed ones; ``before_timing`` is called
    between the two (e.g. to zero counters)."""
    key = cache_keyword(model)
    firsts = []  # sequence 0's tokens as device views: reading them in the loop would synchronize every step
    for _ in range(WARMUP_STEPS):
        out = model(token, use_cache=True, **{key: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        firsts.append(token[:1, 0])
    if before_timing is not None:
        before_timing()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(token, use_cache=True, **{key: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        firsts.append(token[:1, 0])
    _sync(device)
    seconds = time.perf_counter() - t0
    return DecodeRun(seconds, token, torch.cat(firsts).tolist())


@torch.inference_mode()
def _decode_graphed(model, cache, token: torch.Tensor, steps: int, device: torch.device, *,
                    before_timing: Callable[[], None] | None = None) -> DecodeRun:
    """:func:`_decode` with static decode steps: :data:`WARMUP_STEPS` untimed ones (an eager warm-up, the capture,
    a replay), then ``steps`` timed replays; eager static steps where no graph can be captured."""
    from ..runtime import StaticDecoder

    decoder = StaticDecoder(model, cache, tokens=cache.get_seq_length() + WARMUP_STEPS + steps + 1)
    firsts = []
    try:
        for _ in range(WARMUP_STEPS):
            token = decoder(token).argmax(-1, keepdim=True)
            firsts.append(token[:1, 0])
        if before_timing is not None:
            before_timing()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            token = decoder(token).argmax(-1, keepdim=True)
            firsts.append(token[:1, 0])
        _sync(device)
        seconds = time.perf_counter() - t0
        return DecodeRun(seconds, token, torch.cat(firsts).tolist(), decoder.path)
    finally:
        decoder.close()


def graphed_reserve(context: int, steps: int, rows: int = 2) -> int:
    """Tokens per sequence a cache reserves at its prefill for ``rows`` rows that continue it (each
    :data:`WARMUP_STEPS` + ``steps`` tokens, and one token of room for a static step past the last)."""
    return context + rows * (WARMUP_STEPS + steps) + 2


# how the compiled original is compiled: Inductor's code + CUDA graphs (what transformers documents), or the
# graph capture alone (TorchDynamo's "cudagraphs" backend: no generated kernels, a compile of seconds, not minutes)
COMPILED_BACKENDS = {
    "inductor": dict(mode="reduce-overhead"),
    "cudagraphs": dict(backend="cudagraphs"),
}


# tries of the compiled original at its largest batch, each 15% smaller than the last, after running out of memory
COMPILED_BATCH_TRIES = 3


def _compiled_model(model, backend: str = "inductor"):
    """``torch.compile(model, fullgraph=True, **COMPILED_BACKENDS[backend])``, compiled afresh: each compiled row is
    a new shape (a recompile anyway), and dropping the previous compilation frees its CUDA graphs and whatever
    they keep of the previous row's cache."""
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, dynamic=False, **COMPILED_BACKENDS[backend])


@torch.no_grad()
def _compiled_point(model, ids: torch.Tensor, *, batch: int, steps: int, device: torch.device,
                    largest: bool, backend: str = "inductor") -> SpeedPoint:
    """Stock transformers at its fastest: ``StaticCache`` reserved for the run, eager prefill at batch 1 (the cache
    replicated to ``batch``, as for the other rows), then compiled decode steps replayed as CUDA graphs."""
    from transformers import StaticCache

    key = cache_keyword(model)
    context = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=context + WARMUP_STEPS + steps + 1)
    out = model(ids, use_cache=True, logits_to_keep=1, **{key: cache})
    token = out.logits[:, -1].argmax(-1, keepdim=True).repeat_interleave(batch, dim=0)
    del out
    if batch > 1:
        for layer in cache.layers:
            layer.keys = layer.keys.repeat_interleave(batch, dim=0)
            layer.values = layer.values.repeat_interleave(batch, dim=0)
            # fixed addresses, or the cudagraphs would copy the cache into their own buffers
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)
    kv = cache_kv_bytes(cache)
    step = _compiled_model(model, backend)
    pos = torch.full((batch, 1), context, dtype=torch.long, device=device)
    _free(device)
    _reset_peak(device)

    def one(token, pos):
        torch.compiler.cudagraph_mark_step_begin()
        out = step(input_ids=token, position_ids=pos, use_cache=True, **{key: cache})
        return out.logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(WARMUP_STEPS):  # compile, record, replay
        token, pos = one(token, pos), pos + 1
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        token, pos = one(token, pos), pos + 1
    _sync(device)
    seconds = time.perf_counter() - t0
    return SpeedPoint(variant=ORIGINAL_COMPILED, ratio=0.0, streaming_layers=0, context=context, batch=batch,
                      decode_tokens_per_s=batch * steps / seconds, decode_ms_per_step=1000 * seconds / steps,
                      kv_bytes=kv, peak_memory=_peak(device), kv_fraction_expected=1.0, largest_batch=largest,
                      decode_path="torch.compile " + ("reduce-overhead (Inductor + CUDA graphs)" if backend == "inductor"
                                                      else "backend=cudagraphs (CUDA graphs, no Inductor)"))


def _layers_for(ratio: float, *, num_layers: int, lazy_ratios: Sequence[float] | None) -> list[int]:
    if ratio <= 0:
        return []
    if lazy_ratios is not None:
        from ..convert.plan import pick_layers

        return pick_layers(lazy_ratios, ratio=ratio)
    # without a report the choice does not change speed: spread the layers evenly
    k = round(ratio * num_layers)
    return sorted({int(i * num_layers / k) for i in range(k)})


# ---- the benchmark ------------------------------------------------------------------------------------------

def benchmark(
    *,
    baseline: str,
    hybrid: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    contexts: Sequence[int] = (4096, 16384, 32768),
    memory_budget_gb: float | None = None,
    decode_steps: int = 32,
    max_batch: int = 512,
    largest_batch: bool = True,
    sink: int | None = None,
    window: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    cuda_graphs: bool = False,
    compiled_baseline: bool = False,
    compiled_backend: str = "inductor",
    fused_ops: str = "auto",
    original: bool = True,
    decode: str = "dense",
    select_k: int | None = None,
    select_init: int | None = None,
    select_local: int | None = None,
    select_reuse: float | None = None,
    select_reuse_max_age: int | None = None,
    select_reuse_against: str | None = None,
    select_hit_share: float | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Prefill/decode speed and memory of the original model and of hybrids at several ratios, in one process.

    Args:
        baseline: the original model (directory, GGUF, hub id) or a shape name such as ``llama3-8b-shaped``
            (random bf16 weights; speed does not depend on weight values).
        hybrid: a converted checkpoint; its ratio is added to ``ratios`` and its sink/window are the defaults.
        report: an analysis report whose layer ranking picks the layers at each ratio (else the hybrid's summary;
            else evenly spaced layers, which time the same).
        ratios: shares of layers that stream; the runtime with none streaming always runs.
        contexts: prompt lengths in tokens.
        memory_budget_gb: memory the largest batch may use (default: the whole device).
        decode_steps: timed decode steps per measurement.
        max_batch: upper bound of the batch search.
        largest_batch: also measure the largest batch that fits (else batch 1 only).
        sink, window: streaming parameters (default: the hybrid's, else 4 and 1020).
        cuda_graphs: also measure every runtime variant with its decode step replayed from a CUDA graph.
        compiled_baseline: also measure the original with ``StaticCache`` + ``torch.compile`` (CUDA only).
        compiled_backend: ``inductor`` (``mode="reduce-overhead"``) or ``cudagraphs`` (capture only, compiles in
            seconds); see :data:`COMPILED_BACKENDS`.
        fused_ops: the runtime variants' fused ops (:mod:`lighttransfer.runtime.fused_ops`): ``auto`` (on for
            CUDA, as ``lighttransfer.load``), ``on``, ``off``, or ``both`` (each runtime variant twice, the fused
            rows named ``... , fused ops``, for an A/B in one process).
        original: measure the model as stock transformers runs it (``False``: only the runtime's rows; the
            ``x original`` columns stay empty).
        decode: ``dense`` (the full layers read every cached key), or ``tokenselect``: every runtime variant also
            decodes with TokenSelect on its full layers (``<variant> + tokenselect (all miss | all hit)`` rows, eager
            and, with ``cuda_graphs``, graphed; :mod:`lighttransfer.bench.token_select_rows`), on the same cache.
        select_k, select_init, select_local, select_reuse, select_reuse_max_age, select_reuse_against: TokenSelect's
            settings (default: the hybrid's block, else 2048, 128, 512, 0.9, 64, ``anchor``); ``select_reuse = 1``:
            one ``no cache`` row instead.
        select_hit_share: a Selection Cache hit share to interpolate at, besides 0, 50 % and 90 %.
        out: ``.json`` path (a markdown table is written beside it) or a directory.
        progress: called with a line per finished measurement.
    """
    from ..hybrid_format import HybridConfig
    from ..loading import load_config, load_model, resolve_device, resolve_dtype, resolve_model_source
    from ..runtime import disable_hybrid, enable_hybrid, resolve_layout
    from .shaped_model import build_shaped_model, is_shaped_spec

    check_output_target(out, "--out")  # before the work: a read-only or mistyped path costs nothing
    contexts = sorted({int(c) for c in contexts})
    if not contexts or min(contexts) < 2:
        raise LightTransferError(f"--context needs lengths of at least 2 tokens, got {list(contexts)}.")
    bad = [r for r in ratios if not 0.0 < float(r) <= 1.0]
    if bad:
        raise LightTransferError(f"--ratios must be in (0, 1], got {bad}.")
    if decode_steps < 1:
        raise LightTransferError(f"--decode-steps must be at least 1, got {decode_steps}.")
    if compiled_backend not in COMPILED_BACKENDS:
        raise LightTransferError(f"compiled backend must be one of {sorted(COMPILED_BACKENDS)}, got "
                                 f"{compiled_backend!r}.")
    if compiled_baseline and not original:
        raise LightTransferError("--compiled-baseline runs at the original's largest batches; drop --no-original.")
    if compiled_baseline and resolve_device(device).type != "cuda":
        raise LightTransferError("--compiled-baseline needs a CUDA device (torch.compile reduce-overhead).")
    if fused_ops not in FUSED_OPS_CHOICES:
        raise LightTransferError(f"fused ops must be one of {', '.join(FUSED_OPS_CHOICES)}, got {fused_ops!r}.")
    if memory_budget_gb is not None and memory_budget_gb <= 0:
        raise LightTransferError(f"--memory-budget must be a positive number of GB, got {memory_budget_gb}.")
    select_options = dict(select_k=select_k, select_init=select_init, select_local=select_local,
                          select_reuse=select_reuse, select_reuse_max_age=select_reuse_max_age,
                          select_reuse_against=select_reuse_against)
    # the options' own checks first, before loading
    selection = _selection(decode, select_options, select_hit_share, hybrid_selection=None)

    hcfg = None
    if hybrid is not None:
        hcfg = HybridConfig.from_model_config(load_config(resolve_model_source(hybrid)).to_dict())
        if hcfg is None:
            raise LightTransferError(f"'{hybrid}' has no lighttransfer block in its config.json; convert it first.")
        if selection is not None and hcfg.selection is not None:  # the hybrid's settings, the options' on top
            selection = _selection(decode, select_options, select_hit_share, hybrid_selection=hcfg.selection)
    n_settings = 0
    if selection is not None:
        from .token_select_rows import settings as select_settings

        n_settings = len(select_settings(selection))
    sink = sink if sink is not None else (hcfg.sink if hcfg else 4)
    window = window if window is not None else (hcfg.window if hcfg else 1020)
    ratio_list = sorted({float(r) for r in ratios} | ({len(hcfg.streaming_layers) / hcfg.num_layers} if hcfg else set()))

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if is_shaped_spec(baseline):
        model = build_shaped_model(baseline, device=dev, dtype=torch_dtype, seed=seed)
        model_id = str(baseline)
    else:
        loaded = load_model(baseline, device=str(dev), dtype=str(torch_dtype).replace("torch.", ""),
                            with_tokenizer=False)
        model, model_id = loaded.model, loaded.model_id
    config = model.config
    shape = model_shape(config, source=f"'{baseline}'")
    num_layers, max_pos = shape.num_layers, shape.max_positions
    decoded = graphed_reserve(0, decode_steps, rows=rows_per_cache(cuda_graphs, n_settings) * 2)
    if max_pos and max(contexts) + decoded > max_pos:
        raise LightTransferError(f"context {max(contexts)} (+ {decoded} decoded tokens) exceeds the model's {max_pos} "
                                 "positions.")

    lazy = None
    layer_choice = "evenly spaced (layer choice does not change speed)"
    if report is not None:
        from ..analysis import AnalysisReport

        lazy = AnalysisReport.load(report).layer_lazy_ratios()
        layer_choice = f"laziest layers of {Path(report).name}"
    elif hcfg is not None and "layer_lazy_ratios" in (hcfg.report_summary or {}):
        lazy = hcfg.report_summary["layer_lazy_ratios"]
        layer_choice = "laziest layers of the hybrid's report summary"
    if lazy is not None and len(lazy) != num_layers:
        raise LightTransferError(f"the report ranks {len(lazy)} layers but the model has {num_layers}.")

    budget = None
    if memory_budget_gb is not None:
        budget = int(memory_budget_gb * 1e9)
    elif dev.type == "cuda":
        budget = int(torch.cuda.get_device_properties(dev).total_memory)

    result = BenchResult(model_id=model_id, contexts=contexts, ratios=ratio_list, sink=sink, window=window,
                         decode_steps=decode_steps, memory_budget_bytes=budget,
                         dtype=str(torch_dtype).replace("torch.", ""), environment=environment(dev),
                         layer_choice=layer_choice)
    if selection is not None:
        from .token_select_rows import DEFAULT_HIT_SHARES

        result.token_select = selection.to_fields()
        result.select_hit_shares = sorted(set(DEFAULT_HIT_SHARES) | (
            {float(select_hit_share)} if select_hit_share is not None else set()))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result.weight_bytes_per_step = weights_read_per_step(model)
    if dev.type == "cuda":
        from .gpu_env import measure_peaks

        result.copy_gbps = round(measure_peaks(copy_gib=4.0)["hbm_copy_gbps"], 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # "original" is the model as transformers runs it; "runtime, 0 streaming" is the same dense model through
    # the hybrid runtime's code path with no layer streaming, which separates the gain of streaming from any
    # difference between the two code paths
    runtime_variants = [(RUNTIME_DENSE, 0.0, [])] + [
        (f"ratio {r:g}", r, _layers_for(r, num_layers=num_layers, lazy_ratios=lazy)) for r in ratio_list]
    fused_modes = {"on": (True,), "off": (False,), "both": (False, True), "auto": (dev.type == "cuda",)}[fused_ops]
    # (name, ratio, streaming layers, through the runtime, fused ops)
    variants = [("original", 0.0, [], False, False)] * bool(original) + [
        (name + (FUSED if fused and fused_ops == "both" else ""), ratio, layers, True, fused)
        for name, ratio, layers in runtime_variants for fused in fused_modes]

    def checkpoint() -> None:  # after each variant: a run cut short keeps what it measured
        _summarize(result)
        if out is not None:
            write_bench_outputs(result, out)

    state = {"fused": False}  # the fused ops of the variant being measured

    def record(point: SpeedPoint) -> None:
        point.fused_ops = state["fused"]
        with_floor(point, weight_bytes=result.weight_bytes_per_step, copy_gbps=result.copy_gbps)
        result.points.append(asdict(point))
        if progress:
            progress(_describe(point))

    for name, ratio, layers, through_runtime, fused in variants:
        disable_hybrid(model)
        expected = resolve_layout(config, streaming_layers=layers, sink=sink, window=window, prefill="streaming")
        if through_runtime:
            enable_hybrid(model, expected, fused_ops=fused)
        state["fused"] = fused
        graphed = cuda_graphs and through_runtime
        selecting = selection is not None and through_runtime
        for context in contexts:
            ids = torch.randint(0, config.vocab_size, (1, context), generator=gen).to(dev)
            # every row at batch 1 and at the largest batch continues the same cache: reserve for all of them
            reserve = graphed_reserve(context, decode_steps, rows=rows_per_cache(graphed, n_settings if selecting else 0)
                                      * (2 if largest_batch else 1)) if graphed or selecting else None
            _free(dev)
            _prefill(model, ids, reserve)  # warm-up: kernels compile and autotune at this shape
            _free(dev)
            _reset_peak(dev)
            _sync(dev)
            t0 = time.perf_counter()
            cache, token = _prefill(model, ids, reserve)
            _sync(dev)
            prefill_s = time.perf_counter() - t0
            prefill_peak = _peak(dev)
            kv1 = cache_kv_bytes(cache)
            _reset_peak(dev)
            run = _decode(model, cache, token, decode_steps, dev)
            seconds = run.seconds
            point = SpeedPoint(variant=name, ratio=ratio, streaming_layers=len(layers), context=context, batch=1,
                               decode_tokens_per_s=decode_steps / seconds,
                               decode_ms_per_step=1000 * seconds / decode_steps, kv_bytes=kv1,
                               peak_memory=_peak(dev), prefill_s=prefill_s, prefill_tokens_per_s=context / prefill_s,
                               prefill_peak_memory=prefill_peak, kv_fraction_expected=expected.kv_fraction(context),
                               decode_path="eager", tokens=run.tokens)
            record(point)
            token = _continue_rows(record, model, cache, run.token, point, graphed=graphed,
                                   selection=selection if selecting else None, steps=decode_steps, device=dev,
                                   weights=result.weight_bytes_per_step)
            holder = [(cache, token)]
            del cache, token
            if largest_batch:
                big = _largest_batch_point(model, ids, holder, point, weights=weights, budget=budget,
                                           max_batch=max_batch, steps=decode_steps, device=dev, reserve=reserve)
                if big is not None:
                    record(big[0])
                    _continue_rows(record, model, big[1], big[2], big[0], graphed=graphed,
                                   selection=selection if selecting else None, steps=decode_steps, device=dev,
                                   weights=result.weight_bytes_per_step)
                    big = None
            holder.clear()
            _free(dev)
        checkpoint()
    disable_hybrid(model)
    state["fused"] = False
    if compiled_baseline:  # last: its compiles take the longest, and it needs the original's largest batches
        _compiled_rows(model, config, contexts, result, record, gen=gen, steps=decode_steps, device=dev,
                       largest_batch=largest_batch, checkpoint=checkpoint, backend=compiled_backend)
    _summarize(result)
    if out is not None:
        write_bench_outputs(result, out)
    return result


def _selection(decode: str, given: dict, hit_share: float | None, *, hybrid_selection):
    """The TokenSelect config of the rows (``None`` for ``decode="dense"``), or a one-line error naming the option."""
    from ..hybrid_format import token_select_config

    if decode not in ("dense", "tokenselect"):
        raise LightTransferError(f"--decode must be 'dense' or 'tokenselect', got {decode!r}.")
    flags = {key: f"--{key.replace('_', '-')}" for key in given}
    if decode == "dense":
        extra = [flags[key] for key, value in given.items() if value is not None]
        if hit_share is not None:
            extra.append("--select-hit-share")
        if extra:
            raise LightTransferError(f"{extra[0]} sets the TokenSelect rows; add --decode tokenselect, or drop it.")
        return None
    config = token_select_config("tokenselect", **given, base=hybrid_selection, option="--decode")
    if hit_share is not None:
        if isinstance(hit_share, bool) or not 0.0 <= float(hit_share) <= 1.0:
            raise LightTransferError(f"--select-hit-share must be a share of hits in [0, 1], got {hit_share!r}.")
        if not config.cache_enabled:
            raise LightTransferError("--select-hit-share needs the Selection Cache; --select-reuse 1 turns it off.")
    return config


def _summarize(result: BenchResult) -> None:
    """The TokenSelect summary of the points so far (nothing without TokenSelect rows)."""
    if result.token_select is None:
        return
    from .token_select_rows import selection_summary

    result.selection_summary = selection_summary(result.points, shares=result.select_hit_shares,
                                                 copy_gbps=result.copy_gbps)


def rows_per_cache(graphed: bool, select_settings: int = 0) -> int:
    """Rows that decode one cache at one batch: the eager row, its graphed twin, and as many again per TokenSelect
    setting (all miss and all hit, or no cache)."""
    return (1 + graphed) * (1 + select_settings)


def _continued_point(eager: SpeedPoint, variant: str, run: DecodeRun, batch: int, *, cache,
                     device: torch.device) -> SpeedPoint:
    """A row that continued ``eager``'s cache (the same variant, context and batch) under the name ``variant``."""
    steps = len(run.tokens) - WARMUP_STEPS
    return SpeedPoint(variant=variant, ratio=eager.ratio, streaming_layers=eager.streaming_layers,
                      context=eager.context, batch=batch, decode_tokens_per_s=batch * steps / run.seconds,
                      decode_ms_per_step=1000 * run.seconds / steps, kv_bytes=cache_kv_bytes(cache),
                      peak_memory=_peak(device), kv_fraction_expected=eager.kv_fraction_expected,
                      largest_batch=eager.largest_batch, decode_path=run.path, tokens=run.tokens)


def _continue_rows(record, model, cache, token, eager: SpeedPoint, *, graphed: bool, selection, steps: int,
                   device: torch.device, weights: int | None) -> torch.Tensor:
    """After ``eager``'s row, on its cache: the graphed twin (``graphed``), then the TokenSelect rows
    (``selection``: a TokenSelectConfig, see :mod:`.token_select_rows`); returns the token to feed next."""
    if graphed:
        token = _record_graphed(record, model, cache, token, eager, steps=steps, device=device)
    if selection is not None:
        from . import token_select_rows

        def make_point(dense, variant, run, batch):
            return _continued_point(dense, variant, run, batch, cache=cache, device=device)

        def decode(*args, **kwargs):
            _free(device)
            _reset_peak(device)
            return _decode(*args, **kwargs)

        def decode_graphed(*args, **kwargs):
            _free(device)
            _reset_peak(device)
            return _decode_graphed(*args, **kwargs)

        token = token_select_rows.measure_rows(
            model, cache, token, eager, config=selection, graphed=graphed, graphed_suffix=GRAPHED, steps=steps,
            device=device, weights=weights, record=record, decode=decode, decode_graphed=decode_graphed,
            make_point=make_point)
    return token


def _record_graphed(record, model, cache, token, eager: SpeedPoint, *, steps: int, device) -> torch.Tensor:
    """The graphed row beside ``eager``: the same cache, continued with static steps replayed from a CUDA graph;
    returns the token to feed next."""
    try:
        _free(device)
        _reset_peak(device)
        run = _decode_graphed(model, cache, token, steps, device)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is expected here
        if not _is_oom(exc):
            raise
        log.warning("%s%s at %d x%d: out of memory", eager.variant, GRAPHED, eager.context, eager.batch)
        _free(device)
        return token
    record(_continued_point(eager, eager.variant + GRAPHED, run, eager.batch, cache=cache, device=device))
    return run.token


def _compiled_rows(model, config, contexts, result: BenchResult, record, *, gen, steps: int, device,
                   largest_batch: bool, checkpoint: Callable[[], None], backend: str = "inductor") -> None:
    """The compiled original at the original's largest batch at every context, then at batch 1 on the first (a
    failure, e.g. a compile error, is logged and leaves the row out); ``checkpoint`` after each row."""
    # the largest batches first (the throughput comparison), then batch 1 on the first context
    todo = [(context, result.point("original", context, largest=True)) for context in contexts]
    todo = [(context, big["batch"], True) for context, big in todo if largest_batch and big is not None]
    todo.append((contexts[0], 1, False))
    for context, batch, largest in todo:
        ids = torch.randint(0, config.vocab_size, (1, context), generator=gen).to(device)
        # the compiled step needs more memory than the eager one (CUDA-graph pools, functionalized copies), so at
        # the original's largest batch it may not fit: its own largest batch is found by shrinking, as for the
        # eager rows (each try compiles anew)
        for _ in range(COMPILED_BATCH_TRIES if largest else 1):
            _free(device)
            try:
                record(_compiled_point(model, ids, batch=batch, steps=steps, device=device, largest=largest,
                                       backend=backend))
                break
            except Exception as exc:  # noqa: BLE001 - the baseline is best effort; the others still run
                log.warning("%s at %d x%d failed: %s", ORIGINAL_COMPILED, context, batch,
                            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
                if not _is_oom(exc) or batch == 1:
                    break
                batch = max(1, int(batch * 0.85))
        _free(device)
        checkpoint()


def _largest_batch_point(model, ids, holder: list, one: SpeedPoint, *, weights: int, budget: int | None,
                         max_batch: int, steps: int, device: torch.device, reserve: int | None = None):
    """Decode at the largest batch that fits ``budget``: ``(point, cache, token to feed next)``; ``None`` when no
    budget is
    known (CPU, no --memory-budget).

    ``holder`` holds the batch-1 ``(cache, token)``; it is consumed (replicated in place, so no second copy
    competes with the batch for memory) and re-made by a new prefill only if a trial runs out of memory.
    """
    if budget is None:
        holder.clear()
        return None
    transient = max(0, (one.peak_memory or weights + one.kv_bytes) - weights - one.kv_bytes)
    batch = max(1, min(max_batch, int((budget * 0.98 - weights - transient) // max(1, one.kv_bytes))))
    while batch >= 1:
        # a failed trial's tensors live on in reference cycles of its traceback until collected
        _free(device)
        try:
            cache, token = holder.pop() if holder else _prefill(model, ids, reserve)
            if batch > 1:
                cache.batch_repeat_interleave(batch)
            tokens = token.repeat_interleave(batch, dim=0)
            kv = cache_kv_bytes(cache)
            _free(device)
            _reset_peak(device)
            run = _decode(model, cache, tokens, steps, device)
            seconds = run.seconds
            peak = _peak(device)
            if peak is not None and peak > budget:
                raise torch.OutOfMemoryError(f"out of memory: peak {peak} over the budget {budget}")
            point = SpeedPoint(variant=one.variant, ratio=one.ratio, streaming_layers=one.streaming_layers,
                               context=one.context, batch=batch, decode_tokens_per_s=batch * steps / seconds,
                               decode_ms_per_step=1000 * seconds / steps, kv_bytes=kv, peak_memory=peak,
                               kv_fraction_expected=one.kv_fraction_expected, largest_batch=True,
                               decode_path="eager", tokens=run.tokens)
            return point, cache, run.token
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is expected here
            if not _is_oom(exc):
                raise
            cache = token = tokens = None
            _free(device)
            smaller = int(batch * 0.93) if batch > 1 else 0
            log.info("batch %d does not fit (%s); trying %d", batch, str(exc).splitlines()[0][:80], smaller)
            batch = smaller
    return None


def weights_read_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, less the input embedding table when it is
    not tied to the output head (a step gathers only its ``batch`` rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embed is not None and (head is None or head.weight.data_ptr() != embed.weight.data_ptr()):
        total -= embed.weight.numel() * embed.weight.element_size()
    return total


def with_floor(point: SpeedPoint, *, weight_bytes: int | None, copy_gbps: float | None) -> SpeedPoint:
    """``point`` with ``bytes_per_step`` (weights + the KV it holds, unless the point set its own: TokenSelect rows
    read only part of the KV) and, with a measured bandwidth, ``floor_share`` (the time those bytes take at
    ``copy_gbps`` GB/s over the measured step time)."""
    if weight_bytes is None:
        return point
    if point.bytes_per_step is None:
        point.bytes_per_step = int(weight_bytes + point.kv_bytes)
    if copy_gbps:
        point.floor_share = point.bytes_per_step / (copy_gbps * 1e9) / (point.decode_ms_per_step / 1e3)
    return point


def _describe(p: SpeedPoint) -> str:
    pre = f", prefill {p.prefill_s:.3f} s" if p.prefill_s is not None else ""
    peak = f", peak {p.peak_memory / GIB:.1f} GiB" if p.peak_memory else ""
    floor = f", {100 * p.floor_share:.0f}% of the bandwidth floor" if p.floor_share else ""
    path = f" [{p.decode_path}]" if p.decode_path else ""
    return (f"{p.variant} @ {p.context} x{p.batch}: decode {p.decode_tokens_per_s:.1f} tok/s{pre}, "
            f"KV {p.kv_bytes / GIB:.2f} GiB{peak}{floor}{path}")


# ---- outputs -----------------------------------------------------------------------------------------------

def markdown_bench(result: BenchResult) -> str:
    """The benchmark as markdown: one table, ratios against the original at the same context."""
    env = result.environment
    hw = env.get("gpu") or env.get("cpu") or env.get("device")
    lines = [
        f"# Speed and memory: {result.model_id}",
        "",
        f"{hw}; torch {env.get('torch')}, transformers {env.get('transformers')}, triton {env.get('triton')}, "
        f"CUDA {env.get('cuda', '-')}; {result.dtype}; sink {result.sink}, window {result.window}; "
        f"{result.decode_steps} timed decode steps; streaming layers: {result.layer_choice}. "
        "Largest batch: the most sequences whose decode fits the memory budget"
        + (f" ({result.memory_budget_bytes / 1e9:.1f} GB)" if result.memory_budget_bytes else "")
        + ", each holding the full context."
        + (f" Floor: (weights {result.weight_bytes_per_step / 1e9:.2f} GB + the KV held) / the copy bandwidth "
           f"measured in this run, {result.copy_gbps:.0f} GB/s." if result.copy_gbps else ""),
        "",
        "| variant | context | batch | prefill (s) | decode tok/s | ms/step | x original | x compiled original | "
        "x runtime dense | KV (MiB) | KV / original | expected KV | bytes/step (GB) | share of floor | "
        "peak mem (GiB) | decode steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result.points:
        base = result.point("original", p["context"], largest=p["largest_batch"])
        fast = result.point(ORIGINAL_COMPILED, p["context"], largest=p["largest_batch"])
        graphed = p["variant"].endswith(GRAPHED)
        fused = FUSED in p["variant"]
        same = result.point(RUNTIME_DENSE + (FUSED if fused else "") + (GRAPHED if graphed else ""), p["context"],
                            largest=p["largest_batch"])
        speed, speed_fast, speed_same = (_times(p, other) for other in (base, fast, same))
        # KV relative to the original at the same context, per sequence
        kv_ratio = ((p["kv_bytes"] / p["batch"]) / (base["kv_bytes"] / base["batch"])) if base else float("nan")
        lines.append(
            f"| {p['variant']} | {p['context']} | {p['batch']}{' (max)' if p['largest_batch'] else ''} | "
            f"{p['prefill_s']:.3f} | " if p["prefill_s"] is not None else
            f"| {p['variant']} | {p['context']} | {p['batch']}{' (max)' if p['largest_batch'] else ''} | - | "
        )
        lines[-1] += (
            f"{p['decode_tokens_per_s']:.1f} | {p['decode_ms_per_step']:.2f} | {speed} | {speed_fast} | "
            f"{speed_same} | "
            f"{p['kv_bytes'] / 2**20:.1f} | " + (f"{100 * kv_ratio:.1f}%" if base else "-")
            + f" | {100 * (p['kv_fraction_expected'] or 1.0):.1f}% | "
            + (f"{p['bytes_per_step'] / 1e9:.2f} | " if p.get("bytes_per_step") else "- | ")
            + (f"{100 * p['floor_share']:.0f}% | " if p.get("floor_share") else "- | ")
            + (f"{p['peak_memory'] / GIB:.1f}" if p["peak_memory"] else "-") + " | "
            + (p.get("decode_path") or "-")
            + (", fused ops" if p.get("fused_ops") and FUSED not in p["variant"] else "") + " |"
        )
    text = "\n".join(lines) + "\n"
    if result.token_select is not None:
        from ..hybrid_format.token_select import DEFAULT_SELECT_REUSE_AGAINST, TokenSelectConfig
        from .token_select_rows import markdown_summary

        fields = result.token_select  # results written before select_reuse_against compared with the anchor
        config = TokenSelectConfig(k=fields["select_k"], init=fields["select_init"], local=fields["select_local"],
                                   reuse=fields["select_reuse"], reuse_max_age=fields["select_reuse_max_age"],
                                   reuse_against=fields.get("select_reuse_against", DEFAULT_SELECT_REUSE_AGAINST))
        text += markdown_summary(result.selection_summary, copy_gbps=result.copy_gbps,
                                 described=config.describe())
    return text


def _times(point: dict, other: dict | None) -> str:
    return f"{point['decode_tokens_per_s'] / other['decode_tokens_per_s']:.2f}x" if other else "-"


def write_bench_outputs(result: BenchResult, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``<out>.json``, ``<out>.md`` and ``<out>.png`` together (or none of them)."""
    out = Path(out)
    stem, parent = (out.stem, out.parent) if out.suffix == ".json" else ("bench", out)
    parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": parent / f"{stem}.json", "md": parent / f"{stem}.md", "png": parent / f"{stem}.png"}
    from .speed_plot import plot_bench

    written = publish_together({
        paths["json"]: lambda p: write_json(p, result.to_dict()),
        paths["md"]: lambda p: p.write_text(markdown_bench(result)),
        paths["png"]: lambda p: plot_bench(result, p),
    })
    return {key: path for key, path in paths.items() if path in written}


__all__ = ["benchmark", "BenchResult", "SpeedPoint", "markdown_bench", "write_bench_outputs", "cache_kv_bytes",
           "RUNTIME_DENSE", "ORIGINAL_COMPILED", "GRAPHED", "FUSED", "FUSED_OPS_CHOICES"]
