"""Gate optimization vs attention-mass scores on the real SmolLM2-135M (CPU), one flat script.

1. Attention-mass long-context scores per KV head (``analysis.analyze_tokens``) on the gate-training passkey
   prompts and on real text (Sense and Sensibility), same sink / window.
2. DuoAttention-style gates (``analysis.optimize_head_gates``) on those passkey prompts.
3. Rank agreement (Spearman, top-25% / top-50% overlap) between the gates and both mass scores.
4. Equal-budget check on held-out passkey prompts: keep the top ``share`` of KV heads full by each score,
   stream the rest (binary gates), and measure the final-hidden-state error at the answer positions and the
   teacher-forced accuracy of the answer tokens.

Writes head_gates_smollm2.json / .md beside this file and docs/head_gates_smollm2.png.
Run: ``.venv/bin/python bench/scripts/head_gates_compare.py`` (about 20 CPU minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GGUF = REPO.parent / "shared" / "assets" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
_OUT = Path(os.environ.get("HG_OUT", HERE))  # a scratch folder for smoke runs
OUT_JSON, OUT_MD = _OUT / "head_gates_smollm2.json", _OUT / "head_gates_smollm2.md"
OUT_PNG = (_OUT if "HG_OUT" in os.environ else REPO / "docs") / "head_gates_smollm2.png"

SEQ = int(os.environ.get("HG_SEQ", 1024))
SINK, WINDOW, LAST = 4, 128, 32
TRAIN_SAMPLES, STEPS, LR, SEED = int(os.environ.get("HG_SAMPLES", 6)), int(os.environ.get("HG_STEPS", 24)), 0.1, 0
L1 = float(os.environ.get("HG_L1", 0.005))
REUSE = os.environ.get("HG_REUSE_MASS")  # a previous JSON of this script: reuse its attention-mass scores
EVAL_SAMPLES, EVAL_SEED, SHARES = int(os.environ.get("HG_EVAL", 6)), 1, (0.5, 0.25)


def ranks(xs: list[float]) -> list[float]:
    """Ranks 1..n, ties get their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_overlap(a: list[float], b: list[float], share: float) -> float:
    k = max(1, round(share * len(a)))
    top = lambda xs: set(sorted(range(len(xs)), key=lambda i: (-xs[i], i))[:k])  # noqa: E731
    return len(top(a) & top(b)) / k


def flat(matrix) -> list[float]:
    return [float(x) for row in matrix for x in row]


def save(results: dict) -> None:
    OUT_JSON.write_text(json.dumps(results, sort_keys=True, indent=1) + "\n")


