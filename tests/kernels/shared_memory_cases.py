"""The cases of ``test_shared_memory.py``, run in a process of their own where Triton compiles (not interprets).

Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` function is the interpreter's wrapper, which Triton's
compiler cannot take, so the test runs this file with the variable unset and reads one JSON object from its
output: for each case, the bytes of shared memory the compiler reports per configuration, and what the decode
launchers' analytic filter assumed.
"""

from __future__ import annotations

import json
import sys

import torch
from ahead_of_time import captured_launch, shared_bytes


def block_mass(width: int, cols: int) -> dict:
    from lighttransfer.kernels.block_mass_triton import _row_block_mass, launch_config, row_block_mass_triton

    qs = torch.zeros(1, 4, 80, width, dtype=torch.bfloat16)
    k = torch.zeros(1, 1, 300, width, dtype=torch.bfloat16)
    with captured_launch(_row_block_mass) as calls:
        row_block_mass_triton(qs, k, torch.full((80,), 299), scale=0.1, cols_per_block=cols)
    (args, kwargs), = calls
    config = launch_config(width, cols, on_gpu=True)
    options = {name: config.pop(name) for name in ("num_warps", "num_stages")}
    return {"gpu": {"used": shared_bytes(_row_block_mass, args, kwargs, overrides=config, **options)}}


def full_decode(dtype: torch.dtype, dim: int) -> dict:
    from lighttransfer.kernels.decode_launch import SHARED_MEMORY_MARGIN, hopper_candidates, shared_memory
    from lighttransfer.kernels.full_decode_triton import (
        HOPPER_CONFIGS,
        _full_decode_split,
        full_decode_triton,
    )

    q = torch.zeros(2, 16, 1, dim, dtype=dtype)
    k = torch.zeros(2, 4, 200, dim, dtype=dtype)
    with captured_launch(_full_decode_split) as calls:
        full_decode_triton(q, k, k.clone(), kv_start=None, scale=0.1)
    (args, kwargs), = calls
    block_d, block_m, size = kwargs["BLOCK_D"], kwargs["BLOCK_M"], q.element_size()
    out = {}
    for config in hopper_candidates(HOPPER_CONFIGS, block_d, block_m, size):
        out[repr(config)] = {
            "used": shared_bytes(_full_decode_split, args, kwargs, overrides=config.kwargs,
                                 num_warps=config.num_warps, num_stages=config.num_stages),
            "estimate": shared_memory(config, block_d, block_m, size) + SHARED_MEMORY_MARGIN}
    return out


def fused_routing(dtype: torch.dtype, dim: int, diagonal: bool) -> dict:
    """Both passes of the fused QAdA step (pass 1 under the pinned GPU config it always takes, pass 2 under every
    Hopper candidate): compiled for sm_90, which also checks that they compile for the GPU at all."""
    import contextlib

    from lighttransfer.kernels.decode_launch import hopper_candidates
    from lighttransfer.kernels.full_decode_triton import HOPPER_CONFIGS
    from lighttransfer.kernels.fused_routing_triton import (
        FusedWorkspace,
        _bulk_attend,
        _local_config,
        _local_decide,
        fused_routed_decode_triton,
    )
    from lighttransfer.kernels.head_routing import KeyMoments

    batch, kv_heads, n_keys = 2, 4, 1200
    q = torch.zeros(batch, 16, 1, dim, dtype=dtype)
    k = torch.zeros(batch, kv_heads, n_keys, dim, dtype=dtype)

    def launch():
        moments = KeyMoments.zeros(batch, kv_heads, dim, diagonal=diagonal, device="cpu")
        fused_routed_decode_triton(q, k, k.clone(), moments, tau=0.5, sink=4, window=1020, kv_start=None,
                                   scale=0.1, n_valid=None, counts=None,
                                   workspace=FusedWorkspace.zeros(batch, kv_heads, "cpu"))

    with captured_launch(_local_decide) as first:
        launch()
    original = _local_decide.run
    _local_decide.run = lambda *a, **kw: None  # pass 1 "runs"; pass 2 is the launch to capture
    try:
        with captured_launch(_bulk_attend) as second, contextlib.suppress(Exception):
            launch()
    finally:
        _local_decide.run = original
    (args1, kwargs1), = first
    (args2, kwargs2), = second
    block_d, block_m, size = kwargs2["BLOCK_D"], kwargs2["BLOCK_M"], q.element_size()
    pinned = _local_config((9, 0), block_d, block_m, size)
    out = {f"pass1 {pinned}": {"used": shared_bytes(_local_decide, args1, kwargs1, overrides=pinned.kwargs,
                                                      num_warps=pinned.num_warps, num_stages=pinned.num_stages)}}
    for config in hopper_candidates(HOPPER_CONFIGS, block_d, block_m, size):
        out[f"pass2 {config}"] = {"used": shared_bytes(_bulk_attend, args2, kwargs2, overrides=config.kwargs,
                                                         num_warps=config.num_warps, num_stages=config.num_stages)}
    return out


