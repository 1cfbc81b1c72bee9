"""Shortened block tables: sink + window attention over a paged cache at the cost of ``sink + window`` keys.

vLLM's Triton ``unified_attention`` has a prefix-plus-window mask (its R-SWA mode: key ``j`` is visible
to query ``p`` when ``j <= p`` and (``j < prefix`` or ``p - j < window``)), which with ``prefix = sink``
is the streaming rule of :func:`~lighttransfer.kernels.mask.streaming_visible`. But in that mode it visits
every key tile up to the query: the blocks freed between the sink and the window are still read (their
table entries point at vLLM's null block) and masked, so compute grows with the context.

This module removes those blocks from the table instead. For a request whose first new query is at
position ``f`` (``f = seq_len - query_len``), every key a query of this step sees lies in the sink blocks
``[0, sb)`` (``sb = ceil(sink / block_size)``) or at ``>= f - window + 1``, i.e. in blocks ``>= wb``
(``wb = (f - window + 1) // block_size``). The shortened table keeps the sink blocks and continues with
block ``wb``: ``shift = max(0, wb - sb)`` blocks are dropped, and every position ``p >= wb * block_size``
becomes ``p' = p - shift * block_size`` (``seq_len' = seq_len - shift * block_size``). The kernel's mask
in these coordinates is still exactly the streaming rule:

- sink keys (``j < sink <= sb * block_size``) keep their positions and stay visible (``j' < sink``);
- two positions both at or past ``wb * block_size`` keep their distance, so the window test is unchanged;
- the sink blocks' non-sink keys (``sink <= j < sb * block_size``) are masked: every query of the step
  has ``q' >= f - shift * block_size >= sb * block_size + window - 1`` when ``shift > 0``, so
  ``q' - j' >= window``.

So a query reads at most ``sb + ceil((window + query_len) / block_size) + 1`` blocks, whatever the context
(the bound :func:`max_shortened_len` gives the kernel), and never a freed block. Positions only enter the
mask: rotary embeddings are applied before keys enter the cache, so nothing else changes.
"""

from __future__ import annotations

import torch


def dropped_blocks(seq_lens: torch.Tensor, query_lens: torch.Tensor, *, sink: int, window: int,
                   block_size: int) -> torch.Tensor:
    """Blocks dropped after the sink blocks, per request: ``max(0, (f - window + 1) // block_size - sb)``.

    Args:
        seq_lens: ``[requests]`` int, tokens of each request with this step's included.
        query_lens: ``[requests]`` int, this step's new tokens of each request.
        sink, window: the streaming rule (``window >= 1``).
        block_size: tokens per KV block.

    Returns:
        ``[requests]`` int64 (on the inputs' device).
    """
    sink_blocks = -(-sink // block_size)
    first_key = (seq_lens.long() - query_lens.long() - window + 1).clamp(min=0)
    return (first_key // block_size - sink_blocks).clamp(min=0)


def shorten_block_tables(block_table: torch.Tensor, seq_lens: torch.Tensor, query_lens: torch.Tensor, *,
                         sink: int, window: int, block_size: int, out_table: torch.Tensor | None = None,
                         out_seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The shortened block tables and sequence lengths (the module docstring says why they are exact).

    Args:
        block_table: ``[requests, max_blocks]`` int block ids, row ``r`` mapping request ``r``'s positions.
        seq_lens, query_lens: ``[requests]`` int (see :func:`dropped_blocks`).
        sink, window, block_size: as in :func:`dropped_blocks`.
        out_table, out_seq_lens: optional buffers of the same shapes and dtypes as ``block_table`` /
            ``seq_lens`` to write into (persistent buffers, so CUDA graphs see fixed addresses).

    Returns:
        ``(table, seq_lens)``: ``table[r, j] = block_table[r, j]`` for ``j < sb`` and
        ``block_table[r, j + shift_r]`` after (entries past the row's end repeat its last entry and lie beyond
        ``seq_lens'``, so they are never read); ``seq_lens' = seq_lens - shift * block_size``. All tensor
        ops, no host synchronization.
    """
    sink_blocks = -(-sink // block_size)
    shift = dropped_blocks(seq_lens, query_lens, sink=sink, window=window, block_size=block_size)
    max_blocks = block_table.shape[1]
    column = torch.arange(max_blocks, device=block_table.device)[None, :]
    source = torch.where(column < sink_blocks, column, column + shift[:, None]).clamp(max=max_blocks - 1)
    table = torch.gather(block_table, 1, source)
    lens = (seq_lens.long() - shift * block_size).to(seq_lens.dtype)
    if out_table is not None:
        out_table.copy_(table)
        table = out_table
    if out_seq_lens is not None:
        out_seq_lens.copy_(lens)
        lens = out_seq_lens
    return table, lens


def max_shortened_len(max_seq_len: int, max_query_len: int, *, sink: int, window: int, block_size: int) -> int:
    """An upper bound of every shortened ``seq_len'`` of a step (what the kernel is told as its longest key
    sequence): ``min(max_seq_len, sb * block_size + window + max_query_len + block_size)``."""
    sink_blocks = -(-sink // block_size)
    return min(int(max_seq_len), sink_blocks * block_size + window + int(max_query_len) + block_size)


__all__ = ["dropped_blocks", "shorten_block_tables", "max_shortened_len"]
