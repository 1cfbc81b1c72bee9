"""Fused ops mode: fewer, larger kernels per decoder layer, by rewiring a loaded model's modules on the instance.

At batch 1 the decode step of an 8B model is ~2000 kernels, most of them transformers' eager element-wise chains
(RMSNorm ~8 kernels in bf16, the rotary embedding of q and k ~10, three q/k/v GEMMs, gate and up GEMMs plus silu and
mul); in a CUDA graph each still costs a few microseconds of GPU time. :func:`fuse_model` replaces, per module (the
kernels run on CUDA, and on the CPU under ``TRITON_INTERPRET=1``; elsewhere their PyTorch references):

* RMSNorm (Llama, Mistral, Qwen2, Qwen3 incl. Qwen3's q/k norms: Llama style; Gemma 3: Gemma style) -> one
  :func:`~lighttransfer.kernels.fused_ops.rms_norm` launch;
* attention of the Llama family (Llama, Mistral, Qwen2, Qwen3) -> one QKV GEMM over the three weights concatenated
  once, one :func:`~lighttransfer.kernels.fused_ops.apply_rope` launch for q and k, then exactly the stock cache
  update, attention function (the model's ``_attn_implementation``, so the hybrid's) and ``o_proj``;
* SiLU MLPs without bias (Llama, Mistral, Qwen2, Qwen3) -> one gate/up GEMM and one
  :func:`~lighttransfer.kernels.fused_ops.silu_mul` launch, then ``down_proj``.

Invariants:

* **Known classes only.** A module qualifies by its class name *and* its class living in transformers' own
  ``transformers.models`` (remote code of the same name is left alone).
* **Instance level.** Only the ``forward`` attribute of each rewired module instance is set; no transformers class
  or module global is touched, so another model in the same process is unaffected. Modules with an accelerate hook
  (``device_map``) keep theirs untouched.
* **No duplicated memory.** The concatenated weight is the only copy: ``q_proj/k_proj/v_proj`` (``gate_proj/
  up_proj``) parameters are re-pointed as views into it, biases likewise, so ``state_dict`` and ``save_pretrained``
  still hold the original names and values (transformers clones disjoint views on save), and in-place edits of a
  parameter (the head reordering of mixed layers) reach the fused weight.
* **Always the stock values when not fusable.** A forward falls back to the stock one when autograd would need
  gradients (the kernels have no backward), or when a parameter was replaced after fusing (``model.to(...)``): then
  the fused weight is rebuilt on the next forward outside a CUDA-graph capture.
* :func:`unfuse_model` restores the stock forwards; the parameters stay views (values unchanged).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import types

import torch
from torch import nn

from ..kernels.attention import SUPPORTED_DTYPES
from ..kernels.fused_ops import apply_rope, rms_norm, silu_mul

log = logging.getLogger(__name__)

FUSED_ATTR = "lighttransfer_fused"

# class name -> RMSNorm style; other norms keep the stock forward
NORM_CLASSES = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "llama", "Qwen2RMSNorm": "llama",
                "Qwen3RMSNorm": "llama", "Gemma3RMSNorm": "gemma"}
# class name -> how its stock forward passes ``sliding_window`` to the attention function (None: it does not)
ATTENTION_CLASSES = {
    "LlamaAttention": None,
    "MistralAttention": lambda m: getattr(m.config, "sliding_window", None),
    "Qwen2Attention": lambda m: getattr(m, "sliding_window", None),
    "Qwen3Attention": lambda m: getattr(m, "sliding_window", None),
}
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILU_ACTIVATIONS = frozenset({"SiLU", "SiLUActivation"})


@dataclasses.dataclass
class FusedLinear:
    """Linears ``parts`` (names on the module) sharing one weight ``[sum of out_features, in_features]``."""

    parts: tuple[str, ...]
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    splits: tuple[int, ...] = ()
    _pointers: tuple[int, ...] = ()

    def build(self, module: nn.Module) -> None:
        """Concatenate the parts' weights (and biases) once and re-point the parameters as views into the result."""
        linears = [getattr(module, name) for name in self.parts]
        # outside inference mode: the parameters made here must stay usable by autograd later
        with torch.inference_mode(False), torch.no_grad():
            self.weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
            has_bias = linears[0].bias is not None
            self.bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
            self.splits = tuple(lin.out_features for lin in linears)
            start = 0
            for lin, rows in zip(linears, self.splits, strict=True):
                lin.weight = nn.Parameter(self.weight[start:start + rows], requires_grad=lin.weight.requires_grad)
                if has_bias:
                    lin.bias = nn.Parameter(self.bias[start:start + rows], requires_grad=lin.bias.requires_grad)
                start += rows
        self._pointers = self._read_pointers(module)

    def _read_pointers(self, module: nn.Module) -> tuple[int, ...]:
        ptrs = []
        for name in self.parts:
            lin = getattr(module, name)
            ptrs += [lin.weight.data_ptr(), lin.bias.data_ptr() if lin.bias is not None else 0]
        return tuple(ptrs)

    def current(self, module: nn.Module) -> bool:
        """Whether every part's parameters are still the views made by :meth:`build` (not replaced since)."""
        return self.weight is not None and self._read_pointers(module) == self._pointers

    def needs_grad(self, module: nn.Module, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for name in self.parts for p in getattr(module, name).parameters())

    def ready(self, module: nn.Module, x: torch.Tensor) -> bool:
        """Whether the fused path may run now (rebuilding the fused weight first if it went stale, outside capture)."""
        if x.dtype not in SUPPORTED_DTYPES or self.needs_grad(module, x) or not all(type(getattr(module, n)) is nn.Linear for n in self.parts):
            return False  # autograd needs the stock ops; a wrapped projection (e.g. a LoRA adapter) adds to it
        if self.current(module):
            return True
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        self.build(module)
        return True


