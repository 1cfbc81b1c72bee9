"""``evaluate``: perplexity, passkey retrieval and the RULER-style tasks for every row (original, this conversion,
baselines), every row on the same samples.

All rows stream the same number of layers with the same sink and window, so they differ only in *which* layers
stream or in the prefill policy; each row's KV budget is reported at every length.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ..architecture import model_shape
from ..calibration.passkey import check_templates
from ..environment import environment
from ..errors import LightTransferError
from ..output_files import check_output_target, publish_together, write_json
from .identity import check_same_model
from .passkey import passkey_accuracy, passkey_depths, passkey_samples
from .perplexity import default_stride, perplexity, plan_windows
from .rows import DEFAULT_ROWS, GATED_ROUTING_ROWS, HEAD_LEVEL_ROWS, UNRANKED_ROWS, EvalRow, standard_rows

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


class Progress(Protocol):
    """What :func:`evaluate` reports while it runs (the CLI draws a bar from it)."""

    def start(self, total: int) -> None: ...

    def step(self, description: str) -> None: ...


@dataclass
class EvalResult:
    """Everything one evaluation measured; saved as JSON with sorted keys.

    ``rows[i]`` holds the row's definition plus ``kv_fraction {length: fraction}``,
    ``perplexity {length: {ppl, nll, tokens, windows}}``, ``passkey {accuracy, n, by_length, grid}`` (the first
    wording of :attr:`passkey_formats`), ``passkey_by_format {wording: {...}}`` (every wording, the same keys,
    depths and filler offsets in each) and, with ``ruler`` in :attr:`suite`, ``ruler {samples, outcomes, by_task,
    by_task_length, average}`` (scores in percent, :func:`lighttransfer.evaluation.ruler.run_samples`).
    """

    model_id: str
    fingerprint: str
    ratio: float
    sink: int
    window: int
    lengths: list[int]
    strides: dict[str, int]
    passkey_lengths: list[int]
    passkey_depths: list[float]
    passkey_trials: int
    text: str
    backend: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    hybrid: str | None = None
    passkey_format: str = "passkey"
    passkey_formats: list[str] = field(default_factory=list)
    suite: list[str] = field(default_factory=lambda: ["perplexity", "passkey"])
    ruler_lengths: list[int] = field(default_factory=list)
    ruler_tasks: list[str] = field(default_factory=list)
    ruler_samples: int = 0
    ruler_batch: int = 1
    schema_version: int = SCHEMA_VERSION

    def row(self, name: str) -> dict[str, Any]:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise LightTransferError(
                f"evaluation result schema_version {d.get('schema_version')} is not {SCHEMA_VERSION}; rerun eval."
            )
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EvalResult:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise LightTransferError(f"cannot read evaluation result '{path}': {exc}") from exc


def read_text(path: str | os.PathLike[str], *, lines: tuple[int, int] | None = None) -> str:
    """The evaluation text, optionally only lines ``a..b`` (1-based, inclusive)."""
    p = Path(path)
    if not p.is_file():
        raise LightTransferError(f"--text '{path}' does not exist; pass a plain-text file of long prose.")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise LightTransferError(f"cannot read --text '{path}': {exc}") from exc
    if lines is not None:
        a, b = lines
        text = "\n".join(text.splitlines()[a - 1 : b])
    if not text.strip():
        raise LightTransferError(f"--text '{path}' is empty{' in the lines asked for' if lines else ''}.")
    return text


def lazy_ratios_from(report, hybrid_config) -> list[float] | None:
    """Per-layer lazy ratios from an analysis report (its path, or the report already loaded), else from a
    checkpoint's report summary."""
    if isinstance(report, (str, os.PathLike)):
        from ..analysis import AnalysisReport

        report = AnalysisReport.load(report)
    if report is not None:
        return [float(x) for x in report.layer_lazy_ratios()]
    if hybrid_config is not None:
        summary = hybrid_config.report_summary or {}
        for key in ("layer_lazy_ratios", "lazy_ratios"):
            if key in summary:
                return [float(x) for x in summary[key]]
    return None


