"""Triton prefill kernel vs the fp32 reference (mask from kernels/mask.py), over awkward shapes and edges."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from kernel_error_policy import DEVICE, DTYPE_IDS, DTYPES, assert_within_policy
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels import (
    merge_attention,
    streaming_attention,
    streaming_attention_reference,
    streaming_mask,
    use_reference,
)
from lighttransfer.kernels.reference import masked_attention, prefill_visibility


@dataclass(frozen=True)
class Case:
    id: str
    n_kv: int
    sink: int
    window: int
    n: int | None = None  # queries; default all keys
    q_offset: int | None = None  # default n_kv - n
    batch: int = 1
    heads: int = 4
    kv_heads: int = 2
    dim: int = 32
    kv_start: tuple[int, ...] | None = None
    kv_len: tuple[int, ...] | None = None
    stream_heads: tuple[bool, ...] | None = None
    extra: dict = field(default_factory=dict)


CASES = [
    Case("N=1", n_kv=1, sink=4, window=8, heads=2, kv_heads=1, dim=16),
    Case("N<S", n_kv=3, sink=4, window=2),
    Case("W>=N", n_kv=40, sink=2, window=64),
    Case("W=1", n_kv=37, sink=3, window=1),
    Case("S=0", n_kv=50, sink=0, window=7),
    Case("odd-N-gqa4", n_kv=101, sink=4, window=16, heads=8, kv_heads=2),
    Case("gqa1-D64", n_kv=67, sink=4, window=20, heads=2, kv_heads=2, dim=64),
    Case("gqa2-interior-tiles", n_kv=300, sink=4, window=64, heads=2, kv_heads=1, dim=16),
    Case("chunk-of-last-17", n_kv=90, n=17, sink=4, window=24),
    Case("queries-mid-sequence", n_kv=60, n=20, q_offset=10, sink=2, window=9),
    Case("queries-past-keys", n_kv=30, n=10, q_offset=40, sink=0, window=25),
    Case("padding-left-right", n_kv=45, sink=3, window=10, batch=3, kv_start=(0, 5, 13), kv_len=(45, 42, 45)),
    Case("mixed-heads", n_kv=70, sink=2, window=11, stream_heads=(True, False, True, False)),
    Case("mixed-heads-padding-chunk", n_kv=80, n=33, sink=4, window=13, batch=2, kv_start=(7, 0),
         kv_len=(80, 71), stream_heads=(False, True, True, False)),
    Case("D=40-padded", n_kv=50, sink=4, window=12, dim=40),
    # the largest head_dim the kernels claim (kernels.MAX_HEAD_DIM; Gemma 3 uses 256), and Llama's 128
    Case("D=128", n_kv=70, sink=4, window=24, heads=2, kv_heads=1, dim=128),
    Case("D=256-limit", n_kv=70, sink=4, window=24, heads=2, kv_heads=1, dim=256),
    # the sink rides in the window walk: more sink keys than one interpreter tile (16), and a window that has
    # slid past every key so that only the sink is left
    Case("sink-spans-tiles", n_kv=90, sink=20, window=24, heads=2, kv_heads=1, dim=16),
    Case("queries-past-keys-sink-only", n_kv=30, n=10, q_offset=60, sink=5, window=25),
]


def _make(case: Case, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = case.n if case.n is not None else case.n_kv
    q = torch.randn(case.batch, case.heads, n, case.dim, generator=g)
    k = torch.randn(case.batch, case.kv_heads, case.n_kv, case.dim, generator=g)
    v = torch.randn(case.batch, case.kv_heads, case.n_kv, case.dim, generator=g)
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    kw = dict(sink=case.sink, window=case.window,
              q_offset=case.q_offset if case.q_offset is not None else case.n_kv - n)
    if case.kv_start is not None:
        kw["kv_start"] = torch.tensor(case.kv_start, dtype=torch.int32, device=DEVICE)
    if case.kv_len is not None:
        kw["kv_len"] = torch.tensor(case.kv_len, dtype=torch.int32, device=DEVICE)
    if case.stream_heads is not None:
        kw["stream_heads"] = torch.tensor(case.stream_heads, dtype=torch.bool, device=DEVICE)
    return q, k, v, kw


def _check_against_reference(q, k, v, kw, dtype, what):
    o, lse = streaming_attention(q, k, v, return_lse=True, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    ref_o, ref_lse = streaming_attention_reference(q, k, v, return_lse=True, **kw)
    visible = prefill_visibility(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device,
                                 **{key: kw.get(key) for key in ("sink", "window", "q_offset", "kv_start", "kv_len",
                                                                  "stream_heads")})
    low_o, low_lse = masked_attention(q, k, v, visible, 1 / math.sqrt(q.shape[-1]), compute_dtype=dtype)
    assert_within_policy(o, ref_o, low_o.to(dtype), dtype, f"{what} output")
    assert_within_policy(lse, ref_lse, low_lse, dtype, f"{what} lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case, dtype):
    q, k, v, kw = _make(case, dtype, seed=hash(case.id) % 1000)
    _check_against_reference(q, k, v, kw, dtype, case.id)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize(
    "case",
    [
        Case("long-gqa4-D128", n_kv=1537, sink=4, window=300, heads=8, kv_heads=2, dim=128),
        Case("long-gqa4-D256-limit", n_kv=1537, sink=4, window=512, heads=4, kv_heads=1, dim=256),
        Case("long-chunk-D64", n_kv=2049, n=513, sink=64, window=700, heads=4, kv_heads=1, dim=64),
        Case("long-mixed-padding", n_kv=1023, sink=16, window=257, batch=2, heads=4, kv_heads=2, dim=128,
             kv_start=(0, 113), kv_len=(1023, 1000), stream_heads=(True, False, False, True)),
    ],
    ids=lambda c: c.id,
)
def test_kernel_matches_reference_on_gpu_tiles(case, dtype):
    """Shapes large enough for the GPU tiles (BLOCK_M up to 128) to have interior and edge tiles."""
    q, k, v, kw = _make(case, dtype, seed=7)
    _check_against_reference(q, k, v, kw, dtype, case.id)


def test_transposed_views_and_fresh_inputs():
    """Strided [B, n, H, D] -> [B, H, n, D] views, as the runtime passes them, over several random draws."""
    dtype = DTYPES[0]
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(2, 45, 4, 32, generator=g).to(DEVICE, dtype).transpose(1, 2)
        k = torch.randn(2, 45, 2, 32, generator=g).to(DEVICE, dtype).transpose(1, 2)
        v = torch.randn(2, 45, 2, 32, generator=g).to(DEVICE, dtype).transpose(1, 2)
        _check_against_reference(q, k, v, dict(sink=3, window=9, q_offset=0), dtype, f"views seed={seed}")


def test_reference_equals_sdpa_with_the_mask_rule():
    """The reference is the mask rule: SDPA with ``streaming_mask`` (and is_causal for an endless window) agrees."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    mask = streaming_mask(40, 40, sink=3, window=6)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(streaming_attention_reference(q, k, v, sink=3, window=6), expected)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(streaming_attention_reference(q, k, v, sink=0, window=40), causal)


