"""inspect: the hybrid layout and the KV-cache budget, read from config.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_model
from lighttransfer.cli import main
from lighttransfer.convert import inspect_checkpoint
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import HybridConfig, kv_cache_bytes

K = 1024


def _write_hybrid(path: Path, hybrid: HybridConfig, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    base = {"model_type": "llama", "num_hidden_layers": hybrid.num_layers, "num_attention_heads": 8,
            "num_key_value_heads": hybrid.num_kv_heads, "hidden_size": 512, "dtype": "bfloat16",
            "lighttransfer": hybrid.to_dict()}
    (path / "config.json").write_text(json.dumps({**base, **config}))
    return path


def test_memory_numbers_follow_the_formula(tmp_path):
    # 6 layers x 2 KV heads, head_dim 512/8 = 64, bf16; layers 1 and 4 stream, layer 2 streams one KV head
    hybrid = HybridConfig(num_layers=6, num_kv_heads=2, streaming_layers=[1, 4], head_masks={2: [False, True]},
                          sink=4, window=1020)
    result = inspect_checkpoint(_write_hybrid(tmp_path / "h", hybrid))
    assert result.head_dim == 64 and result.dtype == "bfloat16"
    assert [row.tokens for row in result.memory] == [8 * K, 32 * K, 128 * K]
    for row in result.memory:
        per_token_head = 2 * 64 * 2  # key + value, 64 channels, 2 bytes
        assert row.dense_bytes == per_token_head * 12 * row.tokens
        assert row.hybrid_bytes == per_token_head * (7 * row.tokens + 5 * 1024)
    assert result.memory[0].dense_bytes == 25_165_824  # 2*6*2*64*8192*2


def test_short_sequences_keep_everything():
    hybrid = HybridConfig(num_layers=2, num_kv_heads=1, streaming_layers=[0], sink=4, window=100)
    dense, mixed = kv_cache_bytes(hybrid, head_dim=8, dtype_bytes=4, tokens=50)
    assert dense == mixed == 2 * 2 * 8 * 50 * 4


def test_head_dim_and_dtype_from_the_config(tmp_path):
    hybrid = HybridConfig(num_layers=2, num_kv_heads=2, streaming_layers=[0], sink=0, window=8)
    result = inspect_checkpoint(_write_hybrid(tmp_path / "h", hybrid, head_dim=128, dtype="float32"))
    assert result.head_dim == 128
    assert result.memory[0].dense_bytes == 2 * 2 * 2 * 128 * 8 * K * 4


def test_inspect_a_converted_checkpoint_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    from lighttransfer.convert import convert

    src = tmp_path / "src"
    make_tiny_model("llama").save_pretrained(src)
    convert(src, out=tmp_path / "hybrid", layers=[1, 3], sink=4, window=1020)
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(tmp_path / "hybrid")])
    out = capsys.readouterr().out
    assert info.value.code in (0, None)
    assert "streaming layers (2/4): 1,3" in out and "sink 4 + window 1020" in out
    # tiny llama: 4 layers x 2 KV heads x head_dim 16, fp32 -> 8 MiB dense at 8k tokens, 4.5 MiB hybrid
    assert "8.0 MiB" in out and "4.5 MiB" in out
    assert "vLLM plugin: served; vLLM KV cache groups of 2 layers (1 streaming, 1 full); no padding" in out
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path / "hybrid"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["memory"][0] == {"tokens": 8192, "dense_bytes": 8 * 2**20, "hybrid_bytes": 4718592,
                                 "saved_fraction": pytest.approx(1 - 4718592 / 2**23)}


def test_head_masks_show_as_a_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    hybrid = HybridConfig(num_layers=3, num_kv_heads=2, streaming_layers=[0], head_masks={2: [True, False]},
                          granularity="head")
    _write_hybrid(tmp_path / "h", hybrid)
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path / "h")])
    out = capsys.readouterr().out
    assert "S = streaming" in out
    grid = out.split("KV heads\n", 1)[1].split("S = streaming", 1)[0]
    rows = [line for line in grid.splitlines() if line.startswith("│")]
    assert [line.count("S") for line in rows] == [2, 0, 1]
    assert "vLLM plugin: not served:" in out and "head-level hybrid" in out


@pytest.mark.parametrize("case", ["missing", "plain-model", "bad-json"])
def test_inspect_errors_are_one_line(case, tmp_path, capsys):
    target = tmp_path / "x"
    if case == "plain-model":
        make_tiny_model("qwen2").config.save_pretrained(target)
    elif case == "bad-json":
        target.mkdir()
        (target / "config.json").write_text("{not json")
    with pytest.raises(LightTransferError):
        inspect_checkpoint(target)
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(target)])
    err = capsys.readouterr().err
    assert info.value.code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cache_dtype_can_be_chosen(tmp_path):
    hybrid = HybridConfig(num_layers=2, num_kv_heads=2, streaming_layers=[0], sink=0, window=8)
    path = _write_hybrid(tmp_path / "h", hybrid, head_dim=128, dtype="float32")
    assert inspect_checkpoint(path, dtype="bfloat16").memory[0].dense_bytes == 2 * 2 * 2 * 128 * 8 * K * 2
    with pytest.raises(LightTransferError, match="not known"):
        inspect_checkpoint(path, dtype="int3")