def evaluate(
    *,
    baseline: str,
    text: str | os.PathLike[str],
    lengths: Sequence[int],
    hybrid: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    rows: Sequence[str] | Sequence[EvalRow] = DEFAULT_ROWS,
    ratio: float | None = None,
    sink: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    max_windows: int = 2,
    passkey_depths_count: int = 10,
    passkey_lengths: Sequence[int] = (),
    passkey_trials: int = 2,
    passkey_format: str | Sequence[str] = "passkey",
    text_lines: tuple[int, int] | None = None,
    backend: str = "masked",
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    on_row: Callable[[EvalResult], None] | None = None,
    suite: str | Sequence[str] = ("perplexity", "passkey"),
    ruler_tasks: str | Sequence[str] | None = None,
    ruler_samples: int = 25,
    ruler_lengths: Sequence[int] | None = None,
    ruler_batch: int = 1,
    select_k: int | None = None,
    select_init: int | None = None,
    select_local: int | None = None,
    select_reuse: float | None = None,
    select_reuse_max_age: int | None = None,
    select_reuse_against: str | None = None,
    select_page: int | None = None,
    sparse_prefill=None,
    head_routing=None,
    routing_share: float = 0.5,
    routing_tau: float | None = None,
    routing_calibration: int = 12,
    routing_calibrate_on: str = "prompts",
    routing_page: int | None = None,
) -> EvalResult:
    """Perplexity and passkey accuracy of every row, with each row's KV budget.

    Args:
        baseline: the original model (directory, GGUF or hub id); its weights serve every row.
        text: long real text (not the calibration text) for perplexity and as passkey haystack.
        lengths: context lengths (tokens) for perplexity.
        hybrid: a converted checkpoint; its layers, sink, window and ratio define the ``lighttransfer`` row.
        report: an analysis report (lazy ratios for the least-lazy row and for choosing layers without a hybrid;
            attention-mass KV-head scores for ``head-level``, gates for ``head-level-gates``).
        rows: row names (see :data:`~lighttransfer.evaluation.rows.ROW_KINDS`) or ready :class:`EvalRow` objects.
        ratio, sink, window: override the hybrid's (defaults without a hybrid: 0.5, 4, 1020).
        stride: scored tokens per perplexity window (default: a quarter of the length).
        max_windows: perplexity windows per length.
        passkey_depths_count, passkey_lengths, passkey_trials: the passkey grid (no lengths: no passkey).
        passkey_format: the retrieval prompt's wording, or several (``calibration.passkey.TEMPLATES``; a comma-
            separated string or a sequence): every wording gets the same keys, depths and filler offsets, the first
            fills ``passkey`` and the plots. ``needle`` and ``locker`` are held out of gate training.
        text_lines: use only these lines of ``text`` (1-based, inclusive).
        backend: ``masked`` (one dense model, masked; exact) or ``runtime`` (the bounded-cache runtime).
        out: write ``<out>.json``, ``.md`` and plots (``out`` ending in ``.json``) or into directory ``out``.
        progress: receives ``start(total)`` and ``step(description)``.
        on_row: called with the result so far after each row (e.g. to keep a copy of a long run).
        suite: what to measure, of ``perplexity``, ``passkey`` and ``ruler`` (a comma-separated string or a
            sequence); ``ruler`` runs the RULER-style tasks (:mod:`lighttransfer.evaluation.ruler`), generated
            from ``text`` and fitted to the tokenizer, ``ruler_samples`` per task and length.
        ruler_tasks: the RULER tasks (default: all of them).
        ruler_samples: samples per (task, length).
        ruler_lengths: prompt lengths of the RULER tasks (default: ``lengths``).
        ruler_batch: RULER samples generated together (left-padded, one task and length per batch); more than 1
            needs ``backend="runtime"`` (the masked reference runs unpadded sequences); online rows run one by one.
        select_k, select_init, select_local, select_reuse, select_reuse_max_age, select_reuse_against: TokenSelect's
            settings for the ``tokenselect`` rows (default: the hybrid's when it decodes with TokenSelect, else 2048,
            128, 512, 0.9, 64, ``anchor``). Each such row
            reports its Selection Cache counts (``selection_cache``: lookups, hits, dense, hit_rate).
        select_page: keys per page of the Quest-like rows (``quest``, ``lighttransfer+quest``; default 16, at most
            ``select_k``).
        sparse_prefill: :class:`~lighttransfer.hybrid_format.SparsePrefillConfig` of the ``sparse-prefill`` and
            ``lighttransfer+sparse-prefill`` rows (default: its defaults); those rows also report the realised
            density (``sparse_prefill_density``: mean and per layer over their prefill forwards).
        head_routing: :class:`~lighttransfer.hybrid_format.HeadRoutingConfig` of the ``qada`` rows (``stats``,
            ``cov``, ``sink``, ``window``; its ``tau`` is not used). Routing rows report the realised local share
            (``head_routing_realised``) and their calibration.
        routing_share: the local share the routing rows are compared at: ``qada`` and ``qada-oracle`` calibrate
            their thresholds per layer for it (see ``routing_calibrate_on``).
        routing_tau: a fixed threshold for ``qada`` and ``qada-oracle`` instead (no calibration).
        routing_calibration: calibration samples per evaluated kind (text stretches, passkey prompts, prompts of
            each RULER task).
        routing_calibrate_on: ``prompts`` (default): held-out samples of every evaluated kind (stretches of the
            text for perplexity, passkey and RULER prompts drawn with another seed than the evaluated ones, each
            with its reference answer as the continuation), so the realised share on the evaluation is close to
            ``routing_share`` (far shares differ by kind: retrieval prompts route far more decisions local than
            running text at the same threshold); ``text``: stretches of the text only, each as long as the
            longest context.
        routing_page: keys per page of the ``qada-pages`` row's needle guard (default 64).
    """
    import torch

    from ..hybrid_format import HybridConfig
    from ..loading import load_config, load_model, resolve_model_source
    from .backends import MaskedBackend, RuntimeBackend

    suite = check_suite(suite)
    check_output_target(out, "--out")  # before the work: a read-only or mistyped path costs nothing
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
        raise LightTransferError(f"--stride must be a whole number of at least 1 token, got {stride!r}; "
                                 "leave it out for a quarter of each length.")
    lengths = _check_lengths(lengths, "--lengths")
    ruler_lengths = _check_lengths(ruler_lengths if ruler_lengths is not None else lengths, "--lengths")
    task_names: list[str] = []
    if "ruler" in suite:
        from .ruler import DEFAULT_TASKS, check_tasks

        task_names = check_tasks(ruler_tasks if ruler_tasks is not None else DEFAULT_TASKS)
        if isinstance(ruler_samples, bool) or not isinstance(ruler_samples, int) or ruler_samples < 1:
            raise LightTransferError(f"--samples must be a whole number of at least 1, got {ruler_samples!r}.")
        if isinstance(ruler_batch, bool) or not isinstance(ruler_batch, int) or ruler_batch < 1:
            raise LightTransferError(f"--ruler-batch must be a whole number of at least 1, got {ruler_batch!r}.")
        if ruler_batch > 1 and backend != "runtime":
            raise LightTransferError("--ruler-batch above 1 needs --backend runtime: the masked reference runs "
                                     "unpadded sequences one at a time.")
    if "perplexity" not in suite:
        lengths = []
    if "ruler" not in suite:
        ruler_lengths = []
    if "passkey" not in suite:
        passkey_lengths = ()
    formats = check_templates(passkey_format, option="--passkey-format")
    passkey_lengths = _check_lengths(passkey_lengths, "--passkey-lengths", allow_empty=True)
    if backend not in ("masked", "runtime"):
        raise LightTransferError(f"--backend must be 'masked' or 'runtime', got {backend!r}.")
    body = read_text(text, lines=text_lines)

    hcfg = None
    if hybrid is not None:
        hsource = resolve_model_source(hybrid)
        hcfg = HybridConfig.from_model_config(load_config(hsource).to_dict())
        if hcfg is None:
            raise LightTransferError(f"'{hybrid}' has no lighttransfer block in its config.json; convert it first.")
    sink = sink if sink is not None else (hcfg.sink if hcfg else 4)
    window = window if window is not None else (hcfg.window if hcfg else 1020)
    from ..hybrid_format import token_select_config

    selection = token_select_config("tokenselect", select_k=select_k, select_init=select_init,
                                    select_local=select_local, select_reuse=select_reuse,
                                    select_reuse_max_age=select_reuse_max_age,
                                    select_reuse_against=select_reuse_against,
                                    base=hcfg.selection if hcfg else None, option="--rows")
    if select_page is not None:  # the Quest-like rows' page size (the TokenSelect rows score tokens)
        if not isinstance(select_page, int) or not 1 <= select_page <= selection.k:
            raise LightTransferError(f"--select-page must be in [1, --select-k = {selection.k}], got {select_page}.")
        selection = replace(selection, page=select_page)

    report_data = None
    if report is not None:  # read once: the identity check and the rows both need it
        from ..analysis import AnalysisReport

        report_data = AnalysisReport.load(report)
    loaded = load_model(baseline, device=device, dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise LightTransferError(f"baseline '{baseline}' has no tokenizer; pass a model that ships one.")
    check_same_model(loaded.fingerprint, baseline=baseline, hcfg=hcfg, hybrid=hybrid, report=report_data,
                     report_name=None if report is None else str(report))
    config = model.config
    shape = model_shape(config, source=f"baseline '{baseline}'")
    num_layers, num_kv_heads, max_pos = shape.num_layers, shape.num_kv_heads, shape.max_positions
    if hcfg is not None and hcfg.num_layers != num_layers:
        raise LightTransferError(
            f"hybrid '{hybrid}' has {hcfg.num_layers} layers but baseline '{baseline}' has {num_layers}; "
            "pass the model the hybrid was converted from."
        )
    too_long = [L for L in [*lengths, *passkey_lengths, *ruler_lengths] if max_pos and L > max_pos]
    if too_long:
        raise LightTransferError(f"lengths {too_long} exceed the model's {max_pos} positions; use shorter lengths.")

    native = shape.native_windows
    if native:
        log.info("layers %s slide the model's own window: no row streams them, and --ratio is a share of the "
                 "others (as in convert)", ",".join(map(str, native)))
    eval_rows = _build_rows(rows, hcfg=hcfg, report=report, report_data=report_data, ratio=ratio, sink=sink, window=window,
                            num_layers=num_layers, num_kv_heads=num_kv_heads, seed=seed, native_windows=native,
                            token_select=selection,
                            sparse_prefill=sparse_prefill, head_routing=head_routing, routing_share=routing_share,
                            routing_tau=routing_tau, routing_page=routing_page)
    if ratio is None:
        named = [r for r in eval_rows if r.name == "lighttransfer"]
        # without a report or hybrid nothing defines a conversion (only rows that rank no layer could be built)
        ratio = named[0].num_streaming_layers / num_layers if named else 0.5 if report_data or hcfg else 0.0

    token_ids = torch.tensor(tokenizer(body, add_special_tokens=False)["input_ids"], dtype=torch.long)
    # scored tokens must lie where every row can differ from the original: past sink + window, and past the
    # TokenSelect budget (below it the selection is every key)
    min_context = max([max(r.sink + r.window if r.layout.streaming_kv_heads or r.online_ratio is not None
                           or r.head_routing is not None else 0,
                           r.selection.budget if r.selection is not None else 0)
                       for r in eval_rows if not r.is_dense] or [0])
    strides = {L: stride or default_stride(L, min_context) for L in lengths}
    windows = {L: plan_windows(len(token_ids), length=L, stride=strides[L], min_context=min_context,
                               max_windows=max_windows) for L in lengths}
    depths = passkey_depths(passkey_depths_count)
    samples = {fmt: passkey_samples(tokenizer, body, lengths=passkey_lengths, depths=depths, trials=passkey_trials,
                                    seed=seed, template=fmt) for fmt in formats} if passkey_lengths else {}

    ruler_set = []
    if ruler_lengths:
        from .ruler import build_samples

        ruler_set = build_samples(tokenizer, lengths=ruler_lengths, samples_per_task=ruler_samples, tasks=task_names,
                                  essay_text=body, seed=seed)
    runner = MaskedBackend(model) if backend == "masked" else RuntimeBackend(model)
    total = len(eval_rows) * (sum(len(w) for w in windows.values()) + sum(map(len, samples.values()))
                              + len(ruler_set))
    if progress is not None:
        progress.start(total)

    result = EvalResult(
        model_id=loaded.model_id, fingerprint=loaded.fingerprint, ratio=float(ratio), sink=sink, window=window,
        lengths=list(lengths), strides={str(k): v for k, v in strides.items()}, passkey_lengths=list(passkey_lengths),
        passkey_depths=depths, passkey_trials=passkey_trials, text=f"{Path(text).name}"
        + (f" lines {text_lines[0]}-{text_lines[1]}" if text_lines else ""), backend=backend,
        environment=environment(next(model.parameters()).device), hybrid=str(hybrid) if hybrid else None,
        passkey_format=formats[0], passkey_formats=list(formats), suite=list(suite),
        ruler_lengths=list(ruler_lengths), ruler_tasks=task_names, ruler_samples=ruler_samples if ruler_set else 0,
        ruler_batch=ruler_batch if ruler_set else 1,
    )
    calibration_set = None
    if any(row.routing_target is not None for row in eval_rows):
        calibration_set = routing_calibration_samples(
            token_ids, tokenizer, body, on=routing_calibrate_on, count=routing_calibration, lengths=lengths,
            passkey_lengths=passkey_lengths, depths=depths, formats=formats, ruler_lengths=ruler_lengths,
            ruler_tasks=task_names, seed=seed)
    for row in eval_rows:
        t0 = time.perf_counter()
        calibration = None
        if row.routing_target is not None:
            row, calibration = _calibrate_routing(model, row, calibration_set)
        entry = row.to_dict()
        if calibration is not None:
            entry["routing_calibration"] = calibration
        entry["kv_fraction"] = {str(L): row.kv_fraction(L)
                                for L in sorted({*lengths, *passkey_lengths, *ruler_lengths})}

        def sequence(row=row):
            return runner.sequence(row)

        by_part = _RoutedByPart(runner if row.head_routing is not None else None)
        entry["perplexity"] = {}
        for L in lengths:
            step = (lambda L=L, row=row: progress.step(f"{row.name}: perplexity @ {L}")) if progress else None
            entry["perplexity"][str(L)] = perplexity(sequence, token_ids, windows[L], on_window=step)
        by_part.close("perplexity")
        if samples:
            entry["passkey_by_format"] = {}
            for fmt, fmt_samples in samples.items():
                step = (lambda row=row, fmt=fmt: progress.step(f"{row.name}: {fmt}")) if progress else None
                entry["passkey_by_format"][fmt] = passkey_accuracy(sequence, fmt_samples, on_sample=step)
            entry["passkey"] = entry["passkey_by_format"][formats[0]]
        by_part.close("passkey")
        if ruler_set:
            from .ruler import run_samples

            step = (lambda row=row: progress.step(f"{row.name}: ruler")) if progress else None
            batch = 1 if row.online_ratio is not None else ruler_batch  # online rows choose layers per prompt
            entry["ruler"] = run_samples(sequence, ruler_set, tokenizer=tokenizer, on_sample=step, batch_size=batch)
        by_part.close("ruler")
        if by_part.shares:
            entry["head_routing_realised_by_part"] = by_part.shares
        if row.selection is not None:
            entry["selection_cache"] = runner.selection_stats()
        if row.head_routing is not None:
            entry["head_routing_realised"] = runner.routing_stats()
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        if row.sparse_prefill is not None:
            from ..runtime import sparse_prefill_stats

            stats = sparse_prefill_stats(model)
            entry["sparse_prefill_density"] = {
                "mean": stats.mean_density(), "by_layer": {str(k): v for k, v in stats.density_by_layer().items()},
                "sparse_forwards": sum(r.sparse for r in stats.records),
                "dense_forwards": sum(not r.sparse for r in stats.records)}
        runner.release(row)
        log.info("row %s done in %.0f s", row.name, entry["seconds"])
        result.rows.append(entry)
        if on_row is not None:
            on_row(result)

    if out is not None:
        write_outputs(result, out)
    return result


# tokens decided at the end of a calibration stretch of plain text (the calibration's default)
TEXT_DECIDED = 32


class _RoutedByPart:
    """A routing row's realised local share per part of the suite, from the runner's running counts: the passkey
    part teacher-forces the same answer tokens in every row, so its share compares rows at equal decisions, where
    the RULER part's counts depend on what each row generates (a row that rambles adds many local decisions)."""

    def __init__(self, runner) -> None:
        self.runner, self.seen, self.shares = runner, (0.0, 0), {}

    def _counts(self) -> tuple[float, int]:
        stats = self.runner.routing_stats() if self.runner is not None else {}
        decisions = int(stats.get("decisions", 0))
        return float(stats.get("local_share") or 0.0) * decisions, decisions  # None before any decision

    def close(self, part: str) -> None:
        if self.runner is None:
            return
        local, decisions = self._counts()
        new_local, new_decisions = local - self.seen[0], decisions - self.seen[1]
        if new_decisions > 0:
            self.shares[part] = {"local_share": round(new_local / new_decisions, 6), "decisions": new_decisions}
        self.seen = (local, decisions)


def routing_calibration_samples(token_ids, tokenizer, body: str, *, on: str, count: int, lengths: Sequence[int],
                                passkey_lengths: Sequence[int], depths: Sequence[float], formats: Sequence[str],
                                ruler_lengths: Sequence[int], ruler_tasks: Sequence[str],
                                seed: int) -> tuple[list, list[int], dict]:
    """The samples (1-D token ids) the routing thresholds are calibrated on, the tokens decided at the end of each
    (``last``), and how they were drawn (JSON-ready).

    ``on="text"``: ``count`` consecutive stretches of the text, each as long as the longest evaluated context (its
    first tokens: the same for every row). ``on="prompts"``: ``count`` samples of each evaluated kind, held out of
    the evaluation (another seed): text stretches at the perplexity lengths (taken from the end of the text, away
    from most perplexity windows; their last 32 tokens decided), passkey prompts of the first wording, and prompts
    of every RULER task, each prompt followed by its reference answer, whose tokens are the ones decided (as the
    passkey part teacher-forces them). Lengths are cycled over the samples of a kind.
    """
    import torch

    if on not in ("prompts", "text"):
        raise LightTransferError(f"--routing-calibrate-on must be 'prompts' or 'text', got {on!r}.")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise LightTransferError(f"routing calibration needs at least 1 sample per kind, got {count!r}.")
    all_lengths = [*lengths, *passkey_lengths, *ruler_lengths]
    if on == "text" or not all_lengths:
        length = max(all_lengths) if all_lengths else 2048
        if len(token_ids) < count * length:
            raise _too_little_text(count, length, len(token_ids))
        stretches = [token_ids[i * length:(i + 1) * length] for i in range(count)]
        return stretches, [TEXT_DECIDED] * count, {"on": "text", "samples": count, "tokens": length}
    held_out = seed + 7919  # any seed but the evaluation's: other keys, depths' offsets and haystacks
    picked, lasts, kinds = [], [], {}
    if lengths:
        for i in range(count):
            L = lengths[i % len(lengths)]
            end = len(token_ids) - i * L
            if end - L < 0:
                raise _too_little_text(count, L, len(token_ids))
            picked.append(token_ids[end - L:end])
            lasts.append(TEXT_DECIDED)
        kinds["text"] = count
    if passkey_lengths:
        rng = random.Random(held_out)
        for i in range(count):
            sample = passkey_samples(tokenizer, body, lengths=[passkey_lengths[i % len(passkey_lengths)]],
                                     depths=[rng.choice(list(depths))], trials=1, seed=rng.randrange(2**31),
                                     template=formats[0])[0]
            picked.append(torch.cat([sample.prompt_ids.view(-1), sample.answer_ids.view(-1)]))
            lasts.append(int(sample.answer_ids.numel()))
        kinds["passkey"] = count
    if ruler_lengths and ruler_tasks:
        from .ruler import build_samples

        for task in ruler_tasks:
            for i in range(count):
                sample = build_samples(tokenizer, lengths=[ruler_lengths[i % len(ruler_lengths)]],
                                       samples_per_task=1, tasks=[task], essay_text=body, seed=held_out + i)[0]
                answer = tokenizer(" " + ", ".join(sample.answers), add_special_tokens=False)["input_ids"]
                picked.append(torch.tensor([*sample.input_ids, *answer], dtype=torch.long))
                lasts.append(len(answer))
            kinds[task] = count
    return picked, lasts, {"on": "prompts", "samples": len(picked), "kinds": kinds,
                           "tokens": max(int(ids.numel()) for ids in picked)}


def _too_little_text(count: int, length: int, have: int) -> LightTransferError:
    return LightTransferError(f"routing calibration needs {count} x {length} tokens of text, the text has {have}; "
                              "pass a longer --text or fewer calibration samples (--routing-calibration).")


def _calibrate_routing(model, row: EvalRow, calibration: tuple[list, list[int], dict]) -> tuple[EvalRow, dict]:
    """The row with ``tau`` calibrated (per layer) for its ``routing_target`` on ``calibration``'s samples (see
    :func:`routing_calibration_samples`)."""
    import dataclasses

    from ..runtime import calibrate_head_routing, disable_hybrid, enable_hybrid

    samples, lasts, drawn = calibration
    cfg = row.head_routing
    disable_hybrid(model)
    enable_hybrid(model, row.layout)
    try:
        tuned = calibrate_head_routing(model, samples, share=row.routing_target, mode=cfg.mode, stats=cfg.stats,
                                       cov=cfg.cov, sink=cfg.sink, window=cfg.window, guard=cfg.guard,
                                       page=cfg.page, full_masks=cfg.full_masks, last=lasts)
    finally:
        disable_hybrid(model)
    info = {"share": row.routing_target, **drawn, "tau": tuned.tau,
            "layer_tau": {str(k): v for k, v in sorted(tuned.layer_tau.items())}}
    return dataclasses.replace(row, head_routing=tuned, routing_target=None), info


SUITE_PARTS = ("perplexity", "passkey", "ruler")


def check_suite(suite: str | Sequence[str]) -> list[str]:
    """``"perplexity,ruler"`` (or a sequence) as a list in :data:`SUITE_PARTS` order; one-line error otherwise."""
    names = [s.strip() for s in suite.split(",")] if isinstance(suite, str) else [str(s).strip() for s in suite]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in SUITE_PARTS]
    if unknown or not names:
        raise LightTransferError(f"--suite {','.join(names) or repr('')}: choose one or more of "
                                 f"{', '.join(SUITE_PARTS)}, comma-separated.")
    return [n for n in SUITE_PARTS if n in names]


