"""Model loading: where a model lives, device/dtype choice, and the one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.errors import LightTransferError
from lighttransfer.loading import (
    load_model,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)


def test_directory_source(tiny_model_dir):
    src = resolve_model_source(tiny_model_dir)
    assert src.kind == "directory" and src.path == tiny_model_dir.resolve()


def test_gguf_source(real_gguf):
    src = resolve_model_source(real_gguf)
    assert src.kind == "gguf"
    name, kwargs = src.from_pretrained_args
    assert kwargs == {"gguf_file": real_gguf.name}


def test_hub_id_source():
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "does-not-exist", "does not exist"),
        (lambda d: d, "no config.json"),
        (lambda d: (d / "config.json").write_text("{}") and d, "no weights"),
        (lambda d: (d / "weights.txt").write_text("x") and d / "weights.txt", "not a GGUF"),
    ],
    ids=["missing-path", "no-config", "no-weights", "not-gguf-file"],
)
def test_bad_sources_are_one_line(tmp_path, make, fragment):
    with pytest.raises(LightTransferError) as err:
        resolve_model_source(make(tmp_path))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def _save_config_dir(tmp_path, model_type, **kw):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **kw).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path


def test_not_a_causal_lm(tmp_path):
    d = _save_config_dir(tmp_path, "t5", d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=64)
    with pytest.raises(LightTransferError, match="not a causal language model"):
        load_model(d, device="cpu", with_tokenizer=False)


def test_attention_not_swappable(tmp_path):
    d = _save_config_dir(tmp_path, "bloom", hidden_size=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(LightTransferError, match="attention interface") as err:
        load_model(d, device="cpu", with_tokenizer=False)
    assert "llama" in str(err.value)


def test_load_directory_matches_source(tiny_model_dir):
    ref = make_tiny_model("llama")
    loaded = load_model(tiny_model_dir, device="cpu", dtype="float32", with_tokenizer=False)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, ref(ids).logits)
    assert loaded.fingerprint == model_fingerprint(ref)


def test_fingerprint_ignores_dtype_and_lighttransfer_block(tiny_model_dir):
    model = make_tiny_model("llama")
    fp = model_fingerprint(model)
    model.config.lighttransfer = {"format_version": 1}
    assert model_fingerprint(model.to(torch.bfloat16)) == fp
    assert model_fingerprint(make_tiny_model("llama", num_hidden_layers=3)) != fp


def test_bin_weights_load_with_weights_only(tmp_path):
    model = make_tiny_model("qwen2")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(tmp_path, device="cpu", with_tokenizer=False)
    for (n, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.real_model
def test_gguf_loads_as_plain_model(real_model, long_text):
    model = real_model.model
    assert model.config.num_key_value_heads == 3 and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    cfg = json.loads(model.config.to_json_string())
    assert "quantization_config" not in cfg
    ids = real_model.tokenizer(long_text[:4000], return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        out = model(ids, labels=ids)
    # the dequantized Q4_1 SmolLM2 scores ~34 on the opening of Emma; random weights would score ~50k
    assert float(out.loss.exp()) < 60


@pytest.mark.real_model
def test_gguf_tokenizer_has_its_special_tokens(real_model):
    tok = real_model.tokenizer
    assert tok.eos_token is not None and tok.bos_token is not None
    assert tok.eos_token_id == real_model.model.config.eos_token_id
    assert tok.chat_template


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(LightTransferError, match="--dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(LightTransferError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LightTransferError, match="CUDA is not available"):
            resolve_device("cuda:0")
