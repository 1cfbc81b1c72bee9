"""Capture layers' post-RoPE queries, keys and values from a real model, for ``sparse_prefill_bench.py --qkv``.

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/capture_qkv.py --out qkv.pt \\
        [--model SmolLM2-135M-Instruct.Q4_1.gguf] [--text austen_novels.txt] [--length 8192] [--layers 15]

Runs one forward of ``--length`` tokens of the text and saves ``{"q": [1, L*H, N, D], "k", "v": [1, L*Hkv, N, D],
"layers", "model", "length"}`` (bf16 on a GPU, fp32 on the CPU) with ``torch.save``. The tensors are what the
attention function receives (after RoPE, before any GQA repeat); the ``L`` layers of ``--layers`` are stacked along
the head axis in the order given, which keeps every query head over its own layer's KV head (query head
``l*H + h`` reads KV head ``l*Hkv + h // (H/Hkv)``). The model is causal, so the first ``n`` tokens of a capture are
the capture of those ``n`` tokens: one long capture serves every shorter length. The capture is the analysis's own
(:func:`lighttransfer.analysis.capture.capture_attention`: the attention function swapped only inside a ``with``
block), and the forward stops as soon as the last layer asked for has handed over its inputs: layers above it,
their attention included, never run (at 128k on SmolLM2, capturing layers 4, 7, 8 costs the first 9 of 30 layers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lighttransfer.analysis.capture import CaptureComplete, capture_attention, forward_captured
from lighttransfer.loading import load_model

SHARED = Path(__file__).resolve().parents[3] / "shared" / "assets"


class QKVRecorder:
    """A recorder for :func:`~lighttransfer.analysis.capture.capture_attention`: stores ``{layer: (q, k, v)}`` on the
    CPU for ``layers``, then ends the forward (:class:`~lighttransfer.analysis.capture.CaptureComplete`) instead of
    running the layers above."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def record(self, module, query, key, value, kwargs) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer in self.layers:
            self.store[layer] = tuple(t.detach().cpu() for t in (query, key, value))
            if len(self.store) == len(self.layers):
                raise CaptureComplete


def capture(model, ids: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward of ``ids [1, N]``; ``layers``' q ``[1, L*H, N, D]`` and k, v ``[1, L*Hkv, N, D]``, stacked along
    the head axis in the order of ``layers`` (see the module docstring), on the CPU."""
    recorder = QKVRecorder(layers)
    with capture_attention(model, recorder), torch.no_grad():
        forward_captured(model, ids, use_cache=False, logits_to_keep=1)
    store = recorder.store
    if len(store) != len(layers):
        raise SystemExit(f"layers {sorted(set(layers) - set(store))} were not captured (no attention call with "
                         "that layer_idx)")
    return tuple(torch.cat([store[i][j] for i in layers], dim=1) for j in range(3))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=str(SHARED / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--text", default=str(SHARED / "text" / "austen_novels.txt"))
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--layers", default="15", help="comma-separated layer indices, stacked in this order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--layers: {args.layers!r} is not a comma-separated list of layer indices")
    if not layers or len(set(layers)) != len(layers):
        parser.error(f"--layers: {args.layers!r} must name at least one layer, each once")
    dtype = "bfloat16" if args.device != "cpu" else "float32"
    loaded = load_model(args.model, device=args.device, dtype=dtype, attn_implementation="sdpa")
    text = Path(args.text).read_text()[: args.length * 12]
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][: args.length]
    if len(ids) < args.length:
        raise SystemExit(f"{args.text} gives only {len(ids)} tokens")
    missing = [i for i in layers if not 0 <= i < loaded.model.config.num_hidden_layers]
    if missing:
        parser.error(f"--layers: {missing} not in the model's {loaded.model.config.num_hidden_layers} layers")
    q, k, v = capture(loaded.model, torch.tensor([ids], device=loaded.model.device), layers)
    torch.save({"q": q, "k": k, "v": v, "layers": layers, "model": args.model, "length": args.length}, args.out)
    print(f"saved q {tuple(q.shape)}, k/v {tuple(k.shape)} of layers {layers} to {args.out}")


if __name__ == "__main__":
    main()
