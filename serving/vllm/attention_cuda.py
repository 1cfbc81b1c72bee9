"""The streaming layers' attention on NVIDIA GPUs: vLLM's Triton ``unified_attention``, shortened tables.

Imported only where vLLM runs on CUDA (it needs Triton and vLLM's Triton backend). The backend is vLLM's
Triton attention backend with two changes, both in the metadata its builder produces:

- the R-SWA mode of ``unified_attention`` is switched on with ``rswa_prefix_lens = sink`` for every request
  and ``rswa_window = window``: the mask ``j <= p and (j < sink or p - j < window)``, the streaming rule;
- each request's block table and length are shortened (:func:`~.window_table.shorten_block_tables`) so the
  kernel reads the sink blocks and the window's blocks only: its cost per query is bounded by
  ``sink + window + the step's tokens`` (in R-SWA mode vLLM's kernel skips no tile by itself), and it never
  reads a freed block.

Keys and values are written by vLLM's own Triton cache update, into vLLM's Triton KV layout; the full layers
keep whatever backend vLLM picks for them (FlashAttention 3 on an H100/H200 when its binary is installed,
else Triton). The buffers the builder writes are allocated once, so CUDA graphs see fixed addresses.
"""

from __future__ import annotations

import torch

from .internals import triton_attention_classes
from .window_table import max_shortened_len, shorten_block_tables

_TritonBackend, _TritonImpl, _TritonBuilder = triton_attention_classes()


def _sink_and_window(kv_cache_spec, layer_names, vllm_config) -> tuple[int, int]:
    """The group's ``(sink, window)``: from its :class:`~.kv_cache.SinkWindowSpec`, else from its first layer."""
    sink, window = getattr(kv_cache_spec, "sink", None), getattr(kv_cache_spec, "sliding_window", None)
    if sink is None and layer_names:
        layer = vllm_config.compilation_config.static_forward_context.get(layer_names[0])
        sink, window = getattr(layer, "sink", None), getattr(layer, "sliding_window", window)
    if sink is None or window is None:
        raise RuntimeError(f"lighttransfer's sink + window attention got a KV cache group without a sink and a "
                           f"window ({type(kv_cache_spec).__name__}); this vLLM groups layers differently than "
                           "the plugin expects: use a vLLM version the plugin supports.")
    return int(sink), int(window)


class SinkWindowTritonBuilder(_TritonBuilder):
    """vLLM's Triton metadata with the R-SWA fields set and the block tables shortened."""

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.sink, self.window = _sink_and_window(kv_cache_spec, layer_names, vllm_config)
        self.kv_block_size = int(kv_cache_spec.block_size)
        self._rows = int(vllm_config.scheduler_config.max_num_seqs)
        self._sink_lens = torch.full((self._rows,), self.sink, dtype=torch.int32, device=device)
        self._seq_lens: torch.Tensor | None = None
        self._table: torch.Tensor | None = None

    def _buffers(self, rows: int, table: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slices of buffers allocated once (again only if a step outgrows them, which happens before any
        CUDA graph is captured: vLLM's profiling and capture runs are the largest)."""
        if rows > self._rows:
            self._rows = rows
            self._sink_lens = torch.full((rows,), self.sink, dtype=torch.int32, device=self._sink_lens.device)
        width = table.shape[1]
        if (self._table is None or self._table.shape[0] < self._rows or self._table.shape[1] < width
                or self._table.dtype != table.dtype):
            self._table = torch.zeros((self._rows, width), dtype=table.dtype, device=table.device)
        if self._seq_lens is None or self._seq_lens.shape[0] < self._rows or self._seq_lens.dtype != seq_lens.dtype:
            self._seq_lens = torch.zeros(self._rows, dtype=seq_lens.dtype, device=seq_lens.device)
        return self._table[:rows, :width], self._seq_lens[:rows]

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        m = common_attn_metadata
        rows = int(m.num_reqs)
        starts = m.query_start_loc[: rows + 1]
        query_lens = starts[1:] - starts[:-1]
        out_table, out_lens = self._buffers(rows, metadata.block_table, metadata.seq_lens)
        table, lens = shorten_block_tables(metadata.block_table[:rows], metadata.seq_lens[:rows], query_lens,
                                           sink=self.sink, window=self.window, block_size=self.kv_block_size,
                                           out_table=out_table, out_seq_lens=out_lens)
        metadata.block_table, metadata.seq_lens = table, lens
        metadata.max_seq_len = max_shortened_len(metadata.max_seq_len, m.max_query_len, sink=self.sink,
                                                 window=self.window, block_size=self.kv_block_size)
        metadata.rswa_prefix_lens = self._sink_lens[:rows]
        metadata.rswa_window = self.window
        return metadata


class SinkWindowTritonImpl(_TritonImpl):
    """vLLM's Triton attention implementation, the window left to the R-SWA mask alone.

    ``sink`` is taken here (the builder applies it). The kernel is given no sliding window of its own
    (``window_size = (-1, -1)``): with one, its tile bounds follow the plain window and the prefix-plus-window
    mask comes out wrong (measured against the paged reference through Triton's interpreter: errors of 0.3
    once the window drops a key); the layer keeps its window for the KV spec.
    """

    def __init__(self, *args, sink: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sink = int(sink)
        self.sliding_window = (-1, -1)


class SinkWindowTritonBackend(_TritonBackend):
    """vLLM's Triton backend with :class:`SinkWindowTritonBuilder` and :class:`SinkWindowTritonImpl`.

    Its name stays vLLM's ``TRITON_ATTN`` (vLLM 0.26 looks every layer's backend up by name in a fixed enum);
    the layers hold this class itself, and vLLM groups layers by class.
    """

    @staticmethod
    def get_impl_cls() -> type[SinkWindowTritonImpl]:
        return SinkWindowTritonImpl

    @staticmethod
    def get_builder_cls() -> type[SinkWindowTritonBuilder]:
        return SinkWindowTritonBuilder


__all__ = ["SinkWindowTritonBackend", "SinkWindowTritonBuilder", "SinkWindowTritonImpl"]
