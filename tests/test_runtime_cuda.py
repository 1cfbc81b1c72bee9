"""The runtime on CUDA (Triton kernels for the streaming layers, SDPA for the full ones).

fp32 must match the fp64 masked reference closely; bf16/fp16 follow the relative-error policy: the error of the
hybrid against the fp32 reference is at most twice the error of the same masked reference run with the model in
the low dtype, plus a small floor. Peak GPU memory (the allocator's, not counted slots) must fall.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.kernels import use_reference
from lighttransfer.runtime import enable_hybrid, prefill_chunked, resolve_layout
from test_runtime import SINK, STREAMING, WINDOW, hybrid_pair, random_ids
from test_runtime_reference import reference_logits

pytestmark = pytest.mark.cuda
DEV = "cuda"


@pytest.fixture(autouse=True, params=["triton", "reference"], ids=lambda p: f"kernels={p}")
def kernel_path(request):
    """Every check runs on the Triton kernels and again on the kernels' PyTorch references (on CUDA), so a kernel
    problem and a runtime problem can be told apart."""
    with use_reference(request.param == "reference"):
        yield request.param


def err(a, b) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_prefill_and_decoding_equal_the_reference(arch):
    model, plain = hybrid_pair(arch)
    model.to(DEV)
    prompt = random_ids(2, 45, seed=1)
    with torch.no_grad():
        got = model(prompt.to(DEV)).logits
    ref = reference_logits(plain, prompt, streaming_layers=STREAMING, sink=SINK, window=WINDOW)
    assert err(got, ref) <= 1e-4
    out = model.generate(input_ids=prompt.to(DEV), attention_mask=torch.ones_like(prompt).to(DEV),
                         max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    seq = out.sequences.cpu()
    ref = reference_logits(plain, seq, streaming_layers=STREAMING, sink=SINK, window=WINDOW)[:, 44:-1]
    assert err(torch.stack(out.logits, 1), ref) <= 1e-4
    assert torch.equal(seq[:, 45:], ref.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_low_precision_follows_the_error_policy(arch, dtype):
    model, plain = hybrid_pair(arch)
    model.to(DEV, dtype)
    ids = random_ids(2, 60, seed=2)
    with torch.no_grad():
        fast = model(ids.to(DEV)).logits
    ref = reference_logits(plain, ids, streaming_layers=STREAMING, sink=SINK, window=WINDOW)
    low = make_tiny_model(arch).to(DEV, dtype)
    ref_low = reference_logits(low, ids.to(DEV), streaming_layers=STREAMING, sink=SINK, window=WINDOW)
    assert err(fast, ref) <= 2 * err(ref_low, ref) + 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unpadded_chunked_prefill_matches_the_reference(dtype):
    # chunks after cached keys: the full layers run causal attention at an offset (prefill kernel, not SDPA)
    model, plain = hybrid_pair("llama")
    model.to(DEV, dtype)
    ids = random_ids(2, 70, seed=4)
    with torch.no_grad():
        one = model(ids.to(DEV)).logits
        chunked = prefill_chunked(model, ids.to(DEV), chunk_size=16, logits="all").logits
    ref = reference_logits(plain, ids, streaming_layers=STREAMING, sink=SINK, window=WINDOW)
    if dtype == torch.float32:
        assert err(chunked, ref) <= 1e-4
    else:
        assert err(chunked, ref) <= 2 * err(one, ref) + 1e-2


def test_full_attention_of_a_chunk_equals_masked_sdpa():
    from lighttransfer.runtime.ops import causal_padding_mask, full_attention

    torch.manual_seed(0)
    q = torch.randn(2, 8, 24, 64, device=DEV, dtype=torch.float32)
    k, v = (torch.randn(2, 2, 100, 64, device=DEV, dtype=torch.float32) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 4, True, False
    got = full_attention(module, q, k, v, q_offset=76, kv_start=None, has_padding=False, scale=None)
    mask = causal_padding_mask(24, 100, q_offset=76, kv_start=None, device=DEV)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                            attn_mask=mask)
    assert got.shape == (2, 8, 24, 64) and err(got, want) <= 1e-4


@pytest.mark.parametrize("backend", ["auto", "sdpa-flash", "sdpa-cudnn", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_full_prefill_backend_is_causal_attention(backend, dtype):
    from lighttransfer.runtime.ops import full_attention, full_prefill_backend

    torch.manual_seed(0)
    q = torch.randn(2, 8, 300, 64, device=DEV, dtype=dtype)
    k, v = (torch.randn(2, 2, 300, 64, device=DEV, dtype=dtype) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 4, True, False
    with full_prefill_backend(backend):
        got = full_attention(module, q, k, v, q_offset=0, kv_start=None, has_padding=False, scale=None)
    want = torch.nn.functional.scaled_dot_product_attention(
        *(t.double() for t in (q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))), is_causal=True)
    assert got.shape == (2, 8, 300, 64) and got.dtype == dtype
    assert err(got, want) <= (1e-4 if dtype == torch.float32 else 2e-2)


def test_padded_chunked_online_and_mixed_layers_on_cuda():
    # left-padded batch + chunked prefill
    model, plain = hybrid_pair("llama")
    model.to(DEV)
    ids = random_ids(2, 40, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        one = model(ids.to(DEV), attention_mask=mask.to(DEV), position_ids=pos.to(DEV)).logits
        chunked = prefill_chunked(model, ids.to(DEV), attention_mask=mask.to(DEV), chunk_size=7,
                                  logits="all").logits
    ref = reference_logits(plain, ids, attention_mask=mask, streaming_layers=STREAMING, sink=SINK, window=WINDOW)
    real = mask.bool()
    assert err(one.cpu()[real], ref[real]) <= 1e-4
    assert err(chunked.cpu()[real], ref[real]) <= 1e-4
    # mixed layers (per-head) and online choice
    heads = make_tiny_model("llama").to(DEV)
    masks = {0: [False, True], 1: [True, False]}
    enable_hybrid(heads, resolve_layout(heads.config, streaming_layers=[2], head_masks=masks, sink=SINK,
                                        window=WINDOW))
    with torch.no_grad():
        for use_cache in (True, False):
            got = heads(ids[:1].to(DEV), use_cache=use_cache).logits
            want = reference_logits(plain, ids[:1], streaming_layers=[2], head_masks=masks, sink=SINK,
                                    window=WINDOW)
            assert err(got, want) <= 1e-4
    online = make_tiny_model("llama").to(DEV)
    enable_hybrid(online, resolve_layout(online.config, online_ratio=0.5, sink=SINK, window=WINDOW))
    out = online.generate(input_ids=ids[:1].to(DEV), attention_mask=torch.ones(1, 40, dtype=torch.long,
                          device=DEV), max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0)
    chosen = out.past_key_values.streaming_layer_indices()
    assert len(chosen) == 2
    ref = reference_logits(plain, out.sequences.cpu(), streaming_layers=chosen, sink=SINK, window=WINDOW,
                           full_until=40)[:, 39:-1]
    assert err(torch.stack(out.logits, 1), ref) <= 1e-4


def _peak_decode_memory(model, prompt_len: int, new: int) -> int:
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_peak_memory_really_falls(granularity, kernel_path):
    if kernel_path == "reference":
        pytest.skip("the kernels' references build a dense n x N mask by design; memory is the kernels' job")
    cfg = dict(num_hidden_layers=8, hidden_size=256, intermediate_size=512, num_attention_heads=8,
               num_key_value_heads=4, head_dim=64, vocab_size=512, max_position_embeddings=16384)
    dense = make_tiny_model("llama", **cfg).to(DEV, torch.bfloat16)
    hybrid = make_tiny_model("llama", **cfg).to(DEV, torch.bfloat16)
    if granularity == "layer":
        layout = resolve_layout(hybrid.config, streaming_layers=[2, 3, 4, 5, 6, 7], sink=4, window=252)
    else:
        masks = {i: [True, True, True, False] for i in range(8)}
        layout = resolve_layout(hybrid.config, head_masks=masks, sink=4, window=252)
    enable_hybrid(hybrid, layout, chunk_size=1024)
    dense.generation_config.prefill_chunk_size = 1024  # the same chunked prefill for both
    prompt = 8192
    for model in (dense, hybrid):  # warm-up: Triton's autotuning allocates its own scratch buffers
        _peak_decode_memory(model, prompt, 16)
    peak_dense = _peak_decode_memory(dense, prompt, 16)
    peak_hybrid = _peak_decode_memory(hybrid, prompt, 16)
    per_token = 2 * 4 * 64 * 2 * 8  # bytes of K+V per token over all layers (bf16)
    saved = 0.75 * per_token * (prompt + 16 - 256)
    assert peak_dense - peak_hybrid >= 0.7 * saved
