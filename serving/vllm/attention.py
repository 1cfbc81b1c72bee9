"""The streaming layers' attention in vLLM: a layer, a backend, its metadata and its implementation.

:class:`SinkWindowAttention` is vLLM's ``Attention`` with the window as its per-layer sliding window, a
sink + window backend, and a :class:`~.kv_cache.SinkWindowSpec` as its KV spec, so its layers form their
own bounded KV group. Which backend:

- on NVIDIA GPUs, :class:`~.attention_cuda.SinkWindowTritonBackend`: vLLM's Triton ``unified_attention`` in
  its prefix-plus-window mode, over block tables shortened to the sink and window blocks;
- everywhere else (the CPU build), :class:`SinkWindowBackend`, plain PyTorch (:mod:`.paged`): it stores new
  keys and values in the paged cache and attends over the sink and window blocks only, one request at a time.

The KV cache of a layer is ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` per block and head (vLLM's
``LBHNC`` layout, keys then values); :func:`split_kv_cache` reads it the way vLLM's CPU backend does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .internals import (
    LEGACY_BACKEND_API,
    Attention,
    AttentionBackend,
    AttentionBackendEnum,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    KVCacheLayout,
    VllmConfig,
    on_cuda,
    register_backend,
)
from .kv_cache import SinkWindowSpec
from .paged import sink_window_paged_attention, write_kv

BACKEND_NAME = "LIGHTTRANSFER_SINK_WINDOW"


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_cache, value_cache)``, each ``[num_blocks, kv_heads, block_size, head_dim]``, views of one
    layer's ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` cache."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise RuntimeError(f"lighttransfer's sink + window attention expects a [blocks, kv_heads, block_size, "
                           f"2 x {head_size}] KV cache, got {tuple(kv_cache.shape)}; this vLLM lays its cache out "
                           "differently: use a vLLM version the plugin supports.")
    blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(blocks, heads, 2 * block_size, head_size).chunk(2, dim=2)


@dataclass
class SinkWindowMetadata:
    """What one step's attention needs: per request, where its queries are and how long it is.

    Attributes:
        num_actual_tokens: query tokens in the step (the rest of the batch is padding).
        query_start_loc: ``[requests + 1]`` offsets of each request's queries (CPU).
        seq_lens: ``[requests]`` tokens of each request so far, this step's included (CPU).
        block_table: ``[requests, max_blocks]`` block ids.
        slot_mapping: ``[tokens]`` cache slot of each new token.
    """

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class SinkWindowMetadataBuilder(AttentionMetadataBuilder[SinkWindowMetadata]):
    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SinkWindowMetadata:
        m = common_attn_metadata
        return SinkWindowMetadata(num_actual_tokens=m.num_actual_tokens,
                                  query_start_loc=m.query_start_loc_cpu[: m.num_reqs + 1].cpu(),
                                  seq_lens=m.seq_lens[: m.num_reqs].cpu(),
                                  block_table=m.block_table_tensor[: m.num_reqs], slot_mapping=m.slot_mapping)


class SinkWindowImpl(AttentionImpl[SinkWindowMetadata]):
    """Sink + window attention over the paged cache (:func:`~.paged.sink_window_paged_attention`)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, *, sink: int = 0) -> None:
        unsupported = {"ALiBi slopes": alibi_slopes is not None, "a logits soft cap": bool(logits_soft_cap),
                       "a quantized KV cache": kv_cache_dtype != "auto",
                       "non-decoder attention": attn_type != AttentionType.DECODER,
                       "KV sharing between layers": kv_sharing_target_layer_name is not None,
                       "no window": sliding_window is None}
        found = [name for name, bad in unsupported.items() if bad]
        if found:
            raise NotImplementedError(f"lighttransfer's sink + window attention does not support {', '.join(found)}.")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.window, self.sink = int(sliding_window), int(sink)
        self.sliding_window = self.window
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        write_kv(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: SinkWindowMetadata | None, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        """``query`` ``[tokens, heads, head_dim]``; writes ``output`` ``[tokens, heads, head_dim]``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("lighttransfer's sink + window attention has no fused output quantization.")
        if attn_metadata is None:  # profiling run
            return output
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        starts = attn_metadata.query_start_loc.tolist()
        for r, seq_len in enumerate(attn_metadata.seq_lens.tolist()):
            lo, hi = starts[r], starts[r + 1]
            if hi <= lo:
                continue
            output[lo:hi] = sink_window_paged_attention(
                query[lo:hi], key_cache, value_cache, attn_metadata.block_table[r], seq_len=int(seq_len),
                sink=self.sink, window=self.window, scale=self.scale)
        return output


class SinkWindowBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM" if LEGACY_BACKEND_API else BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SinkWindowImpl]:
        return SinkWindowImpl

    @staticmethod
    def get_builder_cls() -> type[SinkWindowMetadataBuilder]:
        return SinkWindowMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    if LEGACY_BACKEND_API:  # vLLM 0.26: the backend gives the cache's shape and its memory order

        @staticmethod
        def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                               cache_dtype_str: str = "auto") -> tuple[int, ...]:
            return (num_blocks, num_kv_heads, block_size, 2 * head_size)

        @classmethod
        def get_required_kv_cache_layout(cls):
            return "HND"
    else:

        @classmethod
        def supported_kv_cache_layouts(cls):
            return (KVCacheLayout.LBHNC,)


def register_attention_backend() -> None:
    """Give the CPU backend its name in vLLM's backend registry (idempotent); on vLLM 0.26, whose names are
    fixed, the ``CUSTOM`` one."""
    path = f"{SinkWindowBackend.__module__}.{SinkWindowBackend.__qualname__}"
    name = SinkWindowBackend.get_name()
    known = AttentionBackendEnum.__members__.get(name)
    register_backend(known if known is not None else name, path)


def sink_window_backend() -> type:
    """The backend of the streaming layers here: vLLM's Triton path on CUDA, the plain-PyTorch one elsewhere."""
    if on_cuda():
        from .attention_cuda import SinkWindowTritonBackend

        return SinkWindowTritonBackend
    register_attention_backend()
    return SinkWindowBackend


class SinkWindowAttention(Attention):
    """vLLM's attention layer for a streaming layer: sink + window attention and a bounded KV group."""

    def __init__(self, num_heads: int, head_size: int, scale: float, *, sink: int, window: int, **kwargs) -> None:
        super().__init__(num_heads, head_size, scale, per_layer_sliding_window=window,
                         attn_backend=sink_window_backend(), sink=sink, **kwargs)
        self.sink = sink

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> SinkWindowSpec:
        return SinkWindowSpec.from_sliding(super().get_kv_cache_spec(vllm_config), sink=self.sink)


__all__ = ["SinkWindowAttention", "SinkWindowBackend", "SinkWindowImpl", "SinkWindowMetadata",
           "register_attention_backend", "sink_window_backend", "split_kv_cache", "BACKEND_NAME"]
