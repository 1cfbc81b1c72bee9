"""Serving engines that run a hybrid checkpoint outside lighttransfer's own runtime.

A stage above the checkpoint format: it reads only the ``lighttransfer`` block (``hybrid_format``) and the
mask rule (``kernels.mask``), never the runtime or the writer. :mod:`.vllm` is the vLLM plugin.
"""
