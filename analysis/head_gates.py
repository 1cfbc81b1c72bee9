"""Find the KV heads that need full attention by optimization (DuoAttention, arXiv 2410.10819, Sec. 3.2).

Every KV head of every layer gets a gate ``alpha`` in [0, 1] that mixes its full-attention output with its
sink + window output (Eq. 1, :mod:`.head_gates_attention`). The model's weights stay frozen; only the gates
train, to make the gated model's final hidden states match the full model's on synthetic passkey-retrieval
prompts, while an L1 penalty pushes every gate toward streaming (Eq. 2-4)::

    L_distill = mean over supervised positions j of  mean_d (H_full[j, d] - H_gated[j, d]) ** 2
    L         = L_distill + l1 * sum_{layer, head} |alpha|

A head whose gate stays high cannot drop distant keys without changing the output: it retrieves. The gates
are the KV heads' long-context scores (higher = keep full), ranked model-wide by ``convert --granularity
head`` like the attention-mass scores, or cut with a threshold (:func:`full_kv_heads`).

The paper's defaults (Sec. 4.1 and its released configuration), and ours for a ~100M model on a CPU:

=====================  =============================================  =======================================
setting                DuoAttention (7-8B models, 8 GPUs)             here (default)
=====================  =============================================  =======================================
data                   multi-passkey (10 keys of 32 words) in         one 5-digit key in real prose
                       BookSum, 1K-32K tokens, depth 0.05-0.95        (``calibration.make_passkey_sample``),
                                                                      ``seq_len`` tokens, depth 0.05 up to
                                                                      where the key leaves the window, six
                                                                      wordings in turn (two held out)
supervision            final hidden states at the answer tokens       final hidden states at the positions
                                                                      that predict the answer's tokens
optimizer              AdamW, weight decay 0, batch 1                 same
steps / lr             2000 / 0.02, 20% warm-up, 20% linear decay     200 / 0.02, same schedule shape
                       (floor 0.1)
L1 weight              0.05 on the sum of the gates                   0.01 (0.05 left 58 of SmolLM2's 90
                                                                      gates at exactly 0, tied)
gates                  initialised at 1, clamped to [0, 1]            same
sink / window          128 / 256 in training                          the analysis' sink / window (4 / 256)
decision               threshold 0.5, or a share of heads kept full   either (:func:`full_kv_heads`)
=====================  =============================================  =======================================
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..calibration.passkey import TRAINING_TEMPLATES
from ..errors import LightTransferError
from .head_gates_attention import gated_attention

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
WARMUP_SHARE = 0.2  # share of steps with a linear warm-up, and of steps with a linear decay at the end
LR_FLOOR = 0.1  # the schedule never goes below this share of the peak learning rate
MIN_DEPTH, MAX_DEPTH = 0.05, 0.95

ProgressCallback = Callable[[int, int], None]


@dataclass
class HeadGateResult:
    """Gates found by :func:`optimize_head_gates`, and how they were found.

    Attributes:
        gates: ``[num_layers][num_kv_heads]`` floats in [0, 1]; higher = the KV head needs full attention.
        loss_history: total loss (distill + l1 * sum of the gates) per step.
        distill_history: ``L_distill`` per step (mean squared error of the final hidden states, per dimension).
        gate_mean_history: mean gate after each step.
        params: samples, seq_len, sink, window, steps, lr, l1, seed, depths, supervised positions, device, dtype.
        timings: seconds (``targets``, ``optimize``, ``per_step``).
        model_id, fingerprint: the model the gates belong to.
    """

    gates: list[list[float]]
    loss_history: list[float]
    distill_history: list[float]
    gate_mean_history: list[float]
    params: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    model_id: str = ""
    fingerprint: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def num_layers(self) -> int:
        return len(self.gates)

    @property
    def num_kv_heads(self) -> int:
        return len(self.gates[0]) if self.gates else 0

    def to_dict(self) -> dict[str, Any]:
        return dict(sorted(asdict(self).items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "head gates") -> HeadGateResult:
        """Build and validate a result from :meth:`to_dict`'s output; one-line errors name ``origin``."""
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            version = data.get("schema_version") if isinstance(data, dict) else None
            raise LightTransferError(
                f"{origin} has schema_version {version!r}; this lighttransfer reads {SCHEMA_VERSION}: rerun "
                "'lighttransfer analyze --method optimize'."
            )
        try:
            result = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as exc:
            raise LightTransferError(f"{origin} is malformed ({exc}).") from exc
        check_gate_matrix(result.gates, origin=origin)
        return result


