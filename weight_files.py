"""Checking a checkpoint's weight files before (and after) a load: every file readable, no tensor missing,
unexpected or of another shape, so that broken weights are never used silently as random ones. The files are read
tensor by tensor, by slices, without loading the model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LightTransferError

if TYPE_CHECKING:  # pragma: no cover
    from .loading import ModelSource


def meta_model(config):
    """``config``'s causal LM built on the meta device: names, shapes and tied weights, no memory."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def ignore_patterns(model, attr: str) -> list[re.Pattern]:
    return [re.compile(p) for p in (getattr(model, attr, None) or [])]


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers would read from ``folder`` (safetensors first, else ``.bin``)."""
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))
        if found:
            return found
    return []


def iter_file_tensors(path: Path):
    """``(name, shape, read(index))`` for every tensor of a weight file, reading only the slices asked for.

    Raises:
        LightTransferError: the file is corrupt or truncated (named, with what to do).
    """
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")
            names = list(handle.keys())
            slices = {n: handle.get_slice(n) for n in names}
            shapes = {n: tuple(slices[n].get_shape()) for n in names}
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
            raise _broken_file(path, exc) from exc
        for n in names:
            def read(idx, _s=slices[n], _p=path):
                try:
                    return _s[idx] if idx else _s[:]
                except Exception as exc:  # noqa: BLE001
                    raise _broken_file(_p, exc) from exc
            yield n, shapes[n], read
        return
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise _broken_file(path, exc) from exc
    for n, t in state.items():
        if isinstance(t, torch.Tensor):
            yield n, tuple(t.shape), (lambda idx, _t=t: _t[idx])


def _broken_file(path: Path, exc: Exception) -> LightTransferError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return LightTransferError(
        f"weights file '{path}' is corrupt or truncated ({first}); download or save it again, or pass another model."
    )


def check_weight_files(source: ModelSource, config) -> None:
    """Check a model directory's weight files against ``config`` without loading them: every file readable,
    no tensor missing (tied copies such as ``lm_head.weight`` excepted), none unexpected, none of another shape.

    Raises:
        LightTransferError: naming the file and the tensors, and what to do.
    """
    if source.kind != "directory":
        return
    files = weight_files(source.path)
    if not files:
        return
    model = meta_model(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    aliases: dict[int, set[str]] = {}
    for name, param in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(param), set()).add(name)
    alias_of = {name: group for group in aliases.values() for name in group}
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        for name, shape, _ in iter_file_tensors(path):
            found[name] = (shape, path)
    mismatched = [(n, shape, expected[n], path) for n, (shape, path) in found.items()
                  if n in expected and shape != expected[n]]
    if mismatched:
        n, got, want, path = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise LightTransferError(
            f"weights file '{path}' does not fit '{source.path / 'config.json'}': tensor {n} has shape {list(got)}, "
            f"the config needs {list(want)}{more}; the weights and config.json belong to different models. "
            "Put the matching config.json beside the weights, or pass the original model."
        )
    ignored = ignore_patterns(model, "_keys_to_ignore_on_load_missing")
    missing = sorted(n for n in expected if n not in found and not (alias_of.get(n, {n}) & set(found))
                     and not any(p.search(n) for p in ignored) and n in alias_of)
    ignored = ignore_patterns(model, "_keys_to_ignore_on_load_unexpected")
    extra = sorted(n for n in found if n not in expected and not any(p.search(n) for p in ignored))
    # transformers renames some keys on load (GPT-NeoX's embed_out is lm_head): a missing and an unexpected
    # tensor of the same shapes are taken for such a rename; what is left over is not
    if sorted(expected[n] for n in missing) == sorted(found[n][0] for n in extra):
        missing, extra = [], []
    if missing:
        raise LightTransferError(
            f"the weights in '{source.path}' lack {len(missing)} tensor(s) the config needs ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); they would be random. The checkpoint is incomplete: copy all "
            "its weight files (and the index) there, or pass another model."
        )
    if extra:
        path = found[extra[0]][1]
        raise LightTransferError(
            f"weights file '{path}' holds {len(extra)} tensor(s) the config does not use ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''}); the weights belong to another model or architecture. Put the "
            "matching config.json beside them, or pass another model."
        )


def check_loading_info(info: dict | None, source: ModelSource) -> None:
    """Refuse a load that left tensors random (missing), ignored some (unexpected) or reshaped some (mismatched),
    from transformers' ``output_loading_info``."""
    if not info:
        return
    where = source.path or source.spec
    for key, what in (("missing_keys", "lacks"), ("mismatched_keys", "has tensors of the wrong shape:"),
                      ("unexpected_keys", "has tensors the model does not use:")):
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in (info.get(key) or ()))
        if names:
            tail = ("they would be random weights" if key == "missing_keys" else
                    "the weights belong to another model or architecture")
            raise LightTransferError(
                f"model '{where}' {what} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} "
                f"({len(names)} tensor(s)); {tail}. Fix or re-download the checkpoint, or pass another model."
            )


__all__ = ["meta_model", "weight_files", "iter_file_tensors", "ignore_patterns", "check_weight_files",
           "check_loading_info"]
