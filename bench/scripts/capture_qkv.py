"""Capture one layer's post-RoPE queries, keys and values from a real model, for ``sparse_prefill_bench.py --qkv``.

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/capture_qkv.py --out qkv.pt \\
        [--model SmolLM2-135M-Instruct.Q4_1.gguf] [--text austen_novels.txt] [--length 8192] [--layer 15]

Runs one forward of ``--length`` tokens of the text and saves ``{"q": [1, H, N, D], "k", "v": [1, Hkv, N, D],
"layer", "model", "length"}`` (bf16 on a GPU, fp32 on the CPU) with ``torch.save``. The tensors are what the
attention function receives (after RoPE, before any GQA repeat). The attention function is swapped only inside a
``with`` block, through transformers' ``AttentionInterface``; the forward's outputs are the model's own.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from lighttransfer.loading import load_model

SHARED = Path(__file__).resolve().parents[3] / "shared" / "assets"
NAME = "lighttransfer_qkv_capture"


@contextlib.contextmanager
def capture_layer(model, layer: int, store: dict):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    original = model.config._attn_implementation or "eager"
    attend = AttentionInterface._global_mapping[original]

    def grab(module, query, key, value, attention_mask, **kwargs):
        if getattr(module, "layer_idx", None) == layer:
            store.update(q=query.detach().cpu(), k=key.detach().cpu(), v=value.detach().cpu())
        return attend(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(NAME, grab)
    AttentionMaskInterface.register(NAME, AttentionMaskInterface._global_mapping[original])
    model.config._attn_implementation = NAME
    try:
        yield store
    finally:
        model.config._attn_implementation = original


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=str(SHARED / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--text", default=str(SHARED / "text" / "austen_novels.txt"))
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dtype = "bfloat16" if args.device != "cpu" else "float32"
    loaded = load_model(args.model, device=args.device, dtype=dtype, attn_implementation="sdpa")
    text = Path(args.text).read_text()[: args.length * 12]
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][: args.length]
    if len(ids) < args.length:
        raise SystemExit(f"{args.text} gives only {len(ids)} tokens")
    store: dict = {}
    with capture_layer(loaded.model, args.layer, store), torch.no_grad():
        loaded.model(torch.tensor([ids], device=loaded.model.device), use_cache=False)
    if not store:
        raise SystemExit(f"layer {args.layer} was not captured (the model has "
                         f"{loaded.model.config.num_hidden_layers} layers)")
    torch.save({**store, "layer": args.layer, "model": args.model, "length": args.length}, args.out)
    print(f"saved q {tuple(store['q'].shape)}, k/v {tuple(store['k'].shape)} of layer {args.layer} to {args.out}")


if __name__ == "__main__":
    main()
