"""S²-Attn as causal attention over groups (training/s2_grouped.py) against SDPA with the layer's explicit mask:
outputs and gradients, every edge length, GQA splits that keep or cut KV groups; and a rolled grid is caught."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lighttransfer.training.masks import dense_mask, layer_rules, s2_group_size, s2_rule
from lighttransfer.training.s2_grouped import _runs, grouped_s2_group, s2_grouped_attention

CASES = [  # (seq_len, group, heads, kv_heads)
    (1, 2, 2, 1), (5, 4, 2, 2), (16, 4, 4, 2), (37, 10, 4, 4), (64, 16, 8, 2), (63, 16, 9, 3), (50, 50, 2, 1),
    (12, 2, 6, 1), (7, 8, 1, 1), (96, 32, 32, 8),
]


def _reference(q, k, v, group, scale=None):
    heads = q.shape[1]
    rules = layer_rules(heads, streaming_heads=[False] * heads, sink=0, window=1, s2_group=group)
    mask = dense_mask(rules, q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=heads != k.shape[1])


def _inputs(seq_len, heads, kv_heads, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq_len, dim, generator=g, dtype=dtype)
    k = torch.randn(2, kv_heads, seq_len, dim, generator=g, dtype=dtype)
    v = torch.randn(2, kv_heads, seq_len, dim, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("seq_len,group,heads,kv_heads", CASES, ids=lambda v: str(v))
def test_runs_tile_the_sequence_in_order(seq_len, group, heads, kv_heads):
    for shift in (0, group // 2):
        covered = []
        for start, count, length in _runs(seq_len, group, shift):
            assert length >= 1 and count >= 1
            for i in range(count):
                run = list(range(start + i * length, start + (i + 1) * length))
                # a run is one group of the grid: (p + shift) // group is the same for all of it
                assert len({(p + shift) // group for p in run}) == 1
                covered += run
        assert covered == list(range(seq_len))


@pytest.mark.parametrize("seq_len,group,heads,kv_heads", CASES, ids=lambda v: str(v))
def test_forward_and_gradients_equal_the_explicit_mask(seq_len, group, heads, kv_heads):
    q, k, v = _inputs(seq_len, heads, kv_heads)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=q.dtype)
    results = []
    for fn in (lambda a, b, c: s2_grouped_attention(a, b, c, group=group, scale=0.3),
               lambda a, b, c: _reference(a, b, c, group, scale=0.3)):
        a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(a, b, c)
        out.backward(grad)
        results.append((out.detach(), a.grad, b.grad, c.grad))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_matches_within_rounding(dtype):
    q, k, v = _inputs(40, 4, 2, dim=16, dtype=dtype, seed=3)
    ours = s2_grouped_attention(q, k, v, group=s2_group_size(40, 0.25)).float()
    ref = _reference(q.double(), k.double(), v.double(), s2_group_size(40, 0.25)).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


def test_no_output_depends_on_a_later_token():
    """Changing the last token's key and value changes no earlier output of any head, shifted ones included."""
    q, k, v = _inputs(32, 4, 2)
    before = s2_grouped_attention(q, k, v, group=8)
    k2, v2 = k.clone(), v.clone()
    k2[..., -1, :] += 3.0
    v2[..., -1, :] += 3.0
    after = s2_grouped_attention(q, k2, v2, group=8)
    assert (after - before)[..., :-1, :].abs().amax() == 0
    assert (after - before)[..., -1, :].abs().amax() > 0


def test_a_rolled_grid_is_caught():
    """A grouped implementation that rolls the shifted heads (LongLoRA's non-flash reference) differs from the
    rule: the same comparison as above fails on it."""
    q, k, v = _inputs(32, 4, 2)
    group, shift = 8, 4
    rolled = [torch.roll(t, -shift, dims=2) for t in (q[:, 2:], k[:, 1:], v[:, 1:])]
    b = q.shape[0]
    grouped = [t.reshape(b, t.shape[1], 4, group, 8).transpose(1, 2).reshape(b * 4, t.shape[1], group, 8)
               for t in rolled]
    o = F.scaled_dot_product_attention(*grouped, is_causal=True, enable_gqa=True)
    o = torch.roll(o.reshape(b, 4, 2, group, 8).transpose(1, 2).reshape(b, 2, 32, 8), shift, dims=2)
    ref = _reference(q, k, v, group)
    bad = torch.cat([ref[:, :2], o], dim=1)  # the unshifted heads right, the shifted ones rolled
    assert not torch.allclose(bad, ref)
    torch.testing.assert_close(s2_grouped_attention(q, k, v, group=group), ref, rtol=1e-10, atol=1e-10)


def test_only_plain_s2_layers_take_the_grouped_path():
    heads = 4
    plain = layer_rules(heads, streaming_heads=[False] * heads, sink=4, window=16, s2_group=8)
    assert grouped_s2_group(plain) == 8
    mixed = layer_rules(heads, streaming_heads=[True, False, False, False], sink=4, window=16, s2_group=8)
    sinks = layer_rules(heads, streaming_heads=[False] * heads, sink=4, window=16, s2_group=8, s2_sink=4)
    causal = layer_rules(heads, streaming_heads=[False] * heads, sink=4, window=16, s2_group=None)
    native = layer_rules(heads, streaming_heads=[False] * heads, sink=4, window=16, s2_group=8, native_window=32)
    for rules in (mixed, sinks, causal, native):
        assert grouped_s2_group(rules) is None
    # every head shifted (not LongLoRA's half / half split) is not this path's layer either
    from lighttransfer.training.masks import LayerRules

    assert grouped_s2_group(LayerRules(tuple(s2_rule(8, shifted=True) for _ in range(heads)))) is None


def test_a_model_trains_the_same_through_the_grouped_path_and_the_mask():
    """Inside ``training_attention`` a hybrid's full layers take the grouped path; its loss and gradients equal
    the explicit-mask path's (``grouped_s2=False``), and the streaming layers keep their mask either way."""
    from conftest import make_tiny_model
    from lighttransfer.runtime import resolve_layout
    from lighttransfer.training import TrainingAttention, training_attention

    ids = torch.randint(3, 60, (2, 48), generator=torch.Generator().manual_seed(2))
    results = {}
    for grouped in (True, False):
        model = make_tiny_model("llama", tie_word_embeddings=True).double()
        layout = resolve_layout(model.config, streaming_layers=[1], sink=2, window=8)
        state = TrainingAttention(layout=layout, s2_attn=True, backend="dense", grouped_s2=grouped)
        with training_attention(model, state):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[grouped] = (loss.detach(), grads, len(state._masks))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-9, atol=1e-10)
    assert results[True][2] < results[False][2]  # the grouped run built masks for the streaming layer only
