"""Differences between the transformers releases lighttransfer supports (5.17 and newer), in one place."""

from __future__ import annotations

import inspect


def cache_keyword(model) -> str:
    """The forward keyword for a KV cache: ``cache`` in transformers >= 5.24, ``past_key_values`` before.

    ``model``: a transformers model (its class's ``forward`` signature is read, so it costs no call)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def output_cache(out):
    """The cache a forward returned: ``out.cache`` in transformers >= 5.24 (which keeps ``past_key_values`` only
    as an alias), ``out.past_key_values`` before."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


__all__ = ["cache_keyword", "output_cache"]