def test_chunk_against_compacted_cache_merges_to_full_result():
    """Sink part + recent part (sink=0) merged by LSE equals streaming attention over the whole sequence."""
    dtype = torch.float32
    g = torch.Generator().manual_seed(1)
    sink, window, n_kv, n = 4, 12, 64, 9
    q = torch.randn(1, 4, n, 32, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(1, 2, n_kv, 32, generator=g).to(DEVICE, dtype) for _ in range(2))
    full = streaming_attention_reference(q, k, v, sink=sink, window=window, q_offset=n_kv - n)
    o1, lse1 = streaming_attention(q, k[:, :, :sink], v[:, :, :sink], sink=sink, window=window,
                                   q_offset=n_kv - n, return_lse=True)
    start = n_kv - n - window + 1
    recent_k, recent_v = k[:, :, start:], v[:, :, start:]
    o2, lse2 = streaming_attention(q, recent_k, recent_v, sink=0, window=window, q_offset=recent_k.shape[2] - n,
                                   return_lse=True)
    merged, _ = merge_attention(o1, lse1, o2, lse2)
    torch.testing.assert_close(merged.float(), full.float(), atol=2e-5, rtol=1e-4)


def test_merge_with_an_empty_part_keeps_the_other():
    o1 = torch.randn(1, 1, 3, 8)
    lse1 = torch.randn(1, 1, 3)
    empty_o, empty_lse = torch.zeros(1, 1, 3, 8), torch.full((1, 1, 3), float("-inf"))
    o, lse = merge_attention(o1, lse1, empty_o, empty_lse)
    torch.testing.assert_close(o, o1)
    torch.testing.assert_close(lse, lse1)
    o, lse = merge_attention(empty_o, empty_lse, empty_o, empty_lse)
    assert torch.equal(o, empty_o) and torch.isneginf(lse).all()


