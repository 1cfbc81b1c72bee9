"""``lighttransfer generate`` on a hybrid directory built in the test (tiny Llama + word tokenizer + block)."""

from __future__ import annotations

import lighttransfer
import pytest
from conftest import make_tiny_model
from conftest import run_cli as run
from lighttransfer.hybrid_format.config_block import HybridConfig
from test_runtime_reference import word_tokenizer

PROMPT = " ".join(f"w{i}" for i in range(10, 60))


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hybrid-cli")
    model = make_tiny_model("llama")
    HybridConfig(num_layers=4, num_kv_heads=2, streaming_layers=[1, 3], sink=2, window=8).attach(model.config)
    model.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


def test_generate_streams_the_greedy_text_and_reports_speed_and_memory(hybrid_dir, capsys):
    code, out, err = run(["generate", str(hybrid_dir), "--prompt", PROMPT, "--max-new-tokens", "6",
                          "--device", "cpu"], capsys)
    assert code == 0, err
    model = lighttransfer.load(hybrid_dir, device="cpu")
    tok = word_tokenizer()
    ids = tok(PROMPT, return_tensors="pt")
    want = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.split() == tok.decode(want[0, ids["input_ids"].shape[1]:]).split()
    assert "tokens/s" in err and "KV cache" in err and "dense" in err
    # 4 layers, 2 of them streaming with 10 slots, after 55 tokens: (2 * 55 + 2 * 10) / (4 * 55)
    assert f"({round(100 * (2 * 55 + 2 * 10) / (4 * 55))}%)" in err


def test_generate_with_cuda_graphs_on_the_cpu_runs_static_steps_eagerly_and_says_why(hybrid_dir, capsys):
    """``--cuda-graphs`` on the CPU: the static loop, eagerly, the same greedy text as transformers' generate."""
    code, out, err = run(["generate", str(hybrid_dir), "--prompt", PROMPT, "--max-new-tokens", "12",
                          "--device", "cpu", "--cuda-graphs"], capsys)
    assert code == 0, err
    model = lighttransfer.load(hybrid_dir, device="cpu")
    tok = word_tokenizer()
    ids = tok(PROMPT, return_tensors="pt")
    want = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.split() == tok.decode(want[0, ids["input_ids"].shape[1]:]).split()
    assert "decode: eager (CUDA graphs need a CUDA device" in err.replace("\n", " ")
    # the same cache bytes as the dynamic path: 2 full layers of 62 tokens, 2 streaming of 10 slots
    assert f"({round(100 * (2 * 62 + 2 * 10) / (4 * 62))}%)" in err


def test_generate_with_fused_ops_gives_the_stock_greedy_text(hybrid_dir, capsys):
    """``--fused-ops`` on the CPU (the kernels in the interpreter): the same greedy text as the stock forwards."""
    code, out, err = run(["generate", str(hybrid_dir), "--prompt", PROMPT, "--max-new-tokens", "6",
                          "--device", "cpu", "--fused-ops"], capsys)
    assert code == 0, err
    assert "fused ops: 4 attention, 4 mlp, 9 norm" in err
    model = lighttransfer.load(hybrid_dir, device="cpu", fused_ops=False)
    tok = word_tokenizer()
    ids = tok(PROMPT, return_tensors="pt")
    want = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.split() == tok.decode(want[0, ids["input_ids"].shape[1]:]).split()


def test_generate_from_a_prompt_file_with_sampling(hybrid_dir, tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_text(PROMPT)
    argv = ["generate", str(hybrid_dir), "--prompt-file", str(f), "--max-new-tokens", "5", "--temperature", "0.8",
            "--top-p", "0.9", "--seed", "3", "--device", "cpu", "-q"]
    first = run(argv, capsys)
    second = run(argv, capsys)
    assert first[0] == 0 and first[1] == second[1] and len(first[1].split()) == 5
    assert first[2] == ""  # quiet: no stats line


@pytest.mark.parametrize("argv, message", [
    ([], "exactly one of --prompt"),
    (["--prompt", "w3", "--prompt-file", "x.txt"], "exactly one of --prompt"),
    (["--prompt", "w3", "--chat"], "no chat template"),
    (["--prompt", "w3", "--max-new-tokens", "0"], "--max-new-tokens"),
], ids=["no-prompt", "two-prompts", "chat", "zero-tokens"])
def test_bad_invocations_are_one_line_errors(hybrid_dir, capsys, argv, message):
    code, _, err = run(["generate", str(hybrid_dir), "--device", "cpu", *argv], capsys)
    assert code != 0
    assert message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_generate_on_a_plain_directory_explains_what_to_do(tiny_model_dir, capsys):
    code, _, err = run(["generate", str(tiny_model_dir), "--prompt", "hi", "--device", "cpu"], capsys)
    assert code == 1 and "lighttransfer convert" in err



def test_generate_with_cuda_graphs_and_tokenselect_runs_the_static_steps(hybrid_dir, capsys):
    """TokenSelect's decode steps read the live length on the device: ``--cuda-graphs`` runs them as static steps
    (eagerly on the CPU) and prints transformers' generate's text."""
    code, out, err = run(["generate", str(hybrid_dir), "--prompt", PROMPT, "--max-new-tokens", "8",
                          "--device", "cpu", "--cuda-graphs", "--decode", "tokenselect", "--select-k", "4",
                          "--select-init", "2", "--select-local", "4"], capsys)
    assert code == 0, err
    assert "decode: eager (CUDA graphs need a CUDA device" in " ".join(err.split())
    assert "selections reused from the Selection Cache" in " ".join(err.split())  # counted on the device
    model = lighttransfer.load(hybrid_dir, device="cpu", decode="tokenselect", select_k=4, select_init=2,
                               select_local=4)
    tok = word_tokenizer()
    ids = tok(PROMPT, return_tensors="pt")
    want = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.split() == tok.decode(want[0, ids["input_ids"].shape[1]:]).split()
