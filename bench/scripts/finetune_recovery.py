"""How much of a hybrid's quality gap a fine-tune recovers: perplexity (and passkey) of the original, the hybrid
and each fine-tuned checkpoint, each run with its own weights through ``lighttransfer.load``, on held-out text.

``lighttransfer eval`` runs every row on one set of weights (the baseline's), so it cannot score a fine-tuned
checkpoint against its source; this script loads each checkpoint itself and uses the same evaluation pieces
(sliding-window perplexity scored beyond sink + window, passkey prompts built once and shared by every model).

    PYTHONPATH=<dir with a lighttransfer link> python3 bench/scripts/finetune_recovery.py \
        --original SmolLM2.gguf --hybrid hybrid/ --finetuned s2=ft_s2/ --finetuned dense=ft_dense/ \
        --text austen_novels.txt --text-lines 1:16237 --lengths 1024,2048 --windows 8 \
        --passkey-trials 5 --out recovery.json

Gap recovered = (ppl_hybrid - ppl_finetuned) / (ppl_hybrid - ppl_original), per length: 1 = back to the
original, 0 = no better than the hybrid, negative = worse. Fine-tuning on the evaluation's kind of text also
lowers the original's perplexity, so that share can pass 1 without any recovery. The control separates the two:
``--finetuned reference_<mode>_<steps>=DIR``, the original fine-tuned the same way (same data, settings and
steps), next to a hybrid row ``<mode>_<steps>``; then

    gap recovered vs control = 1 - (ppl_finetuned - ppl_control) / (ppl_hybrid - ppl_original)

the share of the conversion's gap that is gone once both models had the same training: 1 = the fine-tuned
hybrid is as good as the fine-tuned original, 0 = the gap is as large as before, and the same for the passkey
accuracy (``passkey_gap_recovered_vs_control``, points of accuracy instead of perplexity).

``--passkey-format`` takes one wording or several (``locker,needle``: the two never trained on). Each row then
holds ``retrieval[<wording>]`` for every one and ``passkey`` for the first; the control comparison is made per
wording (``retrieval_gap_recovered_vs_control``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from lighttransfer.calibration.passkey import check_templates
from lighttransfer.environment import environment
from lighttransfer.evaluation.passkey import passkey_accuracy, passkey_depths, passkey_samples
from lighttransfer.evaluation.perplexity import default_stride, perplexity, plan_windows
from lighttransfer.hybrid_format import FinetuneRecord, HybridConfig
from lighttransfer.loading import load_model, load_tokenizer, resolve_model_source
from lighttransfer.output_files import write_json


def _read_text(path: str, lines: str | None) -> str:
    text = Path(path).read_text()
    if not lines:
        return text
    a, b = (int(x) for x in lines.split(":"))
    return "\n".join(text.splitlines()[a - 1 : b])


def control_recovery(original: dict, hybrid: dict, finetuned: dict, control: dict) -> dict:
    """Per key (length): ``1 - (finetuned - control) / (hybrid - original)``, ``None`` where the conversion left no
    gap; see the module docstring (for an accuracy, pass the arguments so that both gaps are "worse minus
    better")."""
    out = {}
    for key, ppl in finetuned.items():
        gap = hybrid[key] - original[key]
        out[key] = 1.0 - (ppl - control[key]) / gap if key in control and gap else None
    return out


def add_recovery(rows: dict[str, dict]) -> None:
    """Add ``gap_recovered`` to every fine-tuned row (all but ``original`` and ``hybrid``) and, where its control
    ``reference_<name>`` is among the rows, ``control``, ``gap_recovered_vs_control`` and (with passkey on both)
    ``passkey_gap_recovered_vs_control``; see the module docstring."""
    original, hybrid = rows["original"], rows["hybrid"]
    for name, row in rows.items():
        if name in ("original", "hybrid"):
            continue
        row["gap_recovered"] = {}
        for L in row["ppl"]:
            gap = hybrid["ppl"][L] - original["ppl"][L]
            row["gap_recovered"][L] = (hybrid["ppl"][L] - row["ppl"][L]) / gap if gap else None
        control = rows.get(f"reference_{name}")
        if control is None or name.startswith("reference_"):
            continue
        row["control"] = f"reference_{name}"
        row["gap_recovered_vs_control"] = control_recovery(original["ppl"], hybrid["ppl"], row["ppl"], control["ppl"])
        # accuracy falls where perplexity rises: both gaps as "better minus worse", hence the argument order
        if all("passkey" in r for r in (row, control, original, hybrid)):
            acc = lambda r: {"all": r["passkey"]["accuracy"]}
            row["passkey_gap_recovered_vs_control"] = control_recovery(acc(hybrid), acc(original), acc(control),
                                                                       acc(row))["all"]
        wordings = set(row.get("retrieval", {}))
        for r in (control, original, hybrid):
            wordings &= set(r.get("retrieval", {}))
        if wordings:
            acc = lambda r, w: {"all": r["retrieval"][w]["accuracy"]}
            row["retrieval_gap_recovered_vs_control"] = {
                w: control_recovery(acc(hybrid, w), acc(original, w), acc(control, w), acc(row, w))["all"]
                for w in sorted(wordings)}


def _load(path: str, device: str, dtype: str):
    import lighttransfer

    config = Path(path) / "config.json"
    if config.is_file() and HybridConfig.from_model_config(json.loads(config.read_text())) is not None:
        return lighttransfer.load(path, device=device, dtype=dtype)
    return load_model(path, device=device, dtype=dtype, with_tokenizer=False).model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original", required=True)
    ap.add_argument("--hybrid", required=True)
    ap.add_argument("--finetuned", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--text", required=True)
    ap.add_argument("--text-lines", default=None)
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows per length")
    ap.add_argument("--passkey-trials", type=int, default=0, help="per depth and length; 0: no passkey")
    ap.add_argument("--passkey-depths", type=int, default=5)
    ap.add_argument("--passkey-format", default="passkey",
                    help="wording or comma-separated wordings (calibration.passkey.TEMPLATES); needle and locker "
                         "are never trained on")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    lengths = [int(x) for x in args.lengths.split(",")]
    block = HybridConfig.from_model_config(json.loads((Path(args.hybrid) / "config.json").read_text()))
    min_context = block.sink + block.window
    tokenizer = load_tokenizer(resolve_model_source(args.hybrid))
    text = _read_text(args.text, args.text_lines)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    plans = {L: plan_windows(len(ids), length=L, stride=default_stride(L, min_context), min_context=min_context,
                             max_windows=args.windows) for L in lengths}
    wordings = check_templates(args.passkey_format, option="--passkey-format")
    samples = {w: passkey_samples(tokenizer, text, lengths=lengths, depths=passkey_depths(args.passkey_depths),
                                  trials=args.passkey_trials, template=w)
               for w in wordings} if args.passkey_trials else {}

    models = [("original", args.original), ("hybrid", args.hybrid)]
    models += [tuple(spec.split("=", 1)) for spec in args.finetuned]
    rows = {}
    for name, path in models:
        start = time.perf_counter()
        model = _load(path, args.device, args.dtype)
        sequence = lambda m=model: contextlib.nullcontext((m, None))
        row = {"path": str(path), "ppl": {}, "nll": {}}
        with torch.no_grad():
            for L, windows in plans.items():
                result = perplexity(sequence, ids, windows)
                row["ppl"][str(L)], row["nll"][str(L)] = result["ppl"], result["nll"]
                row["scored_tokens"] = result["tokens"]
            for w, prompts in samples.items():
                acc = passkey_accuracy(sequence, prompts)
                row.setdefault("retrieval", {})[w] = {"accuracy": acc["accuracy"], "n": acc["n"],
                                                      "ci95": acc["ci95"], "by_length": acc["by_length"]}
            if samples:
                row["passkey"] = row["retrieval"][wordings[0]]
        record = FinetuneRecord.from_model_config(model.config)
        if record is not None:
            row["finetune"] = {"steps": record.steps, "tokens": record.tokens, "first_loss": record.first_loss,
                               "final_loss": record.final_loss, "settings": record.settings}
        row["seconds"] = time.perf_counter() - start
        rows[name] = row
        print(name, {L: round(p, 3) for L, p in row["ppl"].items()},
              {w: r["accuracy"] for w, r in row.get("retrieval", {}).items()}, flush=True)
        del model

    add_recovery(rows)
    for name, row in rows.items():
        if "gap_recovered" in row:
            print(name, "gap recovered", row["gap_recovered"], "vs control",
                  row.get("gap_recovered_vs_control", "-"), row.get("retrieval_gap_recovered_vs_control", "-"),
                  flush=True)

    write_json(args.out, {"schema_version": 1, "rows": rows, "lengths": lengths, "windows": args.windows,
                          "passkey": {"format": ",".join(wordings), "trials": args.passkey_trials,
                                      "depths": args.passkey_depths},
                          "text": {"path": args.text, "lines": args.text_lines, "tokens": len(ids)},
                          "layout": {"streaming_layers": block.streaming_layers, "sink": block.sink,
                                     "window": block.window},
                          "environment": environment(args.device if args.device != "auto" else None)})


if __name__ == "__main__":
    main()