def main() -> None:
    from lighttransfer.analysis import analyze_tokens
    from lighttransfer.analysis.head_gates import distill_loss, optimize_head_gates, passkey_rows
    from lighttransfer.analysis.head_gates_attention import gated_attention
    from lighttransfer.calibration import load_calibration
    from lighttransfer.convert.selection import select_kv_heads
    from lighttransfer.loading import load_model

    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model(str(GGUF), device="cpu", dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    import transformers

    results: dict = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized to fp32)",
        "machine": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, "
                   "shared with other jobs",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "params": {"seq_len": SEQ, "sink": SINK, "window": WINDOW, "last": LAST, "train_samples": TRAIN_SAMPLES,
                   "steps": STEPS, "lr": LR, "l1": L1, "seed": SEED, "eval_samples": EVAL_SAMPLES,
                   "eval_seed": EVAL_SEED, "shares_kept_full": list(SHARES)},
        "timings": {"load": round(time.perf_counter() - t0, 1)},
        "complete": False,
    }
    rows = passkey_rows(tok, samples=TRAIN_SAMPLES, seq_len=SEQ, window=WINDOW, seed=SEED)

    if REUSE:
        previous = json.loads(Path(REUSE).read_text())
        scores = {k: previous["scores"][k] for k in ("mass_passkey", "mass_text")}
        results["mass_scores_from"] = previous["params"] | {"timings": previous["timings"]}
    else:
        t = time.perf_counter()
        mass_passkey = analyze_tokens(model, rows.input_ids, sink=SINK, window=WINDOW, last=LAST)
        results["timings"]["mass_passkey"] = round(time.perf_counter() - t, 1)
        text = load_calibration(None, tok, seq_len=SEQ, samples=TRAIN_SAMPLES, seed=SEED)
        t = time.perf_counter()
        mass_text = analyze_tokens(model, text.input_ids, sink=SINK, window=WINDOW, last=LAST)
        results["timings"]["mass_text"] = round(time.perf_counter() - t, 1)
        scores = {"mass_passkey": mass_passkey.kv_head_long_context_scores(),
                  "mass_text": mass_text.kv_head_long_context_scores()}
    results["scores"] = scores
    save(results)
    print("attention-mass scores done", results["timings"], flush=True)

    def on_step(done: int, total: int) -> None:
        if done % 5 == 0 or done == total:
            print(f"step {done}/{total} {time.perf_counter() - t:.0f}s", flush=True)

    t = time.perf_counter()
    gates = optimize_head_gates(model, tok, sink=SINK, window=WINDOW, steps=STEPS, lr=LR, l1=L1, seed=SEED,
                                rows=rows, progress=on_step)
    results["timings"]["gates"] = round(time.perf_counter() - t, 1)
    scores["gates"] = gates.gates
    results["gate_run"] = {k: v for k, v in gates.to_dict().items() if k != "gates"}
    save(results)

    agreement = {}
    for name in ("mass_passkey", "mass_text"):
        a, b = flat(scores["gates"]), flat(scores[name])
        agreement[f"gates_vs_{name}"] = {"spearman": round(spearman(a, b), 4),
                                         "top25_overlap": round(top_overlap(a, b, 0.25), 4),
                                         "top50_overlap": round(top_overlap(a, b, 0.5), 4)}
    a, b = flat(scores["mass_passkey"]), flat(scores["mass_text"])
    agreement["mass_passkey_vs_mass_text"] = {"spearman": round(spearman(a, b), 4),
                                              "top25_overlap": round(top_overlap(a, b, 0.25), 4),
                                              "top50_overlap": round(top_overlap(a, b, 0.5), 4)}
    results["agreement"] = agreement
    save(results)
    print(json.dumps(agreement, indent=1), flush=True)

    # equal-budget evaluation on held-out prompts
    t = time.perf_counter()
    held = passkey_rows(tok, samples=EVAL_SAMPLES, seq_len=SEQ, window=WINDOW, seed=EVAL_SEED)
    decoder, head = model.model, model.get_output_embeddings()

    def run(ids, gate_matrix):
        with torch.no_grad():
            if gate_matrix is None:
                return decoder(input_ids=ids, use_cache=False).last_hidden_state
            with gated_attention(decoder, gate_matrix, sink=SINK, window=WINDOW):
                return decoder(input_ids=ids, use_cache=False).last_hidden_state

    targets, answers = [], []
    full_correct = 0
    for i in range(EVAL_SAMPLES):
        ids = held.input_ids[i : i + 1]
        n = held.supervised[i]
        h = run(ids, None)[0, -n:]
        targets.append(h)
        answers.append(ids[0, -(n - 1) :])
        full_correct += int((head(h[:-1]).argmax(-1) == answers[-1]).sum())
    total_tokens = sum(len(a) for a in answers)
    evaluation = {"full": {"answer_token_accuracy": round(full_correct / total_tokens, 4), "mse": 0.0}}
    for share in SHARES:
        for name in ("gates", "mass_passkey", "mass_text"):
            # convert's own selection (ties included): stream the 1 - share with the lowest scores
            streamed = select_kv_heads(scores[name], ratio=1.0 - share)
            keep = torch.ones(len(scores[name]), len(scores[name][0]))
            for layer, mask in streamed.items():
                keep[layer] = 1.0 - torch.tensor(mask, dtype=torch.float32)
            mse, correct = 0.0, 0
            for i in range(EVAL_SAMPLES):
                n = held.supervised[i]
                h = run(held.input_ids[i : i + 1], keep)[0, -n:]
                mse += float(distill_loss(h, targets[i])) / EVAL_SAMPLES
                correct += int((head(h[:-1]).argmax(-1) == answers[i]).sum())
            evaluation[f"{name}@{share}"] = {"answer_token_accuracy": round(correct / total_tokens, 4),
                                             "mse": round(mse, 5)}
            print(name, share, evaluation[f"{name}@{share}"], flush=True)
    results["evaluation"] = evaluation
    results["timings"]["evaluation"] = round(time.perf_counter() - t, 1)
    results["complete"] = True
    save(results)
    plot(scores, OUT_PNG)
    write_markdown(results)
    print("done", results["timings"], flush=True)


