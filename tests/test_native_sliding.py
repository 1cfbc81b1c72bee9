"""Models whose own layers slide a window (Gemma 3 style ``layer_types``): the runtime keeps that window on the
layers it leaves full, and a conversion leaves those layers as they are."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.architecture import native_sliding_layers
from lighttransfer.convert import convert
from lighttransfer.errors import LightTransferError
from lighttransfer.runtime import enable_hybrid, resolve_layout


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (2, n), generator=torch.Generator().manual_seed(seed))


def _runtime_logits(ids: torch.Tensor, streaming: list[int], *, sink: int, window: int) -> torch.Tensor:
    """Logits of the tiny Gemma 3 run through the hybrid runtime with ``streaming`` layers."""
    model = make_tiny_model("gemma3")
    enable_hybrid(model, resolve_layout(model.config, streaming_layers=streaming, sink=sink, window=window))
    with torch.no_grad():
        return model(ids).logits


def test_the_native_window_really_matters_at_this_length():
    model = make_tiny_model("gemma3")
    ids = _ids(40)
    with torch.no_grad():
        windowed = model(ids).logits
        model.config.layer_types = ["full_attention"] * 4
        for layer in model.model.layers:
            layer.self_attn.sliding_window = None
        full = model(ids).logits
    assert (windowed - full).abs().max() > 1e-2  # else the tests below could not tell the two apart


@pytest.mark.parametrize("streaming", [[], [3]], ids=["no-streaming", "global-layer-streams"])
def test_runtime_keeps_the_model_window_on_its_sliding_layers(streaming):
    ids = _ids(40, seed=1)
    with torch.no_grad():
        ref = make_tiny_model("gemma3")(ids).logits
    got = _runtime_logits(ids, streaming, sink=2, window=30)
    if not streaming:
        assert (got - ref).abs().max() <= 1e-5
    else:  # layer 3 streams with window 30 over 40 tokens: only the last positions can change
        assert (got[:, :30] - ref[:, :30]).abs().max() <= 1e-5


def test_decoding_keeps_the_native_window():
    model = make_tiny_model("gemma3")
    prompt = _ids(20, seed=2)
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)
    enable_hybrid(model, resolve_layout(model.config, streaming_layers=[], sink=2, window=16))
    with torch.no_grad():
        got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(got, ref)


def test_convert_leaves_native_sliding_layers_alone(tmp_path):
    src = tmp_path / "gemma3"
    model = make_tiny_model("gemma3")
    model.save_pretrained(src)
    assert native_sliding_layers(model.config) == [0, 1]
    result = convert(src, out=tmp_path / "hybrid", strategy="random", ratio=0.5, sink=2, window=16)
    # the ratio is a share of the two full-attention layers: one of them streams
    assert len(result.hybrid.streaming_layers) == 1 and set(result.hybrid.streaming_layers) <= {2, 3}
    everything = convert(src, out=tmp_path / "all", strategy="random", ratio=1.0, sink=2, window=16)
    assert everything.hybrid.streaming_layers == [2, 3]
    assert any("own window of 8 tokens" in w for w in result.warnings)
    assert [r.reason for r in result.rows][:2] == ["the model's own sliding window"] * 2
    config = json.loads((tmp_path / "hybrid" / "config.json").read_text())
    assert config["layer_types"][:2] == ["sliding_attention"] * 2 and config["sliding_window"] == 8
    with pytest.raises(LightTransferError, match="already slides its own window on layers 0,1"):
        convert(src, out=tmp_path / "swa", strategy="random", ratio=0.5, sink=2, window=16, native_swa=True)
    with pytest.raises(LightTransferError, match="--layers 1"):
        convert(src, out=tmp_path / "manual", layers=[1, 2], sink=2, window=16)


def test_a_model_that_slides_everywhere_has_nothing_to_convert(tmp_path):
    src = tmp_path / "local-only"
    make_tiny_model("gemma3", layer_types=["sliding_attention"] * 4).save_pretrained(src)
    with pytest.raises(LightTransferError, match="nothing to convert"):
        convert(src, out=tmp_path / "hybrid", strategy="random", ratio=0.5, sink=2, window=16)
    assert not (tmp_path / "hybrid").exists()


@pytest.mark.parametrize("streaming", [[], [3]], ids=["no-streaming", "global-layer-streams"])
def test_masked_reference_keeps_the_native_window_and_matches_the_runtime(streaming):
    from lighttransfer.evaluation.masked_reference import masked_streaming

    model = make_tiny_model("gemma3")
    ids = _ids(48, seed=3)
    with torch.no_grad():
        plain = model(ids).logits
        with masked_streaming(model, streaming_layers=streaming, sink=2, window=20):
            masked = model(ids).logits
    runtime = _runtime_logits(ids, streaming, sink=2, window=20)
    assert (masked - runtime).abs().max() <= 1e-4
    if not streaming:
        assert (masked - plain).abs().max() <= 1e-5
    else:
        assert (masked - plain).abs().max() > 1e-3  # layer 3 really streams


def test_analysis_measures_native_layers_inside_their_window():
    from lighttransfer.analysis.pipeline import analyze_tokens

    model = make_tiny_model("gemma3", attn_implementation="eager")
    ids = _ids(64, seed=4)
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions  # the model's own weights, its window included
    report = analyze_tokens(model, ids, sink=2, window=4, last=8, model_id="tiny-gemma3")
    assert report.params["native_sliding_layers"] == [0, 1] and report.params["native_sliding_window"] == 8
    q_pos = torch.arange(56, 64).view(-1, 1)
    k_pos = torch.arange(64).view(1, -1)
    for layer, p in enumerate(probs):
        sink = 0 if layer in (0, 1) else 2  # a native window of 8 holds no sink token at these positions
        kept = (k_pos < sink) | ((q_pos - k_pos < 4) & (k_pos <= q_pos))
        expected = (p[:, :, 56:] * kept).sum(-1).mean().item()
        assert report.layers[layer].lazy_ratio.mean == pytest.approx(expected, abs=1e-4), layer


def test_the_cache_of_native_sliding_layers_stays_bounded():
    model = make_tiny_model("gemma3")
    enable_hybrid(model, resolve_layout(model.config, streaming_layers=[3], sink=2, window=16))
    prompt = _ids(40, seed=5)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True)
    cache = out.past_key_values
    held = [layer.keys.shape[2] for layer in cache.layers]
    # native window 8: the two sliding layers keep 7 tokens, like stock transformers; layer 2 keeps all 45
    assert held[0] == held[1] == 7 and held[2] == 45 and held[3] <= 2 + 16


def test_left_padded_batch_decodes_like_the_stock_model():
    prompt = _ids(30, seed=6)
    mask = torch.ones_like(prompt)
    prompt[0, :9], mask[0, :9] = 0, 0  # the first sequence is 9 tokens shorter, padded on the left
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    stock = make_tiny_model("gemma3")
    hybrid = make_tiny_model("gemma3")
    enable_hybrid(hybrid, resolve_layout(hybrid.config, streaming_layers=[], sink=2, window=16))
    with torch.no_grad():
        assert torch.equal(hybrid.generate(prompt, **kwargs), stock.generate(prompt, **kwargs))


def test_kv_table_bounds_native_layers_on_both_sides(tmp_path):
    from lighttransfer.convert import inspect_checkpoint

    src = tmp_path / "gemma3"
    make_tiny_model("gemma3").save_pretrained(src)
    result = convert(src, out=tmp_path / "hybrid", strategy="random", ratio=0.5, sink=2, window=16)
    row = next(r for r in result.memory if r.tokens == 8192)
    per_layer_token = 2 * 16 * 4  # key + value, head_dim 16, one KV head, float32
    # original: two native layers of 8 tokens + two full layers; hybrid: one full layer streams 2 + 16
    assert row.dense_bytes == per_layer_token * (2 * 8 + 2 * 8192)
    assert row.hybrid_bytes == per_layer_token * (2 * 8 + 8192 + 18)
    inspected = next(r for r in inspect_checkpoint(tmp_path / "hybrid").memory if r.tokens == 8192)
    assert (inspected.dense_bytes, inspected.hybrid_bytes) == (row.dense_bytes, row.hybrid_bytes)


def test_eval_rows_leave_native_layers_alone_and_count_them_bounded():
    from lighttransfer.evaluation.rows import standard_rows

    rows = {r.name: r for r in standard_rows(
        lazy_ratios=[0.9, 0.8, 0.3, 0.7], ratio=0.5, num_kv_heads=1, sink=2, window=16,
        names=["original", "lighttransfer", "random", "least-lazy", "streamingllm", "random-heads"],
        native_windows={0: 8, 1: 8})}
    # ratio 0.5 of the two full-attention layers: one streams, never a native one
    assert rows["lighttransfer"].streaming_layers == [3] and rows["least-lazy"].streaming_layers == [2]
    assert rows["random"].streaming_layers in ([2], [3]) and rows["streamingllm"].streaming_layers == [2, 3]
    heads = rows["random-heads"]
    assert not ({0, 1} & (set(heads.streaming_layers) | set(heads.head_masks)))
    # KV at 1000 tokens: original 8 + 8 + 1000 + 1000; the conversion 8 + 8 + 1000 + 18
    assert rows["original"].kv_fraction(1000) == 1.0
    assert rows["lighttransfer"].kv_fraction(1000) == pytest.approx((16 + 1000 + 18) / (16 + 2000))
