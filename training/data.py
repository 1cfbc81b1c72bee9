"""Training rows: the ``--data`` text cut into whole rows of ``seq_len`` tokens, in a seeded order.

The files are read by the calibration's readers (``.txt``/``.md`` one document each, ``.jsonl`` one per line from
a string field; directories and globs), tokenized without special tokens and joined by EOS into one stream
(:func:`lighttransfer.calibration.calibration_set.token_stream`). The stream is cut into non-overlapping rows of
``seq_len`` tokens, each led by the BOS the tokenizer puts before text; the tail that does not fill a row is left
out. Every row is a whole sequence (no padding), so the loss counts every token after the first.

Row order: each pass over the rows ("epoch") is a fresh permutation drawn from ``seed`` and the epoch number, so
step ``s`` always sees the same rows, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..calibration.calibration_set import token_stream
from ..calibration.passkey import bos_prefix
from ..calibration.sources import collect_documents
from ..errors import LightTransferError


@dataclass
class TrainingData:
    """The rows fine-tuning draws from and where they came from.

    Attributes:
        rows: int64 ``[num_rows, seq_len]`` token ids.
        sources: the ``--data`` entries as given.
        files: the files read, in order.
        text_sha256: sha256 of the text read (documents joined by ``"\\n\\x1e\\n"``, as the calibration hashes).
        tokens_sha256: sha256 of ``rows`` (int64, row-major): the exact training tokens.
        total_tokens: tokens in the joined stream (the unused tail included).
        seed: seeds the row order.
    """

    rows: torch.Tensor
    sources: list[str]
    files: list[str]
    text_sha256: str
    tokens_sha256: str
    total_tokens: int
    seed: int = 0
    _order: dict = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.rows.shape[1])

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The int64 ``[batch_size, seq_len]`` rows of ``step`` (0-based): row ``step * batch_size + i`` of the
        epoch-wise permuted sequence of rows."""
        picks = [self._row_at(step * batch_size + i) for i in range(batch_size)]
        return self.rows[picks]

    def _row_at(self, index: int) -> int:
        epoch, within = divmod(index, self.num_rows)
        order = self._order.get(epoch)
        if order is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_rows, generator=gen).tolist()
            self._order = {epoch: order}
        return order[within]

    def to_dict(self) -> dict:
        """What the fine-tune record keeps of the data (no token ids)."""
        return {"sources": list(self.sources), "files": list(self.files), "text_sha256": self.text_sha256,
                "tokens_sha256": self.tokens_sha256, "total_tokens": self.total_tokens, "rows": self.num_rows,
                "seq_len": self.seq_len, "seed": self.seed}


def check_data_sources(sources: Sequence[str], *, field: str = "text") -> None:
    """Raise the one-line error :func:`load_training_data` would raise for unreadable ``--data``, before a model
    is loaded."""
    if not sources:
        raise LightTransferError("--data: pass at least one .txt/.md/.jsonl file, directory or glob.", exit_code=2)
    collect_documents(list(sources), field=field, option="--data")


def load_training_data(sources: Sequence[str], tokenizer, *, seq_len: int, seed: int = 0,
                       field: str = "text") -> TrainingData:
    """Read, tokenize and cut ``--data`` into rows of ``seq_len`` tokens (see the module docstring).

    Raises:
        LightTransferError: a missing, empty, binary or non-UTF-8 file, a bad JSONL line, or fewer tokens than
            one row (the message says how many there are).
    """
    if seq_len < 2:
        raise LightTransferError(f"--seq-len must be at least 2 tokens, got {seq_len}.")
    check_data_sources(sources, field=field)
    docs = collect_documents(list(sources), field=field, option="--data")
    text_sha = hashlib.sha256("\n\x1e\n".join(d.text for d in docs).encode()).hexdigest()
    stream = token_stream(tokenizer, [d.text for d in docs])
    bos = bos_prefix(tokenizer)
    body = seq_len - len(bos)
    count = len(stream) // body
    if count < 1:
        raise LightTransferError(f"--data holds {len(stream):,} tokens, fewer than one row of --seq-len {seq_len}; "
                                 "add text or pass a lower --seq-len.")
    rows = torch.tensor([bos + stream[i * body : (i + 1) * body] for i in range(count)], dtype=torch.long)
    files = list(dict.fromkeys(_file_of(d.origin) for d in docs))
    tokens_sha = hashlib.sha256(rows.contiguous().numpy().tobytes()).hexdigest()
    return TrainingData(rows=rows, sources=list(sources), files=files, text_sha256=text_sha,
                        tokens_sha256=tokens_sha, total_tokens=len(stream), seed=seed)


def _file_of(origin: str) -> str:
    head, sep, tail = origin.rpartition(":")
    return head if sep and tail.isdigit() else origin


__all__ = ["TrainingData", "load_training_data", "check_data_sources"]