def fused_one_launch(dtype: torch.dtype, dim: int, diagonal: bool, runtime: bool = False) -> dict:
    """The one-launch fused QAdA kernel under the pinned GPU config it always takes, compiled for sm_90; its
    estimate is the launcher filter's (the config is the full kernel's first Hopper candidate that fits).
    ``runtime``: with what the runtime's static step passes (``kv_start``, a device-side ``n_valid``, float64
    counts)."""
    from lighttransfer.kernels.decode_launch import SHARED_MEMORY_MARGIN, shared_memory
    from lighttransfer.kernels.fused_routing_one_triton import (
        _decide_attend,
        fused_one_launch_triton,
        one_launch_config,
    )
    from lighttransfer.kernels.fused_routing_triton import FusedWorkspace
    from lighttransfer.kernels.head_routing import KeyMoments

    batch, kv_heads, n_keys = 2, 4, 1200
    q = torch.zeros(batch, 16, 1, dim, dtype=dtype)
    k = torch.zeros(batch, kv_heads, n_keys, dim, dtype=dtype)
    with captured_launch(_decide_attend) as calls:
        fused_one_launch_triton(q, k, k.clone(), KeyMoments.zeros(batch, kv_heads, dim, diagonal=diagonal, device="cpu"),
                                tau=0.5, sink=4, window=1020, scale=0.1,
                                kv_start=torch.zeros(batch, dtype=torch.long) if runtime else None,
                                n_valid=torch.tensor([1100]) if runtime else None,
                                counts=torch.zeros(2, dtype=torch.float64) if runtime else None,
                                workspace=FusedWorkspace.zeros(batch, kv_heads, "cpu"))
    (args, kwargs), = calls
    block_d, block_m, size = kwargs["BLOCK_D"], kwargs["BLOCK_M"], q.element_size()
    pinned = one_launch_config((9, 0), block_d, block_m, size)
    return {f"one-launch {pinned}": {
        "used": shared_bytes(_decide_attend, args, kwargs, overrides=pinned.kwargs, num_warps=pinned.num_warps,
                             num_stages=pinned.num_stages),
        "estimate": shared_memory(pinned, block_d, block_m, size) + SHARED_MEMORY_MARGIN}}


def token_select_onepass(dtype: torch.dtype, dim: int, reuse: bool, static: bool = False) -> dict:
    """TokenSelect's one-pass vote (both passes, with the Selection Cache's ``skip`` flags when ``reuse``) and the
    list kernel (keeping hits' cached picks when ``reuse``), under the launches they take on a GPU, compiled for
    sm_90; ``static``: with a static step's device-side live length (``n_valid``)."""
    import contextlib

    from lighttransfer.kernels.token_select_onepass import (
        _SUM_BLOCK,
        _build_list,
        _score_tiles,
        _token_scores,
        _token_votes_total,
        build_list_triton,
        total_votes_triton,
    )

    batch, kv_heads, n_keys, k_select = 2, 4, 1200, 64
    q = torch.zeros(batch, 16, 1, dim, dtype=dtype)
    k = torch.zeros(batch, kv_heads, n_keys, dim, dtype=dtype)
    skip = torch.tensor([True, False]) if reuse else None
    valid = dict(n_valid=torch.tensor([n_keys - 100], dtype=torch.int32)) if static else {}

    def votes():
        total_votes_triton(q, k, init=4, local=16, kv_start=torch.zeros(batch, dtype=torch.long), scale=0.1,
                           skip=skip, **valid)

    with captured_launch(_token_scores) as first:
        votes()
    original = _token_scores.run
    _token_scores.run = lambda *a, **kw: None  # pass 1 "runs"; pass 2 is the launch to capture
    try:
        with captured_launch(_token_votes_total) as second, contextlib.suppress(Exception):
            votes()
    finally:
        _token_scores.run = original
    extra = dict(hit=skip, cached=torch.zeros(batch, k_select, dtype=torch.long),
                 anchor_pos=torch.full((batch,), n_keys - 3), extra=8) if reuse else {}
    with captured_launch(_build_list) as third:
        build_list_triton(torch.zeros(batch, k_select), torch.zeros(batch, k_select, dtype=torch.long),
                          n_keys=n_keys, k_select=k_select, init=4, local=16, kv_start=None, **extra, **valid)
    (args1, kwargs1), = first
    (args2, kwargs2), = second
    (args3, kwargs3), = third
    block_n, launch = _score_tiles(kwargs1["BLOCK_D"], q.element_size())
    return {
        "scores": {"used": shared_bytes(_token_scores, args1, kwargs1, overrides=dict(BLOCK_N=block_n), **launch)},
        "votes": {"used": shared_bytes(_token_votes_total, args2, kwargs2, overrides=dict(BLOCK_T=_SUM_BLOCK))},
        "list": {"used": shared_bytes(_build_list, args3, kwargs3, overrides=dict(BLOCK=1024))},
    }


