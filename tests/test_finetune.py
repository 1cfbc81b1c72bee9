"""``lighttransfer finetune`` on a tiny random hybrid (Llama, GQA, tied embeddings, layers 1 and 3 streaming):
the training attention is the runtime's, the loss falls, the merged checkpoint loads and generates, the adapter
loads with peft, a resumed run continues exactly, and bad input is one line before any training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from conftest import run_cli as run
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import FinetuneRecord, HybridConfig
from test_runtime_reference import word_tokenizer

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'lighttransfer[finetune]')")

SINK, WINDOW = 2, 8
SEQ = 48


def _pattern_text(n: int, step: int) -> str:
    return " ".join(f"w{3 + (i * step) % 60}" for i in range(n))


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft") / "hybrid"
    model = make_tiny_model("llama", tie_word_embeddings=True)
    HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[1, 3], sink=SINK, window=WINDOW).attach(model.config)
    model.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    (d.parent / "train.txt").write_text(_pattern_text(6000, 7))
    return d


def _settings(**kw):
    from lighttransfer.training import FinetuneSettings

    base = dict(seq_len=SEQ, steps=20, batch=4, lr=1e-2, warmup_steps=2, train_norms=True, train_embeddings=True)
    return FinetuneSettings(**dict(base, **kw))


def _finetune(hybrid, out, **kw):
    from lighttransfer.training import finetune

    settings = kw.pop("settings", None) or _settings()
    return finetune(hybrid, data=[str(hybrid.parent / "train.txt")], out=out, settings=settings, device="cpu", **kw)


@pytest.fixture(scope="module")
def merged(hybrid):
    return _finetune(hybrid, hybrid.parent / "merged")


def test_training_attention_without_s2_is_the_runtime_attention(hybrid):
    """Streaming layers train with the attention they run: the training forward equals lighttransfer.load's."""
    import lighttransfer
    from lighttransfer.runtime import resolve_layout
    from lighttransfer.training import TrainingAttention, training_attention

    ids = torch.randint(3, 60, (2, 40), generator=torch.Generator().manual_seed(0))
    runtime = lighttransfer.load(hybrid, device="cpu")
    plain = make_tiny_model("llama", tie_word_embeddings=True)
    with torch.no_grad():
        expected = runtime(ids, use_cache=False).logits
        dense = plain(ids).logits
        state = TrainingAttention(layout=resolve_layout(runtime.config), s2_attn=False)
        with training_attention(plain, state):
            got = plain(ids, use_cache=False).logits
        after = plain(ids).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert (dense - expected).abs().max().item() > 1e-3  # the streaming masks matter at this length
    assert torch.equal(after, dense)  # leaving the block restores the model's own attention
    assert plain.config._attn_implementation == "sdpa"


def test_s2_attn_changes_only_what_the_full_layers_see(hybrid):
    """With S²-Attn on, the first group's tokens are unchanged (every head sees all of its causal past there) and
    later tokens differ from dense training attention."""
    import lighttransfer
    from lighttransfer.runtime import resolve_layout
    from lighttransfer.training import TrainingAttention, training_attention

    config = lighttransfer.load(hybrid, device="cpu").config
    model = make_tiny_model("llama", tie_word_embeddings=True)
    ids = torch.randint(3, 60, (1, 40), generator=torch.Generator().manual_seed(1))
    out = {}
    with torch.no_grad():
        for s2 in (False, True):
            with training_attention(model, TrainingAttention(layout=resolve_layout(config), s2_attn=s2)):
                out[s2] = model(ids, use_cache=False).logits
    half_group = 40 // 4 // 2  # shifted heads' first group is [0, G/2)
    assert (out[True][:, :half_group] - out[False][:, :half_group]).abs().max().item() < 1e-5
    assert (out[True][:, 20:] - out[False][:, 20:]).abs().max().item() > 1e-4


