"""The runtime on the real SmolLM2-135M (Llama, GQA 9q/3kv, 30 layers): exact against the masked reference,
and still a sensible language model with most layers streaming."""

from __future__ import annotations

import math

import pytest
import torch
from lighttransfer.runtime import disable_hybrid, enable_hybrid, resolve_layout
from test_runtime_reference import reference_logits

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

STREAMING = list(range(11, 30))
SINK, WINDOW = 4, 64


@pytest.fixture(scope="module")
def emma_ids(real_model, long_text):
    """~260 tokens of Emma: a 200-token prompt and its true 60-token continuation."""
    text = long_text[5000:9000]
    return real_model.tokenizer(text, return_tensors="pt")["input_ids"][:, :260]


@pytest.fixture
def hybrid(real_model):
    model = real_model.model
    layout = resolve_layout(model.config, streaming_layers=STREAMING, sink=SINK, window=WINDOW)
    enable_hybrid(model, layout)
    try:
        yield model
    finally:
        disable_hybrid(model)


def test_greedy_decoding_equals_the_masked_reference(real_model, hybrid, emma_ids):
    prompt = emma_ids[:, :200]
    out = hybrid.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                          do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=real_model.tokenizer.eos_token_id)
    steps = torch.stack(out.logits, dim=1)
    disable_hybrid(hybrid)
    ref = reference_logits(hybrid, out.sequences, streaming_layers=STREAMING, sink=SINK, window=WINDOW,
                           in_place=True)[:, 199:-1]
    # the runtime computes attention in fp32, the reference in fp64: allow their rounding, relative to the scale
    assert (steps - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()
    assert torch.equal(out.sequences[:, 200:], ref.argmax(-1))
    assert out.past_key_values.layers[STREAMING[0]].keys.shape[2] == SINK + WINDOW


def _nll(logits: torch.Tensor, ids: torch.Tensor, start: int) -> float:
    logp = torch.log_softmax(logits[0, start - 1:-1].float(), dim=-1)
    return -logp.gather(-1, ids[0, start:, None]).mean().item()


def test_the_hybrid_still_predicts_real_text(real_model, hybrid, emma_ids):
    with torch.no_grad():
        got = _nll(hybrid(emma_ids).logits, emma_ids, 200)
        disable_hybrid(hybrid)
        dense = _nll(hybrid(emma_ids).logits, emma_ids, 200)
    # two thirds of the layers see only 68 of up to 260 tokens: a bit worse than dense, far from broken
    assert math.exp(got) < 1.5 * math.exp(dense)
    assert math.exp(got) < 60
