"""The hybrid runtime through transformers' front doors: generate with left padding, chunked prefill,
pipelines, loading from directories, and a plain model beside a hybrid one."""

from __future__ import annotations

import logging

import lighttransfer
import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format.config_block import HybridConfig
from lighttransfer.runtime import disable_hybrid, make_cache, prefill_chunked
from lighttransfer.runtime.cache import HybridCache
from test_runtime import SINK, STREAMING, WINDOW, cache_kw, hybrid_pair, max_diff, random_ids
from test_runtime_reference import reference_logits, word_tokenizer


def greedy(model, ids, mask, new=12):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, length - len(s):] = s
        mask[b, length - len(s):] = 1
    return ids, mask


@pytest.mark.parametrize("prefill", ["streaming", "full"])
def test_left_padded_batch_equals_each_sequence_alone(tiny_arch, prefill):
    model, _ = hybrid_pair(tiny_arch, prefill=prefill)
    seqs = [random_ids(1, n, seed=n)[0] for n in (31, 19, 2)]
    ids, mask = left_pad(seqs)
    batch = greedy(model, ids, mask)
    for b, s in enumerate(seqs):
        alone = greedy(model, s[None], torch.ones(1, len(s), dtype=torch.long))
        assert torch.equal(batch.sequences[b, ids.shape[1]:], alone.sequences[0, len(s):])
        got = torch.stack(batch.logits, 1)[b]
        want = torch.stack(alone.logits, 1)[0]
        assert max_diff(got, want) <= 1e-4


def test_left_padded_batch_equals_the_masked_reference():
    model, plain = hybrid_pair("llama")
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (28, 17)])
    out = greedy(model, ids, mask, new=15)
    full_mask = torch.cat([mask, torch.ones(2, 15, dtype=mask.dtype)], dim=1)
    ref = reference_logits(plain, out.sequences, attention_mask=full_mask, streaming_layers=STREAMING,
                           sink=SINK, window=WINDOW)
    assert max_diff(torch.stack(out.logits, 1), ref[:, ids.shape[1] - 1: -1]) <= 1e-4


