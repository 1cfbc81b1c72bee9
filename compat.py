"""Differences between the transformers releases lighttransfer supports (5.17 and newer), in one place."""
from __future__ import annotations
import inspect

def cache_keyword(model) -> str:
    """The forward keyword for a KV cache: ``cache`` in transformers >= 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

__all__ = ["cache_keyword"]
