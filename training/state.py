"""The resume state of a fine-tune: a directory written every ``--save-every`` steps, read by ``--resume``.

It holds ``state.json`` (step reached, per-step losses, the settings, the data and base-model identity),
``trainable.safetensors`` (every trainable tensor by its name in the peft model, float32) and ``optimizer.pt``
(AdamW's state, loaded with ``weights_only=True``). It is replaced as a whole: a new one is written beside it and
renamed into place, so a run killed while saving leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LightTransferError
from .settings import RESUME_FIXED, FinetuneSettings

STATE_SCHEMA_VERSION = 1
STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class TrainState:
    """Where a fine-tune stands (``step`` optimizer steps done; ``losses[i]`` the mean loss of step ``i``)."""

    step: int
    losses: list[float]
    settings: dict[str, Any]
    data: dict[str, Any]
    base: dict[str, Any]
    seconds: float = 0.0
    schema_version: int = STATE_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)


def default_state_dir(out: str | os.PathLike[str]) -> Path:
    """``OUT.state`` beside the output directory."""
    out = Path(out).expanduser().absolute()
    return out.with_name(out.name + ".state")


def check_state_target(path: Path) -> None:
    """Refuse a state directory that would overwrite something else (a file, or a folder of other things)."""
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / STATE_FILE).is_file())):
        raise LightTransferError(f"--state-dir '{path}' exists and is not a fine-tune state; choose another place.")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LightTransferError(f"--state-dir '{path}': cannot write into '{parent}'; choose another place.")


def save_state(path: Path, state: TrainState, model, optimizer) -> None:
    """Write the state directory at ``path`` (replacing the previous one only once the new one is complete)."""
    from safetensors.torch import save_file

    check_state_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        tensors = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LightTransferError(f"could not write the fine-tune state '{path}' ({exc.strerror or exc}); the "
                                 "previous state is unchanged. Free some space or pass another --state-dir.") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_state(path: str | os.PathLike[str]) -> TrainState:
    """Read ``state.json`` of a state directory, refusing a missing or damaged one in one line."""
    path = Path(path)
    file = path / STATE_FILE
    if not file.is_file():
        raise LightTransferError(f"--resume '{path}' holds no {STATE_FILE}; pass the state directory a fine-tune "
                                 "wrote (OUT.state by default).")
    try:
        raw = json.loads(file.read_text())
        state = TrainState(**raw)
    except (OSError, ValueError, TypeError) as exc:
        raise LightTransferError(f"--resume '{path}': {STATE_FILE} is damaged ({exc}); start again without "
                                 "--resume.") from exc
    if state.schema_version != STATE_SCHEMA_VERSION:
        raise LightTransferError(f"--resume '{path}' was written by another lighttransfer (state schema "
                                 f"{state.schema_version}, this one reads {STATE_SCHEMA_VERSION}).")
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE):
        if not (path / name).is_file():
            raise LightTransferError(f"--resume '{path}' lacks {name}; it was not written completely.")
    return state


def check_resumable(state: TrainState, settings: FinetuneSettings, *, data: dict, base: dict, where: str) -> None:
    """Refuse to resume with other fixed settings, other data or another base model (one line naming the first
    difference)."""
    for name in RESUME_FIXED:
        theirs, ours = state.settings.get(name), getattr(settings, name)
        if theirs != ours:
            raise LightTransferError(f"--resume '{where}' was trained with {name} = {theirs!r}, this run asks for "
                                     f"{ours!r}; pass the same settings or start without --resume.")
    if state.data.get("tokens_sha256") != data.get("tokens_sha256"):
        raise LightTransferError(f"--resume '{where}' was trained on other data (its token rows differ); pass the "
                                 "same --data, --seq-len and --field, or start without --resume.")
    if state.base.get("fingerprint") != base.get("fingerprint"):
        raise LightTransferError(f"--resume '{where}' belongs to another model (fingerprint "
                                 f"{state.base.get('fingerprint')}, this one {base.get('fingerprint')}).")
    if state.step >= settings.steps:
        raise LightTransferError(f"--resume '{where}' has already done {state.step} steps; pass --steps above "
                                 f"{state.step} to train further.")


def load_into(path: Path, model, optimizer) -> None:
    """Copy the saved trainable tensors into ``model`` and the optimizer state into ``optimizer``."""
    from safetensors.torch import load_file

    saved = load_file(str(path / WEIGHTS_FILE))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing = sorted(set(params) - set(saved))[:3]
        raise LightTransferError(f"--resume '{path}' does not match this model's trainable tensors (e.g. "
                                 f"{missing or sorted(set(saved) - set(params))[:3]}); start without --resume.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu"))


__all__ = ["TrainState", "save_state", "read_state", "check_resumable", "load_into", "default_state_dir",
           "check_state_target", "STATE_FILE"]
