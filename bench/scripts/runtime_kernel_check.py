"""Kernel agreement at the shapes the runtime's CUDA tests use: Triton vs the PyTorch reference (max abs diff).

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/runtime_kernel_check.py
"""

import torch
from lighttransfer.kernels import (
    streaming_attention,
    streaming_attention_reference,
    streaming_decode,
    streaming_decode_reference,
)

torch.manual_seed(0)
for heads, kv_heads, n, dim, sink, window, dtype in [
    (4, 2, 45, 16, 3, 8, torch.float32), (4, 1, 45, 16, 3, 8, torch.float32), (4, 2, 60, 16, 3, 8, torch.bfloat16),
    (9, 3, 300, 64, 4, 64, torch.float32), (9, 3, 4096, 64, 4, 1020, torch.bfloat16),
]:
    q = torch.randn(2, heads, n, dim, device="cuda", dtype=dtype)
    k = torch.randn(2, kv_heads, n, dim, device="cuda", dtype=dtype)
    v = torch.randn(2, kv_heads, n, dim, device="cuda", dtype=dtype)
    start = torch.tensor([0, 5], device="cuda", dtype=torch.int32)
    for kv_start in (None, start):
        a = streaming_attention(q, k, v, sink=sink, window=window, kv_start=kv_start)
        b = streaming_attention_reference(q, k, v, sink=sink, window=window, kv_start=kv_start)
        print("prefill", (heads, kv_heads, n, dim, sink, window, str(dtype)), "padded" if kv_start is not None
              else "", f"{(a.float() - b.float()).abs().max().item():.2e}", flush=True)
    slot_pos = torch.arange(n, device="cuda").repeat(2, 1)
    q1 = q[:, :, -7:]
    q_pos = slot_pos[:, -7:]
    a = streaming_decode(q1, k, v, slot_pos, q_pos, sink=sink, window=window)
    b = streaming_decode_reference(q1, k, v, slot_pos, q_pos, sink=sink, window=window)
    print("decode ", (heads, kv_heads, n, dim, sink, window, str(dtype)),
          f"{(a.float() - b.float()).abs().max().item():.2e}", flush=True)