def test_use_reference_switch_is_a_call_and_a_context_manager(monkeypatch):
    import lighttransfer.kernels.attention as attention

    calls = []
    monkeypatch.setattr(attention, "streaming_attention_reference",
                        lambda *a, **kw: calls.append("ref") or streaming_attention_reference(*a, **kw))
    q = torch.randn(1, 2, 5, 16)
    k = v = torch.randn(1, 1, 5, 16)
    with use_reference():
        attention.streaming_attention(q, k, v, sink=1, window=2)
    assert calls == ["ref"]
    try:
        use_reference()
        attention.streaming_attention(q, k, v, sink=1, window=2)
        assert calls == ["ref", "ref"]
    finally:
        use_reference(False)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(k_heads=3), "KV heads must divide"),
        (dict(window=0), "window >= 1"),
        (dict(q_offset=-1), "q_offset"),
        (dict(stream_heads=torch.ones(3, dtype=torch.bool)), "stream_heads"),
    ],
    ids=["heads-not-divisible", "window-0", "negative-offset", "stream-heads-length"],
)
def test_bad_input_is_one_clear_error(bad, message):
    q = torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, bad.pop("k_heads", 2), 5, 16)
    kw = dict(sink=1, window=2) | bad
    with pytest.raises(LightTransferError, match=message):
        streaming_attention(q, k, v, **kw)


