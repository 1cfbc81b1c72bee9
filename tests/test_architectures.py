"""Every stage on more architectures: Mistral, Qwen3 and GPT-NeoX (Llama and Qwen2 run through every test file).

analyze -> convert -> load, on tiny random models: the lazy ratios match the eager attention weights, the
converted checkpoint loads as the dense model in plain transformers, and the hybrid equals the masked reference.
"""

from __future__ import annotations

import lighttransfer
import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.analysis import analyze_tokens
from lighttransfer.convert import convert
from lighttransfer.hybrid_format import HybridConfig
from test_analysis import LAST, RECENT, SEQ, SINK, reference_mass
from test_runtime_reference import reference_logits
from transformers import AutoModelForCausalLM

ARCHS = ["mistral", "qwen3", "gpt_neox"]


def _sharpen(model, factor=20.0):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in (".q_proj.", ".k_proj.", ".query_key_value.")):
                p.mul_(factor)
    return model


@pytest.fixture(params=ARCHS, ids=lambda a: f"arch={a}")
def arch(request):
    return request.param


def test_lazy_ratios_match_eager_weights(arch):
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    eager = _sharpen(make_tiny_model(arch, attn_implementation="eager"))
    mass = reference_mass(eager, ids)  # [layers, batch, heads, last]
    report = analyze_tokens(_sharpen(make_tiny_model(arch)), ids, sink=SINK, window=RECENT, last=LAST)
    expected = mass.mean(-1).mean(-1).mean(-1)  # over queries, heads, samples
    got = torch.tensor(report.layer_lazy_ratios(), dtype=torch.float64)
    assert expected.min() < 0.99  # the window matters
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_convert_then_load_equals_masked_reference(arch, tmp_path):
    model = make_tiny_model(arch)
    src = tmp_path / "src"
    model.save_pretrained(src)
    layers = [0, model.config.num_hidden_layers - 1]
    result = convert(src, out=tmp_path / "hybrid", layers=layers, sink=2, window=8)
    assert result.hybrid.streaming_layers == layers

    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    assert HybridConfig.from_model_config(plain.config).streaming_layers == layers
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)  # plain transformers: the dense model

    hybrid = lighttransfer.load(tmp_path / "hybrid", device="cpu", dtype="float32")
    ref = reference_logits(model, ids, streaming_layers=layers, sink=2, window=8)
    with torch.no_grad():
        got = hybrid(ids).logits
    assert (got - ref).abs().max().item() < 1e-4
    assert (got[:, 20:] - model(ids).logits[:, 20:]).abs().max().item() > 1e-3  # streaming did change them

    # decoding with the bounded cache equals recomputing the masked model from scratch
    out = hybrid.generate(ids, max_new_tokens=6, do_sample=False)
    full = out[:, :-1]
    ref_next = reference_logits(model, full, streaming_layers=layers, sink=2, window=8)[:, 39:].argmax(-1)
    assert torch.equal(out[:, 40:], ref_next)
