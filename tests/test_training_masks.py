"""The fine-tuning masks against brute force: S²-Attn groups (plain and shifted, never wrapping), streaming heads,
FlexAttention block masks; and a ``torch.roll``-style S²-Attn (LongLoRA's non-flash reference) is caught."""

from __future__ import annotations

import warnings

import pytest
import torch
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels.mask import streaming_mask
from lighttransfer.training.masks import (
    LayerRules,
    dense_mask,
    flex_block_mask,
    layer_rules,
    s2_group_size,
    s2_rule,
    s2_shifted_heads,
)

# ---- brute force: explicit lists of groups, one (query, key) pair at a time ---------------------------------

def reference_groups(seq_len: int, group: int, shifted: bool) -> list[range]:
    """The groups as intervals: ``[0, G), [G, 2G), ...`` or, shifted, ``[0, G/2), [G/2, 3G/2), ...``."""
    start, groups = 0, []
    edge = group // 2 if shifted else group
    while start < seq_len:
        groups.append(range(start, min(edge, seq_len)))
        start, edge = edge, edge + group
    return groups


def reference_mask(num_heads, seq_len, *, group, streaming_heads=None, sink=0, window=1, s2_sink=0):
    """bool ``[num_heads, seq_len, seq_len]`` by loops: S² heads (second half shifted) see causal keys of their
    own group and the first ``s2_sink``; streaming heads the first ``sink`` and the last ``window``."""
    streaming_heads = streaming_heads or [False] * num_heads
    mask = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.bool)
    for h in range(num_heads):
        if streaming_heads[h]:
            for q in range(seq_len):
                for k in range(q + 1):
                    mask[h, q, k] = k < sink or q - k < window
            continue
        shifted = h >= num_heads // 2
        for g in reference_groups(seq_len, group, shifted):
            for q in g:
                for k in g:
                    if k <= q:
                        mask[h, q, k] = True
        for q in range(seq_len):
            for k in range(min(s2_sink, q + 1)):
                mask[h, q, k] = True
    return mask


def matches_reference(mask: torch.Tensor, *, num_heads, seq_len, group, **kw) -> bool:
    return bool(torch.equal(mask, reference_mask(num_heads, seq_len, group=group, **kw)))