@pytest.mark.parametrize("chunk", [5, 13], ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("prefill", ["streaming", "full"])
def test_chunked_prefill_equals_one_pass(tiny_arch, chunk, prefill):
    model, _ = hybrid_pair(tiny_arch, prefill=prefill)
    ids, mask = left_pad([random_ids(1, 37, seed=1)[0], random_ids(1, 29, seed=2)[0]])
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate computes them for left padding
        one = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
        chunked = prefill_chunked(model, ids, attention_mask=mask, chunk_size=chunk, logits="all")
        real = mask.bool()
        assert max_diff(one.logits[real], chunked.logits[real]) <= 1e-5
        # the caches continue identically
        nxt = one.logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        step_pos = positions[:, -1:] + 1
        a = model(nxt, attention_mask=step_mask, position_ids=step_pos, use_cache=True,
                  **cache_kw(model, one.past_key_values))
        b = model(nxt, attention_mask=step_mask, position_ids=step_pos, use_cache=True,
                  **cache_kw(model, chunked.past_key_values))
        assert max_diff(a.logits, b.logits) <= 1e-5


def test_chunked_prefill_bounds_streaming_layers_between_chunks():
    model, _ = hybrid_pair("llama")
    cache = make_cache(model)
    ids = random_ids(1, 40, seed=3)
    prefill_chunked(model, ids[:, :20], chunk_size=6, cache=cache)
    assert all(cache.layers[i].keys.shape[2] == SINK + WINDOW for i in STREAMING)
    assert cache.layers[0].keys.shape[2] == 20


def test_generate_with_a_prefill_chunk_size_equals_one_pass(tiny_arch):
    model, _ = hybrid_pair(tiny_arch)
    chunked, _ = hybrid_pair(tiny_arch, chunk_size=7)
    assert chunked.generation_config.prefill_chunk_size == 7
    ids = random_ids(2, 33, seed=4)
    mask = torch.ones_like(ids)
    a, b = greedy(model, ids, mask), greedy(chunked, ids, mask)
    assert torch.equal(a.sequences, b.sequences)
    assert max_diff(torch.stack(a.logits, 1), torch.stack(b.logits, 1)) <= 1e-4


def test_pipeline_text_generation_uses_the_bounded_cache():
    from transformers import pipeline

    model, _ = hybrid_pair("llama")
    tok = word_tokenizer()
    seen = []
    model.base_model.register_forward_hook(lambda m, a, out: seen.append(type(getattr(out, "past_key_values",
                                                                                       None))))
    prompt = " ".join(f"w{i}" for i in random_ids(1, 30, seed=5)[0].tolist())
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    text = gen(prompt, max_new_tokens=10, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tok(prompt, return_tensors="pt")
    direct = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert text.split() == tok.decode(direct[0, ids["input_ids"].shape[1]:]).split()
    assert len(text.split()) == 10
    assert seen and all(t is HybridCache for t in seen)


def test_a_plain_model_beside_a_hybrid_one():
    model, plain = hybrid_pair("llama")
    other = make_tiny_model("llama")
    ids = random_ids(1, 40, seed=6)
    with torch.no_grad():
        dense = other(ids).logits
        hybrid = model(ids).logits
        dense_again = other(ids).logits
        out = other.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                             do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert other.config._attn_implementation == "sdpa"
    assert type(out.past_key_values) is not HybridCache
    assert max_diff(dense, dense_again) == 0.0
    ref = reference_logits(plain, ids, streaming_layers=STREAMING, sink=SINK, window=WINDOW)
    assert max_diff(hybrid, ref) <= 1e-5
    assert max_diff(dense, hybrid) > 1e-3


def test_disable_restores_the_plain_model():
    model, plain = hybrid_pair("qwen2")
    ids = random_ids(1, 40, seed=7)
    disable_hybrid(model)
    with torch.no_grad():
        assert max_diff(model(ids).logits, plain(ids).logits) <= 1e-5
    assert model.config._attn_implementation == "sdpa"


# ---- loading ----------------------------------------------------------------------------------------------

@pytest.fixture
def hybrid_dir(tmp_path):
    """A tiny Llama saved with a lighttransfer block attached by hand (no convert step)."""
    model = make_tiny_model("llama")
    block = HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=STREAMING, sink=SINK, window=WINDOW,
                         calibration={"sink": SINK, "recent": WINDOW, "last": 8})
    block.attach(model.config)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_load_reads_the_block_and_matches_the_reference(hybrid_dir):
    model = lighttransfer.load(hybrid_dir, device="cpu")
    plain = make_tiny_model("llama")
    ids = random_ids(1, 40, seed=8)
    with torch.no_grad():
        got = model(ids).logits
    assert max_diff(got, reference_logits(plain, ids, streaming_layers=STREAMING, sink=SINK,
                                          window=WINDOW)) <= 1e-5


def test_load_plain_directory_with_an_explicit_layout(tiny_model_dir):
    model = lighttransfer.load(tiny_model_dir, device="cpu", streaming_layers=[0, 2], sink=2, window=5)
    plain = make_tiny_model("llama")
    ids = random_ids(1, 30, seed=9)
    with torch.no_grad():
        got = model(ids).logits
    assert max_diff(got, reference_logits(plain, ids, streaming_layers=[0, 2], sink=2, window=5)) <= 1e-5


def test_load_without_any_layout_is_a_clear_error(tiny_model_dir):
    with pytest.raises(LightTransferError, match="no 'lighttransfer' block"):
        lighttransfer.load(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("options, message", [
    (dict(streaming_layers=[9]), "out of range"),
    (dict(streaming_layers=[1], window=0), "window"),
    (dict(streaming_layers=[1], prefill="sometimes"), "prefill policy"),
    (dict(streaming_layers=[1], online_ratio=0.5), "not both"),
    (dict(online_ratio=1.5), "between 0 and 1"),
    (dict(streaming_layers=[1], chunk_size=0), "chunk_size"),
], ids=["layer", "window", "prefill", "online+layout", "ratio", "chunk"])
def test_bad_options_are_one_line_errors(tiny_model_dir, options, message):
    with pytest.raises(LightTransferError, match=message):
        lighttransfer.load(tiny_model_dir, device="cpu", **options)


def test_sink_or_window_unlike_the_calibration_warns(hybrid_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="lighttransfer"):
        lighttransfer.load(hybrid_dir, device="cpu", window=WINDOW * 2)
    assert any("selected with" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lighttransfer"):
        lighttransfer.load(hybrid_dir, device="cpu")
    assert not caplog.records
