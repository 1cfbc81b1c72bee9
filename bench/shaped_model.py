"""Random-weight models of a real model's shape, for speed and memory runs that need no weights.

Speed and memory of a forward pass depend on shapes, dtypes and the attention pattern, not on weight values,
so a model built from the published config with random bf16 weights times like the real one.
"""

from __future__ import annotations

import logging

import torch

from ..errors import LightTransferError

log = logging.getLogger(__name__)

# the published Llama-3-8B shape (positions raised so that 128k-token runs need no RoPE scaling: with random weights
# only the shapes matter)
SHAPES: dict[str, dict] = {
    "llama3-8b-shaped": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                             intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                             max_position_embeddings=262144, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def is_shaped_spec(spec: str) -> bool:
    return str(spec) in SHAPES


@torch.no_grad()
def build_shaped_model(spec: str, *, device: torch.device, dtype: torch.dtype, seed: int = 0, **overrides):
    """A ``LlamaForCausalLM`` of the named shape with N(0, 0.02) weights and unit norms, in eval mode.

    Built on the meta device and materialized straight on ``device`` (no CPU copy of 16 GB).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec not in SHAPES:
        raise LightTransferError(f"unknown model shape '{spec}'; known: {', '.join(SHAPES)}.")
    config = LlamaConfig(**dict(SHAPES[spec], **overrides))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    # the rotary buffers were never computed on the meta device: rebuild them in fp32 on the target device
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    model.eval()
    log.info("built %s: %.2fB parameters on %s", spec, sum(p.numel() for p in model.parameters()) / 1e9, device)
    return model


__all__ = ["SHAPES", "build_shaped_model", "is_shaped_spec"]
