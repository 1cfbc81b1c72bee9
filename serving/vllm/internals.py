"""Every piece of vLLM the plugin touches, imported here and nowhere else (checked against vLLM 0.32 and 0.26).

Registration surfaces vLLM documents for plugins:

- ``ModelRegistry.register_model`` (``vllm/model_executor/models/registry.py``): our model classes replace
  vLLM's ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``; they
  are the parent class, unchanged, for a checkpoint without a ``lighttransfer`` block.
- ``KVCacheSpecRegistry.register`` (``vllm/v1/kv_cache_spec_registry.py``): the sink + window spec and
  its manager.
- ``register_backend`` (``vllm/v1/attention/backends/registry.py``): the sink + window attention backend,
  under its own name.

Classes subclassed (not a stable API; each vLLM minor release is re-checked before
:data:`~.version.SUPPORTED_VLLM` admits it):

- ``SlidingWindowSpec`` (``vllm/v1/kv_cache_interface.py``) and ``SlidingWindowManager``
  (``vllm/v1/core/single_type_kv_cache_manager.py``), whose ``_remove_blocks_in_range`` the manager calls;
- ``Attention`` (``vllm/model_executor/layers/attention/attention.py``), ``AttentionBackend``,
  ``AttentionImpl``, ``AttentionMetadataBuilder`` (``vllm/v1/attention/backend.py``);
- the four model classes above;
- on CUDA, ``TritonAttentionBackend``, ``TritonAttentionImpl``, ``TritonAttentionMetadataBuilder``
  (``vllm/v1/attention/backends/triton_attn.py``): the streaming layers run vLLM's Triton
  ``unified_attention`` through them, in its R-SWA mode (``rswa_prefix_lens`` = the sink, ``rswa_window``),
  over a block table the builder shortens (:mod:`.window_table`); the builder sets the metadata fields
  ``block_table``, ``seq_lens``, ``max_seq_len``, ``rswa_prefix_lens``, ``rswa_window``.

Differences between the two releases, the only version-dependent code of the plugin (all below):

- 0.32 declares a backend's KV cache layout with ``supported_kv_cache_layouts`` (``KVCacheLayout`` in
  ``vllm/v1/kv_cache_layout.py``); 0.26 has no such type and asks the backend for ``get_kv_cache_shape``
  and ``get_required_kv_cache_layout`` instead (:data:`LEGACY_BACKEND_API`). Both give the CPU path the
  same ``[blocks, kv_heads, block_size, 2 * head_dim]`` contiguous cache.
- 0.32's ``register_backend`` accepts a new backend name (it extends ``AttentionBackendEnum``); 0.26's enum
  is fixed, and ``Attention.__init__`` looks ``AttentionBackendEnum[backend.get_name()]`` up, so there the
  CPU backend takes the ``CUSTOM`` member (the CUDA backend keeps the name ``TRITON_ATTN`` in both).
- Everything else named here has the same name and signature in both (``KVCacheSpecRegistry`` and its
  ``_ensure_registered``; ``SlidingWindowSpec`` with ``max_admission_blocks_per_request`` and
  ``is_uniform_with_collection``; ``SlidingWindowManager`` with ``get_num_skipped_tokens``,
  ``_remove_blocks_in_range``, ``find_longest_cache_hit``, ``req_to_blocks``; ``Attention.__init__`` with
  ``per_layer_sliding_window``, ``attn_backend`` and ``**extra_impl_args``; ``register_backend``; the
  Triton backend's R-SWA fields; the model classes' constructors).

Private state reached into (the names a vLLM upgrade must be checked for):

- ``KVCacheSpecRegistry._ensure_registered``: the registry skips its built-in types once anything is in it,
  so the built-ins are put in first (:func:`ensure_builtin_kv_specs`);
- ``LLM.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.coordinator.single_type_managers``: the
  per-group KV managers of an in-process engine, for tests and measurements (:func:`kv_cache_managers`);
- ``VllmConfig.compilation_config.static_forward_context``: an ``Attention`` registers itself there under its
  layer name; replacing a built layer's attention first removes the old entry (:func:`forget_attention_layer`).
"""