@dataclasses.dataclass
class FusedModule:
    """One rewired module: its kind (``norm``, ``attention``, ``mlp``) and what its fused forward needs."""

    kind: str
    linear: FusedLinear | None = None
    style: str = "llama"
    cache_keyword: str = "cache"
    sliding_window: object = None  # ATTENTION_CLASSES' entry
    eager_attention: object = None


@dataclasses.dataclass
class FusedOps:
    """What :func:`fuse_model` rewired (``{kind: count}``) and what it left stock (``{class name: reason}``)."""

    modules: list[nn.Module] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for module in self.modules:
            kind = getattr(module, FUSED_ATTR).kind
            out[kind] = out.get(kind, 0) + 1
        return out


# ---- fused forwards (bound to one instance each) -----------------------------------------------------------------
def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
    if hidden_states.dtype not in SUPPORTED_DTYPES or (
            torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad)):
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, eps=eps, style=getattr(self, FUSED_ATTR).style)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    fused = getattr(self, FUSED_ATTR).linear
    if not fused.ready(self, x):
        return type(self).forward(self, x)
    return self.down_proj(silu_mul(nn.functional.linear(x, fused.weight)))


_MISSING = object()


def _attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                       cache=_MISSING, **kwargs):
    spec: FusedModule = getattr(self, FUSED_ATTR)
    keyword = spec.cache_keyword
    if cache is _MISSING:  # by keyword, under this version's name (5.24 still accepts the old one)
        cache = kwargs.pop(keyword, None)
        if keyword == "cache" and cache is None:
            cache = kwargs.pop("past_key_values", None)
    fused = spec.linear
    if not fused.ready(self, hidden_states):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, **{keyword: cache},
                                  **kwargs)
    input_shape = hidden_states.shape[:-1]
    qkv = nn.functional.linear(hidden_states, fused.weight, fused.bias)
    nq, nk, _ = fused.splits
    query = qkv[..., :nq].view(*input_shape, -1, self.head_dim)
    key = qkv[..., nq:nq + nk].view(*input_shape, -1, self.head_dim)
    value = qkv[..., nq + nk:].view(*input_shape, -1, self.head_dim).transpose(1, 2)
    if hasattr(self, "q_norm"):  # Qwen3: per-head norms before the rotation
        query, key = self.q_norm(query), self.k_norm(key)
    cos, sin = position_embeddings
    query, key = apply_rope(query.transpose(1, 2), key.transpose(1, 2), cos, sin)

    if cache is not None:
        if keyword == "cache":
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        else:
            key, value = cache.update(key, value, self.layer_idx)

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, spec.eager_attention)
    extra = {} if spec.sliding_window is None else {"sliding_window": spec.sliding_window(self)}
    out, weights = interface(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                             **extra, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


# ---- what qualifies ----------------------------------------------------------------------------------------------
def _linears(module: nn.Module, names) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _parts_unsupported(module: nn.Module, names) -> str | None:
    """Why the linears ``names`` of ``module`` cannot share one weight, or ``None``."""
    parts = [getattr(module, n) for n in names]
    if any(hasattr(p, "_hf_hook") for p in parts):
        return "its projections have accelerate hooks (offloaded or dispatched weights)"
    if any(p.weight.device.type == "meta" for p in parts):
        return "weights on the meta device"
    return None


def _attention_unsupported(module: nn.Module) -> str | None:
    if not _linears(module, ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "not four q/k/v/o linears"
    hooked = _parts_unsupported(module, ("q_proj", "k_proj", "v_proj"))
    if hooked:
        return hooked
    parts = [module.q_proj, module.k_proj, module.v_proj]
    if len({p.in_features for p in parts}) != 1 or len({p.weight.dtype for p in parts}) != 1:
        return "q/k/v projections of different shapes or dtypes"
    if len({p.bias is None for p in parts}) != 1:
        return "only some of q/k/v have a bias"
    if len({p.weight.device for p in parts}) != 1:
        return "q/k/v projections on different devices"
    if any(not p.weight.is_floating_point() for p in parts):
        return "quantized projections"
    if hasattr(module, "q_norm") and type(module.q_norm).__name__ not in NORM_CLASSES:
        return "an unknown q/k norm"
    if sys.modules.get(type(module).__module__) is None or not hasattr(sys.modules[type(module).__module__],
                                                                        "eager_attention_forward"):
        return "no eager attention function in its modeling module"
    return None


def _mlp_unsupported(module: nn.Module) -> str | None:
    if not _linears(module, ("gate_proj", "up_proj", "down_proj")):
        return "not gate/up/down linears"
    hooked = _parts_unsupported(module, ("gate_proj", "up_proj"))
    if hooked:
        return hooked
    if type(getattr(module, "act_fn", None)).__name__ not in SILU_ACTIVATIONS:
        return f"activation {type(getattr(module, 'act_fn', None)).__name__}, not SiLU"
    if module.gate_proj.bias is not None or module.up_proj.bias is not None:
        return "gate/up biases"
    if module.gate_proj.weight.device != module.up_proj.weight.device or not module.gate_proj.weight.is_floating_point():
        return "gate/up on different devices or quantized"
    return None


def _bind(module: nn.Module, spec: FusedModule, forward) -> None:
    setattr(module, FUSED_ATTR, spec)
    module.forward = types.MethodType(forward, module)


def fuse_model(model: nn.Module, *, cache_keyword: str | None = None) -> FusedOps:
    """Rewire ``model``'s supported modules (in place) to the fused forwards; return what was done.

    ``cache_keyword``: the attention forward's cache keyword (default: read from each attention class's stock
    signature: ``cache`` in transformers >= 5.24, ``past_key_values`` before). Idempotent: already fused modules are
    left as they are. Unsupported modules keep the stock forward; the reasons are logged at debug level.
    """
    done = FusedOps()
    for module in model.modules():
        name = type(module).__name__
        if hasattr(module, FUSED_ATTR):
            done.modules.append(module)
            continue
        kind = ("norm" if name in NORM_CLASSES else "attention" if name in ATTENTION_CLASSES
                else "mlp" if name in MLP_CLASSES else None)
        if kind is not None and not type(module).__module__.startswith("transformers.models."):
            done.skipped.setdefault(name, f"defined in {type(module).__module__}, not transformers' own")
            continue
        if kind is None:
            if name.endswith(("Attention", "RMSNorm", "MLP")):
                done.skipped.setdefault(name, "not a supported class")
            continue
        if hasattr(module, "_hf_hook") or "forward" in vars(module):
            done.skipped.setdefault(name, "its forward is already wrapped (accelerate hook or another rewrite)")
            continue
        if kind == "norm":
            if getattr(module, "weight", None) is None or module.weight.dim() != 1 or module.weight.is_meta:
                done.skipped.setdefault(name, "no 1-D weight in memory")
                continue
            _bind(module, FusedModule("norm", style=NORM_CLASSES[name]), _norm_forward)
        elif kind == "mlp":
            reason = _mlp_unsupported(module)
            if reason:
                done.skipped.setdefault(name, reason)
                continue
            linear = FusedLinear(("gate_proj", "up_proj"))
            linear.build(module)
            _bind(module, FusedModule("mlp", linear=linear), _mlp_forward)
        else:
            reason = _attention_unsupported(module)
            if reason:
                done.skipped.setdefault(name, reason)
                continue
            params = inspect.signature(type(module).forward).parameters
            keyword = cache_keyword or ("cache" if "cache" in params else "past_key_values")
            linear = FusedLinear(("q_proj", "k_proj", "v_proj"))
            linear.build(module)
            spec = FusedModule("attention", linear=linear, cache_keyword=keyword,
                               sliding_window=ATTENTION_CLASSES[name],
                               eager_attention=sys.modules[type(module).__module__].eager_attention_forward)
            _bind(module, spec, _attention_forward)
        done.modules.append(module)
    if any(getattr(m, FUSED_ATTR).linear is not None and getattr(m, FUSED_ATTR).linear.weight.is_cuda
           for m in done.modules):
        # the separate q/k/v and gate/up tensors were freed: give their blocks back, or the concatenated copies
        # would have come on top of them in the allocator's reserve
        torch.cuda.empty_cache()
    for name, reason in sorted(done.skipped.items()):
        log.debug("fused ops: %s keeps the stock forward (%s)", name, reason)
    log.info("fused ops: %s", ", ".join(f"{n} {k}" for k, n in sorted(done.counts().items())) or "nothing to fuse")
    return done


def unfuse_model(model: nn.Module) -> int:
    """Give every fused module of ``model`` its stock forward back; return how many. The parameters stay views into
    the concatenated weights (the same values; ``state_dict`` and saving are unaffected)."""
    count = 0
    for module in model.modules():
        if hasattr(module, FUSED_ATTR):
            vars(module).pop("forward", None)
            delattr(module, FUSED_ATTR)
            count += 1
    return count


def is_fused(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs a fused forward."""
    return any(hasattr(m, FUSED_ATTR) for m in model.modules())


__all__ = ["fuse_model", "unfuse_model", "is_fused", "FusedOps", "NORM_CLASSES", "ATTENTION_CLASSES", "MLP_CLASSES"]
