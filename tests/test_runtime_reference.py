"""An independent reference for the runtime: full recompute with an explicit per-layer sink + window mask.

The reference runs a plain copy of the model with no cache. Its attention (registered for the tests only) is
eager softmax attention under a dense boolean mask built from ``kernels.mask.streaming_visible`` for the
streaming layers and plain causal visibility for the others, with each sequence's positions counted from its
first real token. It shares nothing with the runtime's cache, slot bookkeeping or kernels.

Helpers here are imported by the other runtime tests; the tests at the bottom check the reference itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.kernels.mask import causal_visible, streaming_visible
from transformers import AttentionInterface, PreTrainedTokenizerFast

REFERENCE_NAME = "lighttransfer_test_masked_reference"
_VISIBLE = "_test_visible"


def _masked_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    visible = getattr(module, _VISIBLE)  # [B, 1 or H, n, N]
    group = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.double(), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE_NAME, _masked_eager)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from its sequence's first real token (negative for left padding)."""
    kv_start = (attention_mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)
    return torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0) - kv_start


def reference_visibility(pos: torch.Tensor, *, streaming: bool, sink: int, window: int,
                         full_until: int | None = None) -> torch.Tensor:
    """``[B, L, L]`` bool: query row i sees key j. ``full_until``: queries at positions below it attend fully
    (the ``full`` prefill policy: the prompt's own queries)."""
    q = pos.unsqueeze(-1)
    k = pos.unsqueeze(-2)
    real = k >= 0
    causal = causal_visible(q, k) & real
    vis = streaming_visible(q, k, sink, window) & real if streaming else causal
    if streaming and full_until is not None:
        vis = torch.where(q < full_until, causal, vis)
    # a padding query sees itself, so that its (unused) row stays finite
    eye = torch.eye(pos.shape[1], dtype=torch.bool, device=pos.device).unsqueeze(0)
    return vis | (eye & ~vis.any(-1, keepdim=True))


@torch.no_grad()
def reference_logits(plain_model, input_ids: torch.Tensor, *, streaming_layers, sink: int, window: int,
                     attention_mask: torch.Tensor | None = None, full_until: int | None = None,
                     head_masks: dict[int, list[bool]] | None = None, in_place: bool = False) -> torch.Tensor:
    """Logits ``[B, L, vocab]`` of ``plain_model`` with sink + window attention in ``streaming_layers`` (and in the
    streaming KV heads of ``head_masks``), recomputed with no cache. The model is left as it was (``in_place``:
    borrowed and restored instead of copied, for big models)."""
    model = plain_model if in_place else copy.deepcopy(plain_model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE_NAME)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pos = positions_from_mask(attention_mask)
    stream = reference_visibility(pos, streaming=True, sink=sink, window=window, full_until=full_until)
    full = reference_visibility(pos, streaming=False, sink=sink, window=window)
    head_masks = head_masks or {}
    modules = [m for m in model.modules()
               if isinstance(getattr(m, "layer_idx", None), int) and "attention" in type(m).__name__.lower()]
    try:
        for module in modules:
            idx = module.layer_idx
            if idx in head_masks:
                heads = module.config.num_attention_heads
                kv_mask = torch.tensor(head_masks[idx], device=pos.device)
                per_q = kv_mask.repeat_interleave(heads // kv_mask.numel())  # [H]
                vis = torch.where(per_q.view(1, -1, 1, 1), stream.unsqueeze(1), full.unsqueeze(1))
            else:
                vis = (stream if idx in set(streaming_layers) else full).unsqueeze(1)
            setattr(module, _VISIBLE, vis)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos.clamp(min=0),
                    use_cache=False)
    finally:
        for module in modules:
            if hasattr(module, _VISIBLE):
                delattr(module, _VISIBLE)
        model.set_attn_implementation(previous)
    return out.logits


def word_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``w3 .. w{vocab_size-1}`` (ids 0-2: pad, eos, unk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


# ---- checks of the reference itself -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reference_without_streaming_layers_is_the_plain_model(arch):
    model = make_tiny_model(arch)
    ids = torch.randint(3, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(ids).logits
    ref = reference_logits(model, ids, streaming_layers=[], sink=2, window=4)
    assert (plain - ref).abs().max().item() < 1e-5


def test_reference_streaming_changes_long_inputs_only():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids).logits
    ref = reference_logits(model, ids, streaming_layers=[0, 1, 2, 3], sink=2, window=6)
    assert (plain[:, :8] - ref[:, :8]).abs().max().item() < 1e-5  # positions < sink + window see everything
    assert (plain[:, 20:] - ref[:, 20:]).abs().max().item() > 1e-3