def _check_lengths(values: Sequence[int], option: str, *, allow_empty: bool = False) -> list[int]:
    values = [int(v) for v in values]
    if not values and not allow_empty:
        raise LightTransferError(f"{option} needs at least one length.")
    bad = [v for v in values if v < 2]
    if bad:
        raise LightTransferError(f"{option}: lengths must be at least 2 tokens, got {bad}.")
    return sorted(set(values))


def _build_rows(rows, *, hcfg, report, report_data, ratio, sink, window, num_layers, num_kv_heads, seed,
                native_windows=None, token_select=None,
                sparse_prefill=None, head_routing=None, routing_share: float = 0.5,
                routing_tau: float | None = None, routing_page: int | None = None) -> list[EvalRow]:
    """``report``: the report's path (for messages); ``report_data``: the report, loaded once by the caller."""
    if rows and all(isinstance(r, EvalRow) for r in rows):
        return list(rows)
    names = list(rows)
    loaded = report_data
    lazy = lazy_ratios_from(loaded, hcfg)
    attention, ranked_by = lazy, "lazy ratio"
    # rank like convert does: by the gates when the report has them from analyze --method optimize
    if loaded is not None and loaded.head_score_method == "optimize":
        lazy, ranked_by = [float(x) for x in loaded.layer_streaming_scores()], "optimized gates"
    selection = None
    if hcfg is not None and ratio is None:
        selection = hcfg.streaming_layers
        ratio = len(selection) / num_layers
    if lazy is None and selection is None and set(names) <= set(UNRANKED_ROWS):
        # TokenSelect, sparse prefill or routing alone on a plain model: no row picks layers by a ranking
        lazy = [0.0] * num_layers
    ratio = 0.5 if ratio is None else ratio
    if lazy is None:
        if selection is None or {"least-lazy"} & set(names):
            raise LightTransferError(
                "the rows need per-layer lazy ratios; pass --report REPORT.json (from 'lighttransfer analyze') "
                "or a hybrid converted with a report."
            )
        lazy = [1.0 if i in selection else 0.0 for i in range(num_layers)]
    if len(lazy) != num_layers:
        raise LightTransferError(
            f"the report has lazy ratios for {len(lazy)} layers but the model has {num_layers}; "
            "pass the report of this model."
        )
    kv_scores = kv_gates = kv_default = None
    if set(HEAD_LEVEL_ROWS + GATED_ROUTING_ROWS) & set(names) and loaded is not None:
        # head-level always ranks by attention mass, head-level-gates by the gates: one run compares the two
        kv_scores = loaded.kv_head_long_context_scores("attention")
        kv_default = loaded.kv_head_long_context_scores()
        if {"head-level-gates", *GATED_ROUTING_ROWS} & set(names):
            if loaded.kv_head_gates is None:
                raise LightTransferError(
                    f"the {' and '.join(sorted({'head-level-gates', *GATED_ROUTING_ROWS} & set(names)))} row needs "
                    f"KV-head gates, and report '{report}' has none; "
                    "rerun 'lighttransfer analyze --method optimize' or drop the row."
                )
            kv_gates = loaded.kv_head_long_context_scores("optimize")
    return standard_rows(lazy_ratios=lazy, ratio=ratio, num_kv_heads=num_kv_heads, sink=sink, window=window,
                         names=names, lazy_selection=selection, kv_head_scores=kv_scores, kv_head_gates=kv_gates,
                         kv_head_default=kv_default, attention_lazy_ratios=attention, ranked_by=ranked_by, seed=seed,
                         native_windows=native_windows, selection=token_select,
                         sparse_prefill=sparse_prefill, head_routing=head_routing, routing_share=routing_share,
                         routing_tau=routing_tau, routing_page=routing_page)


