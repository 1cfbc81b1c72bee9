"""Switch a loaded transformers model to the hybrid runtime, and the per-forward hook that feeds it.

:func:`enable_hybrid` does three things to one model, and nothing to transformers' global state beyond the
attention function's registration (so a hybrid and a plain model work side by side in one process):

1. every attention module gets a :class:`~lighttransfer.runtime.attention.LayerPlan`, and the model's attention
   implementation becomes ``"lighttransfer"``;
2. a forward pre-hook on the base model (``model.base_model``) reads the left padding from the 2-D
   ``attention_mask``, makes sure the forward uses a :class:`~lighttransfer.runtime.cache.HybridCache`, and passes
   both down to the attention layers as the keyword ``lighttransfer_step`` (transformers forwards extra keywords
   from the model to every attention function);
3. ``generation_config.prefill_chunk_size`` is set when a prefill chunk size was asked for.

How ``generate`` gets the bounded cache: when a forward is asked to use a cache but brings none, or brings an
empty plain ``DynamicCache`` (what ``generate`` creates in transformers 5.17 and 5.24 alike, under the keyword
``past_key_values`` in 5.17 and ``cache`` in 5.24), the hook replaces it with a fresh ``HybridCache``.
``generate`` then continues with the cache the model returns, so ``model.generate(**inputs)`` and
``pipeline("text-generation", model=model, ...)`` get the bounded cache with no extra argument. A non-empty cache,
or any other Cache class, is used as given (streaming layers then attend with the exact rule over the keys it
returns, without the memory bound).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import weakref

import torch
from transformers.cache_utils import DynamicCache

from ..compat import cache_keyword
from ..errors import LightTransferError
from ..hybrid_format import CONFIG_KEY, HeadRoutingConfig, HybridLayout, SparsePrefillConfig
from ..loading import check_attention_swappable
from .attention import ATTENTION_NAME, PLAN_ATTR, STEP_KWARG, LayerPlan, StepContext, register
from .cache import HybridCache, leading_padding
from .fused_ops import FusedOps, fuse_model, unfuse_model
from .head_order import grouped_kv_order, inverse, permute_heads, supports_reordering
from .head_routing import HeadRouting, RoutingStats
from .online import OnlineSelector
from .sparse_prefill import SparsePrefill, SparsePrefillStats
from .token_select import SelectionStats

log = logging.getLogger(__name__)

RUNTIME_ATTR = "lighttransfer_runtime"


class HybridRuntime:
    """The per-model state of the hybrid runtime: its layout, its hook, and the cache factory.

    :attr:`selection_stats` sums TokenSelect's Selection Cache counts over every cache this runtime made (hit rate:
    ``runtime_of(model).selection_stats.hit_rate``; ``reset()`` it between measurements). :attr:`select_chunks`
    (default False): with TokenSelect, whether a multi-token forward after the prefill selects per query, as if
    each query were decoded alone (what evaluation needs: teacher forcing then equals greedy decoding), instead of
    attending densely like a prefill chunk.
    """

    def __init__(self, model, layout: HybridLayout) -> None:
        self.layout = layout
        self.config = model.config
        base = model.base_model
        self._model = weakref.ref(model)
        self.cache_keyword = cache_keyword(base)
        self._handle = base.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self.previous_attn_implementation = model.config._attn_implementation
        # {layer: KV-head order applied to the weights} (see head_order.py), undone by disable_hybrid
        self.head_orders: dict[int, list[int]] = {}
        self.previous_config_block = None
        # lighttransfer's own generation loops (generate_text, generate_static) replay the decode step from a
        # CUDA graph where one can be captured (see graphs.py); transformers' generate keeps its eager loop
        self.cuda_graphs = False
        # (batch, reserved tokens, padded, device) -> StaticDecoder whose captured graph later generations replay
        self.decoders: dict = {}
        self.selection_stats = SelectionStats()
        self.select_chunks = False
        # block-sparse prefill of the full layers (runtime/sparse_prefill.py), or None
        self.sparse_prefill: SparsePrefill | None = None
        # the modules rewired to fused kernels (runtime/fused_ops.py), or None when fused ops are off
        self.fused_ops: FusedOps | None = None
        # per-query KV-head routing of the full layers' decode steps (runtime/head_routing.py), or None
        self.head_routing: HeadRouting | None = None

    def make_cache(self, max_tokens: int | None = None) -> HybridCache:
        """A fresh, empty cache laid out for this model (``max_tokens``: see :class:`HybridCache`)."""
        layout = self.layout
        online = None
        kinds = layout.kinds
        if layout.online_ratio is not None:
            online = OnlineSelector.for_ratio(num_layers=layout.num_layers, ratio=layout.online_ratio,
                                              last=layout.online_last)
            kinds = ("full",) * layout.num_layers
        return HybridCache(kinds, sink=layout.sink, window=layout.window, prefill=layout.prefill,
                           kv_head_masks=layout.mixed_masks, online=online, native_windows=layout.native_windows,
                           max_tokens=max_tokens,
                           selection=layout.selection, selection_stats=self.selection_stats,
                           select_chunks=self.select_chunks, routing=self.head_routing)

    def remove(self) -> None:
        """Take the hook off and give the fused modules their stock forwards back (the rest is
        :func:`disable_hybrid`'s)."""
        self._handle.remove()
        model = self._model()
        if self.fused_ops is not None and model is not None:
            unfuse_model(model)
            self.fused_ops = None

    # ---- the hook ------------------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        key = self.cache_keyword
        cache = kwargs.get(key)
        if cache is None and key == "cache":
            cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(self.config, "use_cache", True)) and not module.training
        if use_cache and (cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)):
            cache = self.make_cache()
            kwargs.pop("past_key_values", None)
            kwargs[key] = cache
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        mask = kwargs.get("attention_mask")
        if isinstance(cache, HybridCache):
            batch = inputs.shape[0] if inputs is not None else mask.shape[0]
            device = inputs.device if inputs is not None else mask.device
            new_tokens = inputs.shape[1] if inputs is not None else 1
            kv_start = cache.sequence.observe(mask, batch, device, new_tokens)
            has_padding = cache.sequence.has_padding
        else:
            cache = None
            kv_start, has_padding = None, False
            if mask is not None and mask.dim() == 2:
                kv_start = leading_padding(mask)
                has_padding = bool(kv_start.max().item() > 0)
        kwargs[STEP_KWARG] = StepContext(cache=cache, kv_start=kv_start if has_padding else None,
                                         has_padding=has_padding,
                                         static=cache.sequence.static if cache is not None else None, sparse=self.sparse_prefill)
        return args, kwargs