def check_gate_matrix(gates, *, origin: str = "head gates", shape: tuple[int, int] | None = None) -> None:
    """Raise a one-line error unless ``gates`` is a non-empty ``[layers][kv_heads]`` matrix of values in [0, 1]
    (and of ``shape`` when given)."""
    if not isinstance(gates, list) or not gates or not all(isinstance(r, list) and r for r in gates):
        raise LightTransferError(f"{origin}: gates must be a non-empty [layers][kv_heads] list of lists.")
    widths = {len(r) for r in gates}
    if len(widths) != 1:
        raise LightTransferError(f"{origin}: gate rows have different lengths {sorted(widths)}.")
    if shape is not None and (len(gates), widths.pop()) != tuple(shape):
        raise LightTransferError(f"{origin}: gates are [{len(gates)}][{len(gates[0])}], the model has "
                                 f"[{shape[0]}][{shape[1]}] (layers x KV heads).")
    if any(not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0 for r in gates for x in r):
        raise LightTransferError(f"{origin}: every gate must be a number in [0, 1].")


def full_kv_heads(gates: list[list[float]], *, threshold: float | None = None,
                  share: float | None = None) -> list[list[bool]]:
    """Which KV heads stay full: ``gate > threshold`` (the paper's deployment rule, 0.5), or the ``share`` of
    all heads with the highest gates (ties: lower ``(layer, head)`` first). Returns ``[layers][kv_heads]`` bools.
    """
    if (threshold is None) == (share is None):
        raise LightTransferError("pass exactly one of threshold= or share= to pick the full KV heads.")
    if threshold is not None:
        return [[g > threshold for g in row] for row in gates]
    if not 0.0 <= share <= 1.0:
        raise LightTransferError(f"share of full KV heads must be in [0, 1], got {share}.")
    cells = [(layer, head) for layer in range(len(gates)) for head in range(len(gates[layer]))]
    count = int(share * len(cells) + 0.5)
    top = set(sorted(cells, key=lambda c: (-gates[c[0]][c[1]], c))[:count])
    return [[(layer, head) in top for head in range(len(gates[layer]))] for layer in range(len(gates))]


def lr_factor(step: int, steps: int) -> float:
    """Share of the peak learning rate at ``step`` (0-based): linear warm-up over the first ``WARMUP_SHARE``
    of the steps, flat, then linear decay over the last ``WARMUP_SHARE``; never below ``LR_FLOOR``."""
    ramp = max(1, int(steps * WARMUP_SHARE))
    return min(1.0, max((step + 1) / ramp, LR_FLOOR), max((steps - step) / ramp, LR_FLOOR))


