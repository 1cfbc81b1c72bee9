"""The vLLM plugin end to end, on vLLM's CPU build: tiny random hybrids written by ``convert``, served by
``vllm.LLM`` in this process, against lighttransfer's own runtime and transformers.

Skipped (with the reason) where vLLM is not installed or is outside the supported range: the default test
environment does not carry vLLM; ``make test-vllm`` sets one up.
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch
from conftest import make_tiny_model
from lighttransfer.serving.vllm.version import unsupported_reason

_reason = unsupported_reason()
if _reason is None:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # an install that cannot import (e.g. leftover torchvision) is a skip, said
        _reason = f"vLLM is installed but does not import: {type(exc).__name__}: {exc}"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_reason is not None, reason=str(_reason))]

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its KV managers can be read
SINK, WINDOW, BLOCK = 4, 40, 32
PROMPTS = [[(7 * i + 3) % 250 + 3 for i in range(30)], [(11 * i + 5) % 250 + 3 for i in range(53)]]
NEW_TOKENS = 90  # 30 + 90 and 53 + 90 tokens: well past sink + window
# head_dim 32: vLLM's CPU attention kernel (the full layers) takes head sizes that are multiples of 32
SHAPE = dict(head_dim=32, hidden_size=128, num_attention_heads=4)


def _checkpoint(tmp_path_factory, arch: str, *, layers, native_swa=False, **overrides):
    from lighttransfer.convert import convert

    root = tmp_path_factory.mktemp(f"{arch}-hybrid")
    make_tiny_model(arch, **{**SHAPE, **overrides}).save_pretrained(root / "src")
    convert(root / "src", out=root / "hybrid", layers=layers, sink=SINK, window=WINDOW, native_swa=native_swa)
    return root


def _llm(path, **kwargs):
    from vllm import LLM

    options = dict(skip_tokenizer_init=True, dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=4,
                   kv_cache_memory_bytes=32 << 20, block_size=BLOCK, enable_prefix_caching=False)
    return LLM(str(path), **{**options, **kwargs})


def _vllm_greedy(llm, prompts=PROMPTS, new_tokens=NEW_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _runtime_greedy(path, prompts=PROMPTS, new_tokens=NEW_TOKENS) -> list[list[int]]:
    import lighttransfer

    model = lighttransfer.load(path, device="cpu", dtype=torch.float32)
    got = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
        got.append(out[0, len(p):].tolist())
    return got


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "llama", layers=[1, 2])


@pytest.fixture
def release():
    """Drop the engines a test made before the next one starts."""
    yield
    gc.collect()


def test_llama_hybrid_greedy_tokens_equal_the_runtime_and_differ_from_dense(llama, release):
    llm = _llm(llama / "hybrid", enable_prefix_caching=True)
    served = _vllm_greedy(llm)
    # the same prompts again, with prefix caching on: the streaming group reports no hit, so nothing stale is read
    assert _vllm_greedy(llm) == served
    del llm
    assert served == _runtime_greedy(llama / "hybrid")
    dense = _llm(llama / "src")
    assert _vllm_greedy(dense) != served  # the streaming layers changed something this test can see
    del dense


def test_chunked_prefill_of_a_long_prompt_equals_the_runtime(llama, release):
    """A 300-token prompt in steps of 64: the manager frees blocks between the chunks of one prefill, and the
    later chunks still find the sinks and their window."""
    prompts = [[(13 * i + 7) % 250 + 3 for i in range(300)], PROMPTS[0]]
    llm = _llm(llama / "hybrid", max_num_batched_tokens=64)
    served = _vllm_greedy(llm, prompts, 40)
    del llm
    assert served == _runtime_greedy(llama / "hybrid", prompts, 40)


@pytest.mark.parametrize("arch,layers", [("qwen2", [0, 2]), ("qwen3", [1])], ids=["qwen2-native-swa", "qwen3"])
def test_qwen_hybrids_greedy_tokens_equal_the_runtime(tmp_path_factory, arch, layers, release):
    """qwen2 written with --native-swa: the plugin ignores the sink-less layer_types and keeps the sinks."""
    root = _checkpoint(tmp_path_factory, arch, layers=layers, native_swa=arch == "qwen2")
    llm = _llm(root / "hybrid")
    served = _vllm_greedy(llm)
    del llm
    assert served == _runtime_greedy(root / "hybrid")


def _blocks(manager) -> list:
    """The block table of the one running request (vLLM keys it by its own request id)."""
    tables = list(manager.req_to_blocks.values())
    assert len(tables) <= 1
    return tables[0] if tables else []


def _held(manager) -> list[int]:
    return [b.block_id for b in _blocks(manager) if not b.is_null]


def test_streaming_group_blocks_stay_bounded_and_sinks_stay_resident(llama, release):
    from lighttransfer.serving.vllm.internals import kv_cache_managers
    from lighttransfer.serving.vllm.kv_cache import SinkWindowManager
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _llm(llama / "hybrid")
    managers = kv_cache_managers(llm)
    streaming = [m for m in managers if isinstance(m, SinkWindowManager)]
    full = [m for m in managers if not isinstance(m, SinkWindowManager)]
    assert streaming and full, [type(m).__name__ for m in managers]
    new_tokens = 300
    llm.llm_engine.add_request("long", TokensPrompt(prompt_token_ids=PROMPTS[0]),
                               SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    peak_streaming, peak_full, sink_id, freed, steps = 0, 0, None, 0, 0
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
        steps += 1
        for m in streaming:
            table = _blocks(m)
            if not table:
                continue
            peak_streaming = max(peak_streaming, len(_held(m)))
            freed = max(freed, sum(b.is_null for b in table))
            assert not table[0].is_null, "the sink block was freed"
            sink_id = sink_id or table[0].block_id
            assert table[0].block_id == sink_id, "the sink block moved"
        peak_full = max([peak_full, *(len(_held(m)) for m in full)])
    assert steps > new_tokens // 2 and sink_id is not None and freed > 0
    block = streaming[0].block_size
    total = len(PROMPTS[0]) + new_tokens
    bound = math.ceil(SINK / block) + math.ceil(WINDOW / block) + 2
    assert peak_full == math.ceil(total / full[0].block_size)  # full layers keep every token
    assert peak_streaming <= bound < math.ceil(total / block), (peak_streaming, bound, total)
    del llm


def test_vllm_reports_more_kv_capacity_for_the_hybrid(llama, release):
    """vLLM sizes a sliding group for the window plus one step's tokens in flight, so the saving shows once the
    context is long against a step: 2048 tokens, steps of 64."""
    capacity = {}
    for name in ("src", "hybrid"):
        llm = _llm(llama / name, max_model_len=2048, max_num_batched_tokens=64)
        capacity[name] = llm.llm_engine.vllm_config.cache_config.kv_cache_max_concurrency
        del llm
        gc.collect()
    # per request: dense 4 layers x 64 blocks; hybrid 2 x 64 + 2 x (1 sink + ~4 window-and-step blocks)
    assert capacity["hybrid"] >= 1.6 * capacity["src"], capacity


def test_window_only_llama_matches_transformers_windowed_reference(tmp_path, release):
    """A Llama whose config slides a window on every layer, through vLLM's own Llama (the plugin leaves a
    checkpoint without our block alone), against transformers' Mistral, the same weights with the same window."""
    from transformers import MistralConfig, MistralForCausalLM

    window = 24
    llama = make_tiny_model("llama", **SHAPE)
    llama.config.layer_types = ["sliding_attention"] * llama.config.num_hidden_layers
    llama.config.sliding_window = window
    llama.save_pretrained(tmp_path / "llama-swa")
    config = MistralConfig(**{k: v for k, v in llama.config.to_dict().items()
                              if k not in ("model_type", "architectures", "layer_types")})
    config.sliding_window = window
    mistral = MistralForCausalLM(config).eval()
    mistral.load_state_dict(llama.state_dict())
    prompt = PROMPTS[1]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = mistral.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
        full = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert ref != full  # the window matters at this length
    llm = _llm(tmp_path / "llama-swa")
    assert _vllm_greedy(llm, [prompt], 40) == [ref]
    del llm


