"""A model's identity, cheaply: a hash of its structure (config, tensor names and shapes) and of sampled weight
values, so that a report, a hybrid or an eval baseline from another model of the same shape (a base model and its
fine-tune) is told apart, while dtype, device and where the weights came from do not change it."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

from .weight_files import ignore_patterns, iter_file_tensors, meta_model, weight_files

if TYPE_CHECKING:  # pragma: no cover
    from .loading import ModelSource

# config keys that do not change what the model computes (or that a conversion rewrites)
VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "lighttransfer",
    "architectures",
    "_attn_implementation_autoset",
    "_commit_hash",
    "layer_types",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "use_cache",
}


FINGERPRINT_SAMPLE = 8  # elements per sampled row and trailing dimension


def model_fingerprint(model) -> str:
    """A short hash of a model's identity: its structure, then its weight values (``"<structure>-<values>"``).

    The structure is the config (minus volatile keys) and the sorted parameter names and shapes. The values are a
    few sampled slices of every tensor (4 rows, the first elements of each), rounded to bfloat16 and hashed as
    a set, so a base model and its fine-tune differ while dtype, device, tied copies and where the weights came
    from (GGUF, safetensors, a converted hybrid) do not change it. :func:`fingerprint_from_config` computes the
    same hash from the weight files without loading the model.
    """
    digests = {_tensor_digest(t) for t in model.state_dict().values() if not t.is_meta}
    return f"{_structure_fingerprint(model)}-{_values_digest(digests)}"


def fingerprint_structure(fingerprint: str | None) -> str:
    """The structure part of a fingerprint (all of one written before lighttransfer hashed weight values)."""
    return str(fingerprint or "").split("-", 1)[0]


def compare_fingerprints(recorded: str | None, actual: str) -> str:
    """``"same"``, ``"different"``, or ``"legacy"``: ``recorded`` predates weight values and only its
    structure (config, names, shapes) matches ``actual``."""
    if recorded == actual:
        return "same"
    if recorded and "-" not in recorded and recorded == fingerprint_structure(actual):
        return "legacy"
    return "different"


def _structure_fingerprint(model) -> str:
    config = {k: v for k, v in model.config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    index = sorted((name, list(t.shape)) for name, t in model.state_dict().items())
    blob = json.dumps({"config": config, "weights": index}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sample_index(shape) -> list[tuple[slice, ...]]:
    """The slices sampled from a tensor of ``shape``: 4 rows spread over dim 0, the first elements of the rest."""
    if len(shape) == 0:
        return [()]
    rows = sorted({0, shape[0] // 3, 2 * shape[0] // 3, max(shape[0] - 1, 0)})
    rest = tuple(slice(0, min(FINGERPRINT_SAMPLE, d)) for d in shape[1:])
    return [(slice(r, r + 1), *rest) for r in rows if r < shape[0]]


def _digest_of_pieces(shape, pieces) -> str:
    import torch

    h = hashlib.sha1(json.dumps(list(shape)).encode())
    for piece in pieces:
        piece = piece.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(piece.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _tensor_digest(t) -> str:
    return _digest_of_pieces(tuple(t.shape), [t[idx] for idx in _sample_index(tuple(t.shape))])


def _values_digest(digests) -> str:
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:8]


def fingerprint_from_config(config, source: ModelSource | str | os.PathLike[str] | None = None) -> str:
    """The :func:`~lighttransfer.loading.model_fingerprint` of a model, computed without loading the model.

    The structure comes from ``config`` (the model built on the meta device); the weight values are sampled from
    ``source``'s safetensors or ``.bin`` files (a few rows per tensor, read from disk). Without ``source``, or for
    a GGUF file, only the structure part is returned (load the model for the full fingerprint).
    """
    model = meta_model(config)
    structure = _structure_fingerprint(model)
    if source is None:
        return structure
    from .loading import ModelSource, resolve_model_source

    if not isinstance(source, ModelSource):
        source = resolve_model_source(source)
    if source.kind != "directory":
        return structure
    ignored = ignore_patterns(model, "_keys_to_ignore_on_load_unexpected")
    digests = set()
    for path in weight_files(source.path):
        for name, shape, read in iter_file_tensors(path):
            # every tensor the load keeps, under its file name (transformers may rename some, e.g. GPT-NeoX's
            # embed_out to lm_head; the digests do not depend on names)
            if not any(p.search(name) for p in ignored):
                digests.add(_digest_of_pieces(shape, [read(idx) for idx in _sample_index(shape)]))
    return f"{structure}-{_values_digest(digests)}"


__all__ = ["model_fingerprint", "fingerprint_from_config", "fingerprint_structure", "compare_fingerprints"]