from __future__ import annotations

from .version import check_vllm_version

check_vllm_version()  # before any vLLM import: one line naming the supported range, not an ImportError deep inside

from vllm import ModelRegistry  # noqa: E402
from vllm.config import VllmConfig, get_current_vllm_config  # noqa: E402
from vllm.model_executor.layers.attention import Attention  # noqa: E402
from vllm.model_executor.models.utils import extract_layer_index  # noqa: E402
from vllm.utils.math_utils import cdiv  # noqa: E402
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager  # noqa: E402
from vllm.v1.kv_cache_interface import SlidingWindowSpec  # noqa: E402
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: E402

try:  # vLLM 0.32
    from vllm.v1.kv_cache_interface import KVCacheLayout  # noqa: E402
except ImportError:  # vLLM 0.26: backends give get_kv_cache_shape + get_required_kv_cache_layout instead
    KVCacheLayout = None
# vLLM 0.26's backend API: a fixed enum of backend names, KV cache shapes asked of the backend
LEGACY_BACKEND_API = KVCacheLayout is None


def on_cuda() -> bool:
    """Whether vLLM runs on an NVIDIA GPU (then the streaming layers take the Triton path)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda())


def triton_attention_classes() -> tuple[type, type, type]:
    """vLLM's ``(TritonAttentionBackend, TritonAttentionImpl, TritonAttentionMetadataBuilder)`` (imported on
    first use: the module needs Triton, which the CPU build lacks)."""
    from vllm.v1.attention.backends.triton_attn import (
        TritonAttentionBackend,
        TritonAttentionImpl,
        TritonAttentionMetadataBuilder,
    )

    return TritonAttentionBackend, TritonAttentionImpl, TritonAttentionMetadataBuilder


def vllm_model_classes() -> dict[str, type]:
    """vLLM's model classes by architecture name (imported on first use: not at plugin load)."""
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.mistral import MistralForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    return {"LlamaForCausalLM": LlamaForCausalLM, "MistralForCausalLM": MistralForCausalLM,
            "Qwen2ForCausalLM": Qwen2ForCausalLM, "Qwen3ForCausalLM": Qwen3ForCausalLM}


def ensure_builtin_kv_specs() -> None:
    """Put vLLM's built-in KV spec types in the registry before ours (private: ``_ensure_registered``)."""
    KVCacheSpecRegistry._ensure_registered()


def forget_attention_layer(vllm_config: VllmConfig, layer_name: str) -> None:
    """Remove a built ``Attention`` from the forward context, so a replacement can take its name (private:
    ``compilation_config.static_forward_context``)."""
    vllm_config.compilation_config.static_forward_context.pop(layer_name, None)


def kv_cache_managers(llm) -> tuple:
    """The KV cache managers, one per KV cache group, of an ``LLM`` whose engine runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); private: the scheduler's coordinator."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    if core is None:
        raise RuntimeError("the engine runs in another process; set VLLM_ENABLE_V1_MULTIPROCESSING=0 to inspect it.")
    return tuple(core.scheduler.kv_cache_manager.coordinator.single_type_managers)


__all__ = [
    "kv_cache_managers",
    "ModelRegistry", "VllmConfig", "get_current_vllm_config", "Attention", "vllm_model_classes", "extract_layer_index", "cdiv",
    "AttentionBackend", "AttentionImpl", "AttentionMetadataBuilder", "AttentionType", "CommonAttentionMetadata",
    "AttentionBackendEnum", "register_backend", "SlidingWindowManager", "KVCacheLayout", "SlidingWindowSpec",
    "KVCacheSpecRegistry", "ensure_builtin_kv_specs", "forget_attention_layer", "LEGACY_BACKEND_API",
    "on_cuda", "triton_attention_classes",
]
