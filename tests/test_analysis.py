"""Analysis: lazy ratios against eager attention weights, hand-made q/k, memory, determinism, report."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.analysis import analyze, analyze_tokens, capture_lazy_mass, streaming_attention_mass
from lighttransfer.analysis.heatmap import lazy_layers, plot_heatmap
from lighttransfer.analysis.lazy_ratio import stats_workspace_bytes
from lighttransfer.analysis.report import AnalysisReport
from lighttransfer.errors import LightTransferError
from lighttransfer.kernels.mask import streaming_mask, streaming_visible
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SINK, RECENT, LAST, SEQ = 3, 10, 8, 48


def sharpened(arch: str, *, dtype=torch.float32, attn_implementation="eager", factor=20.0):
    """A tiny model whose q/k projections are scaled up, so attention is peaked and differs between heads."""
    model = make_tiny_model(arch, attn_implementation=attn_implementation)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p.mul_(factor)
    return model.to(dtype)


def reference_mass(model, ids: torch.Tensor) -> torch.Tensor:
    """``[layers, batch, q_heads, LAST]`` lazy mass from the eager attention weights (dense, fp64)."""
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=False)
    mask = streaming_mask(LAST, ids.shape[1], sink=SINK, window=RECENT)
    return torch.stack([(a[:, :, -LAST:, :].double() * mask).sum(-1) for a in out.attentions])


def expected_tables(mass: torch.Tensor, threshold: float, kv_heads: int):
    """The report's tables from per-query mass ``[layers, samples, q_heads, last]``, written out plainly."""
    lazy = mass.mean(-1).permute(1, 0, 2)  # [samples, layers, heads]
    share = ((1 - mass) > threshold).double().mean(-1).permute(1, 0, 2)
    s, layers, heads = lazy.shape
    grouped = lazy.reshape(s, layers, kv_heads, heads // kv_heads)
    grouped_share = share.reshape(s, layers, kv_heads, heads // kv_heads)
    return {
        "layer": lazy.mean(-1).mean(0),
        "layer_std": lazy.mean(-1).std(0, correction=0),
        "head_lazy": lazy.mean(0),
        "head_share": share.mean(0),
        "kv_lazy": grouped.min(-1).values.mean(0),
        "kv_long": 1 - grouped.min(-1).values.mean(0),
        "kv_share": grouped_share.max(-1).values.mean(0),
    }


@pytest.mark.parametrize("attn", ["eager", "sdpa"], ids=lambda a: f"capture-from={a}")
def test_matches_eager_attention_weights(tiny_arch, attn):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (3, SEQ))
    reference = expected_tables(reference_mass(sharpened(tiny_arch), ids), 0.3, make_tiny_model(tiny_arch).config.num_key_value_heads)
    report = analyze_tokens(sharpened(tiny_arch, attn_implementation=attn), ids, sink=SINK, window=RECENT,
                            last=LAST, threshold=0.3, batch=2)
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    # the window matters: ratios are far from 1 and differ between layers and heads
    assert reference["head_lazy"].std() > 0.05 and reference["head_lazy"].max() < 0.99
    assert 0.1 < reference["head_share"].mean() < 0.9
    assert torch.allclose(t(report.layer_lazy_ratios()), reference["layer"], atol=1e-4, rtol=0)
    assert torch.allclose(t([s.lazy_ratio.std for s in report.layers]), reference["layer_std"], atol=1e-4, rtol=0)
    assert torch.allclose(t(report.head_lazy_ratios()), reference["head_lazy"], atol=1e-4, rtol=0)
    assert torch.allclose(t(report.query_heads.long_context_mass), 1 - reference["head_lazy"], atol=1e-4, rtol=0)
    assert torch.allclose(t(report.query_heads.long_query_share), reference["head_share"], atol=1e-4, rtol=0)
    assert torch.allclose(t(report.kv_heads.lazy_ratio), reference["kv_lazy"], atol=1e-4, rtol=0)
    assert torch.allclose(t(report.kv_head_long_context_scores()), reference["kv_long"], atol=1e-4, rtol=0)
    assert torch.allclose(t(report.kv_heads.long_query_share), reference["kv_share"], atol=1e-4, rtol=0)
    assert report.ranking == sorted(range(report.num_layers), key=lambda i: -report.layer_lazy_ratios()[i])


def test_capture_leaves_outputs_and_implementation_unchanged(tiny_arch):
    model = sharpened(tiny_arch, attn_implementation="sdpa")
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        plain = model(ids).logits
        with capture_lazy_mass(model, last=4, sink=2, window=8) as recorder:
            assert model.config._attn_implementation != "sdpa"
            captured = model(ids).logits
            mass = recorder.take()
    assert torch.equal(plain, captured)
    assert mass.shape == (model.config.num_hidden_layers, 2, model.config.num_attention_heads, 4)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), capture_lazy_mass(model, last=4, sink=2, window=8):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def _exact_mass(scores_by_key: dict[int, float], q_pos: int, *, sink: int, window: int) -> float:
    """Eq. 1 for one query whose score is 0 on every key except those listed."""
    total = kept = 0.0
    for j in range(q_pos + 1):
        w = torch.tensor(scores_by_key.get(j, 0.0), dtype=torch.float64).exp().item()
        total += w
        kept += w if bool(streaming_visible(q_pos, j, sink, window)) else 0.0
    return kept / total


