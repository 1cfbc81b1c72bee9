"""Fused ops mode on tiny models (fp32, CPU, the Triton interpreter that conftest switches on without a GPU): the
same logits and greedy tokens as the stock forwards through every runtime path, instance-level rewiring only, and a
clean way back. The CUDA tests at the end run the compiled kernels in bf16, with and without a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.errors import LightTransferError
from lighttransfer.runtime import (
    disable_hybrid,
    enable_hybrid,
    generate_static,
    make_cache,
    prefill_chunked,
    resolve_layout,
    runtime_of,
)
from lighttransfer.runtime import fused_ops as fused_module
from lighttransfer.runtime.fused_ops import FUSED_ATTR, fuse_model, is_fused, unfuse_model
from test_runtime import SINK, WINDOW, max_diff, random_ids

# fp32 through the interpreter: only the reduction order and the GEMM blocking differ from the stock ops
TOL = 2e-5
# layers: 0 mixed (KV head 1 streams), 1 streaming, the rest full
MIXED = {0: [False, True]}


@pytest.fixture
def rope_calls(monkeypatch):
    """Counts the fused RoPE launches, so a test knows the fused attention forward really ran."""
    calls = []
    original = fused_module.apply_rope

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fused_module, "apply_rope", counting)
    return calls


def pair(arch: str, *, mixed: bool = True, **options):
    """(hybrid with fused ops, the same hybrid without): same weights, same layout."""
    models = []
    for fused in (True, False):
        model = make_tiny_model(arch)
        masks = MIXED if mixed and model.config.num_key_value_heads == 2 else None
        layout = resolve_layout(model.config, streaming_layers=[1], head_masks=masks, sink=SINK, window=WINDOW,
                                **options)
        models.append(enable_hybrid(model, layout, fused_ops=fused))
    return models


def _generate(model, prompt, new=14, **kw):
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_generation_past_sink_and_window_equals_the_stock_forwards(arch, rope_calls):
    """Streaming, mixed and full layers; the prompt plus 12 new tokens passes sink + window (3 + 8)."""
    fused, stock = pair(arch)
    counts = runtime_of(fused).fused_ops.counts()
    layers = fused.config.num_hidden_layers
    assert counts["attention"] == layers and counts["mlp"] == layers and counts["norm"] >= 2 * layers + 1
    prompt = random_ids(2 if arch == "llama" else 1, 9, seed=1)
    got, ref = _generate(fused, prompt, new=12), _generate(stock, prompt, new=12)
    assert len(rope_calls) >= 12 * layers  # every decode step went through the fused attention
    assert max_diff(torch.stack(got.logits, 1), torch.stack(ref.logits, 1)) <= TOL
    assert torch.equal(got.sequences, ref.sequences)


def test_left_padded_generation_equals_the_stock_forwards():
    """Per-sequence positions (left padding): cos/sin carry a batch dim of their own."""
    from test_runtime_generate import left_pad

    fused, stock = pair("llama")
    ids, mask = left_pad([random_ids(1, 12, seed=9)[0], random_ids(1, 5, seed=10)[0]])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    got, ref = fused.generate(**kw), stock.generate(**kw)
    assert max_diff(torch.stack(got.logits, 1), torch.stack(ref.logits, 1)) <= TOL
    assert torch.equal(got.sequences, ref.sequences)


def test_mistral_forward_equals_the_stock_forward():
    """Mistral's attention passes the config's sliding window on to the attention function, as its stock one does."""
    fused, stock = pair("mistral", mixed=False)
    ids = random_ids(1, 16, seed=5)
    with torch.no_grad():
        assert max_diff(fused(ids).logits, stock(ids).logits) <= TOL


def test_gemma3_fuses_its_norms_only():
    """Gemma 3: the norms (Gemma style, ``1 + w``) fused; its attention and GELU MLP keep the stock forward."""
    model, plain = make_tiny_model("gemma3"), make_tiny_model("gemma3")
    done = fuse_model(model)
    assert set(done.counts()) == {"norm"}
    assert {"Gemma3Attention", "Gemma3MLP"} <= set(done.skipped)
    ids = random_ids(2, 12)
    with torch.no_grad():
        assert max_diff(model(ids).logits, plain(ids).logits) <= TOL


def test_unsupported_architectures_are_untouched():
    model, plain = make_tiny_model("gpt_neox"), make_tiny_model("gpt_neox")
    done = fuse_model(model)
    assert done.counts() == {} and not is_fused(model)
    assert not any("forward" in vars(m) for m in model.modules())
    ids = random_ids(1, 10)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_classes_of_the_same_name_outside_transformers_are_left_alone():
    """Remote code may name a class LlamaRMSNorm with another formula: only transformers' own classes qualify."""

    class LlamaRMSNorm(torch.nn.Module):  # noqa: N801 - the name is the point
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))

    holder = torch.nn.Sequential(LlamaRMSNorm())
    done = fuse_model(holder)
    assert done.counts() == {} and "not transformers' own" in done.skipped["LlamaRMSNorm"]