def rolled_s2_mask(num_heads: int, seq_len: int, group: int) -> torch.Tensor:
    """What LongLoRA's non-flash reference computes: the shifted heads' tokens rolled left by G/2
    (``torch.roll``), grouped, causal in the rolled order, rolled back. Returned as the mask in original
    positions: the first G/2 tokens share the last group with the final G/2 and come after them."""
    pos = torch.arange(seq_len)
    mask = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.bool)
    for h in range(num_heads):
        orig = torch.roll(pos, -group // 2) if h >= num_heads // 2 else pos  # rolled index r holds token orig[r]
        r = torch.arange(seq_len)
        seen = (r.view(-1, 1) // group == r.view(1, -1) // group) & (r.view(1, -1) <= r.view(-1, 1))
        mask[h][orig.view(-1, 1), orig.view(1, -1)] = seen
    return mask


CASES = [  # (seq_len, group_frac, heads)
    (8, 0.25, 2), (16, 0.25, 4), (37, 0.25, 4), (64, 0.5, 9), (113, 0.25, 3), (96, 1 / 3, 4), (50, 1.0, 2),
]


@pytest.mark.parametrize("seq_len,frac,heads", CASES, ids=lambda v: str(v))
def test_s2_mask_is_the_brute_force_groups(seq_len, frac, heads):
    group = s2_group_size(seq_len, frac)
    rules = layer_rules(heads, streaming_heads=[False] * heads, sink=4, window=8, s2_group=group)
    assert matches_reference(dense_mask(rules, seq_len), num_heads=heads, seq_len=seq_len, group=group)


@pytest.mark.parametrize("seq_len,frac,heads", CASES[:4], ids=lambda v: str(v))
def test_s2_with_sinks_adds_the_first_tokens(seq_len, frac, heads):
    group = s2_group_size(seq_len, frac)
    rules = layer_rules(heads, streaming_heads=[False] * heads, sink=4, window=8, s2_group=group, s2_sink=3)
    assert matches_reference(dense_mask(rules, seq_len), num_heads=heads, seq_len=seq_len, group=group, s2_sink=3)


@pytest.mark.parametrize("seq_len", [16, 40, 77])
def test_mixed_layer_streams_its_streaming_heads_with_the_kernels_rule(seq_len):
    """Heads of a streaming KV head get kernels/mask.py's sink + window rule; the rest S²-Attn."""
    heads, sink, window = 4, 2, 5
    streaming = [True, True, False, False]
    group = s2_group_size(seq_len, 0.25)
    mask = dense_mask(layer_rules(heads, streaming_heads=streaming, sink=sink, window=window, s2_group=group),
                      seq_len)
    assert matches_reference(mask, num_heads=heads, seq_len=seq_len, group=group, streaming_heads=streaming,
                             sink=sink, window=window)
    assert torch.equal(mask[0], streaming_mask(seq_len, seq_len, sink=sink, window=window))


def test_without_s2_full_heads_are_causal_and_native_windows_slide():
    rules = layer_rules(3, streaming_heads=[False] * 3, sink=2, window=4, s2_group=None)
    assert rules.is_causal
    assert torch.equal(dense_mask(rules, 12), torch.ones(3, 12, 12, dtype=torch.bool).tril().expand(3, 12, 12))
    slid = layer_rules(2, streaming_heads=[False, False], sink=2, window=4, s2_group=8, native_window=3)
    assert torch.equal(dense_mask(slid, 10)[1], streaming_mask(10, 10, sink=0, window=3))


@pytest.mark.parametrize("seq_len,group", [(16, 4), (64, 16), (37, 10)])
def test_every_pattern_is_causal(seq_len, group):
    rules = layer_rules(4, streaming_heads=[False, True, False, False], sink=3, window=5, s2_group=group, s2_sink=2)
    mask = dense_mask(rules, seq_len)
    assert not mask.triu(1).any()
    assert mask.diagonal(dim1=1, dim2=2).all()  # every query sees itself


# ---- the torch.roll variant is caught ---------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,group", [(16, 4), (64, 16), (48, 12)])
def test_a_rolled_shift_fails_the_check(seq_len, group):
    """LongLoRA issues #15/#90: rolling the shifted heads lets the first G/2 tokens see the last G/2."""
    bad = rolled_s2_mask(4, seq_len, group)
    assert not matches_reference(bad, num_heads=4, seq_len=seq_len, group=group)
    shifted = bad[2:]
    assert shifted.triu(1).any(), "the rolled variant should reach into the future"
    assert shifted[:, 0, seq_len - 1].all()  # token 0 sees the very last token
    # the unshifted heads of the rolled variant are right: the check does not fail for the wrong reason
    assert torch.equal(bad[:2], reference_mask(4, seq_len, group=group)[:2])


def _attention_with_mask(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("make_mask,leaks", [("ours", False), ("rolled", True)], ids=["ours", "torch.roll"])
def test_no_output_depends_on_a_later_token(make_mask, leaks):
    """Causality as a model sees it: changing the last token's key/value changes no earlier output (ours), and
    does change the first tokens' outputs with a rolled shift."""
    heads, seq_len, group = 4, 32, 8
    mask = dense_mask(layer_rules(heads, streaming_heads=[False] * heads, sink=0, window=1, s2_group=group),
                      seq_len) if make_mask == "ours" else rolled_s2_mask(heads, seq_len, group)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, 8, generator=g) for _ in range(3))
    before = _attention_with_mask(q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    k2[..., -1, :] += 3.0
    v2[..., -1, :] += 3.0
    after = _attention_with_mask(q, k2, v2, mask)
    changed = (after - before)[..., :-1, :].abs().amax() > 1e-6
    assert bool(changed) == leaks


# ---- FlexAttention block masks (built on the CPU; FlexAttention's backward needs CUDA) -----------------------

@pytest.mark.parametrize("seq_len,frac", [(256, 0.25), (384, 0.5), (640, 0.25)])
def test_block_mask_holds_exactly_the_blocks_with_a_visible_pair(seq_len, frac):
    heads = 4
    rules = layer_rules(heads, streaming_heads=[False, False, True, False], sink=4, window=100,
                        s2_group=s2_group_size(seq_len, frac))
    block = flex_block_mask(rules, seq_len, device="cpu", compile_mask=False)
    size = block.BLOCK_SIZE[0]
    dense = dense_mask(rules, seq_len)
    nb = -(-seq_len // size)
    padded = torch.zeros(heads, nb * size, nb * size, dtype=torch.bool)
    padded[:, :seq_len, :seq_len] = dense
    expected = padded.view(heads, nb, size, nb, size).any(dim=(2, 4))
    assert torch.equal(block.to_dense()[0].bool(), expected)


def test_flex_forward_equals_the_explicit_mask():
    from torch.nn.attention.flex_attention import flex_attention

    heads, seq_len = 4, 256
    rules = layer_rules(heads, streaming_heads=[True, False, False, False], sink=4, window=50, s2_group=64,
                        s2_sink=2)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, seq_len, 16, generator=g) for _ in range(3))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex warns (once per process) that it is unfused
        flex = flex_attention(q, k, v, block_mask=flex_block_mask(rules, seq_len, device="cpu", compile_mask=False))
    ref = _attention_with_mask(q, k, v, dense_mask(rules, seq_len))
    assert (flex - ref).abs().max().item() < 1e-5


# ---- small pieces ------------------------------------------------------------------------------------------

def test_group_size_and_heads():
    assert s2_group_size(8192, 0.25) == 2048
    assert s2_group_size(37, 0.25) == 10  # round(9.25) = 9, made even
    assert s2_group_size(3, 0.25) == 2
    assert s2_shifted_heads(9) == [False] * 4 + [True] * 5
    with pytest.raises(LightTransferError, match="group-frac"):
        s2_group_size(100, 0.0)


def test_visible_pairs_counts_the_mask():
    rules = LayerRules((s2_rule(8, shifted=False), s2_rule(8, shifted=True)))
    assert rules.visible_pairs(30) == int(dense_mask(rules, 30).sum())
