"""``lighttransfer.load``: a hybrid checkpoint (or a plain model with an explicit layout) as a transformers model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import LightTransferError
from ..hybrid_format import (
    ROUTING_MODES,
    SPARSE_METHODS,
    HeadRoutingConfig,
    SparsePrefillConfig,
    TokenSelectConfig,
    token_select_config,
)
from ..loading import LoadedModel, load_model, load_tokenizer
from .head_routing import resolve_head_routing
from .hybrid import check_chunk_size, enable_hybrid
from .layout import resolve_layout
from .sparse_prefill import resolve_sparse_prefill

if TYPE_CHECKING:  # pragma: no cover
    import torch


def load_hybrid(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    streaming_layers: list[int] | None = None,
    head_masks: dict[int, list[bool]] | None = None,
    sink: int | None = None,
    window: int | None = None,
    prefill: str | None = None,
    online_ratio: float | None = None,
    chunk_size: int | None = None,
    cuda_graphs: bool = False,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    device_map: str | dict | None = None,
    decode: str | None = None,
    select_k: int | None = None,
    select_init: int | None = None,
    select_local: int | None = None,
    select_reuse: float | None = None,
    select_reuse_max_age: int | None = None,
    select_reuse_against: str | None = None,
    prefill_sparse: str | None = None,
    prefill_alpha: float | None = None,
    prefill_min_len: int | None = None,
    fused_ops: bool | None = None,
    head_routing: str | None = None,
    routing_tau: float | None = None,
    routing_share: float | None = None,
    routing_stats: str | None = None,
    routing_cov: str | None = None,
    routing_sink: int | None = None,
    routing_window: int | None = None,
    routing_guard: str | None = None,
    routing_page: int | None = None,
    routing_full_heads: dict[int, list[bool]] | None = None,
) -> LoadedModel:
    """Like :func:`load`, but returns the :class:`~lighttransfer.loading.LoadedModel` (model, tokenizer, source)."""
    check_chunk_size(chunk_size)  # before the weights load: a typo costs nothing
    selection = dict(decode=decode, select_k=select_k, select_init=select_init, select_local=select_local,
                     select_reuse=select_reuse, select_reuse_max_age=select_reuse_max_age,
                     select_reuse_against=select_reuse_against)
    token_select_config(decode, **{k: v for k, v in selection.items() if k != "decode"},
                        base=TokenSelectConfig() if decode is None else None)  # range checks, also before
    if prefill_sparse not in (None, "dense", *SPARSE_METHODS):
        raise LightTransferError(f"prefill_sparse {prefill_sparse!r} is not known; use one of "
                                 f"{', '.join(SPARSE_METHODS)}, 'dense' or None.")
    if fused_ops is not None and not isinstance(fused_ops, bool):
        raise LightTransferError(f"fused_ops must be True, False or None (on for CUDA models), got {fused_ops!r}.")
    ranges = {k: v for k, v in (("alpha", prefill_alpha), ("min_len", prefill_min_len)) if v is not None}
    if ranges:
        SparsePrefillConfig(**ranges)  # their range checks, also before the weights load
    routing = dict(tau=routing_tau, share=routing_share, stats=routing_stats, cov=routing_cov, sink=routing_sink,
                   window=routing_window, guard=routing_guard, page=routing_page, full_masks=routing_full_heads)
    _check_routing(head_routing, routing)  # also before the weights load
    loaded = load_model(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, with_tokenizer=False,
                        device_map=device_map)
    layout = resolve_layout(loaded.model.config, streaming_layers=streaming_layers, head_masks=head_masks,
                            sink=sink, window=window, prefill=prefill, online_ratio=online_ratio,
                            source=f"model '{loaded.source.spec}'", **selection,
                            alone=head_routing not in (None, "dense"))
    sparse = resolve_sparse_prefill(loaded.model.config, method=prefill_sparse, alpha=prefill_alpha,
                                    min_len=prefill_min_len)
    if fused_ops is None:  # the Triton interpreter would make a CPU model slow
        fused_ops = any(p.is_cuda for p in loaded.model.parameters())
    routed = resolve_head_routing(loaded.model.config, mode=head_routing, **routing)
    enable_hybrid(loaded.model, layout, chunk_size=chunk_size, cuda_graphs=cuda_graphs, sparse_prefill=sparse,
                  fused_ops=fused_ops, head_routing=routed)
    if with_tokenizer:
        loaded.tokenizer = load_tokenizer(loaded.source, trust_remote_code=trust_remote_code)
    return loaded


def load(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    streaming_layers: list[int] | None = None,
    head_masks: dict[int, list[bool]] | None = None,
    sink: int | None = None,
    window: int | None = None,
    prefill: str | None = None,
    online_ratio: float | None = None,
    chunk_size: int | None = None,
    cuda_graphs: bool = False,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    decode: str | None = None,
    select_k: int | None = None,
    select_init: int | None = None,
    select_local: int | None = None,
    select_reuse: float | None = None,
    select_reuse_max_age: int | None = None,
    select_reuse_against: str | None = None,
    prefill_sparse: str | None = None,
    prefill_alpha: float | None = None,
    prefill_min_len: int | None = None,
    fused_ops: bool | None = None,
    head_routing: str | None = None,
    routing_tau: float | None = None,
    routing_share: float | None = None,
    routing_stats: str | None = None,
    routing_cov: str | None = None,
    routing_sink: int | None = None,
    routing_window: int | None = None,
    routing_guard: str | None = None,
    routing_page: int | None = None,
    routing_full_heads: dict[int, list[bool]] | None = None,
) -> Any:
    """Load a hybrid checkpoint as an ordinary transformers causal LM with a bounded KV cache.

    The layout comes from the checkpoint's ``lighttransfer`` block; explicit arguments override it, and make any
    plain model directory, GGUF file or hub id usable (``load(dir, streaming_layers=[...])``).

    Args:
        path: hybrid checkpoint directory, plain model directory, ``.gguf`` file or hub id.
        device: ``auto | cpu | cuda[:N]`` or a ``torch.device``.
        dtype: ``auto | float32 | bfloat16 | float16`` or a ``torch.dtype`` (``auto``: bf16 on CUDA, fp32 on CPU).
        streaming_layers: layers whose every KV head streams (overrides the block).
        head_masks: ``{layer: [bool] * kv_heads}`` for layers where only some KV heads stream.
        sink, window: tokens a streaming layer keeps (first ``sink``, last ``window``); default the block's.
            A warning is logged when they differ from the ones the layers were selected with.
        prefill: ``streaming`` (default: sink + window attention in prefill too) or ``full`` (LightTransfer's
            test mode: full attention during prefill, streaming caches trimmed right after).
        online_ratio: choose the streaming layers per prompt instead (LightTransfer-Test): this share of layers
            streams, the least lazy ones on the prompt's last queries stay full.
        chunk_size: prefill in chunks of this many tokens inside ``generate`` (bounded prefill memory).
        cuda_graphs: decode in lighttransfer's own loops (``lighttransfer.generate_static``, ``lighttransfer
            generate``) with the step captured once in a CUDA graph and replayed per token: the cache is reserved
            for prompt + ``max_new_tokens``, and no host work or sync is left inside a step. Off by default; where
            no graph can be captured (CPU, a cache layer of transformers' own) the same static steps run eagerly
            and the reason is reported. ``model.generate`` keeps transformers' loop either way.
        trust_remote_code: allow the model's own Python code (off by default).
        device_map: as in transformers' ``from_pretrained`` (``"auto"`` spreads a big model over the GPUs).
        decode: how the full layers decode: ``dense`` (every cached key) or ``tokenselect`` (TokenSelect, arXiv
            2411.02886: each query attends its ``select_k`` keys of largest soft vote plus the first ``select_init``
            and the last ``select_local`` tokens; the Selection Cache reuses a selection while each query has cosine
            similarity >= ``select_reuse`` with the one it is compared with). Default: the checkpoint block's, else dense. Works on a
            plain model too (TokenSelect alone). Hit rate: ``runtime_of(model).selection_stats``.
        select_k, select_init, select_local, select_reuse, select_reuse_max_age, select_reuse_against: TokenSelect's
            settings (defaults 2048, 128, 512, 0.9, 64, ``anchor``, or the block's; ``select_reuse_max_age``: steps a
            reused selection may serve; ``select_reuse_against``: ``anchor`` compares each query with the query the
            selection was computed from, ``previous`` with the previous step's query).
        prefill_sparse: block-sparse prefill of the full layers: ``sample`` (sampled query rows), ``vslash``
            (last-queries vertical-slash) or ``antidiag`` (antidiagonal scoring); ``dense`` turns off what the
            checkpoint block stores; ``None`` keeps it (dense without one). See ``runtime/sparse_prefill.py``.
        prefill_alpha: share of the estimated attention mass each (head, query block) keeps (default 0.95).
        prefill_min_len: keys below which a prefill or chunk stays dense (default 16384).
        fused_ops: run RMSNorm, the rotary embedding and the SiLU-mul as fused Triton kernels, and q/k/v and
            gate/up as one GEMM each (Llama, Mistral, Qwen2, Qwen3; Gemma 3's norms; other modules stay stock; see
            ``runtime/fused_ops.py``). ``None`` (default): on for a model on CUDA, off on the CPU; ``True`` forces
            it (on the CPU the kernels need ``TRITON_INTERPRET=1``, else their PyTorch references run).
        head_routing: per-query KV-head routing of the full layers' decode steps (arXiv 2502.09647): ``qada``
            (each KV head attends sink + window of its cache when the Gaussian prediction of every query head's
            far share is ``<= routing_tau``, else every key), ``oracle`` (the exact far share; reads every key,
            for evaluation), ``random`` (local with probability ``routing_share``); ``dense`` turns off what the
            checkpoint stores, ``None`` keeps it. Works on a plain model too. Realised share:
            ``lighttransfer.head_routing_stats(model)``; thresholds for a target share:
            ``lighttransfer.calibrate_head_routing``. See ``runtime/head_routing.py``.
        routing_tau: far-share threshold in [0, 1] (``qada``/``oracle``).
        routing_share: local probability (``random``).
        routing_stats: ``bulk`` (default: the Gaussian from the bulk keys' running moments) or ``local`` (from the
            window keys).
        routing_cov: ``full`` (default) or ``diag`` covariance.
        routing_sink, routing_window: the local set of a routed-local head (default: the layout's sink/window).
        routing_guard: ``none`` (default), ``heads`` (``qada``: see ``routing_full_heads``) or ``pages``
            (``qada``): a needle guard, per page of ``routing_page`` bulk keys the elementwise key max and min; a KV
            head also goes full when one page could, at its score bound, take more than ``tau`` of the attention
            alone (``kernels/routing_guard.py``).
        routing_page: keys per page of the ``pages`` guard (default 64).
        routing_full_heads: ``heads`` guard (``qada``): ``{layer: [bool] * kv_heads}``, True = that KV head of a
            full layer always attends every key (for example the heads an analysis found long-context), QAdA
            deciding the others.

    Returns:
        The transformers model; ``model.generate`` and ``pipeline("text-generation", model=model)`` use the
        bounded :class:`~lighttransfer.runtime.cache.HybridCache` automatically.

    Raises:
        LightTransferError: bad path, no layout anywhere, or an option out of range.
    """
    return load_hybrid(path, device=device, dtype=dtype, streaming_layers=streaming_layers,
                       head_masks=head_masks, sink=sink, window=window, prefill=prefill, online_ratio=online_ratio,
                       chunk_size=chunk_size, cuda_graphs=cuda_graphs, trust_remote_code=trust_remote_code,
                       with_tokenizer=False, device_map=device_map, decode=decode, select_k=select_k,
                       select_init=select_init, select_local=select_local, select_reuse=select_reuse,
                       select_reuse_max_age=select_reuse_max_age, select_reuse_against=select_reuse_against,
                       prefill_sparse=prefill_sparse, prefill_alpha=prefill_alpha, prefill_min_len=prefill_min_len,
                       fused_ops=fused_ops, head_routing=head_routing, routing_tau=routing_tau,
                       routing_share=routing_share, routing_stats=routing_stats, routing_cov=routing_cov,
                       routing_sink=routing_sink, routing_window=routing_window, routing_guard=routing_guard,
                       routing_page=routing_page, routing_full_heads=routing_full_heads).model


def _check_routing(mode: str | None, options: dict) -> None:
    """One-line errors for the head-routing options, before any weight loads."""
    if mode not in (None, "dense", *ROUTING_MODES):
        raise LightTransferError(f"head_routing {mode!r} is not known; use one of {', '.join(ROUTING_MODES)}, "
                                 "'dense' or None.")
    given = {k: v for k, v in options.items() if v is not None}
    if mode in (None, "dense"):
        return  # options without a mode are checked against the checkpoint's block once it is read
    if mode == "static":
        raise LightTransferError("head_routing 'static' needs per-layer masks: pass them through "
                                 "enable_hybrid(head_routing=HeadRoutingConfig(mode='static', local_masks=...)).")
    filler = {"tau": 0.0} if mode in ("qada", "oracle") and "tau" not in given else {}
    if mode == "random" and "share" not in given:
        filler = {"share": 0.0}
    HeadRoutingConfig(mode=mode, **{**filler, **given})


__all__ = ["load", "load_hybrid"]