def enable_hybrid(model, layout: HybridLayout, *, reorder_heads: bool = True, chunk_size: int | None = None,
                  cuda_graphs: bool = False,
                  sparse_prefill: SparsePrefillConfig | None = None, fused_ops: bool = False,
                  head_routing: HeadRoutingConfig | None = None):
    """Make ``model`` run ``layout`` (in place) and return it. Calling it again replaces the previous layout.

    ``chunk_size``: prefill chunk length ``generate`` uses (sets ``generation_config.prefill_chunk_size``;
    ``None``: one pass).

    ``cuda_graphs``: lighttransfer's generation loops (:func:`~lighttransfer.runtime.generate_text`,
    :func:`~lighttransfer.runtime.generate_static`) decode with static steps replayed from a CUDA graph (eagerly
    where none can be captured, e.g. on the CPU; the reason is reported). ``model.generate`` is not affected.
    ``sparse_prefill``: block-sparse prefill of the full layers (:mod:`.sparse_prefill`); ``None``: dense.
    ``head_routing``: per-query KV-head routing of the full layers' decode steps (:mod:`.head_routing`); its
    default sink and window are the layout's.

    ``fused_ops``: rewire the model's RMSNorms, Llama-family attention and SiLU MLPs to fused kernels (one QKV
    GEMM, one RoPE launch, one gate/up GEMM, see :mod:`.fused_ops`); :func:`disable_hybrid` gives the stock forwards
    back. The kernels run on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (elsewhere their references).

    ``reorder_heads``: in layers that mix streaming and full KV heads, permute the heads in the weights so that
    each group is contiguous (exact; saves a gather and a scatter per group and step, see ``head_order.py``).
    The checkpoint block on ``model.config`` is updated to the new order, so ``save_pretrained`` stays
    consistent; :func:`disable_hybrid` restores the original order.
    """
    check_chunk_size(chunk_size)
    check_attention_swappable(model)
    register()
    disable_hybrid(model)
    modules = attention_modules(model)
    if len(modules) != layout.num_layers:
        raise LightTransferError(
            f"found {len(modules)} attention layers in the model but the layout describes {layout.num_layers}; "
            "this architecture's attention modules are not recognized.")
    orders: dict[int, list[int]] = {}
    if reorder_heads and layout.mixed_masks:
        layout, orders = _reorder_mixed_heads(modules, layout)
    for idx, module in modules.items():
        setattr(module, PLAN_ATTR, LayerPlan(layer_idx=idx, layout=layout))
    runtime = HybridRuntime(model, layout)
    runtime.head_orders = orders
    runtime.cuda_graphs = bool(cuda_graphs)
    runtime.sparse_prefill = SparsePrefill(sparse_prefill) if sparse_prefill is not None else None
    runtime.head_routing = HeadRouting(head_routing, sink=layout.sink, window=layout.window) \
        if head_routing is not None else None
    if orders:
        runtime.previous_config_block = _reorder_config_block(model.config, orders, layout)
    if fused_ops:  # after the head reordering: the fused weights hold the heads in their final order
        runtime.fused_ops = fuse_model(model, cache_keyword=None)
    setattr(model, RUNTIME_ATTR, runtime)
    model.set_attn_implementation(ATTENTION_NAME)
    if chunk_size is not None and model.generation_config is not None:
        model.generation_config.prefill_chunk_size = chunk_size
    log.info("hybrid runtime: %s", layout.describe())
    return model


