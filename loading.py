"""Model loading shared by every stage: resolve where a model lives, pick device and dtype, load it.

A model is named by
  * a local directory holding ``config.json`` and weights (safetensors preferred; ``.bin`` is read with
    ``weights_only=True``),
  * a GGUF file (dequantized through transformers' GGUF loader, then rebuilt as a plain model so that it can
    be saved as safetensors), or
  * a hub id (``org/name``), fetched by transformers when the machine can reach the hub or has it cached.

``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import LightTransferError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SourceKind = Literal["directory", "gguf", "hub"]

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Architectures we test; any other whose modeling code goes through transformers' attention-function
# interface works too.
TESTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# config keys that say nothing about the model's identity (left out of the fingerprint)
_VOLATILE_CONFIG_KEYS = {
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


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        spec: what the user typed.
        kind: ``directory``, ``gguf`` or ``hub``.
        path: the directory (for ``directory``) or the GGUF file (for ``gguf``); ``None`` for a hub id.
    """

    spec: str
    kind: SourceKind
    path: Path | None

    @property
    def model_id(self) -> str:
        """A readable id for reports: the hub id, or the directory / file name."""
        if self.path is None:
            return self.spec
        return self.path.name

    @property
    def from_pretrained_args(self) -> tuple[str, dict[str, Any]]:
        """``(name_or_path, kwargs)`` for transformers' ``from_pretrained``."""
        if self.kind == "gguf":
            assert self.path is not None
            return str(self.path.parent), {"gguf_file": self.path.name}
        if self.kind == "directory":
            return str(self.path), {}
        return self.spec, {}


