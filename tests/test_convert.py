"""convert: round trips through plain transformers, byte-identical tensors, safety, and one-line errors."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, run_cli
from lighttransfer.convert import convert
from lighttransfer.convert import weights as weights_module
from lighttransfer.convert.verify import safetensors_digests
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import HeadRoutingConfig, HybridConfig
from lighttransfer.loading import fingerprint_from_config, load_config, resolve_model_source
from safetensors import safe_open


@dataclass
class FakeReport:
    """The shape of an analysis report that convert reads (fingerprint, params, per-layer / per-head scores)."""

    fingerprint: str
    num_layers: int
    num_kv_heads: int
    lazy: list[float]
    scores: list[list[float]] | None = None
    model_id: str = "tiny"
    params: dict = field(default_factory=lambda: {"sink": 4, "recent": 16, "last": 8, "seq_len": 64, "samples": 2})
    calibration: dict = field(default_factory=lambda: {"source": "fake.txt"})
    head_score_method: str = "attention"

    def layer_lazy_ratios(self):
        return list(self.lazy)

    def layer_streaming_scores(self):
        return list(self.lazy)

    def kv_head_long_context_scores(self):
        return self.scores or [[1.0 - r] * self.num_kv_heads for r in self.lazy]

    def head_lazy_ratios(self):
        return [[r] * 4 for r in self.lazy]

    def summary(self):
        return {"layer_lazy_ratios": list(self.lazy)}


def _save(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    (path / "LICENSE").write_text("test license\n")
    (path / "tokenizer_config.json").write_text('{"model_max_length": 2048}\n')
    return path


@pytest.fixture(scope="module")
def source_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models: llama (GQA 4q/2kv) and qwen2 (4q/1kv), safetensors."""
    root = tmp_path_factory.mktemp("sources")
    return {arch: _save(make_tiny_model(arch), root / arch) for arch in ("llama", "qwen2")}


def _fingerprint(path: Path) -> str:
    source = resolve_model_source(path)
    return fingerprint_from_config(load_config(source), source)


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps captured output at 80 columns otherwise


# ---- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"], ids=lambda a: f"arch={a}")
def test_round_trip_is_the_dense_model_with_identical_tensors(arch, source_dirs, tmp_path):
    src = source_dirs[arch]
    out = tmp_path / "hybrid"
    result = convert(src, out=out, layers=[1, 3], sink=2, window=16)

    assert result.hybrid.streaming_layers == [1, 3]
    assert result.tensors_verified == len(safetensors_digests(src / "model.safetensors"))
    # same bytes on disk, tensor by tensor and file by file
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(src, ids), _logits(out, ids))
    # tokenizer/license files travel, the card and figure are written
    assert (out / "LICENSE").read_text() == "test license\n"
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "2 of 4" in card and "AutoModelForCausalLM.from_pretrained" in card and "lighttransfer.load" in card
    assert (out / "lighttransfer_layers.png").stat().st_size > 1000
    assert _no_leftovers(tmp_path) == []