def test_head_level_hybrids_are_refused_with_one_line(tmp_path_factory, release):
    from lighttransfer.convert import convert

    root = tmp_path_factory.mktemp("heads")
    make_tiny_model("llama", **SHAPE).save_pretrained(root / "src")
    convert(root / "src", out=root / "hybrid", strategy="random", granularity="head", ratio=0.5, sink=SINK,
            window=WINDOW)
    with pytest.raises(Exception, match="head-level hybrid") as info:
        _llm(root / "hybrid")
    assert "lighttransfer.load" in str(info.value)


def test_stock_vllm_refuses_a_native_swa_qwen2_loudly(tmp_path_factory):
    """Without the plugin (``VLLM_PLUGINS=""`` loads none), vLLM's own Qwen2 refuses what --native-swa wrote,
    instead of running every layer as full attention."""
    import subprocess
    import sys

    root = _checkpoint(tmp_path_factory, "qwen2", layers=[0, 2], native_swa=True)
    code = ("from vllm import LLM\n"
            f"LLM({str(root / 'hybrid')!r}, skip_tokenizer_init=True, dtype='float32', max_model_len=512, "
            "enforce_eager=True, kv_cache_memory_bytes=32 << 20, block_size=32)\n")
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "max_window_layers" in proc.stderr + proc.stdout