def resolve_model_source(spec: str | os.PathLike[str]) -> ModelSource:
    """Say whether ``spec`` is a model directory, a GGUF file or a hub id, with a clear error if none.

    Raises:
        LightTransferError: the path does not exist, or the directory lacks a config or weights.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(text, "gguf", path.resolve())
        if path.name == "config.json":
            return resolve_model_source(path.parent)
        raise LightTransferError(
            f"model '{text}' is a file but not a GGUF file; pass a model directory (with config.json), "
            "a .gguf file or a hub id."
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(text, "gguf", ggufs[0].resolve())
            raise LightTransferError(
                f"model directory '{text}' has no config.json; pass a transformers model directory, "
                "a .gguf file or a hub id."
            )
        if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(text, "gguf", ggufs[0].resolve())
            raise LightTransferError(
                f"model directory '{text}' has a config.json but no weights (*.safetensors or *.bin); "
                "copy the weights there or pass another model."
            )
        return ModelSource(text, "directory", path.resolve())
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1)
    if _HUB_ID.match(text) and not looks_like_path:
        return ModelSource(text, "hub", None)
    raise LightTransferError(
        f"model '{text}' does not exist; pass an existing model directory, a .gguf file or a hub id (org/name)."
    )


def resolve_device(spec: str | torch.device | int | None = "auto") -> torch.device:
    """Turn ``auto | cpu | cuda | cuda:N`` (or a ``torch.device``, or a CUDA index as transformers takes it)
    into a device: ``auto`` is CUDA when present, else the CPU."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    elif isinstance(spec, int) and not isinstance(spec, bool):
        spec = f"cuda:{spec}"
    elif spec is not None and not isinstance(spec, str):
        raise LightTransferError(f"device={spec!r} is not understood; pass 'auto', 'cpu', 'cuda[:N]' or a torch.device.")
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", spec):
        if not torch.cuda.is_available():
            raise LightTransferError(f"--device {spec}: CUDA is not available here; use --device cpu or auto.")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise LightTransferError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible; pick one of them."
            )
        return torch.device("cuda", index)
    raise LightTransferError(f"--device '{spec}' is not understood; use auto, cpu, cuda or cuda:N.")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Turn ``auto | float32 | bfloat16 | float16`` (or a ``torch.dtype``, or ``"torch.bfloat16"``, as transformers
    takes them) into a dtype: ``auto`` is bf16 on CUDA, fp32 on CPU."""
    import torch

    if isinstance(spec, torch.dtype):
        if spec not in (torch.float32, torch.bfloat16, torch.float16):
            raise LightTransferError(f"dtype={spec} is not supported; use torch.float32, torch.bfloat16 or "
                                     "torch.float16 (or 'auto').")
        return spec
    if spec is not None and not isinstance(spec, str):
        raise LightTransferError(f"dtype={spec!r} is not understood; pass a torch.dtype or one of {', '.join(DTYPES)}.")
    spec = (spec or "auto").strip().lower().removeprefix("torch.")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    spec = aliases.get(spec, spec)
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise LightTransferError(f"--dtype '{spec}' is not understood; use one of {', '.join(DTYPES)}.")
    return getattr(torch, spec)


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    source: ModelSource
    fingerprint: str

    @property
    def model_id(self) -> str:
        return self.source.model_id


def load_config(source: ModelSource, *, trust_remote_code: bool = False):
    """Load the transformers config of ``source`` (GGUF included), with one-line errors; refuse models that are
    not causal LMs or whose attention cannot be swapped (:func:`check_causal_lm`)."""
    from transformers import AutoConfig

    name, kwargs = source.from_pretrained_args
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(source, exc) from exc
    check_causal_lm(config, source)
    return config


def load_tokenizer(source: ModelSource | str, *, trust_remote_code: bool = False):
    """Load the tokenizer that belongs to ``source``."""
    from transformers import AutoTokenizer

    if not isinstance(source, ModelSource):
        source = resolve_model_source(source)
    name, kwargs = source.from_pretrained_args
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(source, exc, what="tokenizer") from exc
    if source.kind == "gguf":
        # transformers' GGUF loader drops the special-token roles and the chat template; the header has them
        from .gguf_metadata import complete_tokenizer, read_gguf_metadata

        filled = complete_tokenizer(tokenizer, read_gguf_metadata(source.path))
        if filled:
            log.debug("restored %s of the tokenizer from the GGUF metadata", ", ".join(filled))
    return tokenizer


def load_model(
    spec: str | os.PathLike[str] | ModelSource,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load a causal LM (and its tokenizer) from a directory, a GGUF file or a hub id.

    Args:
        spec: model directory, ``.gguf`` file, hub id, or an already resolved :class:`ModelSource`.
        device: ``auto | cpu | cuda[:N]`` or a ``torch.device``; ignored when ``device_map`` is given.
        dtype: ``auto | float32 | bfloat16 | float16`` or a ``torch.dtype`` (``auto``: bf16 on CUDA, fp32 on CPU).
        trust_remote_code: allow the model's own Python code (off by default).
        attn_implementation: transformers attention backend (``sdpa``, ``eager``, ...); default: transformers'.
        device_map: passed to accelerate (e.g. ``"auto"`` for a model too big for one GPU); a single device
            (``"cuda:1"``, ``torch.device``) works for GGUF files too.
        with_tokenizer: also load the tokenizer.

    Raises:
        LightTransferError: on every problem the user can fix, with one line saying what to do.
    """
    from transformers import AutoModelForCausalLM

    source = spec if isinstance(spec, ModelSource) else resolve_model_source(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config = load_config(source, trust_remote_code=trust_remote_code)  # one-line errors before any weight is read
    if source.kind == "directory":
        check_weight_files(source, config)  # corrupt files and shape mismatches, named, before the slow load

    name, kwargs = source.from_pretrained_args
    kwargs = dict(kwargs, trust_remote_code=trust_remote_code, dtype=torch_dtype, output_loading_info=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    import torch

    if isinstance(device_map, torch.device):
        device_map = str(device_map)
    if device_map is not None and source.kind == "gguf":
        # the GGUF copy is rebuilt in memory (see _plain_copy): one device only
        if isinstance(device_map, str) and device_map not in ("auto", "balanced", "sequential"):
            dev, device_map = resolve_device(device_map), None
        else:
            raise LightTransferError(f"device_map={device_map!r} cannot spread a GGUF file over devices; pass "
                                     "device='cuda:N' (or a single-device device_map), or convert it first.")
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model, info = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except LightTransferError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, numpy (GGUF) and torch errors come in many types
        raise _load_error(source, exc) from exc
    check_loading_info(info, source)
    if source.kind == "gguf":
        model = _plain_copy(model, torch_dtype, attn_implementation)
    check_attention_swappable(model)
    if device_map is None:
        model = model.to(dev)
    model.eval()
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code) if with_tokenizer else None
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, fingerprint=model_fingerprint(model))


def check_causal_lm(config, source: ModelSource) -> None:
    """Refuse configs that have no causal-LM head in transformers, or whose attention cannot be swapped."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        if getattr(config, "auto_map", None):
            return  # remote code: checked once the model class is known
        raise LightTransferError(
            f"model '{source.spec}' ({config.model_type}) is not a causal language model; "
            "lighttransfer converts decoder-only causal LMs such as Llama, Mistral, Qwen2/3 or GPT-NeoX."
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise LightTransferError(
            f"model '{source.spec}' ({config.model_type}) is an encoder (masked language) model, not a decoder-only "
            "causal LM; its causal-LM head would be untrained. lighttransfer converts decoder-only causal LMs such "
            "as Llama, Mistral, Qwen2/3 or GPT-NeoX."
        )
    check_attention_swappable(mapping[type(config)], config.model_type)


def check_attention_swappable(model_or_class, model_type: str | None = None) -> None:
    """Refuse models whose attention does not go through transformers' attention-function interface."""
    if not getattr(model_or_class, "_supports_attention_backend", False):
        model_type = model_type or model_or_class.config.model_type
        raise LightTransferError(
            f"architecture '{model_type}' does not route attention through transformers' attention "
            "interface, so its layers cannot be made streaming; supported are models such as "
            f"{', '.join(TESTED_ARCHITECTURES)} (any whose transformers class supports attention backends)."
        )


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
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
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