def output_paths(out: str | os.PathLike[str]) -> dict[str, Path]:
    """Where the JSON, markdown and plots go for ``--out`` (a ``.json`` file or a directory)."""
    out = Path(out)
    if out.suffix == ".json":
        stem, parent = out.stem, out.parent
    else:
        stem, parent = "eval", out
    return {
        "json": parent / f"{stem}.json",
        "md": parent / f"{stem}.md",
        "passkey_png": parent / f"{stem}_passkey.png",
        "ppl_png": parent / f"{stem}_perplexity.png",
        "ruler_png": parent / f"{stem}_ruler.png",
    }


def write_outputs(result: EvalResult, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write JSON, markdown and plots; all files appear together or not at all."""
    from .eval_report import markdown_report, plot_passkey, plot_perplexity, plot_ruler

    paths = output_paths(out)
    publish_together({
        paths["json"]: lambda p: write_json(p, result.to_dict()),
        paths["md"]: lambda p: p.write_text(markdown_report(result)),
        paths["passkey_png"]: lambda p: bool(result.passkey_lengths) and plot_passkey(result, p),
        paths["ppl_png"]: lambda p: bool(result.lengths) and plot_perplexity(result, p),
        paths["ruler_png"]: lambda p: bool(result.ruler_lengths) and plot_ruler(result, p),
    })
    return {k: v for k, v in paths.items() if v.exists()}


__all__ = ["evaluate", "check_suite", "SUITE_PARTS", "EvalResult", "Progress", "read_text", "write_outputs", "output_paths", "SCHEMA_VERSION"]
