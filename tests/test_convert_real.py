"""One-step convert of the real SmolLM2-135M GGUF: analysis, selection, a checkpoint stock transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from lighttransfer.convert import convert, inspect_checkpoint
from lighttransfer.hybrid_format import HybridConfig
from lighttransfer.loading import fingerprint_from_config, load_config, resolve_model_source

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_hybrid(real_model, tmp_path_factory):
    """One-step convert (analysis included) of the session's GGUF-loaded model; the GGUF is not loaded twice."""
    assert real_model.source.kind == "gguf"
    out = tmp_path_factory.mktemp("real") / "smollm2-hybrid"
    convert(real_model, out=out, ratio=0.5, seq_len=512, samples=2, sink=4, window=128, device="cpu",
            dtype="float32")
    return out


def test_one_step_convert_picks_the_laziest_layers(real_hybrid):
    hybrid = HybridConfig.from_model_config(json.loads((real_hybrid / "config.json").read_text()))
    assert hybrid.num_layers == 30 and hybrid.num_kv_heads == 3
    assert (hybrid.sink, hybrid.window) == (4, 128)
    assert hybrid.calibration["sink"] == 4 and hybrid.calibration["window"] == 128
    assert hybrid.calibration["seq_len"] == 512 and hybrid.calibration["samples"] == 2
    ranking = hybrid.report_summary["ranking"]
    assert hybrid.streaming_layers == sorted(ranking[:15])
    lazy = hybrid.report_summary["layer_lazy_ratios"]
    assert min(lazy[i] for i in hybrid.streaming_layers) >= max(
        lazy[i] for i in range(30) if i not in hybrid.streaming_layers)
    sidecar = json.loads((real_hybrid / hybrid.sidecar).read_text())
    assert len(sidecar["kv_head_long_context_scores"]) == 30 and len(sidecar["head_lazy_ratios"][0]) == 9


def test_real_hybrid_loads_in_plain_transformers_as_the_dense_model(real_hybrid, real_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(real_hybrid, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(real_hybrid)
    ids = real_model.tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    assert torch.equal(tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, real_model.model(ids).logits)
    # the GGUF's chat template and special tokens survive into the checkpoint
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    hybrid_source = resolve_model_source(real_hybrid)
    assert fingerprint_from_config(load_config(hybrid_source), hybrid_source) == real_model.fingerprint
    card = (real_hybrid / "README.md").read_text()
    assert "GGUF" in card and "float32" in card and "license: apache-2.0" in card
    assert (real_hybrid / "LICENSE").is_file() and (real_hybrid / "lighttransfer_heatmap.png").is_file()


def test_real_hybrid_inspect_numbers(real_hybrid):
    result = inspect_checkpoint(real_hybrid)
    row = result.memory[0]  # 8k tokens, fp32: 2 * 30 layers * 3 KV heads * 64 * 8192 * 4 bytes
    assert row.dense_bytes == 2 * 30 * 3 * 64 * 8192 * 4
    assert row.hybrid_bytes == 2 * 3 * 64 * 4 * (15 * 8192 + 15 * 132)
