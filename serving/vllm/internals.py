"""Every piece of vLLM the plugin touches, imported here and nowhere else (checked against vLLM 0.32).

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
- the four model classes above.

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
from vllm.v1.kv_cache_interface import KVCacheLayout, SlidingWindowSpec  # noqa: E402
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: E402


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
    "KVCacheSpecRegistry", "ensure_builtin_kv_specs", "forget_attention_layer",
]