def check_chunk_size(chunk_size) -> None:
    """A one-line error unless ``chunk_size`` is ``None`` or a positive whole number of tokens."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise LightTransferError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}.")


def disable_hybrid(model) -> None:
    """Undo :func:`enable_hybrid` on ``model`` (no-op if it was not enabled)."""
    runtime = getattr(model, RUNTIME_ATTR, None)
    if runtime is None:
        return
    runtime.remove()  # the stock forwards first, then the heads back in order (through the parameters' views)
    modules = attention_modules(model)
    for module in modules.values():
        if hasattr(module, PLAN_ATTR):
            delattr(module, PLAN_ATTR)
    for idx, order in runtime.head_orders.items():
        _permute(modules[idx], inverse(order), len(order))
    if runtime.previous_config_block is _NO_BLOCK:
        if hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)
    elif runtime.previous_config_block is not None:
        setattr(model.config, CONFIG_KEY, runtime.previous_config_block)
    delattr(model, RUNTIME_ATTR)
    model.set_attn_implementation(runtime.previous_attn_implementation or "sdpa")


def _permute(module, kv_order: list[int], num_kv_heads: int) -> None:
    head_dim = module.k_proj.out_features // num_kv_heads
    permute_heads(module, kv_order, num_heads=module.q_proj.out_features // head_dim, num_kv_heads=num_kv_heads,
                  head_dim=head_dim)


def _reorder_mixed_heads(modules, layout: HybridLayout) -> tuple[HybridLayout, dict[int, list[int]]]:
    """Permute every mixed layer's heads (where the module allows it) and return the layout in the new order."""
    masks = dict(layout.head_masks)
    orders = {}
    for idx, mask in layout.mixed_masks.items():
        order = grouped_kv_order(mask)
        if order == list(range(len(mask))) or not supports_reordering(modules[idx]):
            continue
        _permute(modules[idx], order, len(mask))
        orders[idx] = order
        masks[idx] = tuple(mask[i] for i in order)
    return dataclasses.replace(layout, head_masks=masks), orders