def test_loss_falls_and_the_merged_checkpoint_loads_and_generates(hybrid, merged, capsys):
    import lighttransfer
    from transformers import AutoModelForCausalLM

    losses = merged.losses
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    record = merged.record
    assert record.output == "merged" and record.steps == 20 and record.tokens == 20 * 4 * SEQ
    assert record.data["tokens_sha256"] and record.data["rows"] >= 1
    assert record.settings["s2_attn"] and record.settings["lora_r"] == 8 and record.settings["train_embeddings"]
    assert record.versions["peft"] == peft.__version__
    config = json.loads((merged.out / "config.json").read_text())
    block = HybridConfig.from_model_config(config)
    # the block is the hybrid's own, unchanged (older readers read it); the record sits beside it
    assert block.to_dict() == HybridConfig.from_model_config(json.loads((hybrid / "config.json").read_text())).to_dict()
    assert FinetuneRecord.from_model_config(config).final_loss == record.final_loss

    code, shown, _ = run(["inspect", str(merged.out)], capsys)
    assert code == 0 and "fine-tuned: 20 steps" in shown and "S²-Attn" in shown

    model = lighttransfer.load(merged.out, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stay tied
    dense = AutoModelForCausalLM.from_pretrained(hybrid)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight)
    tok = word_tokenizer()
    ids = tok(_pattern_text(36, 7), return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids[:, :30], max_new_tokens=6, do_sample=False)
    assert out.shape[1] == 36
    # what was learned is what loads: the next-token accuracy on the pattern, through the hybrid runtime
    with torch.no_grad():
        after = (model(ids, use_cache=False).logits.argmax(-1)[0, :-1] == ids[0, 1:]).float().mean().item()
        before = (lighttransfer.load(hybrid, device="cpu")(ids, use_cache=False).logits.argmax(-1)[0, :-1]
                  == ids[0, 1:]).float().mean().item()
    assert before < 0.1 and after > 0.5, (before, after)