def test_hand_made_queries_and_keys():
    """One KV head peaks on a sink key, the other on a far key, a third shape is uniform: known answers."""
    k_len, d, q_len, sink, window, scale = 64, 8, 8, 4, 8, 0.25
    e = torch.zeros(d)
    e[0] = 1.0
    k = torch.zeros(1, 3, k_len, d)
    k[0, 0, 2] = e  # a sink key
    k[0, 1, 20] = e  # far back: outside every window
    k[0, 2, 60] = e  # inside the window of queries 60.., in the future of queries 56..59
    q = torch.zeros(1, 6, q_len, d)
    q[0, :, :, 0] = 12.0  # score 12 * 0.25 = 3 on the marked key, 0 elsewhere
    q[0, 1] = 0.0  # query head 1 (KV head 0): uniform attention
    mass = streaming_attention_mass(q, k, q_offset=k_len - q_len, sink=sink, window=window, scale=scale,
                                    block_size=16)
    for i in range(q_len):
        p = k_len - q_len + i
        expect = {
            0: _exact_mass({2: 3.0}, p, sink=sink, window=window),
            1: _exact_mass({}, p, sink=sink, window=window),
            2: _exact_mass({20: 3.0}, p, sink=sink, window=window),
            4: _exact_mass({60: 3.0}, p, sink=sink, window=window),
        }
        for head, value in expect.items():
            assert mass[0, head, i].item() == pytest.approx(value, rel=1e-5), (head, p)
    assert mass[0, 1, 0].item() == pytest.approx((sink + window) / (k_len - q_len + 1), rel=1e-6)


@pytest.mark.parametrize("block", [1, 16, 113, 1024], ids=lambda b: f"block={b}")
@pytest.mark.parametrize("q_offset", [50, 106], ids=lambda o: f"q_offset={o}")
def test_blockwise_equals_dense_reference(block, q_offset):
    torch.manual_seed(1)
    q, k = torch.randn(2, 6, 7, 16) * 2, torch.randn(2, 3, 113, 16) * 2
    got = streaming_attention_mass(q, k, q_offset=q_offset, sink=5, window=19, scale=16**-0.5, block_size=block)
    scores = (q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2)) * 16**-0.5
    q_pos = torch.arange(7)[:, None] + q_offset
    k_pos = torch.arange(113)[None, :]
    weights = scores.masked_fill(~(k_pos <= q_pos), float("-inf")).softmax(-1)
    expect = (weights * streaming_visible(q_pos, k_pos, 5, 19)).sum(-1)
    assert torch.allclose(got.double(), expect, atol=2e-5, rtol=0)  # fp32 math vs an fp64 reference