def test_unsupported_dtype_on_kernel_path_raises():
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64, device=DEVICE)
    k = v = torch.randn(1, 1, 5, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(LightTransferError, match="float64"):
        streaming_attention(q, k, v, sink=1, window=2)


@dataclass(frozen=True)
class Layout:
    id: str
    options: dict = field(default_factory=dict)  # keyword arguments of prefill_triton._config
    tma: bool = False
    cuda_only: bool = False  # differs from another layout only in how Triton compiles it


LAYOUTS = [
    Layout("four-loops", dict(merged=False)),
    Layout("four-loops-tma", dict(merged=False), tma=True),
    Layout("merged-sink-tile", dict(sink_in_window=False)),
    Layout("merged-sink-in-window", {}),
    Layout("merged-sink-in-window-tma", {}, tma=True),
    Layout("one-loop", dict(one_loop=True)),
    Layout("persistent", dict(persistent=2)),
    Layout("persistent-one-loop", dict(one_loop=True, persistent=2)),
    Layout("persistent-one-loop-flatten", dict(one_loop=True, persistent=2, flatten=True), cuda_only=True),
]
LAYOUT_CASES = [
    Case("interior-tiles-gqa4", n_kv=130, sink=4, window=40, heads=4, kv_heads=1, dim=16),
    Case("sink-spans-tiles-padded", n_kv=110, sink=20, window=24, batch=2, heads=2, kv_heads=1, dim=16,
         kv_start=(0, 9), kv_len=(110, 100)),
    CASES[13],
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.id)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: c.id)
def test_kernel_layouts_match_reference(case, layout):
    """Every load path (pointers / tensor descriptors) and loop layout a config may pick, including the sink
    folded into the first window tiles and persistent programs that walk several query blocks."""
    from lighttransfer.kernels import prefill_triton, switch

    dtype = DTYPES[0]
    q, k, v, kw = _make(case, dtype, seed=11)
    if not switch.triton_runs_on(q):
        pytest.skip("no Triton path on this machine")
    if layout.cuda_only and DEVICE != "cuda":
        pytest.skip("same program as another layout in the interpreter")
    if layout.tma and DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    block = 64 if DEVICE == "cuda" else 16
    config = prefill_triton._config(block, block, 4 if DEVICE == "cuda" else 1, 2 if DEVICE == "cuda" else 1,
                                    **layout.options)
    o, lse = prefill_triton.streaming_attention_triton(
        q, k, v, scale=1 / math.sqrt(case.dim), return_lse=True, config=config, use_tma=layout.tma,
        **{"kv_start": None, "kv_len": None, "stream_heads": None, **kw},
    )
    ref_o, ref_lse = streaming_attention_reference(q, k, v, return_lse=True, **kw)
    visible = prefill_visibility(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device,
                                 **{key: kw.get(key) for key in ("sink", "window", "q_offset", "kv_start", "kv_len",
                                                                  "stream_heads")})
    low_o, low_lse = masked_attention(q, k, v, visible, 1 / math.sqrt(case.dim), compute_dtype=dtype)
    assert_within_policy(o, ref_o, low_o.to(dtype), dtype, f"{layout.id} output")
    assert_within_policy(lse, ref_lse, low_lse, dtype, f"{layout.id} lse")


def test_one_loop_layout_needs_the_sink_in_the_window_walk():
    from lighttransfer.kernels import prefill_triton

    with pytest.raises(ValueError, match="one_loop"):
        prefill_triton._config(16, 16, 1, 1, sink_in_window=False, one_loop=True)


def test_sink_in_window_walk_saves_a_tile_at_the_benchmark_shape():
    """The tile count behind the layout: at S + W = 4 + 1020 with 32 query positions per program and 64-key
    tiles, the sink costs a tile of its own, but fits the slack of the window walk's last tile."""
    sink, window, rows, block_n = 4, 1020, 32, 64
    window_keys = window + rows - 1
    separate = math.ceil(sink / block_n) + math.ceil(window_keys / block_n)
    folded = math.ceil((sink + window_keys) / block_n)
    assert (separate, folded) == (18, 17)


@pytest.mark.parametrize("capability, limit", [((9, 0), 227 * 1024), ((8, 6), 99 * 1024)], ids=["hopper", "other"])
@pytest.mark.parametrize("element_bytes", [2, 4], ids=["bf16", "fp32"])
def test_prefill_tiles_fit_shared_memory_at_every_element_size(capability, limit, element_bytes):
    """The host side (no launch): at head size 256 the fp32 fallback tiles (327 KB, refused by an H200) give way to
    smaller ones; every candidate kept fits the block's shared memory for its element size."""
    from lighttransfer.kernels import prefill_triton as pt

    def smem(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return element_bytes * (bm * 256 + c.num_stages * 2 * bn * 256)

    configs = pt._tuned_launcher(capability, 256, True, element_bytes).configs
    assert configs and all(smem(c) <= limit for c in configs)
    if element_bytes == 4:
        assert smem(pt.FALLBACK_CONFIG) > 227 * 1024 and str(pt.FALLBACK_CONFIG) not in map(str, configs)
