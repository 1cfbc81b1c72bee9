"""Run by test_vllm_triton_path.py in a process of its own: vLLM's Triton ``unified_attention`` (R-SWA mode) over
the plugin's shortened block tables, in Triton's interpreter on the CPU, against the plain paged reference.

Prints one JSON line: per (sink, window, table) the largest error and whether the output is finite. vLLM's
Triton shim turns Triton off on a CPU-only machine, so a stand-in "cpu" driver is put in Triton's backend list
before vLLM is imported (the interpreter needs no driver), and CUDA's capability query is answered as Hopper's.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"


def _pretend_triton_runs_here() -> None:
    import torch
    import triton.backends

    class _Driver:
        @staticmethod
        def is_active() -> bool:
            return True

    class _Backend:
        driver = _Driver

    triton.backends.backends.setdefault("cpu", _Backend)
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)


def check(sink: int, window: int, *, shortened: bool, block_size: int = 16) -> dict:
    import torch
    from lighttransfer.serving.vllm.paged import sink_window_paged_attention
    from lighttransfer.serving.vllm.window_table import max_shortened_len, shorten_block_tables
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    torch.manual_seed(sink * 100 + window)
    heads, kv_heads, head_dim, max_blocks = 4, 2, 32, 24
    requests = [(300, 1), (190, 37), (9, 9), (160, 1), (sink + window + 1, 3)]  # (seq_len, new tokens)
    num_blocks = len(requests) * max_blocks + 1
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)  # vLLM's Triton layout [blocks, slot, head, d]
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    table = (torch.randperm(num_blocks - 1)[: len(requests) * max_blocks] + 1).view(len(requests), max_blocks).int()
    sink_blocks = -(-sink // block_size)
    for r, (seq_len, q_len) in enumerate(requests):  # what the plugin's KV manager has freed: NaN, null block 0
        for b in range(sink_blocks, max(sink_blocks, max(0, seq_len - q_len - window + 1) // block_size)):
            key_cache[table[r, b]] = value_cache[table[r, b]] = float("nan")
            table[r, b] = 0
    key_cache[0] = value_cache[0] = float("nan")
    seq_lens = torch.tensor([s for s, _ in requests], dtype=torch.int32)
    query_lens = torch.tensor([q for _, q in requests], dtype=torch.int32)
    starts = torch.zeros(len(requests) + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(query_lens, 0)
    query = torch.randn(int(starts[-1]), heads, head_dim)
    if shortened:
        kernel_table, kernel_lens = shorten_block_tables(table, seq_lens, query_lens, sink=sink, window=window,
                                                         block_size=block_size)
    else:
        kernel_table, kernel_lens = table, seq_lens
    out = torch.zeros_like(query)
    ones = torch.ones(len(requests), kv_heads)
    unified_attention(q=query, k=key_cache, v=value_cache, out=out, cu_seqlens_q=starts,
                      max_seqlen_q=int(query_lens.max()), seqused_k=kernel_lens,
                      max_seqlen_k=max_shortened_len(int(seq_lens.max()), int(query_lens.max()), sink=sink,
                                                     window=window, block_size=block_size),
                      softmax_scale=head_dim ** -0.5, causal=True, window_size=(-1, -1), block_table=kernel_table,
                      softcap=0, q_descale=None, k_descale=ones, v_descale=ones,
                      rswa_prefix_lens=torch.full((len(requests),), sink, dtype=torch.int32), rswa_window=window)
    worst, finite = 0.0, True
    for r, (seq_len, _) in enumerate(requests):
        want = sink_window_paged_attention(query[starts[r]:starts[r + 1]], key_cache.transpose(1, 2),
                                           value_cache.transpose(1, 2), table[r], seq_len=seq_len, sink=sink,
                                           window=window, scale=head_dim ** -0.5)
        got = out[starts[r]:starts[r + 1]]
        finite &= bool(torch.isfinite(got).all())
        if torch.isfinite(got).all():
            worst = max(worst, float((got - want).abs().max()))
    return {"sink": sink, "window": window, "shortened": shortened, "max_error": worst, "finite": finite}


if __name__ == "__main__":
    _pretend_triton_runs_here()
    cases = json.loads(sys.argv[1])
    print(json.dumps([check(c["sink"], c["window"], shortened=c["shortened"]) for c in cases]))
