"""The TokenSelect rows of :func:`lighttransfer.bench.benchmark`: each runtime variant (the runtime's dense path and
each hybrid) decoded with TokenSelect on its full layers, on the same cache right after its dense-decode rows.

The prefill does not depend on the decode policy (TokenSelect selects at decode steps only), so the TokenSelect rows
continue the dense rows' cache with the policy switched (``cache.selection``), at the same batch: TokenSelect keeps
every token, so the largest batch is the same. Each row continues the same greedy generation as the rows before it.

**The Selection Cache's hit rate.** A hit reuses the previous selection (no scoring), so a step's time depends on
how many sequences hit, and with random weights the queries' cosine similarity says nothing about a real model.
Each TokenSelect row is therefore measured at two forced settings (``TokenSelectConfig.force_reuse``):

* ``all miss``: no query counts as similar, every step rescores (through the Selection Cache's own step);
* ``all hit``: every query counts as similar, so each step reuses the selection until the age bound
  (``reuse_max_age``, default 64) makes it rescore: from a cold cache, step ``i`` (warm-up steps included) misses
  iff ``i % (reuse_max_age + 1) == 0`` (:func:`forced_hits`).

Both rows report the realised ``select_hits`` / ``select_lookups`` of their timed steps, read from the runtime's
counters (on the device, read once after the row). The step time at a hit share ``h`` is interpolated linearly
between the two rows' realised shares (:func:`interpolated_ms`): in a batch the vote skips the sequences that hit,
so a step's work is linear in the share of hits. With ``select_reuse = 1`` (no Selection Cache) there is one
setting, ``no cache``.

**Bytes per step** (the floor share, as :func:`lighttransfer.bench.speed.with_floor` computes it for the other
rows): the weights read per step, every streaming (and mixed) layer's whole held cache, and per full layer and
sequence of ``n`` keys, with ``c = n - init - local`` candidates (:func:`full_layer_read_bytes`):

* a miss: the candidates' keys (the vote scores each once) + the listed keys' K and V rows + their int32 indices;
* a hit: the listed rows and indices only; the reused list is ``init + k + local`` keys plus the tokens generated
  since its anchor, ``(reuse_max_age + 1) / 2`` on average over a reuse cycle;
* a budget covering every candidate (``c <= k``): every key's K and V (attending all of them).

The vote's float32 scratch and the top-k's read of the votes are the implementation's own cost, not part of the
floor (at the paper's sizes they add ~6 % of the candidates' key bytes to a miss).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from ..hybrid_format import TokenSelectConfig

log = logging.getLogger(__name__)

TOKENSELECT = " + tokenselect"  # infix of a TokenSelect row's variant: "<variant> + tokenselect (<setting>)"
ALL_MISS, ALL_HIT, NO_CACHE = "all miss", "all hit", "no cache"
# interpolated columns of the summary table (with the bench's own --select-hit-share added)
DEFAULT_HIT_SHARES = (0.0, 0.5, 0.9)


def settings(config: TokenSelectConfig) -> list[tuple[str, TokenSelectConfig]]:
    """``[(setting, config)]`` the TokenSelect rows run: forced all-miss and all-hit with the Selection Cache on,
    ``no cache`` without it."""
    if not config.cache_enabled:
        return [(NO_CACHE, config)]
    return [(ALL_MISS, dataclasses.replace(config, force_reuse=False)),
            (ALL_HIT, dataclasses.replace(config, force_reuse=True))]


def row_variant(variant: str, setting: str, *, graphed_suffix: str = "") -> str:
    """The variant name of a TokenSelect row: ``"ratio 0.5 + tokenselect (all hit), cuda graph"``."""
    return f"{variant}{TOKENSELECT} ({setting}){graphed_suffix}"


def forced_hits(setting: str, *, first_step: int, steps: int, max_age: int) -> int:
    """Hits per (full layer, sequence) over the steps ``first_step .. first_step + steps - 1`` counted from a cold
    Selection Cache (step 0 the first decode step after it was cleared), under a forced setting."""
    if setting != ALL_HIT:
        return 0
    cycle = max_age + 1  # a miss, then max_age steps reusing it
    misses = sum(1 for i in range(first_step, first_step + steps) if i % cycle == 0)
    return steps - misses


def full_layer_read_bytes(n_keys: int, *, key_row: int, value_row: int, config: TokenSelectConfig,
                          hit: bool) -> int:
    """Bytes one full layer's TokenSelect decode step must read for one sequence of ``n_keys`` cached keys;
    ``key_row`` / ``value_row``: bytes of one token's keys / values over the layer's KV heads."""
    candidates = n_keys - config.init - config.local
    if candidates <= config.k:  # the budget covers every key: all of them attended
        return n_keys * (key_row + value_row)
    listed = config.budget + (round((config.reuse_max_age + 1) / 2) if hit else 0)
    listed = min(n_keys, listed)
    read = listed * (key_row + value_row + 4)  # the rows and their int32 indices
    return read if hit else read + candidates * key_row


def kv_read_bytes(cache, config: TokenSelectConfig, *, hit: bool) -> int:
    """Bytes of KV one decode step over ``cache`` (a :class:`~lighttransfer.runtime.HybridCache`) must read with
    TokenSelect on its full layers, every sequence missing (``hit=False``) or hitting: the full layers by
    :func:`full_layer_read_bytes`, every other layer its whole held cache."""
    from ..runtime.full_layer import FullLayer

    total = int(cache.kv_bytes())
    for layer in cache.layers:
        if not isinstance(layer, FullLayer) or layer.keys is None:
            continue
        total -= layer.nbytes()
        batch, heads, n_keys, dim = layer.keys.shape
        key_row = heads * dim * layer.keys.element_size()
        value_row = heads * layer.values.shape[-1] * layer.values.element_size()
        total += batch * full_layer_read_bytes(n_keys, key_row=key_row, value_row=value_row, config=config, hit=hit)
    return total


def interpolated_ms(miss: dict, hit: dict, share: float) -> float | None:
    """ms per step at the hit share ``share``, linear between the ``all miss`` and ``all hit`` points' realised
    shares (``None`` when they are equal, e.g. no lookups)."""
    s0, s1 = _share(miss), _share(hit)
    if s0 is None or s1 is None or s1 <= s0:
        return None
    t0, t1 = miss["decode_ms_per_step"], hit["decode_ms_per_step"]
    return t0 + (share - s0) / (s1 - s0) * (t1 - t0)


def interpolated_bytes(miss: dict, share: float) -> int | None:
    """Bytes per step at the hit share ``share`` (weights included), between the all-miss and all-hit bytes of
    ``miss`` (the all-miss row: counted over its own cache length)."""
    if miss.get("select_bytes_miss") is None:
        return None
    return int(round((1 - share) * miss["select_bytes_miss"] + share * miss["select_bytes_hit"]))


def _share(point: dict) -> float | None:
    lookups = point.get("select_lookups")
    return point["select_hits"] / lookups if lookups else None


def measure_rows(model, cache, token: torch.Tensor, dense_point, *, config: TokenSelectConfig, graphed: bool,
                 graphed_suffix: str, steps: int, device: torch.device, weights: int | None,
                 record: Callable, decode: Callable, decode_graphed: Callable, make_point: Callable) -> torch.Tensor:
    """The TokenSelect rows beside ``dense_point`` (the same variant, context and batch, decoded densely), on its
    ``cache``: every setting eagerly, then (``graphed``) every setting as CUDA-graph replays. Returns the token to
    feed next. The cache decodes densely again afterwards.

    ``decode`` / ``decode_graphed``: the bench's decode loops (:func:`lighttransfer.bench.speed._decode`);
    ``make_point(dense_point, variant, run, batch)``: a :class:`~lighttransfer.bench.speed.SpeedPoint` of a run;
    ``record``: what the bench does with each point.
    """
    from ..runtime import runtime_of

    stats = runtime_of(model).selection_stats
    batch = int(token.shape[0])
    try:
        for static in (False, True) if graphed else (False,):
            for setting, chosen in settings(config):
                cache.selection = chosen
                cache.selection_states.clear()  # every row starts from a cold Selection Cache
                stats.reset()
                try:
                    run = (decode_graphed if static else decode)(model, cache, token, steps, device,
                                                                 before_timing=stats.reset)
                except Exception as exc:  # noqa: BLE001 - only out-of-memory is expected here
                    if not _is_oom(exc):
                        raise
                    log.warning("%s at %d x%d: out of memory", row_variant(dense_point.variant, setting),
                                dense_point.context, batch)
                    continue
                token = run.token
                point = make_point(dense_point, row_variant(dense_point.variant, setting,
                                                            graphed_suffix=graphed_suffix if static else ""),
                                   run, batch)
                point.decode = "tokenselect"
                point.select_setting = setting
                point.select_lookups, point.select_hits = int(stats.lookups), int(stats.hits)
                if weights is not None:
                    point.select_bytes_miss = int(weights + kv_read_bytes(cache, config, hit=False))
                    point.select_bytes_hit = int(weights + kv_read_bytes(cache, config, hit=True))
                    share = point.select_hits / point.select_lookups if point.select_lookups else 0.0
                    point.bytes_per_step = int(round((1 - share) * point.select_bytes_miss
                                                     + share * point.select_bytes_hit))
                record(point)
    finally:
        cache.selection = None
        cache.selection_states.clear()
    return token


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def selection_summary(points: list[dict], *, shares=DEFAULT_HIT_SHARES,
                      copy_gbps: float | None = None) -> list[dict]:
    """One entry per TokenSelect pair (variant, context, batch, eager or graphed, fused or not): the all-miss and
    all-hit rows, the same variant without TokenSelect, and per hit share the interpolated ms per step, the speedup
    over the dense-decode row (``x_dense_decode``), the bytes per step and their floor share (with the copy
    bandwidth ``copy_gbps`` in GB/s)."""
    by_name = {(p["variant"], p["context"], p["largest_batch"]): p for p in points}
    out = []
    for p in points:
        if p.get("select_setting") not in (ALL_MISS, NO_CACHE):
            continue
        base, rest = p["variant"].split(TOKENSELECT, 1)
        suffix = rest.split(")", 1)[1]  # ", cuda graph" or ""
        key = (p["context"], p["largest_batch"])
        hit = by_name.get((row_variant(base, ALL_HIT) + suffix, *key))
        dense = by_name.get((base + suffix, *key))
        entry = {"variant": base + suffix, "context": p["context"], "batch": p["batch"],
                 "largest_batch": p["largest_batch"], "decode_path": p.get("decode_path"),
                 "miss_ms": p["decode_ms_per_step"], "miss_hits": p.get("select_hits"),
                 "miss_lookups": p.get("select_lookups"),
                 "hit_ms": hit["decode_ms_per_step"] if hit else None,
                 "hit_hits": hit.get("select_hits") if hit else None,
                 "hit_lookups": hit.get("select_lookups") if hit else None,
                 "dense_decode_ms": dense["decode_ms_per_step"] if dense else None, "shares": []}
        for share in shares:
            ms = p["decode_ms_per_step"] if p["select_setting"] == NO_CACHE and share == 0.0 else (
                interpolated_ms(p, hit, share) if hit else None)
            nbytes = interpolated_bytes(p, share)
            entry["shares"].append({
                "hit_share": share, "ms_per_step": ms,
                "x_dense_decode": dense["decode_ms_per_step"] / ms if dense and ms else None,
                "bytes_per_step": nbytes,
                "floor_share": nbytes / (copy_gbps * 1e9) / (ms / 1e3) if nbytes and ms and copy_gbps else None,
            })
        out.append(entry)
    return out


def markdown_summary(summary: list[dict], *, copy_gbps: float | None = None, described: str = "") -> str:
    """The summary as a markdown section (empty when there are no TokenSelect rows)."""
    if not summary:
        return ""
    shares = [s["hit_share"] for s in summary[0]["shares"]]
    head = " | ".join(f"{100 * h:g}% hits: ms (x dense decode)" for h in shares)
    lines = [
        "", "## TokenSelect decode against the same variant decoding densely", "",
        (f"{described}. " if described else "")
        + "Selection Cache hits forced (random weights): *all miss* rescores at every step, *all hit* reuses the "
        "selection until the age bound makes it rescore; hits / lookups are the realised counts of the timed steps "
        "(per full layer and sequence). The step time at a hit share is interpolated linearly between the two rows' "
        "realised shares; x dense decode = the variant's own dense-decode row at the same context, batch and decode "
        "path over it. Bytes per step: weights + the KV the step must read (full layers: the candidates' keys on a "
        "miss, the listed K/V rows; streaming layers their window)"
        + (f"; floor = bytes / {copy_gbps:.0f} GB/s." if copy_gbps else "."),
        "",
        f"| variant | context | batch | all miss: ms (hits/lookups) | all hit: ms (hits/lookups) | dense decode ms | "
        f"{head} | bytes/step GB at {', '.join(f'{100 * h:g}%' for h in shares)} | share of floor at those |",
        "|---|---|---|---|---|---|" + "---|" * len(shares) + "---|---|",
    ]
    for e in summary:
        cells = []
        for s in e["shares"]:
            ms, x = s["ms_per_step"], s["x_dense_decode"]
            cells.append("-" if ms is None else f"{ms:.2f}" + (f" ({x:.2f}x)" if x else ""))
        nbytes = ", ".join("-" if s["bytes_per_step"] is None else f"{s['bytes_per_step'] / 1e9:.3g}"
                           for s in e["shares"])
        floors = ", ".join("-" if s["floor_share"] is None else f"{100 * s['floor_share']:.0f}%"
                           for s in e["shares"])
        hit = "-" if e["hit_ms"] is None else f"{e['hit_ms']:.2f} ({e['hit_hits']}/{e['hit_lookups']})"
        dense = "-" if e["dense_decode_ms"] is None else f"{e['dense_decode_ms']:.2f}"
        lines.append(f"| {e['variant']} | {e['context']} | {e['batch']}{' (max)' if e['largest_batch'] else ''} | "
                     f"{e['miss_ms']:.2f} ({e['miss_hits']}/{e['miss_lookups']}) | {hit} | {dense} | "
                     + " | ".join(cells) + f" | {nbytes} | {floors} |")
    return "\n".join(lines) + "\n"


__all__ = ["settings", "row_variant", "forced_hits", "full_layer_read_bytes", "kv_read_bytes", "interpolated_ms",
           "interpolated_bytes", "measure_rows", "selection_summary", "markdown_summary", "TOKENSELECT", "ALL_MISS",
           "ALL_HIT", "NO_CACHE", "DEFAULT_HIT_SHARES"]