class LargestTensor(TorchDispatchMode):
    """Records the byte size of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_extra_memory_stays_far_below_n_squared():
    sizes = {}
    for n in (4096, 16384):
        q, k = torch.randn(1, 4, 32, 8), torch.randn(1, 2, n, 8)
        with LargestTensor() as probe:
            mass = streaming_attention_mass(q, k, q_offset=n - 32, sink=4, window=1020, scale=8**-0.5)
        assert mass.shape == (1, 4, 32)
        sizes[n] = probe.largest
    dense = 16384 * 16384 * 4  # one fp32 N x N score matrix for one head
    assert sizes[16384] < dense / 1000
    assert sizes[16384] == sizes[4096]  # independent of N: one block of keys at a time
    bound = stats_workspace_bytes(batch=1, q_heads=4, q_len=32, head_dim=8, k_len=16384)
    assert sizes[16384] <= bound < dense / 500


class BytesTokenizer:
    """Token id = UTF-8 byte (vocab 256, like the tiny models); no special tokens."""

    bos_token_id = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": list(text.encode("utf-8"))}


def _tiny_report(**kwargs) -> AnalysisReport:
    model = sharpened("llama", attn_implementation="sdpa")
    args = dict(tokenizer=BytesTokenizer(), seq_len=96, samples=3, sink=2, window=16, last=8, threshold=0.2)
    return analyze(model, **(args | kwargs))


def test_same_input_same_report():
    a, b = _tiny_report().to_dict(), _tiny_report().to_dict()
    for d in (a, b):
        d.pop("timings")
    assert a == b
    assert a["calibration"]["samples"] == 3 and len(a["calibration"]["offsets"]) == 3
    other = _tiny_report(seed=1).to_dict()
    assert other["calibration"]["tokens_sha256"] != a["calibration"]["tokens_sha256"]


def test_bfloat16_model_within_the_error_of_the_reference_in_bfloat16():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, SEQ))
    exact = reference_mass(sharpened("llama"), ids).mean(-1)
    reference_bf16 = reference_mass(sharpened("llama", dtype=torch.bfloat16), ids).mean(-1)
    report = analyze_tokens(sharpened("llama", dtype=torch.bfloat16, attn_implementation="sdpa"), ids,
                            sink=SINK, window=RECENT, last=LAST)
    got = torch.tensor(report.head_lazy_ratios(), dtype=torch.float64)
    exact_heads, ref_heads = exact.mean(1), reference_bf16.mean(1)
    assert report.params["dtype"] == "bfloat16"
    assert (got - exact_heads).abs().max() <= 2 * (ref_heads - exact_heads).abs().max() + 1e-3


def test_report_round_trip_and_summary(tmp_path):
    report = _tiny_report()
    path = report.save(tmp_path / "sub" / "report.json")
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left behind
    text = path.read_text()
    assert json.loads(text) == json.loads(json.dumps(json.loads(text), sort_keys=True))
    loaded = AnalysisReport.load(path)
    assert loaded == report
    assert len(loaded.kv_head_long_context_scores()) == 4 and len(loaded.kv_head_long_context_scores()[0]) == 2
    summary = report.summary()
    assert len(json.dumps(summary)) < 1000
    assert summary["ranking"] == report.ranking and summary["params"]["window"] == 16
    assert summary["layer_lazy_ratios"] == [round(x, 4) for x in report.layer_lazy_ratios()]


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "does not exist"), ("{not json", "is not JSON"), ('{"schema_version": 99}', "schema_version 99"),
     ('{"schema_version": 1, "model_id": "m"}', "lacks field(s)"), ("[1, 2]", "not an analysis report")],
    ids=["missing", "not-json", "wrong-version", "missing-fields", "not-object"],
)
def test_report_load_errors(tmp_path, content, expected):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LightTransferError) as err:
        AnalysisReport.load(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_report_with_wrong_shapes_is_refused(tmp_path):
    data = _tiny_report().to_dict()
    data["kv_heads"]["long_context_mass"][0].append(0.5)
    (tmp_path / "r.json").write_text(json.dumps(data))
    with pytest.raises(LightTransferError, match=r"kv_heads.long_context_mass is not \[4\]\[2\]"):
        AnalysisReport.load(tmp_path / "r.json")


def test_heatmap_png(tmp_path):
    report = _tiny_report()
    path = plot_heatmap(report, tmp_path / "heat.png", lazy_fraction=0.5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lazy_layers(report, 0.5) == sorted(report.ranking[:2])


def test_bad_parameters_are_one_liners():
    model = make_tiny_model("llama")
    with pytest.raises(LightTransferError, match="not longer than --sink"):
        analyze(model, tokenizer=BytesTokenizer(), seq_len=64, sink=4, window=60)
    with pytest.raises(LightTransferError, match="beyond the model's 2048 positions"):
        analyze(model, tokenizer=BytesTokenizer(), seq_len=4096, window=64)
    with pytest.raises(LightTransferError, match="--last 100 is longer"):
        analyze_tokens(model, torch.zeros(1, 64, dtype=torch.long), sink=2, window=8, last=100)


@pytest.mark.cuda
def test_cuda_bfloat16_matches_cpu_float32():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 300))
    args = dict(sink=4, window=64, last=16)
    cpu = analyze_tokens(sharpened("llama", attn_implementation="sdpa"), ids, **args)
    cpu_bf16 = analyze_tokens(sharpened("llama", dtype=torch.bfloat16, attn_implementation="sdpa"), ids, **args)
    gpu = analyze_tokens(sharpened("llama", dtype=torch.bfloat16, attn_implementation="sdpa").cuda(), ids, **args)
    exact = torch.tensor(cpu.head_lazy_ratios())
    err_gpu = (torch.tensor(gpu.head_lazy_ratios()) - exact).abs().max()
    err_ref = (torch.tensor(cpu_bf16.head_lazy_ratios()) - exact).abs().max()
    assert gpu.params["device"].startswith("cuda")
    assert err_gpu <= 2 * err_ref + 2e-3


@pytest.mark.real_model
def test_real_model_first_layers_less_lazy(real_model):
    report = analyze(real_model, seq_len=1024, samples=1, sink=4, window=256, last=32)
    ratios = report.layer_lazy_ratios()
    assert report.num_layers == 30 and report.num_heads == 9 and report.num_kv_heads == 3
    assert all(0.0 <= r <= 1.0 for r in ratios)
    early, late = sum(ratios[:10]) / 10, sum(ratios[11:]) / 19
    assert early < late - 0.1, (early, late)
    assert report.fingerprint == real_model.fingerprint


@pytest.mark.cuda
def test_device_map_model_matches_single_device(tmp_path):
    """Layers placed by accelerate's device_map (GPU and CPU-offloaded) give the same report."""
    from transformers import AutoModelForCausalLM

    sharpened("llama", attn_implementation="sdpa").save_pretrained(tmp_path)
    placement = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0,
                 "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 0, "model.layers.3": "cpu"}
    spread = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=placement, dtype=torch.float32,
                                                  attn_implementation="sdpa")
    ids = torch.randint(0, 256, (2, 200))
    args = dict(sink=4, window=32, last=16)
    single = analyze_tokens(sharpened("llama", attn_implementation="sdpa"), ids, **args)
    mapped = analyze_tokens(spread, ids, **args)
    assert torch.allclose(torch.tensor(mapped.head_lazy_ratios()), torch.tensor(single.head_lazy_ratios()),
                          atol=1e-4)