def test_adapter_only_loads_with_peft_and_matches_the_merged_model(hybrid, merged):
    import lighttransfer
    from peft import PeftModel

    result = _finetune(hybrid, hybrid.parent / "adapter", adapter_only=True)
    assert (result.out / "adapter_config.json").is_file() and (result.out / "adapter_model.safetensors").is_file()
    assert FinetuneRecord.from_dict(json.loads((result.out / "lighttransfer_finetune.json").read_text())).output == "adapter"
    assert result.losses == pytest.approx(merged.losses, rel=1e-4)  # same seed, same rows, same steps

    with_adapter = PeftModel.from_pretrained(lighttransfer.load(hybrid, device="cpu"), result.out)
    merged_model = lighttransfer.load(merged.out, device="cpu")
    ids = torch.randint(3, 60, (1, 36), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = with_adapter(ids, use_cache=False).logits
        b = merged_model(ids, use_cache=False).logits
    assert (a - b).abs().max().item() < 1e-3
    generated = with_adapter.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == 40


def test_resume_continues_exactly(hybrid, tmp_path):
    settings = _settings(steps=4, train_embeddings=False)
    whole = _finetune(hybrid, tmp_path / "whole", settings=settings)
    first = _finetune(hybrid, tmp_path / "first", settings=_settings(steps=2, train_embeddings=False), save_every=2)
    assert first.state_dir == (tmp_path / "first.state") and (first.state_dir / "state.json").is_file()
    resumed = _finetune(hybrid, tmp_path / "resumed", settings=settings, resume=first.state_dir)
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(str(whole.out / "model.safetensors")), load_file(str(resumed.out / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    with pytest.raises(LightTransferError, match="lora_r"):
        _finetune(hybrid, tmp_path / "other", settings=_settings(steps=4, lora_r=4, train_embeddings=False),
                  resume=first.state_dir)
    with pytest.raises(LightTransferError, match="already done"):
        _finetune(hybrid, tmp_path / "again", settings=_settings(steps=2, train_embeddings=False),
                  resume=first.state_dir)


def test_the_cli_trains_and_prints_the_share_and_the_loss(hybrid, tmp_path, capsys):
    out = tmp_path / "cli-out"
    code, stdout, stderr = run(["finetune", str(hybrid), "--data", str(hybrid.parent / "train.txt"), "--seq-len",
                                str(SEQ), "--steps", "3", "--batch", "2", "--lr", "1e-3", "--out", str(out),
                                "--no-s2-attn", "--device", "cpu"], capsys)
    assert code == 0, stderr
    assert f"wrote {out}" in stdout
    assert "trainable of" in stderr and "loss " in stderr and "tok/s" in stderr
    assert FinetuneRecord.from_model_config(json.loads((out / "config.json").read_text())).settings["s2_attn"] is False


@pytest.mark.parametrize("argv,message", [
    (["--data", "missing.txt"], "--data 'missing.txt': no such file"),
    (["--data", "{binary}"], "looks like a binary file"),
    (["--data", "{train}", "--out", "{hybrid}"], "--out must differ from HYBRID"),
    (["--data", "{train}", "--out", "{existing}"], "already exists; pass --force"),
    (["--data", "{train}", "--seq-len", "4096"], "beyond the model's 2048 positions"),
    (["--data", "{train}", "--group-frac", "0"], "--group-frac must be in (0, 1]"),
    (["--data", "{train}", "--resume", "{existing}"], "holds no state.json"),
    (["--data", "{short}"], "fewer than one row of --seq-len"),
], ids=["missing", "binary", "out-is-input", "out-exists", "seq-len", "group-frac", "resume", "short"])
def test_bad_input_is_one_line_and_writes_nothing(hybrid, tmp_path, capsys, argv, message):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "short.txt").write_text("w3 w4 w5")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    names = {"binary": tmp_path / "bin.txt", "train": hybrid.parent / "train.txt", "hybrid": hybrid,
             "existing": existing, "short": tmp_path / "short.txt"}
    argv = [a.format(**names) for a in argv]
    out = tmp_path / "out"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    code, _, stderr = run(["finetune", str(hybrid), "--steps", "2", "--seq-len", str(SEQ), *argv, "--device", "cpu"]
                          if "--seq-len" not in argv else ["finetune", str(hybrid), "--steps", "2", *argv, "--device",
                                                          "cpu"], capsys)
    assert code != 0
    assert message in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_plain_model_is_refused(tiny_model_dir, hybrid, tmp_path, capsys):
    code, _, stderr = run(["finetune", str(tiny_model_dir), "--data", str(hybrid.parent / "train.txt"), "--steps", "1",
                           "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert code == 1 and "no 'lighttransfer' block" in stderr


def test_the_record_sits_beside_the_block_and_survives_save_pretrained(merged, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(merged.out).save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert FinetuneRecord.from_model_config(config) == merged.record
    assert "finetune" not in config["lighttransfer"]  # a reader of the block sees a plain hybrid
    assert FinetuneRecord.from_model_config({"lighttransfer": config["lighttransfer"]}) is None
    with pytest.raises(LightTransferError, match="damaged: finetune record schema_version"):
        FinetuneRecord.from_model_config({"lighttransfer_finetune": dict(merged.record.to_dict(), schema_version=9)})
    with pytest.raises(LightTransferError, match="final_loss"):
        FinetuneRecord(output="merged", steps=1, tokens=1, final_loss=float("nan"), first_loss=None)


@pytest.mark.cuda
@pytest.mark.parametrize("s2", [True, False], ids=["s2", "no-s2"])
def test_flex_backend_matches_the_explicit_masks_on_cuda(hybrid, s2):
    """FlexAttention block masks (CUDA), explicit-mask SDPA and (with S²-Attn) the grouped causal path give the same
    loss and LoRA gradients, bf16."""
    import lighttransfer
    from lighttransfer.runtime import resolve_layout
    from lighttransfer.training import TrainingAttention, training_attention
    from lighttransfer.training.lora import add_lora

    layout = resolve_layout(lighttransfer.load(hybrid, device="cpu").config)
    ids = torch.randint(3, 60, (2, 256), generator=torch.Generator().manual_seed(4)).cuda()
    results = {}
    variants = {"flex": ("flex", False), "dense": ("dense", False)}
    if s2:
        variants["grouped"] = ("flex", True)
    for variant, (backend, grouped) in variants.items():
        model = add_lora(make_tiny_model("llama", tie_word_embeddings=True).cuda(), r=4, alpha=8)
        for name, p in model.named_parameters():  # B = 0 at init: give the gradients of A something to show
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        state = TrainingAttention(layout=layout, s2_attn=s2, backend=backend, grouped_s2=grouped)
        with training_attention(model, state):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        grads = torch.cat([p.grad.flatten().float() for n, p in model.named_parameters() if p.grad is not None])
        results[variant] = (loss.item(), grads)
    for variant in variants:
        assert results[variant][0] == pytest.approx(results["dense"][0], rel=1e-2), variant
        err = (results[variant][1] - results["dense"][1]).norm() / results["dense"][1].norm()
        assert err.item() < 5e-2, variant


def test_a_checkpoint_that_streams_no_layer_trains_every_layer_full(tmp_path):
    """The control run of the recovery benchmark (the original fine-tuned the same way): a block with no
    streaming layer fine-tunes with a warning, S²-Attn on every layer, and its output loads and generates."""
    import lighttransfer

    d = tmp_path / "reference"
    model = make_tiny_model("llama", tie_word_embeddings=True)
    HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[], sink=SINK, window=WINDOW).attach(model.config)
    model.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    (tmp_path / "train.txt").write_text(_pattern_text(3000, 7))
    from lighttransfer.training import finetune

    result = finetune(d, data=[str(tmp_path / "train.txt")], out=tmp_path / "out", settings=_settings(steps=3),
                      device="cpu")
    assert result.losses and len(result.losses) == 3
    loaded = lighttransfer.load(tmp_path / "out", device="cpu")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    assert loaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 9)


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_rope_scaling_extends_the_context_into_the_merged_checkpoint(tmp_path, kind):
    """--rope-scaling: a hybrid of 32 positions trains on 48-token rows at factor 2; the output's config holds
    the scaled RoPE and 64 positions, and the checkpoint loads with the scaled frequencies and generates."""
    import lighttransfer
    from lighttransfer.training import finetune

    d = tmp_path / "short"
    model = make_tiny_model("llama", tie_word_embeddings=True, max_position_embeddings=32)
    base_freq = model.model.rotary_emb.inv_freq.clone()
    HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[1, 3], sink=SINK, window=WINDOW).attach(model.config)
    model.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    (tmp_path / "train.txt").write_text(_pattern_text(3000, 7))
    starts = []
    result = finetune(d, data=[str(tmp_path / "train.txt")], out=tmp_path / "out", device="cpu",
                      settings=_settings(steps=2, rope_scaling=kind, rope_factor=2.0), on_start=starts.append)
    assert starts[0].rope.positions == 64 and starts[0].rope.original_positions == 32
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == 64
    assert config["rope_parameters"]["rope_type"] == kind and config["rope_parameters"]["factor"] == 2.0
    if kind == "yarn":
        assert config["rope_parameters"]["original_max_position_embeddings"] == 32
    assert result.record.settings["rope"] == {"kind": kind, "factor": 2.0, "original_positions": 32, "positions": 64}
    loaded = lighttransfer.load(tmp_path / "out", device="cpu")
    freq = loaded.model.rotary_emb.inv_freq
    if kind == "linear":  # position interpolation: every frequency halved
        torch.testing.assert_close(freq, base_freq / 2)
    else:  # YaRN keeps the highest frequency and interpolates the lowest
        assert freq[0] == pytest.approx(base_freq[0].item()) and freq[-1] == pytest.approx(base_freq[-1].item() / 2)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    assert loaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 9)


@pytest.mark.parametrize("argv,message", [
    (["--rope-factor", "2"], "--rope-factor needs --rope-scaling"),
    (["--rope-scaling", "linear"], "needs --rope-factor above 1"),
    (["--rope-scaling", "linear", "--rope-factor", "1"], "needs --rope-factor above 1"),
    (["--rope-scaling", "yarn", "--rope-factor", "2", "--adapter-only"], "leave out --adapter-only"),
    (["--rope-scaling", "linear", "--rope-factor", "1.5", "--seq-len", "4096"], "x 1.5 (--rope-factor) = 3072"),
    (["--rope-scaling", "linear", "--rope-factor", "2", "--seq-len", "{seq}", "--data", "{train}", "--out",
      "{scaled_out}", "HYBRID={scaled}"], "already scales its RoPE"),
], ids=["factor-alone", "no-factor", "factor-1", "adapter", "too-long", "already-scaled"])
def test_rope_scaling_bad_input_is_one_line(hybrid, tmp_path, capsys, argv, message):
    scaled = tmp_path / "scaled"
    model = make_tiny_model("llama", tie_word_embeddings=True,
                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[1], sink=SINK, window=WINDOW).attach(model.config)
    model.save_pretrained(scaled)
    word_tokenizer().save_pretrained(scaled)
    capsys.readouterr()  # the save's own progress line
    names = {"seq": str(SEQ), "train": str(hybrid.parent / "train.txt"), "scaled": str(scaled),
             "scaled_out": str(tmp_path / "scaled_out")}
    argv = [a.format(**names) for a in argv]
    source = str(hybrid)
    if argv[-1].startswith("HYBRID="):
        source = argv.pop().removeprefix("HYBRID=")
    out = tmp_path / "out"
    base = ["finetune", source, "--steps", "1", "--device", "cpu"]
    if "--data" not in argv:
        base += ["--data", str(hybrid.parent / "train.txt"), "--out", str(out)]
    if "--seq-len" not in argv:
        base += ["--seq-len", str(SEQ)]
    code, _, stderr = run(base + argv, capsys)
    assert code != 0 and message in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "scaled_out").exists()
