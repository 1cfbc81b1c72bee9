"""The prefill floor's FLOP count (bench/prefill_floor.py), checked against brute force and the published shape."""

from __future__ import annotations

import pytest
from lighttransfer.bench.prefill_floor import attention_pairs, kernel_category, prefill_flops


@pytest.mark.parametrize("n, sink, window", [(1, 4, 16), (7, 4, 16), (20, 4, 16), (300, 2, 30), (64, 0, 64)])
def test_attention_pairs_count_what_the_rule_keeps(n, sink, window):
    import torch
    from lighttransfer.kernels.mask import streaming_visible  # the rule written once

    q = torch.arange(n).view(n, 1)
    k = torch.arange(n).view(1, n)
    assert attention_pairs(n, sink=sink, window=window) == int(streaming_visible(q, k, sink=sink, window=window).sum())
    assert attention_pairs(n) == int((k <= q).sum())


def test_flops_of_the_8b_shape():
    from lighttransfer.bench.shaped_model import SHAPES
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES["llama3-8b-shaped"])
    n = 32768
    dense = prefill_flops(config, n)
    # 6.98 B weights in the 32 layers' linear maps (Llama-3-8B: 8.03 B with both 0.53 B embeddings)
    assert dense["linear"] == pytest.approx(2 * n * 6.98e9 + 2 * 4096 * 128256, rel=2e-3)
    assert dense["attention"] == 4 * 32 * 128 * 32 * n * (n + 1) // 2
    half = prefill_flops(config, n, streaming_layers=range(0, 32, 2), sink=4, window=1020)
    assert half["linear"] == dense["linear"]
    # 16 full layers, and 16 whose queries see at most 1024 keys each: 0.5 + 0.5 * 2 * 1024 / 32768 of the pairs
    assert half["attention"] == pytest.approx(0.531 * dense["attention"], rel=2e-3) and half["total"] < dense["total"]


def test_kernel_names_fall_in_their_categories():
    assert kernel_category("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert kernel_category("_streaming_attn_fwd") == "attention"
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert kernel_category("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT") == "matmul"
    assert kernel_category("void at::native::vectorized_elementwise_kernel<4, SiLU>") == "other"
