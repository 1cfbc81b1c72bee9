"""Writing a hybrid checkpoint's files into a staging directory: weights, config, sidecar, tokenizer and
license files, model card. What to write was decided by :mod:`.plan`; :mod:`.staging` makes it appear at once."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..gguf_metadata import read_gguf_metadata
from ..hybrid_format import SIDECAR_FORMAT_VERSION, HybridConfig
from ..loading import LoadedModel, ModelSource
from .model_card import FIGURE_NAME, plot_selection, render_model_card
from .weights import (
    WrittenWeights,
    source_weight_files,
    write_bin_as_safetensors,
    write_model_weights,
    write_safetensors_shards,
)

log = logging.getLogger(__name__)

# files beside the weights that a checkpoint needs or must keep (tokenizers, chat templates, licenses)
AUX_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
LICENSE_PATTERNS = ("LICENSE*", "LICENCE*", "License*", "license*", "NOTICE*", "COPYING*", "USE_POLICY*")
HEATMAP_NAME = "lighttransfer_heatmap.png"


def copy_aux_files(src_dir: Path, dst_dir: Path, patterns: Iterable[str]) -> list[str]:
    copied = []
    for pattern in patterns:
        for path in sorted(src_dir.glob(pattern)):
            if path.is_file() and not (dst_dir / path.name).exists():
                shutil.copyfile(path, dst_dir / path.name)
                copied.append(path.name)
    return copied


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def sidecar(report, *, model_id: str, fingerprint: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "format_version": SIDECAR_FORMAT_VERSION,
        "model_id": model_id,
        "fingerprint": fingerprint,
        "params": dict(report.params or {}),
        "layer_lazy_ratios": list(report.layer_lazy_ratios()),
        "kv_head_long_context_scores": [list(r) for r in report.kv_head_long_context_scores()],
    }
    head_ratios = getattr(report, "head_lazy_ratios", None)
    if callable(head_ratios):
        data["head_lazy_ratios"] = [list(r) for r in head_ratios()]
    return json.loads(json.dumps(data, default=float))


def write_weights(source: ModelSource, loaded: LoadedModel | None, tmp: Path) -> WrittenWeights:
    if source.kind == "gguf":
        assert loaded is not None
        written = write_model_weights(loaded.model, tmp)
        written.method = f"dequantized from the GGUF file {source.path.name} and saved in " \
                         f"{str(loaded.model.dtype).removeprefix('torch.')}"
        return written
    fmt, shards, index = source_weight_files(source.path)
    if fmt == "safetensors":
        return write_safetensors_shards(source.path, tmp, shards, index)
    return write_bin_as_safetensors(source.path, tmp, shards)


def write_aux_files(source: ModelSource, loaded: LoadedModel | None, tmp: Path, *,
                     trust_remote_code: bool) -> dict[str, Any]:
    """Copy tokenizer, generation and license files; for a GGUF, save its tokenizer. Returns GGUF metadata."""
    if source.kind == "directory":
        copy_aux_files(source.path, tmp, AUX_PATTERNS + LICENSE_PATTERNS)
        return {}
    # GGUF: the tokenizer lives inside the file; transformers' loader rebuilds it, minus a few roles
    tokenizer = loaded.tokenizer if loaded is not None else None
    if tokenizer is None:
        from ..loading import load_tokenizer

        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    metadata = read_gguf_metadata(source.path)  # license and name for the card; load_tokenizer filled the roles
    tokenizer.save_pretrained(tmp)
    copy_aux_files(source.path.parent, tmp, LICENSE_PATTERNS)
    return metadata


def write_card(tmp: Path, name: str, hybrid: HybridConfig, rows, memory, report, written: WrittenWeights, *,
                source: ModelSource, gguf_dtype: str, hub_id: str | None, license_id: str | None) -> None:
    kv_scores = report.kv_head_long_context_scores() if report is not None and hybrid.granularity == "head" else None
    figure = FIGURE_NAME if plot_selection(tmp / FIGURE_NAME, rows=rows, hybrid=hybrid, kv_scores=kv_scores) else None
    heatmap = None
    if report is not None and hasattr(report, "query_heads"):
        try:
            from ..analysis.heatmap import plot_heatmap

            plot_heatmap(report, tmp / HEATMAP_NAME, lazy_fraction=len(hybrid.streaming_layers) / hybrid.num_layers)
            heatmap = HEATMAP_NAME
        except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
            log.warning("no heatmap in the model card (%s)", exc)
    dtype_note = None
    if source.kind == "gguf":
        dtype_note = (f"The source was a GGUF file ({source.path.name}); its quantized weights were dequantized "
                      f"by transformers and saved in {gguf_dtype}. They equal the GGUF's values, not the original "
                      "full-precision weights.")
    card = render_model_card(name=name, hybrid=hybrid, rows=rows, memory=memory, weights_note=written.method,
                             figure=figure, heatmap=heatmap, hub_id=hub_id, license_id=license_id,
                             dtype_note=dtype_note)
    (tmp / "README.md").write_text(card)


__all__ = ["write_weights", "write_aux_files", "write_card", "write_json", "sidecar", "copy_aux_files",
           "AUX_PATTERNS", "LICENSE_PATTERNS", "HEATMAP_NAME"]