def _plain_copy(model, dtype, attn_implementation):
    """Rebuild a GGUF-loaded model without its gguf quantization config, so it behaves like any other."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, **kwargs)
    plain.load_state_dict(model.state_dict(), strict=False, assign=True)
    plain.tie_weights()
    # non-persistent buffers (rotary frequencies) are not in the state dict: take them over too
    for name, buf in model.named_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = plain.get_submodule(owner_name) if owner_name else plain
        if getattr(owner, attr, None) is not None and getattr(owner, attr).is_meta:
            owner._buffers[attr] = buf
    missing = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if missing:
        raise LightTransferError(f"GGUF model lacks weights for {missing[:3]}...; the file may be incomplete.")
    if model.generation_config is not None:
        plain.generation_config = model.generation_config
    plain.to(dtype)
    return plain


def _load_error(source: ModelSource, exc: Exception, what: str = "model") -> LightTransferError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if source.kind == "hub":
        return LightTransferError(
            f"could not load {what} '{source.spec}' from the hub ({first[:160]}); without network access, "
            "pass a local model directory or a .gguf file."
        )
    if "does not recognize this architecture" in first or "model type" in first:
        return LightTransferError(
            f"{what} '{source.spec}': transformers does not know this architecture ({first[:160]}); "
            "upgrade transformers or pass --trust-remote-code if the model ships its own code."
        )
    if source.kind == "gguf" or type(exc).__name__ in ("SafetensorError", "HeaderTooLarge", "UnpicklingError") \
            or "reshape" in first or "deserializ" in first:
        return LightTransferError(
            f"could not load {what} from '{source.path or source.spec}': the file looks corrupt or truncated "
            f"({type(exc).__name__}: {first[:160]}); download or save it again, or pass another model."
        )
    return LightTransferError(f"could not load {what} from '{source.spec}' ({type(exc).__name__}: {first[:200]}); "
                              "check that the directory holds a complete transformers model, or pass another model.")


def local_snapshot(source: ModelSource) -> ModelSource:
    """A hub id becomes the local snapshot directory (downloaded, or from the cache when offline)."""
    if source.kind != "hub":
        return source
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(source.spec, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model",
                                                             "*.txt", "*.jinja", "*.tiktoken", "LICENSE*", "NOTICE*"])
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LightTransferError(
            f"could not fetch '{source.spec}' from the hub ({first}); pass a local model directory or a .gguf file."
        ) from exc
    return ModelSource(source.spec, "directory", Path(path))


def _meta_model(config):
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def fingerprint_from_config(config, source: ModelSource | str | os.PathLike[str] | None = None) -> str:
    """The :func:`~lighttransfer.loading.model_fingerprint` of a model, computed without loading the model.

    The structure comes from ``config`` (the model built on the meta device); the weight values are sampled from
    ``source``'s safetensors or ``.bin`` files (a few rows per tensor, read from disk). Without ``source``, or for
    a GGUF file, only the structure part is returned (load the model for the full fingerprint).
    """
    model = _meta_model(config)
    structure = _structure_fingerprint(model)
    if source is None:
        return structure
    if not isinstance(source, ModelSource):
        source = resolve_model_source(source)
    if source.kind != "directory":
        return structure
    ignored = _ignore_patterns(model, "_keys_to_ignore_on_load_unexpected")
    digests = set()
    for path in _weight_files(source.path):
        for name, shape, read in _iter_file_tensors(path):
            # every tensor the load keeps, under its file name (transformers may rename some, e.g. GPT-NeoX's
            # embed_out to lm_head; the digests do not depend on names)
            if not any(p.search(name) for p in ignored):
                digests.add(_digest_of_pieces(shape, [read(idx) for idx in _sample_index(shape)]))
    return f"{structure}-{_values_digest(digests)}"


def _ignore_patterns(model, attr: str) -> list[re.Pattern]:
    return [re.compile(p) for p in (getattr(model, attr, None) or [])]


def _weight_files(folder: Path) -> list[Path]:
    """The weight files transformers would read from ``folder`` (safetensors first, else ``.bin``)."""
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))
        if found:
            return found
    return []


def _iter_file_tensors(path: Path):
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
    files = _weight_files(source.path)
    if not files:
        return
    model = _meta_model(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    aliases: dict[int, set[str]] = {}
    for name, param in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(param), set()).add(name)
    alias_of = {name: group for group in aliases.values() for name in group}
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        for name, shape, _ in _iter_file_tensors(path):
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
    ignored = _ignore_patterns(model, "_keys_to_ignore_on_load_missing")
    missing = sorted(n for n in expected if n not in found and not (alias_of.get(n, {n}) & set(found))
                     and not any(p.search(n) for p in ignored) and n in alias_of)
    ignored = _ignore_patterns(model, "_keys_to_ignore_on_load_unexpected")
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


__all__ = [
    "local_snapshot",
    "fingerprint_from_config",
    "ModelSource",
    "LoadedModel",
    "resolve_model_source",
    "resolve_device",
    "resolve_dtype",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "compare_fingerprints",
    "fingerprint_structure",
    "check_weight_files",
    "check_loading_info",
    "TESTED_ARCHITECTURES",
]