_NO_BLOCK = object()  # the config had no block before the heads were reordered


def _reorder_config_block(config, orders: dict[int, list[int]], layout: HybridLayout | None = None):
    """Rewrite the checkpoint block's head masks in the weights' new order, and record the order, so that a
    ``save_pretrained`` copy says how its heads are stored; return the block as it was.

    A model without a block (an explicit layout) gets one: its saved weights are no longer the source's."""
    block = getattr(config, CONFIG_KEY, None)
    if block is None and layout is not None:
        from ..hybrid_format import HybridConfig

        fresh = HybridConfig(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                             streaming_layers=list(layout.streaming_layers),
                             head_masks={k: list(v) for k, v in layout.head_masks.items()}, sink=layout.sink,
                             window=layout.window, prefill=layout.prefill, head_order=orders,
                             granularity="head").to_dict()
        setattr(config, CONFIG_KEY, fresh)
        return _NO_BLOCK
    if not isinstance(block, dict) or not block.get("head_masks"):
        return None
    new = copy.deepcopy(block)
    # recorded, so that a saved copy says its weights are no longer in the source model's head order
    recorded = {int(k): v for k, v in (block.get("head_order") or {}).items()}
    for key, mask in block["head_masks"].items():
        order = orders.get(int(key))
        if order is not None:
            new["head_masks"][key] = [mask[i] for i in order]
            before = recorded.get(int(key), list(range(len(order))))
            recorded[int(key)] = [before[i] for i in order]
    if recorded:
        new["head_order"] = {str(k): v for k, v in sorted(recorded.items())}
    setattr(config, CONFIG_KEY, new)
    return block


def runtime_of(model) -> HybridRuntime:
    """The hybrid runtime of ``model``; a one-line error if it has none."""
    runtime = getattr(model, RUNTIME_ATTR, None)
    if runtime is None:
        raise LightTransferError("this model is not a lighttransfer hybrid; load it with lighttransfer.load().")
    return runtime


def sparse_prefill_stats(model) -> SparsePrefillStats:
    """The full layers' prefill records of ``model`` (realised density per layer: ``.density_by_layer()``); a
    one-line error when sparse prefill is off."""
    sparse = runtime_of(model).sparse_prefill
    if sparse is None:
        raise LightTransferError("sparse prefill is off for this model; load it with prefill_sparse='sample', "
                                 "'vslash' or 'antidiag'.")
    return sparse.stats


def head_routing_stats(model) -> RoutingStats:
    """The realised head routing of ``model`` (ρ: ``.local_share()``, per layer ``.local_share_by_layer()``); a
    one-line error when head routing is off."""
    routing = runtime_of(model).head_routing
    if routing is None:
        raise LightTransferError("head routing is off for this model; load it with head_routing='qada', 'oracle', "
                                 "'random' or 'static'.")
    return routing.stats


def make_cache(model, max_tokens: int | None = None) -> HybridCache:
    """A fresh :class:`HybridCache` for ``model`` (for ``past_key_values=`` / ``cache=`` in manual loops);
    ``max_tokens``: tokens per sequence the full layers allocate at once (prompt + ``max_new_tokens``)."""
    return runtime_of(model).make_cache(max_tokens)


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """``{layer_idx: attention module}`` of a decoder-only transformers model."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and "attention" in type(module).__name__.lower():
            found.setdefault(idx, module)
    return dict(sorted(found.items()))


__all__ = ["enable_hybrid", "disable_hybrid", "make_cache", "runtime_of", "attention_modules", "HybridRuntime",
           "sparse_prefill_stats", "head_routing_stats"]
