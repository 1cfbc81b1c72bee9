"""The fused QAdA decode step in the runtime (tiny models, fp32, CPU, the Triton interpreter): the same tokens and
realised shares as the unfused path (PyTorch decision + routed kernel), dynamic and static steps, left padding;
the guarded, local-statistics and observe-only routings keep to the unfused path."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer import kernels
from lighttransfer.hybrid_format import HeadRoutingConfig
from lighttransfer.runtime import (
    enable_hybrid,
    generate_static,
    head_routing_stats,
    resolve_layout,
    runtime_of,
)
from lighttransfer.runtime import head_routing as hr
from lighttransfer.runtime import head_routing_fused as fused

SINK, WINDOW = 2, 6

needs_interpreter = pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"),
                                       reason="needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest on CPU)")


@pytest.fixture
def on_kernels(monkeypatch):
    """The kernels on the CPU, and a count of the fused steps taken."""
    monkeypatch.setattr(hr, "KERNELS_ON_CPU", True)
    calls = []
    real = kernels.fused_routed_decode

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(kernels, "fused_routed_decode", counting)
    return calls


def _model(config, device="cpu"):
    model = make_tiny_model("llama").to(device)
    enable_hybrid(model, resolve_layout(model.config, streaming_layers=[], sink=SINK, window=WINDOW),
                  head_routing=config)
    runtime_of(model).select_chunks = False
    return model


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(3, 256, (1, 30), generator=g), torch.randint(3, 256, (1, 22), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    return ids.to(device), mask.to(device)


def _run(model, static, ids, mask):
    head_routing_stats(model).reset()
    with torch.no_grad():
        if static:
            out = generate_static(model, ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0).sequences
        else:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    return out[:, -10:], head_routing_stats(model).to_dict()


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA GPU")])
CPU = pytest.param("cpu", marks=needs_interpreter)


@pytest.mark.parametrize("variant", ["one-launch", "three-launch"])
@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize(("cov", "static"), [("diag", False), ("full", True)], ids=["diag-dynamic", "full-static"])
def test_fused_and_unfused_paths_give_the_same_tokens_and_shares(cov, static, device, variant, on_kernels,
                                                                 monkeypatch):
    """Left-padded batch of two, both fused variants; on CUDA the static steps are captured in a CUDA graph on
    both paths."""
    monkeypatch.setattr(fused, "VARIANT", variant)
    config = HeadRoutingConfig(mode="qada", tau=0.67, cov=cov)
    ids, mask = _batch(device)
    # one model per path: a static step captured in a CUDA graph replays the path it was captured with
    monkeypatch.setattr(fused, "FUSED", False)
    want_tokens, want_stats = _run(_model(config, device), static, ids, mask)
    assert not on_kernels
    monkeypatch.setattr(fused, "FUSED", True)
    got_tokens, got_stats = _run(_model(config, device), static, ids, mask)
    assert on_kernels  # the fused steps ran
    assert torch.equal(got_tokens, want_tokens)
    assert got_stats == want_stats and 0.0 < got_stats["local_share"] < 1.0


@needs_interpreter
def test_other_routings_keep_to_the_unfused_path(on_kernels):
    """The pages guard, window statistics, the oracle, observing (calibration) and recorded shares: unfused."""
    q = torch.zeros(1, 4, 1, 8)
    fusable = hr.HeadRouting(HeadRoutingConfig(mode="qada", tau=0.67, cov="diag"), sink=SINK, window=WINDOW)
    assert fused.applies(fusable, q)
    for config in (HeadRoutingConfig(mode="qada", tau=0.67, guard="pages", page=4),
                   HeadRoutingConfig(mode="qada", tau=0.67, stats="local"), HeadRoutingConfig(mode="oracle", tau=0.6)):
        assert not fused.applies(hr.HeadRouting(config, sink=SINK, window=WINDOW), q), config
    fusable.observe_only = True
    assert not fused.applies(fusable, q)
    fusable.observe_only, fusable.stats.record = False, True
    assert not fused.applies(fusable, q)
    with kernels.use_reference():
        fusable.stats.record = False
        assert not fused.applies(fusable, q)
    assert fused.applies(fusable, q)
