"""Calibration sets: ``samples`` rows of ``seq_len`` token ids cut from the calibration text.

Documents are tokenized without special tokens and joined with the tokenizer's EOS into one stream. The
stream is split into non-overlapping windows; ``samples`` of them are picked with a seeded generator (and a
seeded shift of the window grid), so the same text, tokenizer, seed and sizes give the same rows. When the
tokenizer puts a BOS in front of text by default, every row starts with it (as every real prompt would).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import LightTransferError
from .passkey import bos_prefix, passkey_samples, token_ids
from .sources import SHIPPED_TEXT, collect_documents

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SOURCES = ("passkey",)


@dataclass
class CalibrationSet:
    """Token rows for the analysis and where they came from.

    Attributes:
        input_ids: ``[samples, seq_len]`` int64 token ids.
        sources: the sources as given (paths, globs, ``synthetic:passkey``); the shipped text when none.
        files: the files actually read, in order.
        text_sha256: sha256 of the text read (documents joined by ``"\\n\\x1e\\n"``; passkey: of its filler).
        tokens_sha256: sha256 of ``input_ids`` (int64, row-major): the exact rows analysed.
        total_tokens: tokens in the joined stream (passkey: ``samples * seq_len``).
        offsets: start of each row in the stream (empty for synthetic rows).
        depths: needle depth of each passkey row (empty otherwise).
    """

    input_ids: torch.Tensor
    sources: list[str]
    files: list[str]
    text_sha256: str
    tokens_sha256: str
    total_tokens: int
    seed: int
    offsets: list[int] = field(default_factory=list)
    depths: list[float] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def description(self) -> str:
        """One line for logs and reports, e.g. ``sense_and_sensibility.txt (71,842 tokens)``."""
        names = ", ".join(s.rsplit("/", 1)[-1] for s in self.sources)
        return f"{names} ({self.total_tokens:,} tokens)"

    def to_dict(self) -> dict:
        """What a report records about the calibration (no token ids)."""
        return {
            "sources": list(self.sources),
            "files": list(self.files),
            "text_sha256": self.text_sha256,
            "tokens_sha256": self.tokens_sha256,
            "total_tokens": self.total_tokens,
            "tokens_used": self.samples * self.seq_len,
            "samples": self.samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "offsets": list(self.offsets),
            "depths": list(self.depths),
        }


def check_sources(sources: str | Sequence[str] | None, *, field: str = "text") -> None:
    """Raise the one-line error :func:`load_calibration` would raise for unreadable sources, without
    tokenizing (so that bad input is reported before a model is loaded)."""
    specs = [sources] if isinstance(sources, str) else list(sources or [])
    _split_sources(specs)
    files = [s for s in specs if not s.startswith(SYNTHETIC_PREFIX)]
    if files:
        collect_documents(files, field=field)


def _split_sources(specs: list[str]) -> tuple[list[str], list[str]]:
    synthetic = [s for s in specs if s.startswith(SYNTHETIC_PREFIX)]
    for s in synthetic:
        if s[len(SYNTHETIC_PREFIX) :] not in SYNTHETIC_SOURCES:
            known = ", ".join(SYNTHETIC_PREFIX + k for k in SYNTHETIC_SOURCES)
            raise LightTransferError(f"--calib '{s}' is not a known synthetic source; use one of: {known}.")
    if len(synthetic) > 1:
        raise LightTransferError("--calib: pass at most one synthetic source.")
    return synthetic, [s for s in specs if not s.startswith(SYNTHETIC_PREFIX)]


def load_calibration(
    sources: str | Sequence[str] | None,
    tokenizer,
    *,
    seq_len: int,
    samples: int,
    seed: int = 0,
    field: str = "text",
) -> CalibrationSet:
    """Read, tokenize and cut the calibration text into ``samples`` rows of ``seq_len`` tokens.

    Args:
        sources: files, directories, globs, or ``synthetic:passkey`` (passkey prompts whose filler is the
            other sources' text, or the shipped text when there is no other); ``None``: the shipped text.
        tokenizer: the model's transformers tokenizer.
        seq_len: tokens per row (BOS included).
        samples: number of rows.
        seed: picks the windows (and passkeys); same seed, same rows.
        field: the JSONL field holding the text.

    Raises:
        LightTransferError: a missing, empty or non-UTF-8 file, an unknown synthetic source, or too few tokens
            for ``samples * seq_len`` (the message says how many there are and what to pass).
    """
    if seq_len < 2:
        raise LightTransferError(f"--seq-len must be at least 2 tokens, got {seq_len}.")
    if samples < 1:
        raise LightTransferError(f"--samples must be at least 1, got {samples}.")
    specs = [sources] if isinstance(sources, str) else list(sources or [])
    synthetic, files_specs = _split_sources(specs)
    if not files_specs:
        files_specs = [str(SHIPPED_TEXT)]
    docs = collect_documents(files_specs, field=field)
    text_sha = hashlib.sha256("\n\x1e\n".join(d.text for d in docs).encode()).hexdigest()
    files = list(dict.fromkeys(_file_of(d.origin) for d in docs))
    shown = specs or [str(SHIPPED_TEXT)]

    if synthetic:
        filler = "\n\n".join(d.text for d in docs)
        ids, depths = passkey_samples(tokenizer, filler, seq_len=seq_len, samples=samples, seed=seed)
        return CalibrationSet(input_ids=ids, sources=shown, files=files, text_sha256=text_sha,
                              tokens_sha256=_tokens_sha(ids), total_tokens=samples * seq_len, seed=seed,
                              depths=depths)

    stream = token_stream(tokenizer, [d.text for d in docs])
    bos = bos_prefix(tokenizer)
    body = seq_len - len(bos)
    windows = len(stream) // body
    if windows < samples:
        have = f"enough for {windows} sample(s) of {seq_len}" if windows else f"fewer than --seq-len {seq_len}"
        raise LightTransferError(
            f"--calib: the calibration text has {len(stream):,} tokens, {have}, but --samples {samples} x "
            f"--seq-len {seq_len} needs {samples * body:,}; pass a lower --seq-len or --samples, or add text."
        )
    rng = random.Random(seed)
    shift = rng.randrange(0, len(stream) - windows * body + 1)
    chosen = sorted(rng.sample(range(windows), samples))
    offsets = [shift + w * body for w in chosen]
    rows = [bos + stream[o : o + body] for o in offsets]
    ids = torch.tensor(rows, dtype=torch.long)
    return CalibrationSet(input_ids=ids, sources=shown, files=files, text_sha256=text_sha,
                          tokens_sha256=_tokens_sha(ids), total_tokens=len(stream), seed=seed, offsets=offsets)


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The documents tokenized without special tokens and joined by the tokenizer's EOS (``"\\n\\n"`` without one)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    separator = [eos] if eos is not None else token_ids(tokenizer, "\n\n")
    stream: list[int] = []
    for i, text in enumerate(texts):
        if i:
            stream.extend(separator)
        stream.extend(token_ids(tokenizer, text))
    return stream


def _file_of(origin: str) -> str:
    head, sep, tail = origin.rpartition(":")
    return head if sep and tail.isdigit() else origin


def _tokens_sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


__all__ = ["CalibrationSet", "check_sources", "load_calibration", "token_stream", "SYNTHETIC_SOURCES"]