def selection_lookup(dtype: torch.dtype, static: bool, force: bool | None) -> dict:
    """The Selection Cache lookup kernel as a GPU launches it (blocks of 1024 elements), compiled for sm_90: with
    the cosine or a forced decision, the query's position as an int or read on the device."""
    from lighttransfer.kernels.selection_cache_triton import _lookup, selection_lookup_triton

    batch, heads, dim = 3, 32, 128
    q = torch.zeros(batch, 1, heads, dim, dtype=dtype).transpose(1, 2)
    anchor, made = torch.zeros(batch, heads * dim), torch.zeros(batch, dtype=torch.long)
    where = dict(pos=None, n_valid=torch.tensor([900], dtype=torch.int32)) if static else dict(pos=899)
    with captured_launch(_lookup) as calls:
        selection_lookup_triton(q, anchor, made, where.pop("pos"), reuse=0.9, max_age=64, force=force,
                                counter=torch.zeros(2, dtype=torch.long), eps=1e-8, **where)
    (args, kwargs), = calls
    return {"lookup": {"used": shared_bytes(_lookup, args, kwargs, overrides=dict(BLOCK=1024))}}


def topk_rows(skip: bool) -> dict:
    """The radix top-k's histogram rounds, chunk counts and gather as a GPU launches them (blocks of 1024),
    compiled for sm_90."""
    from lighttransfer.kernels.topk_rows_triton import (
        _topk_chunk_counts,
        _topk_gather,
        _topk_histogram,
        topk_rows_triton,
    )

    votes = torch.zeros(3, 5000)
    flags = torch.tensor([1, 0, 0], dtype=torch.int8) if skip else None
    calls = []  # every launch of the seven, recorded without running (captured_launch stops at the first)
    kernels = (_topk_histogram, _topk_chunk_counts, _topk_gather)
    originals = [kernel.run for kernel in kernels]
    for kernel in kernels:
        kernel.run = lambda *a, grid=None, warmup=False, _k=kernel, **kw: calls.append((_k, a, kw))
    try:
        topk_rows_triton(votes, 300, flags)
    finally:
        for kernel, run in zip(kernels, originals, strict=True):
            kernel.run = run
    assert [c[0] for c in calls] == [_topk_histogram] * 4 + [_topk_chunk_counts, _topk_gather]
    names = [f"round{i}" for i in range(4)] + ["counts", "gather"]
    return {name: {"used": shared_bytes(kernel, args, kwargs, overrides=dict(BLOCK=1024))}
            for name, (kernel, args, kwargs) in zip(names, calls, strict=True)}


CASES = {
    "topk-rows": lambda: topk_rows(False),
    "topk-rows-skip": lambda: topk_rows(True),
    "selection-lookup-bf16": lambda: selection_lookup(torch.bfloat16, False, None),
    "selection-lookup-fp16-static": lambda: selection_lookup(torch.float16, True, None),
    "selection-lookup-fp32-forced": lambda: selection_lookup(torch.float32, False, True),
    "token-select-onepass-bf16-D128": lambda: token_select_onepass(torch.bfloat16, 128, False),
    "token-select-onepass-bf16-D128-reuse": lambda: token_select_onepass(torch.bfloat16, 128, True),
    "token-select-onepass-fp16-D64-reuse": lambda: token_select_onepass(torch.float16, 64, True),
    "token-select-onepass-bf16-D128-reuse-static": lambda: token_select_onepass(torch.bfloat16, 128, True, True),
    "token-select-onepass-bf16-D128-static": lambda: token_select_onepass(torch.bfloat16, 128, False, True),
    "block-mass-sampled-rows": lambda: block_mass(128, 64),
    "block-mass-antidiagonal-rows": lambda: block_mass(16 * 128, 4),
    "full-decode-bf16-D128": lambda: full_decode(torch.bfloat16, 128),
    "full-decode-bf16-D256": lambda: full_decode(torch.bfloat16, 256),
    "full-decode-fp32-D256": lambda: full_decode(torch.float32, 256),
    "fused-routing-bf16-D128-full": lambda: fused_routing(torch.bfloat16, 128, False),
    "fused-routing-bf16-D128-diag": lambda: fused_routing(torch.bfloat16, 128, True),
    "fused-routing-fp16-D64-full": lambda: fused_routing(torch.float16, 64, False),
    "fused-one-launch-bf16-D128-full": lambda: fused_one_launch(torch.bfloat16, 128, False),
    "fused-one-launch-bf16-D128-full-runtime": lambda: fused_one_launch(torch.bfloat16, 128, False, runtime=True),
    "fused-one-launch-bf16-D128-diag": lambda: fused_one_launch(torch.bfloat16, 128, True),
    "fused-one-launch-fp16-D64-full": lambda: fused_one_launch(torch.float16, 64, False),
    "fused-one-launch-fp32-D128-full": lambda: fused_one_launch(torch.float32, 128, False),
}


if __name__ == "__main__":
    print(json.dumps({name: CASES[name]() for name in (sys.argv[1:] or CASES)}))