def plot(scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [("gates", "gates (optimized)"), ("mass_passkey", "attention mass, passkey"),
             ("mass_text", "attention mass, text")]
    fig, axes = plt.subplots(1, 3, figsize=(8, 7), sharey=True)
    for ax, (key, title) in zip(axes, names, strict=True):
        m = np.array(scores[key])
        image = ax.imshow(m, aspect="auto", cmap="magma", vmin=0.0, vmax=max(1e-6, float(m.max())),
                          interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("KV head")
        ax.set_xticks(range(m.shape[1]))
        fig.colorbar(image, ax=ax, fraction=0.08)
    axes[0].set_ylabel("layer")
    fig.suptitle(f"SmolLM2-135M: KV-head long-context scores (sink {SINK}, window {WINDOW}, {SEQ} tokens)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(r: dict) -> None:
    p, run = r["params"], r["gate_run"]
    lines = [
        "# KV-head gates vs attention mass: SmolLM2-135M-Instruct, CPU",
        "",
        f"{r['machine']}; torch {r['versions']['torch']}, transformers {r['versions']['transformers']}.",
        f"Passkey prompts of {p['seq_len']} tokens, sink {p['sink']}, window {p['window']}; attention mass over the "
        f"last {p['last']} queries; gates: {p['steps']} steps on {p['train_samples']} prompts, peak lr {p['lr']}, "
        f"L1 {p['l1']} (sum of gates), seed {p['seed']}. Script: `bench/scripts/head_gates_compare.py`.",
        "",
        "## Rank agreement over the 90 KV heads",
        "",
        "| pair | Spearman | top-25% overlap | top-50% overlap |",
        "| --- | ---: | ---: | ---: |",
    ]
    for pair, a in r["agreement"].items():
        lines.append(f"| {pair} | {a['spearman']:.3f} | {a['top25_overlap']:.2f} | {a['top50_overlap']:.2f} |")
    d = run["distill_history"]
    lines += [
        "",
        "## Gate optimization",
        "",
        f"distill loss (MSE of final hidden states at the answer positions): first steps "
        f"{', '.join(f'{x:.4f}' for x in d[:3])}; last steps {', '.join(f'{x:.4f}' for x in d[-3:])}; "
        f"mean gate {run['gate_mean_history'][0]:.3f} -> {run['gate_mean_history'][-1]:.3f}; "
        f"{run['timings']['per_step']:.1f} s per step.",
        "",
        f"## Equal budget on {p['eval_samples']} held-out passkey prompts",
        "",
        "The top share of KV heads by each score stays full, the rest stream (binary gates); the heads are "
        "picked by `convert`'s own `select_kv_heads` (ties: lower layer streams first).",
        "",
        "| heads kept full by | share full | answer-token accuracy | hidden-state MSE |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, e in r["evaluation"].items():
        name, _, share = key.partition("@")
        lines.append(f"| {name} | {share or '1.0'} | {e['answer_token_accuracy']:.3f} | {e['mse']:.4f} |")
    lines += ["", f"Timings (s): {json.dumps(r['timings'], sort_keys=True)}", ""]
    OUT_MD.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
