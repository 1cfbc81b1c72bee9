"""TokenSelect in the runtime (tiny models, fp32, CPU): exactness when the budget covers every key, decode =
teacher-forced continuation, the Selection Cache and its counts, the config block (format 2, format 1 unchanged),
``load(decode=...)`` on plain models and hybrids."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.compat import cache_keyword, output_cache
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import HybridConfig, TokenSelectConfig, token_select_config
from lighttransfer.runtime import enable_hybrid, make_cache, resolve_layout, runtime_of

TOL = 1e-5


def selecting(arch="llama", *, streaming_layers=(), chunks=True, **select):
    model = make_tiny_model(arch)
    layout = resolve_layout(model.config, streaming_layers=list(streaming_layers), sink=2, window=6,
                            decode="tokenselect", **select)
    enable_hybrid(model, layout)
    runtime_of(model).select_chunks = chunks
    return model


def ids_of(batch, length, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, ids, split, **kw):
    """Prefill ``ids[:, :split]`` then feed one token at a time: logits of every fed position after the split."""
    key = cache_keyword(model)
    cache = make_cache(model) if hasattr(model, "lighttransfer_runtime") else None
    with torch.no_grad():
        out = model(ids[:, :split], use_cache=True, **({key: cache} if cache is not None else {}), **kw)
        logits = [out.logits[:, -1]]
        for t in range(split, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], use_cache=True, **{key: output_cache(out)}, **kw)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_budget_covering_every_key_equals_dense_attention(arch, monkeypatch):
    """Exactness: k >= every candidate, with the dense shortcut off, so the selection path itself runs."""
    import lighttransfer.runtime.token_select as ts

    monkeypatch.setattr(ts, "DENSE_WHEN_COVERED", False)
    model = selecting(arch, select_k=64, select_init=2, select_local=3, select_reuse=0.0)
    plain = make_tiny_model(arch)
    ids = ids_of(2, 40)
    got = decode_logits(model, ids, 20)
    want = decode_logits(plain, ids, 20)
    assert (got - want).abs().max().item() <= TOL
    stats = runtime_of(model).selection_stats
    assert stats.lookups == 2 * 4 * 19 and stats.dense == 0  # 2 sequences x 4 full layers x 19 steps


def test_small_budgets_change_the_output_and_the_dense_shortcut_counts(monkeypatch):
    model = selecting(select_k=2, select_init=1, select_local=2, select_reuse=1.0)
    plain = make_tiny_model("llama")
    ids = ids_of(1, 30, seed=3)
    got, want = decode_logits(model, ids, 4), decode_logits(plain, ids, 4)
    # the first step (5 keys: 2 candidates beside 1 init + 2 local) is covered by the budget: dense and equal
    stats = runtime_of(model).selection_stats
    assert stats.dense == 4 and stats.lookups == 4 * 24 and stats.hits == 0  # reuse 1.0: no Selection Cache
    assert (got[:, :2] - want[:, :2]).abs().max().item() <= TOL
    assert (got - want).abs().max().item() > 1e-3


@pytest.mark.parametrize("reuse", [0.0, 0.5, 1.0])
def test_teacher_forced_continuation_equals_decoding_step_by_step(reuse):
    """A continuation chunk selects per query exactly as decoding would, Selection Cache included."""
    model = selecting(select_k=4, select_init=1, select_local=3, select_reuse=reuse)
    ids = ids_of(2, 36, seed=5)
    stepwise = decode_logits(model, ids, 14)
    stats = runtime_of(model).selection_stats
    step_counts = (stats.lookups, stats.hits)
    stats.reset()
    with torch.no_grad():
        cache = make_cache(model)
        key = runtime_of(model).cache_keyword
        first = model(ids[:, :14], use_cache=True, **{key: cache})
        rest = model(ids[:, 14:-1], use_cache=True, **{key: output_cache(first)})
    chunked = torch.cat([first.logits[:, -1:], rest.logits], 1)
    assert (chunked - stepwise).abs().max().item() <= TOL
    assert (stats.lookups, stats.hits) == step_counts
    if reuse == 0.0:
        assert stats.hits > 0
    if reuse == 1.0:
        assert stats.hits == 0


def test_without_select_chunks_a_chunk_after_the_prefill_attends_densely():
    """Chunked prefill stays a prefill: dense, like the model without TokenSelect."""
    model = selecting(select_k=2, select_init=1, select_local=2, chunks=False)
    plain = make_tiny_model("llama")
    ids = ids_of(1, 40, seed=6)
    with torch.no_grad():
        key = runtime_of(model).cache_keyword
        first = model(ids[:, :10], use_cache=True, **{key: make_cache(model)})
        rest = model(ids[:, 10:], use_cache=True, **{key: output_cache(first)})
        want = plain(ids).logits[:, 10:]
    assert (rest.logits - want).abs().max().item() <= TOL
    assert runtime_of(model).selection_stats.lookups == 0


def test_hit_rate_counts_over_a_generation():
    model = selecting(select_k=3, select_init=1, select_local=2, select_reuse=0.0)
    decode_logits(model, ids_of(1, 30, seed=2), 10)
    stats = runtime_of(model).selection_stats
    assert stats.lookups == 4 * 19 and 0 < stats.hits <= stats.lookups - 4  # each layer misses at least once
    assert stats.to_dict()["hit_rate"] == stats.hit_rate == stats.hits / stats.lookups


def test_the_selection_cache_compares_with_the_anchor_and_reuses_its_whole_selection():
    """Similar queries reuse the anchor's top-k and keep its local window; a dissimilar one rescores and becomes
    the anchor; the comparison is with the anchor, not the previous query (no drift)."""
    from lighttransfer.runtime.token_select import SelectionState, SelectionStats, token_select_attention

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 40, 8, generator=g)
    v = torch.randn(1, 1, 40, 8, generator=g)
    cfg = TokenSelectConfig(k=3, init=1, local=2, reuse=0.9)
    state, stats = SelectionState(), SelectionStats()
    base = torch.randn(1, 2, 1, 8, generator=g)

    def step(q, n_keys):
        return token_select_attention(q, k[:, :, :n_keys], v[:, :, :n_keys], config=cfg, state=state, stats=stats,
                                      kv_start=None, scale=None)

    step(base, 30)
    anchor, picked = state.anchor.clone(), state.picked.clone()
    assert stats.hits == 0 and int(state.anchor_pos) == 29
    step(base + 0.01 * torch.randn(1, 2, 1, 8, generator=g), 31)  # similar: hit
    assert stats.hits == 1 and torch.equal(state.picked, picked) and torch.equal(state.anchor, anchor)
    assert int(state.anchor_pos) == 29  # the reused selection still has the anchor's local window
    # drift: each query within reach of the previous one but, after a few steps, not of the anchor
    drift = base.clone()
    other = torch.randn(1, 2, 1, 8, generator=g)
    for t in range(6):
        drift = drift + 0.35 * other
        step(drift, 32 + t)
    assert stats.lookups == 8 and stats.hits < 7
    assert not torch.equal(state.anchor, anchor)
    # the reused attention is the anchor's selection: init, its top-k, and (anchor - local, now]
    from lighttransfer.kernels import assemble_indices

    idx = assemble_indices(state.picked.view(1, 1, -1), n_keys=38, init=1, local=2,
                           recent_start=(state.anchor_pos - 1).view(1, 1))
    want = set(range(int(state.anchor_pos) - 1, 38)) | {0} | set(state.picked[0].tolist())
    assert set(x for x in idx[0, 0].tolist() if x >= 0) == want


def test_hybrid_plus_tokenselect_keeps_the_streaming_layers_as_they_were():
    """Streaming layers are untouched; only the full layers select (k covering all = the hybrid alone)."""
    import lighttransfer.runtime.token_select as ts

    hybrid = make_tiny_model("llama")
    enable_hybrid(hybrid, resolve_layout(hybrid.config, streaming_layers=[1, 2], sink=2, window=6))
    both = selecting(streaming_layers=[1, 2], select_k=1000, select_init=1, select_local=2)
    ids = ids_of(2, 30, seed=4)
    old = ts.DENSE_WHEN_COVERED
    ts.DENSE_WHEN_COVERED = False
    try:
        got = decode_logits(both, ids, 12)
    finally:
        ts.DENSE_WHEN_COVERED = old
    assert (got - decode_logits(hybrid, ids, 12)).abs().max().item() <= TOL
    assert runtime_of(both).selection_stats.lookups == 2 * 2 * 17  # 2 sequences x the 2 full layers x 17 steps


def test_left_padded_batch_equals_each_sequence_alone():
    model = selecting(select_k=3, select_init=2, select_local=2, select_reuse=0.8)
    a, b = ids_of(1, 26, seed=7), ids_of(1, 20, seed=8)
    pad = torch.zeros(1, 6, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone = model.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1, -6:], alone[0, -6:])


def test_generate_text_reports_the_hit_rate(tiny_model_dir):
    import lighttransfer
    from lighttransfer.runtime.generation import GenerationStats

    model = lighttransfer.load(tiny_model_dir, device="cpu", decode="tokenselect", select_k=2, select_init=1,
                               select_local=2, select_reuse=0.0)
    assert runtime_of(model).layout.selection == TokenSelectConfig(k=2, init=1, local=2, reuse=0.0)
    assert runtime_of(model).layout.streaming_layers == ()  # TokenSelect alone on a plain model
    stats = GenerationStats(1, 2, 0.1, 0.1, 1, 1, selection_lookups=8, selection_hits=6)
    assert stats.selection_hit_rate == 0.75


# ------------------------------------------------------------------------------------------- settings, block
def test_settings_are_validated_with_one_clear_line():
    with pytest.raises(LightTransferError, match="select_k"):
        TokenSelectConfig(k=0)
    with pytest.raises(LightTransferError, match="select_reuse"):
        TokenSelectConfig(reuse=1.5)
    with pytest.raises(LightTransferError, match="decode='tokenselect'"):
        token_select_config("dense", select_k=4)
    with pytest.raises(LightTransferError, match="not known"):
        token_select_config("sparse")
    assert token_select_config(None) is None
    assert token_select_config("tokenselect", select_k=7) == TokenSelectConfig(k=7)
    assert token_select_config(None, select_local=9, base=TokenSelectConfig(k=5)) == TokenSelectConfig(k=5, local=9)


def test_config_block_format_2_round_trips_and_format_1_stays_as_it_was():
    dense = HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[1])
    block = dense.to_dict()
    assert block["format_version"] == 1 and "decode" not in block and "select_k" not in block
    ts = dense.with_selection(TokenSelectConfig(k=64, init=4, local=16, reuse=0.85))
    d = ts.to_dict()
    assert d["format_version"] == 2 and d["decode"] == "tokenselect" and d["select_k"] == 64
    back = HybridConfig.from_dict(json.loads(json.dumps(d)))
    assert back.selection == TokenSelectConfig(k=64, init=4, local=16, reuse=0.85)
    assert back.layout().selection == back.selection
    assert HybridConfig.from_dict(block).selection is None  # an old block loads, decoding densely
    with pytest.raises(LightTransferError, match="format_version 2"):
        HybridConfig.from_dict({**d, "format_version": 1})
    with pytest.raises(LightTransferError, match="select_init"):
        HybridConfig.from_dict({k: v for k, v in d.items() if k != "select_init"})
    with pytest.raises(LightTransferError, match="only meaningful"):
        HybridConfig.from_dict({**block, "select_k": 3})


def test_a_checkpoint_block_decodes_with_tokenselect_and_load_overrides_it(tiny_model_dir, tmp_path):
    import shutil

    import lighttransfer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["lighttransfer"] = HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[2]).with_selection(
        TokenSelectConfig(k=8, init=2, local=4, reuse=0.9)).to_dict()
    (ckpt / "config.json").write_text(json.dumps(config))
    model = lighttransfer.load(ckpt, device="cpu")
    assert runtime_of(model).layout.selection == TokenSelectConfig(k=8, init=2, local=4, reuse=0.9)
    model = lighttransfer.load(ckpt, device="cpu", select_k=3)
    assert runtime_of(model).layout.selection == TokenSelectConfig(k=3, init=2, local=4, reuse=0.9)
    assert runtime_of(lighttransfer.load(ckpt, device="cpu", decode="dense")).layout.selection is None
    with pytest.raises(LightTransferError, match="select_k"):
        lighttransfer.load(tiny_model_dir, device="cpu", decode="dense", select_k=3)


def test_convert_stores_tokenselect_and_the_runtime_reads_it(tiny_model_dir, tmp_path, capsys):
    import lighttransfer
    from conftest import run_cli

    out = tmp_path / "hybrid"
    code, stdout, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--out", str(out), "--decode",
                                 "tokenselect", "--select-k", "16", "--select-init", "4", "--select-local", "8"],
                                capsys)
    assert code == 0, err
    assert "TokenSelect k=16, init=4, local=8" in stdout
    block = json.loads((out / "config.json").read_text())["lighttransfer"]
    assert block["format_version"] == 2 and block["decode"] == "tokenselect" and block["select_reuse"] == 0.9
    assert "TokenSelect k=16, init=4, local=8" in (out / "README.md").read_text()
    layout = runtime_of(lighttransfer.load(out, device="cpu")).layout
    assert layout.streaming_layers == (1,) and layout.selection == TokenSelectConfig(k=16, init=4, local=8)
    code, _, err = run_cli(["convert", str(tiny_model_dir), "--layers", "1", "--out", str(tmp_path / "bad"),
                            "--select-k", "16"], capsys)
    assert code != 0 and "select_k" in err and "Traceback" not in err


def test_generate_cli_decodes_with_tokenselect_and_prints_the_hit_rate(tmp_path, capsys):
    from conftest import run_cli
    from test_runtime_reference import word_tokenizer

    d = tmp_path / "hybrid"
    model = make_tiny_model("llama")
    HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[1, 3], sink=2, window=8).attach(model.config)
    model.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    prompt = " ".join(f"w{i}" for i in range(10, 60))
    code, out, err = run_cli(["generate", str(d), "--prompt", prompt, "--max-new-tokens", "6", "--device", "cpu",
                              "--decode", "tokenselect", "--select-k", "4", "--select-init", "2", "--select-local",
                              "4", "--select-reuse", "0.5"], capsys)
    assert code == 0, err
    assert "TokenSelect:" in err and "of 10 selections reused" in err  # 2 full layers x 5 decode steps


def test_the_kernel_path_gives_the_reference_path_s_outputs(monkeypatch):
    """The CUDA path's wiring (votes of the sequences that missed, attention over per-query lists) run through the
    kernels in the Triton interpreter: the same logits as the references, decode and continuation chunk alike."""
    import lighttransfer.runtime.token_select as ts

    if not __import__("os").environ.get("TRITON_INTERPRET"):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by conftest on CPU machines)")
    ids = ids_of(2, 16, seed=9)
    model = selecting(select_k=3, select_init=1, select_local=2, select_reuse=0.0)
    want = decode_logits(model, ids, 10)
    ref_counts = runtime_of(model).selection_stats.to_dict()
    runtime_of(model).selection_stats.reset()
    monkeypatch.setattr(ts, "KERNELS_ON_CPU", True)
    got = decode_logits(model, ids, 10)
    assert (got - want).abs().max().item() <= 1e-4
    assert runtime_of(model).selection_stats.to_dict() == ref_counts and ref_counts["hits"] > 0
    with torch.no_grad():
        cache = make_cache(model)
        key = runtime_of(model).cache_keyword
        first = model(ids[:, :10], use_cache=True, **{key: cache})
        rest = model(ids[:, 10:-1], use_cache=True, **{key: output_cache(first)})
    assert (torch.cat([first.logits[:, -1:], rest.logits], 1) - want).abs().max().item() <= 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_cuda_the_kernels_give_the_references_outputs(dtype):
    """The runtime's CUDA path (vote kernel for the sequences that missed, split-K attention over the lists)
    against the references forced with use_reference(), teacher-forced over 39 decode steps of 3 sequences."""
    from lighttransfer.kernels import use_reference

    model = selecting(select_k=8, select_init=2, select_local=4, select_reuse=0.5).to("cuda", dtype)
    ids = ids_of(3, 80, seed=11).cuda()
    got = decode_logits(model, ids, 40)  # the decode steps 41..79: TokenSelect's kernels
    lookups = runtime_of(model).selection_stats.lookups
    with use_reference():
        want = decode_logits(model, ids, 40)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert (got.float() - want.float()).abs().max().item() <= tol
    assert lookups == 3 * 4 * 39