@pytest.mark.parametrize("arch", ["llama", "qwen2"], ids=lambda a: f"arch={a}")
def test_block_survives_from_pretrained_save_pretrained(arch, source_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = convert(source_dirs[arch], out=tmp_path / "hybrid", layers=[0, 2], sink=4, window=32).out
    written = HybridConfig.from_model_config(json.loads((out / "config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert HybridConfig.from_model_config(model.config) == written
    model.save_pretrained(tmp_path / "resaved")
    again = HybridConfig.from_model_config(json.loads((tmp_path / "resaved" / "config.json").read_text()))
    assert again == written
    assert again.source["fingerprint"] == _fingerprint(source_dirs[arch])


def test_config_is_the_source_config_plus_the_block(source_dirs, tmp_path):
    src = source_dirs["llama"]
    out = convert(src, out=tmp_path / "hybrid", layers=[1]).out
    before = json.loads((src / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    assert after.pop("lighttransfer")["streaming_layers"] == [1]
    assert after == before


def test_sharded_safetensors_are_hard_linked_with_index(source_dirs, tmp_path):
    src = _save(make_tiny_model("llama"), tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1 and (src / "model.safetensors.index.json").is_file()
    out = convert(src, out=tmp_path / "hybrid", layers=[2]).out
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for name in shards:
        assert os.path.samefile(src / name, out / name)
    assert (out / "model.safetensors.index.json").read_bytes() == (src / "model.safetensors.index.json").read_bytes()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(src, ids), _logits(out, ids))


@pytest.mark.parametrize("sharded", [False, True], ids=["single-bin", "sharded-bin"])
def test_bin_source_becomes_safetensors_with_the_same_tensors(sharded, tmp_path):
    model = make_tiny_model("llama", tie_word_embeddings=True)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()  # shared storage
    src = tmp_path / "bin"
    src.mkdir()
    model.config.save_pretrained(src)
    names = sorted(state)
    if sharded:
        halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for file, part in halves.items():
            torch.save({n: state[n] for n in part}, src / file)
        index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
        (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, src / "pytorch_model.bin")

    result = convert(src, out=tmp_path / "hybrid", layers=[0, 3])
    out = result.out
    assert "converted" in result.weights
    assert not list(out.glob("*.bin"))
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] if sharded
                     else ["model.safetensors"])
    got = {}
    for file in files:
        with safe_open(out / file, "pt") as f:
            got.update({n: f.get_tensor(n) for n in f.keys()})
    assert sorted(got) == names
    for name in names:
        assert torch.equal(got[name], state[name]), name
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    assert torch.equal(_logits(out, ids), want)


# ---- selection from a report ---------------------------------------------------------------------------------


def test_report_drives_layer_choice_and_sidecar(source_dirs, tmp_path, caplog):
    src = source_dirs["llama"]
    report = FakeReport(_fingerprint(src), 4, 2, lazy=[0.2, 0.9, 0.4, 0.8])
    result = convert(src, out=tmp_path / "hybrid", report=report, ratio=0.5, sink=4, window=16)
    hybrid = result.hybrid
    assert hybrid.streaming_layers == [1, 3]
    assert hybrid.calibration["recent"] == 16 and hybrid.calibration["text"] == {"source": "fake.txt"}
    assert hybrid.report_summary["layer_lazy_ratios"] == report.lazy
    sidecar = json.loads((result.out / hybrid.sidecar).read_text())
    assert sidecar["layer_lazy_ratios"] == report.lazy and sidecar["fingerprint"] == report.fingerprint
    assert [r.reason for r in result.rows][1] == "among the laziest"
    assert not result.warnings


def test_report_with_other_window_warns(source_dirs, tmp_path, caplog):
    src = source_dirs["llama"]
    report = FakeReport(_fingerprint(src), 4, 2, lazy=[0.2, 0.9, 0.4, 0.8])
    with caplog.at_level("WARNING", logger="lighttransfer"):
        result = convert(src, out=tmp_path / "hybrid", report=report, ratio=0.25, window=64)
    assert any("window 16" in w and "window 64" in w for w in result.warnings)
    assert any("window 64" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_ties_at_the_cut_are_reported(source_dirs, tmp_path, granularity):
    from lighttransfer.convert.selection import tied_at_cut

    src = source_dirs["llama"]
    # gate-like scores: three layers at exactly the same score, two of which must stream
    report = FakeReport(_fingerprint(src), 4, 2, lazy=[1.0, 1.0, 1.0, 0.2], head_score_method="optimize")
    result = convert(src, out=tmp_path / "tied", report=report, ratio=0.5, sink=4, window=16,
                     granularity=granularity)
    tied = [w for w in result.warnings if "tie on score" in w]
    assert len(tied) == 1 and "--gate-l1" in tied[0]
    assert ("2 of the streaming layers" if granularity == "layer" else "4 of the streaming KV heads") in tied[0]
    untied = FakeReport(_fingerprint(src), 4, 2, lazy=[0.9, 1.0, 0.5, 0.2])
    result = convert(src, out=tmp_path / "untied", report=untied, ratio=0.5, sink=4, window=16,
                     granularity=granularity)
    assert not [w for w in result.warnings if "tie on score" in w]
    assert tied_at_cut([0.0, 0.0, 0.5, float("nan")], [0]) == 1
    assert tied_at_cut([0.0, 0.0, 0.5, float("nan")], [0, 1]) == 0 and tied_at_cut([1.0, 2.0], []) == 0


def test_head_granularity_writes_masks(source_dirs, tmp_path):
    src = source_dirs["llama"]
    scores = [[0.1, 0.9], [0.05, 0.02], [0.7, 0.8], [0.6, 0.3]]  # lowest 3 of 8: (1,1), (1,0), (0,0)
    report = FakeReport(_fingerprint(src), 4, 2, lazy=[0.5] * 4, scores=scores)
    result = convert(src, out=tmp_path / "hybrid", report=report, ratio=3 / 8, granularity="head", window=16)
    assert result.hybrid.streaming_layers == [1]
    assert result.hybrid.head_masks == {0: [True, False]}
    assert [r.kind for r in result.rows] == ["mixed", "streaming", "full", "full"]


def test_random_strategy_needs_no_analysis(source_dirs, tmp_path):
    result = convert(source_dirs["llama"], out=tmp_path / "hybrid", ratio=0.5, strategy="random", seed=1)
    assert len(result.hybrid.streaming_layers) == 2
    assert result.hybrid.report_summary["selection"]["strategy"] == "random"


def test_report_for_another_model_is_refused(source_dirs, tmp_path):
    report = FakeReport(_fingerprint(source_dirs["qwen2"]), 4, 1, lazy=[0.1] * 4, model_id="other")
    with pytest.raises(LightTransferError, match="report was made for model 'other'"):
        convert(source_dirs["llama"], out=tmp_path / "hybrid", report=report)
    assert not (tmp_path / "hybrid").exists() and _no_leftovers(tmp_path) == []


# ---- native sliding-window fields ----------------------------------------------------------------------------


def test_native_swa_qwen2_loads_in_stock_transformers_with_windows(source_dirs, tmp_path, caplog):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = source_dirs["qwen2"]
    with caplog.at_level("WARNING", logger="lighttransfer"):
        out = convert(src, out=tmp_path / "hybrid", layers=[1, 3], sink=4, window=8, native_swa=True).out
    assert any("without sink tokens" in r.getMessage() for r in caplog.records)
    config = AutoConfig.from_pretrained(out)
    assert config.layer_types == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert config.sliding_window == 8
    # below num_hidden_layers: stock vLLM's Qwen2 refuses the mixed layer types instead of running them all full
    assert config.max_window_layers == 1 < config.num_hidden_layers
    assert HybridConfig.from_model_config(config).native_swa
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, 8, None, 8]
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    dense = _logits(src, ids)
    with torch.no_grad():
        windowed = model(ids).logits
    # identical while every key is inside the window, different once keys fall out of it
    torch.testing.assert_close(windowed[:, :8], dense[:, :8], rtol=1e-5, atol=1e-5)
    assert (windowed[:, 12:] - dense[:, 12:]).abs().max() > 1e-3
    assert _fingerprint(out) == _fingerprint(src)


# ---- safety --------------------------------------------------------------------------------------------------


def test_interrupted_write_leaves_nothing(source_dirs, tmp_path, monkeypatch):
    real = weights_module.link_or_copy

    def copy_then_interrupt(src, dst):
        real(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(weights_module, "link_or_copy", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(source_dirs["llama"], out=tmp_path / "hybrid", layers=[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupt_through_cli_is_one_line(source_dirs, tmp_path, monkeypatch, capsys):
    def interrupt(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(weights_module, "link_or_copy", interrupt)
    code, _, err = run_cli(["convert", str(source_dirs["llama"]), "--layers", "1", "--out", str(tmp_path / "h")], capsys)
    # click turns Ctrl-C into its Abort, which the CLI reports as one line
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_a_clear_error_and_leaves_nothing(source_dirs, tmp_path, monkeypatch):
    def disk_full(src, dst):
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights_module, "link_or_copy", disk_full)
    with pytest.raises(LightTransferError, match="is full"):
        convert(source_dirs["llama"], out=tmp_path / "hybrid", layers=[1])
    assert list(tmp_path.iterdir()) == []


def test_corrupted_copy_is_caught_by_verification(source_dirs, tmp_path, monkeypatch):
    def bad_copy(src, dst):
        data = bytearray(Path(src).read_bytes())
        data[-1] ^= 0xFF  # flip bits in the last tensor
        Path(dst).write_bytes(bytes(data))
        return "copied"

    monkeypatch.setattr(weights_module, "link_or_copy", bad_copy)
    with pytest.raises(LightTransferError, match="differs from the source"):
        convert(source_dirs["llama"], out=tmp_path / "hybrid", layers=[1])
    assert list(tmp_path.iterdir()) == []


def test_overwrite_needs_force_and_force_replaces(source_dirs, tmp_path, capsys):
    out = tmp_path / "hybrid"
    convert(source_dirs["llama"], out=out, layers=[1])
    with pytest.raises(LightTransferError, match="already exists"):
        convert(source_dirs["llama"], out=out, layers=[2])
    convert(source_dirs["llama"], out=out, layers=[2], force=True)
    assert HybridConfig.from_model_config(json.loads((out / "config.json").read_text())).streaming_layers == [2]
    assert _no_leftovers(tmp_path) == []


def test_force_does_not_delete_unrelated_directories(source_dirs, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(LightTransferError, match="without config.json"):
        convert(source_dirs["llama"], out=precious, layers=[1], force=True)
    assert (precious / "todo.txt").read_text() == "keep me"


# ---- CLI -----------------------------------------------------------------------------------------------------


def test_cli_convert_prints_the_selection_table(source_dirs, tmp_path, capsys):
    code, out, err = run_cli(["convert", str(source_dirs["qwen2"]), "--layers", "0-1,3", "--window", "64",
                              "--out", str(tmp_path / "h")], capsys)
    assert code == 0, err
    assert "chosen by hand" in out and "wrote" in out and "3 of 4 layers streaming" in out
    assert HybridConfig.from_model_config(json.loads((tmp_path / "h" / "config.json").read_text())).streaming_layers == [0, 1, 3]


BAD_INPUTS = {
    "ratio-zero": (["--ratio", "0"], "--ratio"),
    "ratio-above-one": (["--ratio", "1.5"], "--ratio"),
    "unknown-layer": (["--layers", "1,9"], "no such layer"),
    "unknown-keep": (["--layers", "1", "--keep", "4"], "no such layer"),
    "window-zero": (["--layers", "1", "--window", "0"], "--window"),
    "sink-negative": (["--layers", "1", "--sink", "-1"], "--sink"),
    "layers-not-numbers": (["--layers", "a,b"], "--layers"),
    "head-with-layers": (["--layers", "1", "--granularity", "head"], "--layers"),
    "native-swa-llama": (["--layers", "1", "--native-swa"], "layer_types"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_error_without_traceback(case, source_dirs, tmp_path, capsys):
    extra, needle = BAD_INPUTS[case]
    code, out, err = run_cli(["convert", str(source_dirs["llama"]), "--out", str(tmp_path / "h"), *extra], capsys)
    assert code != 0
    assert "Traceback" not in err + out
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not (tmp_path / "h").exists() and _no_leftovers(tmp_path) == []


def test_cli_refuses_existing_out_and_missing_model(source_dirs, tmp_path, capsys):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "config.json").write_text("{}")
    code, _, err = run_cli(["convert", str(source_dirs["llama"]), "--layers", "1", "--out", str(tmp_path / "h")], capsys)
    assert code != 0 and "--force" in err and "Traceback" not in err
    code, _, err = run_cli(["convert", str(tmp_path / "nowhere"), "--layers", "1", "--out", str(tmp_path / "x")], capsys)
    assert code != 0 and "does not exist" in err and len(err.strip().splitlines()) == 1


# ---- with a real analysis report -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report_path(source_dirs, tmp_path_factory) -> Path:
    """A real analysis report of the saved tiny llama, on random tokens (sink 4, window 16, last 8)."""
    from lighttransfer.analysis.pipeline import analyze_tokens
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source_dirs["llama"], dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    report = analyze_tokens(model, ids, sink=4, window=16, last=8, model_id="tiny-llama")
    return report.save(tmp_path_factory.mktemp("report") / "report.json")


def test_cli_convert_with_a_real_report(source_dirs, tiny_report_path, tmp_path, capsys):
    from lighttransfer.analysis.report import AnalysisReport

    report = AnalysisReport.load(tiny_report_path)
    code, out, err = run_cli(["convert", str(source_dirs["llama"]), "--report", str(tiny_report_path),
                              "--ratio", "0.5", "--sink", "4", "--window", "16", "--out", str(tmp_path / "h")], capsys)
    assert code == 0, err
    assert "among the laziest" in out
    hybrid = HybridConfig.from_model_config(json.loads((tmp_path / "h" / "config.json").read_text()))
    assert hybrid.streaming_layers == sorted(report.ranking[:2])
    assert hybrid.calibration["window"] == 16 and hybrid.report_summary["ranking"] == report.ranking
    sidecar = json.loads((tmp_path / "h" / hybrid.sidecar).read_text())
    assert sidecar["kv_head_long_context_scores"] == report.kv_head_long_context_scores()
    assert len(sidecar["head_lazy_ratios"]) == 4 and len(sidecar["head_lazy_ratios"][0]) == 4
    assert (tmp_path / "h" / "lighttransfer_heatmap.png").is_file()


def test_cli_refuses_a_report_of_another_model(source_dirs, tiny_report_path, tmp_path, capsys):
    code, out, err = run_cli(["convert", str(source_dirs["qwen2"]), "--report", str(tiny_report_path),
                              "--out", str(tmp_path / "h")], capsys)
    assert code != 0 and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1 and "report was made for model 'tiny-llama'" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_analysis_options_fail_before_loading(source_dirs, tmp_path, capsys):
    code, _, err = run_cli(["convert", str(source_dirs["llama"]), "--calib", str(tmp_path / "missing.txt"),
                            "--out", str(tmp_path / "h")], capsys)
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_out_cannot_be_the_source_itself(source_dirs):
    src = source_dirs["llama"]
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(LightTransferError, match="where the source model lives"):
        convert(src, out=src, layers=[1], force=True)
    assert sorted(p.name for p in src.iterdir()) == before


def test_package_level_convert_model(source_dirs, tmp_path):
    import lighttransfer

    result = lighttransfer.convert_model(source_dirs["qwen2"], out=tmp_path / "h", layers=[2])
    assert result.hybrid.streaming_layers == [2]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "qwen2_moe"])
def test_native_swa_makes_vllm_qwen_refuse_mixed_layers_instead_of_running_them_full(model_type):
    """vLLM's Qwen2Model accepts mixed layer_types only when max_window_layers == num_hidden_layers, and then runs
    every layer full; the fields we write always fail that check when the layers mix, and are uniform otherwise."""
    from lighttransfer.convert.native_swa import native_swa_fields

    mixed = native_swa_fields(model_type, HybridConfig(num_layers=6, num_kv_heads=2, streaming_layers=[2, 5]))
    assert len(set(mixed["layer_types"])) > 1 and mixed["max_window_layers"] == 2 < 6
    everything = native_swa_fields(model_type, HybridConfig(num_layers=3, num_kv_heads=2, streaming_layers=[0, 1, 2]))
    assert set(everything["layer_types"]) == {"sliding_attention"}  # vLLM then slides every layer
    assert "max_window_layers" not in native_swa_fields("gemma2", HybridConfig(num_layers=3, num_kv_heads=2,
                                                                                  streaming_layers=[1]))


def test_sparse_prefill_options_write_the_block_entry_and_load(source_dirs, tmp_path, capsys):
    """--prefill-sparse/--prefill-alpha/--prefill-min-len store the optional entry; load reads it back."""
    from lighttransfer import load
    from lighttransfer.runtime import runtime_of

    src = source_dirs["llama"]
    out = tmp_path / "hybrid"
    code, stdout, stderr = run_cli(["convert", str(src), "--out", str(out), "--layers", "1", "--prefill-sparse",
                                    "vslash", "--prefill-alpha", "0.9", "--prefill-min-len", "64"], capsys)
    assert code == 0, stderr
    block = json.loads((out / "config.json").read_text())["lighttransfer"]
    assert block["sparse_prefill"]["method"] == "vslash"
    assert block["sparse_prefill"]["alpha"] == 0.9 and block["sparse_prefill"]["min_len"] == 64
    model = load(out, device="cpu", dtype=torch.float32)
    assert runtime_of(model).sparse_prefill.config.alpha == 0.9
    plain = tmp_path / "plain"
    convert(src, out=plain, layers=[1])
    assert "sparse_prefill" not in json.loads((plain / "config.json").read_text())["lighttransfer"]


@pytest.mark.parametrize("args, message", [(["--prefill-alpha", "0.9"], "need --prefill-sparse"),
                                           (["--prefill-sparse", "sample", "--prefill-alpha", "1.5"],
                                            "prefill_alpha must be in")])
def test_sparse_prefill_options_bad_values_are_one_line(source_dirs, tmp_path, capsys, args, message):
    out = tmp_path / "hybrid"
    code, stdout, stderr = run_cli(["convert", str(source_dirs["llama"]), "--out", str(out), "--layers", "1", *args],
                                   capsys)
    assert code != 0 and message in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_heads_guard_keeps_the_highest_scoring_heads_of_the_full_layers(source_dirs, tmp_path):
    src = source_dirs["llama"]
    scores = [[0.1, 0.9], [0.95, 0.99], [0.7, 0.3], [0.6, 0.2]]  # layers 1 and 3 stream: their scores do not count
    report = FakeReport(_fingerprint(src), 4, 2, lazy=[0.2, 0.9, 0.4, 0.8], scores=scores)
    routing = HeadRoutingConfig(mode="qada", tau=0.1)
    result = convert(src, out=tmp_path / "guarded", report=report, ratio=0.5, sink=4, window=16,
                     head_routing=routing, routing_full_share=0.5)  # 2 of the 4 full-layer KV heads
    assert result.hybrid.streaming_layers == [1, 3]
    stored = result.hybrid.head_routing_config()
    assert stored.guard == "heads" and stored.full_masks == {0: [False, True], 2: [True, False]}
    assert stored.tau == 0.1
    with pytest.raises(LightTransferError, match="needs --head-routing qada"):
        convert(src, out=tmp_path / "bad", report=report, ratio=0.5, routing_full_share=0.5)
    with pytest.raises(LightTransferError, match=r"must be in \(0, 1\]"):
        convert(src, out=tmp_path / "bad", report=report, ratio=0.5, head_routing=routing, routing_full_share=0)
    with pytest.raises(LightTransferError, match="pass --report"):
        convert(src, out=tmp_path / "bad", layers=[1], head_routing=routing, routing_full_share=0.5)
    assert not (tmp_path / "bad").exists()
