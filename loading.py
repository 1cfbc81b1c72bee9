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

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import LightTransferError

# re-exported too: loading is where the stages find a model's identity and the weight checks
from .fingerprint import (
    compare_fingerprints,
    fingerprint_from_config,
    fingerprint_structure,
    model_fingerprint,
)
from .weight_files import check_loading_info, check_weight_files

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