def distill_loss(gated: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``L_distill`` (Eq. 2): squared error of ``[positions, hidden]`` final hidden states, averaged over the
    hidden dimension and the positions, in float32."""
    return (gated.float() - full.float()).pow(2).mean(dim=-1).mean()


@dataclass
class PasskeyRows:
    """Gate-training prompts: ``input_ids [samples, seq_len]`` int64, each a passkey prompt followed by its
    answer; the last ``supervised[i]`` positions of row ``i`` are the ones whose outputs predict the answer;
    ``templates[i]`` names row ``i``'s wording."""

    input_ids: torch.Tensor
    supervised: list[int]
    depths: list[float]
    templates: list[str] = field(default_factory=list)


def passkey_rows(tokenizer, *, samples: int, seq_len: int, window: int, seed: int,
                 filler_text: str | None = None, templates: Sequence[str] = TRAINING_TEMPLATES) -> PasskeyRows:
    """Build ``samples`` passkey rows of exactly ``seq_len`` tokens with the calibration passkey builder.

    Depths are spread evenly over ``[0.05, d_max]`` in a seeded order, ``d_max`` keeping the key at least
    ``window`` tokens before the question, so that the streaming branch cannot see it (0.95 at most). Row ``i``
    is worded with ``templates[i % len(templates)]`` (keys of ``calibration.passkey.TEMPLATES``): several
    wordings keep the gates from fitting one phrasing of the question.
    """
    from ..calibration import SHIPPED_TEXT, make_passkey_sample
    from ..calibration.passkey import check_templates, token_ids

    templates = check_templates(templates, option="--gate-formats")

    filler = filler_text if filler_text is not None else SHIPPED_TEXT.read_text(encoding="utf-8")
    rng = random.Random(seed)
    top = min(MAX_DEPTH, max(MIN_DEPTH, 1.0 - (window + 32) / seq_len))
    depths = [MIN_DEPTH + (top - MIN_DEPTH) * (i + 0.5) / samples for i in range(samples)]
    rng.shuffle(depths)
    rows, supervised, worded = [], [], []
    for i, depth in enumerate(depths):
        sample_seed = rng.randrange(2**31)
        template = templates[i % len(templates)]
        worded.append(template)
        # the key depends on the seed only; build once to learn it, then leave room for its tokens
        key = make_passkey_sample(tokenizer, filler, length_tokens=seq_len, depth=depth, seed=sample_seed,
                                  template=template).answer
        answer = token_ids(tokenizer, " " + key)
        prompt = make_passkey_sample(tokenizer, filler, length_tokens=seq_len - len(answer), depth=depth,
                                     seed=sample_seed, template=template)
        rows.append(torch.cat([prompt.input_ids, torch.tensor(answer, dtype=torch.long)]))
        supervised.append(len(answer) + 1)  # the prompt's last token predicts the answer's first
    return PasskeyRows(input_ids=torch.stack(rows), supervised=supervised, depths=depths, templates=worded)


def _decoder(model):
    # the base model: the loss needs hidden states, not logits (the LM head would cost a large matmul)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return base if isinstance(base, torch.nn.Module) else model


def _check_args(*, samples, seq_len, sink, window, steps, lr, l1) -> None:
    if samples < 1 or steps < 1:
        raise LightTransferError(f"gate optimization needs samples >= 1 and --gate-steps >= 1, got {samples}, {steps}.")
    if sink < 0 or window < 1:
        raise LightTransferError(f"--sink must be >= 0 and the window >= 1, got {sink} and {window}.")
    if seq_len <= sink + window + 64:
        raise LightTransferError(
            f"--seq-len {seq_len} leaves no distance beyond sink + window ({sink + window}); raise --seq-len."
        )
    if lr <= 0 or l1 < 0:
        raise LightTransferError(f"the gate learning rate must be > 0 and --gate-l1 >= 0, got {lr} and {l1}.")


def optimize_head_gates(
    model,
    tokenizer,
    *,
    samples: int = 16,
    seq_len: int = 1024,
    sink: int = 4,
    window: int = 256,
    steps: int = 200,
    lr: float = 0.02,
    l1: float = 0.01,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | ProgressCallback = False,
    filler_text: str | None = None,
    templates: Sequence[str] = TRAINING_TEMPLATES,
    rows: PasskeyRows | None = None,
) -> HeadGateResult:
    """Train one gate per (layer, KV head) on passkey prompts with the model frozen (see the module docstring).

    Args:
        model: a transformers causal LM (or its decoder) whose attention goes through ``AttentionInterface``.
        tokenizer: its tokenizer (builds the passkey prompts; unused when ``rows`` is given).
        samples: distinct passkey prompts; step ``i`` uses prompt ``order[i % samples]`` (seeded order).
        seq_len: tokens per prompt, answer included.
        sink, window: the streaming branch's rule (first ``sink`` tokens + the ``window`` most recent).
        steps: optimizer steps (one prompt each); lr: peak AdamW learning rate; l1: weight of the mean gate.
        seed: picks prompts, depths and their order; same seed, same gates.
        device: where the prompts go (default: the model's embedding device).
        progress: ``True`` logs every step; a callable ``(done, total)`` is called after each step.
        filler_text: prose to hide the keys in (default: the shipped calibration text).
        templates: the prompts' wordings, used in turn (keys of ``calibration.passkey.TEMPLATES``; default: the
            training wordings, leaving ``HELD_OUT_TEMPLATES`` for evaluation).
        rows: ready prompts (overrides ``samples``, ``seq_len``, ``filler_text`` and ``templates``).

    Returns:
        :class:`HeadGateResult` with ``gates [num_layers][num_kv_heads]`` in [0, 1].
    """
    from ..architecture import model_shape
    from ..loading import model_fingerprint

    _check_args(samples=samples if rows is None else rows.input_ids.shape[0],
                seq_len=seq_len if rows is None else rows.input_ids.shape[1], sink=sink, window=window,
                steps=steps, lr=lr, l1=l1)
    shape = model_shape(model.config)
    layers, kv_heads, max_pos = shape.num_layers, shape.num_kv_heads, shape.max_positions
    if rows is None:
        if max_pos and seq_len > max_pos:
            raise LightTransferError(f"--seq-len {seq_len} is beyond the model's {max_pos} positions.")
        rows = passkey_rows(tokenizer, samples=samples, seq_len=seq_len, window=window, seed=seed,
                            filler_text=filler_text, templates=templates)
    decoder = _decoder(model)
    device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    on_step = _progress(progress)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows.input_ids.shape[0], generator=generator).tolist()

    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        started = time.perf_counter()
        targets = _full_targets(decoder, rows, device)
        targets_s = time.perf_counter() - started

        gates = torch.nn.Parameter(torch.ones(layers, kv_heads, dtype=torch.float32, device=device))
        optimizer = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
        losses, distills, means = [], [], []
        started = time.perf_counter()
        with gated_attention(decoder, gates, sink=sink, window=window):
            for step in range(steps):
                i = order[step % len(order)]
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(step, steps)
                ids = rows.input_ids[i : i + 1].to(device)
                hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, -rows.supervised[i] :]
                distill = distill_loss(hidden, targets[i])
                loss = distill + l1 * gates.abs().sum()  # Eq. 4
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    gates.clamp_(0.0, 1.0)  # projected step: gates stay mixing weights
                losses.append(round(float(loss.detach()), 7))
                distills.append(round(float(distill.detach()), 7))
                means.append(round(float(gates.detach().mean()), 6))
                on_step(step + 1, steps)
        optimize_s = time.perf_counter() - started
    finally:
        for p, flag in zip(model.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)

    dtype = next(model.parameters()).dtype
    return HeadGateResult(
        gates=[[round(float(x), 6) for x in row] for row in gates.detach().cpu()],
        loss_history=losses,
        distill_history=distills,
        gate_mean_history=means,
        params={
            "samples": int(rows.input_ids.shape[0]), "seq_len": int(rows.input_ids.shape[1]), "sink": sink,
            "window": window, "steps": steps, "lr": lr, "l1": l1, "seed": seed,
            "depths": [round(d, 4) for d in rows.depths], "supervised": list(rows.supervised),
            "templates": sorted(set(rows.templates)),
            "schedule": f"linear warm-up {WARMUP_SHARE:.0%}, decay {WARMUP_SHARE:.0%}, floor {LR_FLOOR}",
            "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        },
        timings={"targets": round(targets_s, 3), "optimize": round(optimize_s, 3),
                 "per_step": round(optimize_s / steps, 4)},
        model_id=getattr(model.config, "_name_or_path", "") or type(model).__name__,
        fingerprint=model_fingerprint(model),
    )


def _full_targets(decoder, rows: PasskeyRows, device) -> list[torch.Tensor]:
    """The frozen full model's final hidden states ``[supervised, hidden]`` of each row (computed once: the
    model never changes)."""
    out = []
    with torch.no_grad():
        for i in range(rows.input_ids.shape[0]):
            hidden = decoder(input_ids=rows.input_ids[i : i + 1].to(device), use_cache=False).last_hidden_state
            out.append(hidden[0, -rows.supervised[i] :].detach())
    return out


def _progress(progress: bool | ProgressCallback) -> ProgressCallback:
    if callable(progress):
        return progress
    if progress:
        return lambda done, total: log.info("gate optimization: step %d/%d", done, total)
    return lambda done, total: None


def attach_head_gates(report, result: HeadGateResult) -> None:
    """Store ``result``'s gates in an analysis report as its KV-head long-context scores (``optimize``)."""
    check_gate_matrix(result.gates, origin="head gates", shape=(report.num_layers, report.num_kv_heads))
    report.kv_head_gates = [list(row) for row in result.gates]
    report.head_score_method = "optimize"
    report.params["gates"] = {k: v for k, v in result.params.items() if k not in ("depths", "supervised")} | {
        "final_loss": result.loss_history[-1], "final_distill": result.distill_history[-1],
        "first_distill": result.distill_history[0],
    }
    report.timings["gates"] = result.timings.get("optimize", 0.0) + result.timings.get("targets", 0.0)


__all__ = [
    "HeadGateResult",
    "PasskeyRows",
    "attach_head_gates",
    "check_gate_matrix",
    "distill_loss",
    "full_kv_heads",
    "lr_factor",
    "optimize_head_gates",
    "passkey_rows",
]