def test_modules_with_accelerate_hooks_keep_their_forwards():
    """An accelerate hook (``device_map`` dispatch or offload) on a module or its projections: left stock."""
    model = make_tiny_model("llama")
    layer = model.model.layers[0]
    layer.self_attn.q_proj._hf_hook = object()
    layer.mlp._hf_hook = object()
    done = fuse_model(model)
    assert not hasattr(layer.self_attn, FUSED_ATTR) and not hasattr(layer.mlp, FUSED_ATTR)
    assert "hooks" in done.skipped["LlamaAttention"] and "wrapped" in done.skipped["LlamaMLP"]
    assert hasattr(model.model.layers[1].self_attn, FUSED_ATTR)


def test_rewiring_is_per_instance():
    """Another model of the same class in the process keeps the stock forwards; no class attribute changes."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

    before = (LlamaAttention.forward, LlamaMLP.forward, LlamaRMSNorm.forward)
    fused, other = make_tiny_model("llama"), make_tiny_model("llama")
    fuse_model(fused)
    assert (LlamaAttention.forward, LlamaMLP.forward, LlamaRMSNorm.forward) == before
    assert not any("forward" in vars(m) or hasattr(m, FUSED_ATTR) for m in other.modules())


def test_projections_are_views_into_one_weight():
    model = make_tiny_model("qwen2")  # q/k/v with biases
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = sum(p.numel() for p in model.parameters())
    fuse_model(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    fused_w = getattr(attn, FUSED_ATTR).linear.weight
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == fused_w.untyped_storage().data_ptr()
        assert proj.bias.untyped_storage().data_ptr() == getattr(attn, FUSED_ATTR).linear.bias.untyped_storage().data_ptr()
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sum(p.numel() for p in model.parameters()) == params_before


def test_remove_restores_the_stock_forwards_and_values(rope_calls):
    fused, stock = pair("llama")
    disable_hybrid(fused)
    disable_hybrid(stock)
    assert not is_fused(fused) and not any("forward" in vars(m) for m in fused.modules())
    ids = random_ids(2, 20, seed=2)
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, stock(ids).logits)
    assert rope_calls == []
    # head reordering of the mixed layer was undone through the views: the weights are the original ones
    plain = make_tiny_model("llama")
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), plain.state_dict().values(), strict=True))


def test_save_and_load_round_trip(tmp_path):
    """A fused model saves the original tensor names and values; the saved copy loads and runs fused again."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama")
    fuse_model(model)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    plain = make_tiny_model("llama").state_dict()
    assert set(saved) == set(plain) and all(torch.equal(saved[k], plain[k]) for k in plain)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    fuse_model(again)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert max_diff(again(ids).logits, model(ids).logits) <= TOL


def test_load_option(tiny_model_dir):
    import lighttransfer

    model = lighttransfer.load(tiny_model_dir, device="cpu", streaming_layers=[1], sink=SINK, window=WINDOW,
                               fused_ops=True)
    assert is_fused(model) and runtime_of(model).fused_ops.counts()["attention"] == 4
    default = lighttransfer.load(tiny_model_dir, device="cpu", streaming_layers=[1], sink=SINK, window=WINDOW)
    assert not is_fused(default)  # off on the CPU unless asked for
    with pytest.raises(LightTransferError, match="fused_ops"):
        lighttransfer.load(tiny_model_dir, device="cpu", streaming_layers=[1], fused_ops="yes")


def test_static_steps_and_chunked_prefill_equal_the_stock_forwards():
    """generate_static's static decode steps (eager on the CPU) and a chunked prefill, fused vs stock."""
    fused, stock = pair("llama")
    prompt = random_ids(2, 10, seed=3)
    got = generate_static(fused, prompt, max_new_tokens=8, cuda_graphs=False, chunk_size=4)
    ref = generate_static(stock, prompt, max_new_tokens=8, cuda_graphs=False, chunk_size=4)
    assert torch.equal(got.sequences, ref.sequences)
    with torch.no_grad():
        a = prefill_chunked(fused, prompt, chunk_size=3, cache=make_cache(fused), logits="all")
        b = prefill_chunked(stock, prompt, chunk_size=3, cache=make_cache(stock), logits="all")
    assert max_diff(a.logits, b.logits) <= TOL


def test_tokenselect_decode_equals_the_stock_forwards():
    fused, stock = pair("llama", mixed=False, decode="tokenselect", select_k=4, select_init=1, select_local=2)
    prompt = random_ids(1, 16, seed=4)
    got, ref = _generate(fused, prompt, new=8), _generate(stock, prompt, new=8)
    assert max_diff(torch.stack(got.logits, 1), torch.stack(ref.logits, 1)) <= TOL
    assert torch.equal(got.sequences, ref.sequences)


