"""Context extension for a fine-tune: RoPE scaled to ``factor`` times the model's positions, written into its
config so that the merged checkpoint runs extended wherever transformers (or vLLM) reads it.

Two schemes, both as transformers implements them (``rope_parameters["rope_type"]``):

* ``linear``: position interpolation (Chen et al., arXiv 2306.15595), what LongLoRA fine-tunes with: position
  ``p`` is rotated as ``p / factor``, i.e. every inverse frequency divided by ``factor``;
* ``yarn`` (Peng et al., arXiv 2309.00071): high frequencies kept, low ones interpolated, a ramp between
  (``beta_fast`` 32, ``beta_slow`` 1, transformers' defaults), and the attention logits scaled by
  ``0.1 ln(factor) + 1``; ``original_max_position_embeddings`` is written explicitly (transformers would otherwise
  infer the factor from ``max_position_embeddings``, which the extension raises).

Only models with one unscaled RoPE are extended (Llama, Mistral, Qwen2/3, GPT-NeoX, ...): a model that already
scales its RoPE (Llama 3.1's ``llama3``, a YaRN Qwen) or keeps one per layer type (Gemma 3) is refused with one
line, rather than stacking two scalings or guessing which one to extend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import LightTransferError

ROPE_SCALINGS = ("linear", "yarn")


@dataclass(frozen=True)
class RopeExtension:
    """What :func:`extend_rope` did: ``kind`` at ``factor``, positions ``original_positions -> positions``."""

    kind: str
    factor: float
    original_positions: int
    positions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_rope_scaling(kind: str | None, factor: float | None) -> None:
    """One line for options that do not go together: a scheme needs a factor above 1, a factor needs a scheme."""
    if kind is None:
        if factor is not None:
            raise LightTransferError("--rope-factor needs --rope-scaling linear or yarn.")
        return
    if kind not in ROPE_SCALINGS:
        raise LightTransferError(f"--rope-scaling must be one of {', '.join(ROPE_SCALINGS)}, got {kind!r}.")
    if factor is None or isinstance(factor, bool) or not float(factor) > 1.0:
        raise LightTransferError(f"--rope-scaling {kind} needs --rope-factor above 1 (the target length over the "
                                 f"model's positions), got {factor!r}.")


def extended_positions(max_positions: int, factor: float) -> int:
    """Positions after extending ``max_positions`` by ``factor`` (rounded down)."""
    return int(max_positions * float(factor))


def _rope_type_of(params: Any) -> str | None:
    """The RoPE type of a config's ``rope_parameters`` / ``rope_scaling`` dict: ``None`` when there is none,
    ``"per-layer-type"`` when it holds one dict per layer type (Gemma 3)."""
    if not isinstance(params, dict) or not params:
        return None
    if all(isinstance(v, dict) for v in params.values()):
        return "per-layer-type"
    return params.get("rope_type", params.get("type"))


def check_rope_extensible(config: dict, *, where: str) -> None:
    """Refuse, from ``config.json`` alone (no weights), a model whose RoPE cannot be extended: already scaled or
    one per layer type; see the module docstring."""
    for key in ("rope_parameters", "rope_scaling"):
        kind = _rope_type_of(config.get(key))
        if kind == "per-layer-type":
            raise LightTransferError(f"{where} keeps one RoPE per layer type ({config.get('model_type')}); "
                                     "--rope-scaling extends models with a single RoPE only.")
        if kind not in (None, "default"):
            raise LightTransferError(f"{where} already scales its RoPE ({key} rope_type {kind!r}); --rope-scaling "
                                     "extends an unscaled RoPE only: leave it out.")


def scaled_rope_parameters(params: dict, kind: str, factor: float, original_positions: int) -> dict:
    """``rope_parameters`` for ``kind`` at ``factor`` from the unscaled ``params`` (``rope_theta`` and, where
    present, ``partial_rotary_factor`` kept)."""
    out = {k: v for k, v in params.items() if k in ("rope_theta", "partial_rotary_factor")}
    out.update(rope_type=kind, factor=float(factor))
    if kind == "yarn":
        out["original_max_position_embeddings"] = int(original_positions)
    return out


def _rotary_modules(model) -> list[tuple[Any, str, Any]]:
    """``(parent, attribute name, module)`` of every rotary embedding (a module with ``inv_freq`` and a
    ``rope_type``, transformers' ``*RotaryEmbedding``)."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if hasattr(child, "inv_freq") and hasattr(child, "rope_type"):
                found.append((parent, name, child))
    return found


def extend_rope(model, kind: str, factor: float) -> RopeExtension:
    """Scale the RoPE of a loaded transformers model in place: its text config gets the scaled
    ``rope_parameters`` and ``max_position_embeddings * factor``, and every rotary embedding module is rebuilt
    from it (on its device). Raises :class:`LightTransferError` where the model cannot be extended."""
    check_rope_scaling(kind, factor)
    config = model.config.get_text_config()
    params = getattr(config, "rope_parameters", None)
    if params is None and hasattr(config, "standardize_rope_params"):
        config.standardize_rope_params()
        params = config.rope_parameters
    where = f"the model ({config.model_type})"
    check_rope_extensible({"rope_parameters": params, "model_type": config.model_type}, where=where)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise LightTransferError(f"{where} has no RoPE parameters that --rope-scaling can extend.")
    modules = _rotary_modules(model)
    if not modules:
        raise LightTransferError(f"{where} has no rotary embedding module to rebuild; --rope-scaling supports "
                                 "transformers' RoPE models (Llama, Mistral, Qwen2/3, ...).")
    original = int(config.max_position_embeddings)
    config.rope_parameters = scaled_rope_parameters(params, kind, factor, original)
    config.max_position_embeddings = extended_positions(original, factor)
    for parent, name, old in modules:
        try:
            new = type(old)(config=old.config if getattr(old, "config", None) is not None else config)
        except TypeError as exc:
            raise LightTransferError(f"{where}: its rotary embedding ({type(old).__name__}) cannot be rebuilt "
                                     f"for --rope-scaling ({exc}).") from exc
        if getattr(new, "rope_type", None) != kind:
            raise LightTransferError(f"{where}: its rotary embedding ({type(old).__name__}) ignored the scaled "
                                     "rope_parameters; --rope-scaling does not support this architecture.")
        setattr(parent, name, new.to(old.inv_freq.device))
    return RopeExtension(kind=kind, factor=float(factor), original_positions=original,
                         positions=int(config.max_position_embeddings))


__all__ = ["ROPE_SCALINGS", "RopeExtension", "check_rope_scaling", "check_rope_extensible", "extend_rope",
           "extended_positions", "scaled_rope_parameters"]
