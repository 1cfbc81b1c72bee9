"""Training rows: the ``--data`` text cut into whole rows of ``seq_len`` tokens, in a seeded order.

The files are read by the calibration's readers (``.txt``/``.md`` one document each, ``.jsonl`` one per line from
a string field; directories and globs), tokenized without special tokens and joined by EOS into one stream
(:func:`lighttransfer.calibration.calibration_set.token_stream`). The stream is cut into non-overlapping rows of
``seq_len`` tokens, each led by the BOS the tokenizer puts before text; the tail that does not fill a row is left
out. Every row is a whole sequence (no padding), so the loss counts every token after the first.

**Synthetic retrieval rows.** ``synthetic:passkey`` among the sources adds passkey rows: a key hidden at an evenly
spread depth of the other sources' text, the question, and the answer as the row's last tokens, so the loss
teaches the model to fetch it. They use the six training wordings of :mod:`lighttransfer.calibration.passkey`
in turn; ``needle`` and ``locker`` stay out, for evaluation on wordings never trained on. By default one passkey
row is added for every four text rows (``passkey_rows`` sets the number).

Row order: each pass over the rows ("epoch") is a fresh permutation drawn from ``seed`` and the epoch number, so
step ``s`` always sees the same rows, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..calibration.calibration_set import token_stream
from ..calibration.passkey import ANSWER, TRAINING_TEMPLATES, bos_prefix, make_passkey_sample
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
        seed: seeds the row order (and the passkey rows).
        passkey_rows: how many of ``rows`` (the last ones) are synthetic passkey rows.
    """

    rows: torch.Tensor
    sources: list[str]
    files: list[str]
    text_sha256: str
    tokens_sha256: str
    total_tokens: int
    seed: int = 0
    passkey_rows: int = 0
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
                "seq_len": self.seq_len, "seed": self.seed, "passkey_rows": self.passkey_rows}


SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SOURCES = ("passkey",)


def _split(sources: Sequence[str]) -> tuple[bool, list[str]]:
    synthetic = [s for s in sources if s.startswith(SYNTHETIC_PREFIX)]
    for spec in synthetic:
        if spec[len(SYNTHETIC_PREFIX):] not in SYNTHETIC_SOURCES:
            raise LightTransferError(f"--data '{spec}' is not a known synthetic source; use synthetic:passkey.")
    files = [s for s in sources if not s.startswith(SYNTHETIC_PREFIX)]
    if not files:
        raise LightTransferError("--data: pass at least one .txt/.md/.jsonl file, directory or glob (synthetic "
                                 "rows hide their key in that text).", exit_code=2)
    return bool(synthetic), files


def check_data_sources(sources: Sequence[str], *, field: str = "text") -> None:
    """Raise the one-line error :func:`load_training_data` would raise for unreadable ``--data``, before a model
    is loaded."""
    _, files = _split(sources)
    collect_documents(files, field=field, option="--data")


def passkey_rows(tokenizer, filler: str, *, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """int64 ``[count, seq_len]``: passkey prompts of ``seq_len - len(answer)`` tokens followed by the answer
    (``ANSWER``), needles at evenly spread depths in a seeded order, the training wordings in turn."""
    rng = random.Random(seed)
    depths = [(i + 0.5) / count for i in range(count)]
    rng.shuffle(depths)
    rows = []
    for i, depth in enumerate(depths):
        template = TRAINING_TEMPLATES[i % len(TRAINING_TEMPLATES)]
        seed_i = rng.randrange(2**31)
        # the key is drawn first from the sample's seed, whatever the length: a probe tells the answer's length
        key = make_passkey_sample(tokenizer, filler, length_tokens=seq_len, depth=depth, seed=seed_i,
                                  template=template).answer
        answer = tokenizer(ANSWER.format(key=key), add_special_tokens=False)["input_ids"]
        sample = make_passkey_sample(tokenizer, filler, length_tokens=seq_len - len(answer), depth=depth,
                                     seed=seed_i, template=template)
        if sample.answer != key:  # pragma: no cover - guards the builder's contract
            raise RuntimeError("passkey builder drew another key for the same seed")
        rows.append(torch.cat([sample.input_ids, torch.tensor(answer, dtype=torch.long)]))
    return torch.stack(rows)


def load_training_data(sources: Sequence[str], tokenizer, *, seq_len: int, seed: int = 0, field: str = "text",
                       passkey_count: int | None = None) -> TrainingData:
    """Read, tokenize and cut ``--data`` into rows of ``seq_len`` tokens (see the module docstring).

    Args:
        passkey_count: synthetic passkey rows when ``synthetic:passkey`` is among the sources (default: one per
            four text rows, at least one).

    Raises:
        LightTransferError: a missing, empty, binary or non-UTF-8 file, a bad JSONL line, an unknown synthetic
            source, or fewer tokens than one row (the message says how many there are).
    """
    if seq_len < 2:
        raise LightTransferError(f"--seq-len must be at least 2 tokens, got {seq_len}.")
    synthetic, files = _split(sources)
    docs = collect_documents(files, field=field, option="--data")
    text_sha = hashlib.sha256("\n\x1e\n".join(d.text for d in docs).encode()).hexdigest()
    stream = token_stream(tokenizer, [d.text for d in docs])
    bos = bos_prefix(tokenizer)
    body = seq_len - len(bos)
    count = len(stream) // body
    if count < 1:
        raise LightTransferError(f"--data holds {len(stream):,} tokens, fewer than one row of --seq-len {seq_len}; "
                                 "add text or pass a lower --seq-len.")
    rows = torch.tensor([bos + stream[i * body : (i + 1) * body] for i in range(count)], dtype=torch.long)
    extra = 0
    if synthetic:
        extra = passkey_count if passkey_count is not None else max(1, count // 4)
        if extra:
            filler = "\n\n".join(d.text for d in docs)
            rows = torch.cat([rows, passkey_rows(tokenizer, filler, seq_len=seq_len, count=extra, seed=seed)])
    elif passkey_count:
        raise LightTransferError("--passkey-rows needs synthetic:passkey among the --data sources.")
    files_read = list(dict.fromkeys(_file_of(d.origin) for d in docs))
    tokens_sha = hashlib.sha256(rows.contiguous().numpy().tobytes()).hexdigest()
    return TrainingData(rows=rows, sources=list(sources), files=files_read, text_sha256=text_sha,
                        tokens_sha256=tokens_sha, total_tokens=len(stream), seed=seed, passkey_rows=extra)


def _file_of(origin: str) -> str:
    head, sep, tail = origin.rpartition(":")
    return head if sep and tail.isdigit() else origin


__all__ = ["TrainingData", "load_training_data", "check_data_sources", "passkey_rows", "SYNTHETIC_SOURCES"]