def test_sparse_prefill_equals_the_stock_forwards():
    """Block-sparse prefill of the full layers (sampled rows, alpha 0.9) sees the same q/k/v with fused ops."""
    from lighttransfer.hybrid_format import SparsePrefillConfig
    from lighttransfer.runtime import sparse_prefill_stats

    sparse = SparsePrefillConfig(method="sample", alpha=0.9, min_len=16, block_q=16, block_k=16, sink_blocks=1,
                                 local_blocks=1)
    models = []
    for fused in (True, False):
        model = make_tiny_model("llama")
        layout = resolve_layout(model.config, streaming_layers=[1, 3], sink=4, window=24)
        models.append(enable_hybrid(model, layout, sparse_prefill=sparse, fused_ops=fused))
    ids = random_ids(1, 70, seed=8)
    with torch.no_grad():
        got, want = models[0](ids).logits, models[1](ids).logits
    assert max_diff(got, want) <= TOL
    assert sparse_prefill_stats(models[0]).density_by_layer() == sparse_prefill_stats(models[1]).density_by_layer()


def test_gradients_take_the_stock_path():
    """With autograd on, the fused forwards defer to the stock ones, so training sees every gradient."""
    model, plain = make_tiny_model("llama"), make_tiny_model("llama")
    fuse_model(model)
    ids = random_ids(1, 8)
    model(ids).logits.sum().backward()
    plain(ids).logits.sum().backward()
    grad = model.model.layers[0].self_attn.k_proj.weight.grad
    assert grad is not None and torch.allclose(grad, plain.model.layers[0].self_attn.k_proj.weight.grad, atol=1e-5)


def test_replaced_parameters_are_refused_again():
    """A projection replaced after fusing (as ``model.to(...)`` does) is picked up, not shadowed by a stale copy."""
    model, plain = make_tiny_model("llama"), make_tiny_model("llama")
    fuse_model(model)
    with torch.no_grad():
        for m in (model, plain):
            attn = m.model.layers[1].self_attn
            attn.v_proj.weight.data = attn.v_proj.weight.data.clone() * 2
            m.model.layers[2].mlp.up_proj.weight.mul_(3)  # in place: through the view
    ids = random_ids(1, 9)
    with torch.no_grad():
        assert max_diff(model(ids).logits, plain(ids).logits) <= TOL
    assert getattr(model.model.layers[1].self_attn, FUSED_ATTR).linear.current(model.model.layers[1].self_attn)


def test_unfuse_counts_and_is_idempotent():
    model = make_tiny_model("qwen3")
    done = fuse_model(model)
    assert fuse_model(model).counts() == done.counts()  # a second call changes nothing
    assert unfuse_model(model) == len(done.modules) and unfuse_model(model) == 0


# ---- CUDA: the compiled kernels, a captured graph, bf16 --------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_graph_replays_with_fused_ops_equal_the_stock_eager_steps(arch):
    """Moved to the GPU after fusing (the fused weights are rebuilt on the first forward, outside the capture), then
    decoded past the ring's wrap-around from a captured graph: each replay gives the stock model's eager logits
    (teacher-forced with the stock model's greedy token, so a near tie cannot make the two runs diverge)."""
    from lighttransfer.compat import output_cache
    from lighttransfer.runtime import StaticDecoder

    fused, stock = (m.to("cuda") for m in pair(arch))
    prompt = random_ids(2, 10, seed=6).cuda()
    new = 3 * (SINK + WINDOW)
    reserve = prompt.shape[1] + new
    key = runtime_of(stock).cache_keyword
    with torch.inference_mode():
        caches, logits = [], None
        for m in (fused, stock):
            out = m(prompt, use_cache=True, **{key: make_cache(m, max_tokens=reserve)})
            caches.append(output_cache(out))
            logits = out.logits[:, -1]
        decoder = StaticDecoder(fused, caches[0], tokens=reserve)
        dynamic = caches[1]
        token = logits.argmax(-1)
        for step in range(new - 1):
            want = stock(token[:, None], use_cache=True, **{key: dynamic}).logits[:, -1]
            got = decoder(token).clone()
            assert max_diff(got, want) <= 1e-4, f"step {step} ({decoder.path})"
            token = want.argmax(-1)
    assert decoder.path == "cuda graph"
    attn = fused.model.layers[0].self_attn
    assert getattr(attn, FUSED_ATTR).linear.weight.is_cuda and getattr(attn, FUSED_ATTR).linear.current(attn)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_bf16_logits_are_as_close_to_fp32_as_the_stock_bf16_ones(arch):
    """The error policy at model level: |fused bf16 - fp32| within twice |stock bf16 - fp32| plus a small floor."""
    fused, stock = (m.to("cuda", torch.bfloat16) for m in pair(arch))
    exact = pair(arch)[1].to("cuda")
    ids = random_ids(2, 40, seed=7).cuda()
    with torch.inference_mode():
        ref = exact(ids).logits.float()
        low = stock(ids).logits.float()
        got = fused(ids).logits.float()
    base = (low - ref).abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= 2 * base + 1e-2 * ref.abs().max().item(), f"{err:.3g} vs stock bf16 {base:.3g}"
