"""What the vLLM plugin decides without vLLM: which checkpoints it serves, which it refuses, which vLLM it
accepts. (The end-to-end tests with vLLM itself are in test_vllm_plugin.py.)"""

from __future__ import annotations

import logging

import pytest
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import CONFIG_KEY, HybridConfig
from lighttransfer.serving.vllm import layout as layout_module
from lighttransfer.serving.vllm import version
from lighttransfer.serving.vllm.layout import served_layout


def _config(**block) -> dict:
    return {"num_hidden_layers": 4, CONFIG_KEY: HybridConfig(num_layers=4, num_kv_heads=2, **block).to_dict()}


def test_a_layer_level_hybrid_is_served_as_its_block_says():
    got = served_layout(_config(streaming_layers=[1, 3], sink=4, window=64))
    assert got.streaming_layers == {1, 3} and (got.sink, got.window, got.native_swa) == (4, 64, False)
    # a layer whose mask streams every KV head is a streaming layer too
    whole = served_layout(_config(head_masks={2: [True, True]}, granularity="head"))
    assert whole.streaming_layers == {2}


def test_a_checkpoint_without_the_block_is_left_to_vllm():
    assert served_layout({"num_hidden_layers": 4}) is None


def test_head_level_and_full_prefill_hybrids_are_refused_with_one_line():
    with pytest.raises(LightTransferError, match="head-level hybrid .*lighttransfer.load") as info:
        served_layout(_config(head_masks={1: [True, False]}, granularity="head"), origin="/m/hybrid")
    assert "\n" not in str(info.value) and "'/m/hybrid'" in str(info.value)
    with pytest.raises(LightTransferError, match="full prefill"):
        served_layout(_config(streaming_layers=[1], prefill="full"))
    with pytest.raises(LightTransferError, match="damaged"):
        served_layout({"num_hidden_layers": 4, CONFIG_KEY: {"format_version": 1}})
    assert layout_module.has_block(_config()) and not layout_module.has_block({})


def test_runtime_only_full_layer_methods_are_served_dense_and_said(caplog):
    from lighttransfer.hybrid_format import SparsePrefillConfig

    with caplog.at_level(logging.WARNING, logger=layout_module.__name__):
        plain = served_layout(_config(streaming_layers=[1]))
    assert plain.streaming_layers == {1} and not caplog.records
    both = _config(streaming_layers=[1], decode="tokenselect", select_k=64, select_init=4, select_local=16,
                   select_reuse=0.9, sparse_prefill=SparsePrefillConfig().to_dict())
    with caplog.at_level(logging.WARNING, logger=layout_module.__name__):
        got = served_layout(both, origin="/m/h")
    assert got.streaming_layers == {1}
    (record,) = caplog.records
    assert "TokenSelect decode and sparse prefill" in record.getMessage() and "'/m/h'" in record.getMessage()


@pytest.mark.parametrize("installed,ok", [("0.32.0", True), ("0.32.4+cpu", True), ("0.31.9", False),
                                          ("0.33.0", False), ("0.30.1.dev202609231158", False),
                                          ("0.26.0", True), ("0.26.1+cu130", True), ("0.25.1", False),
                                          ("0.27.0", False)])
def test_version_range(installed, ok):
    reason = version.unsupported_reason(installed)
    assert (reason is None) == ok
    if not ok:
        assert version.SUPPORTED_VLLM_SPEC in reason and "\n" not in reason
        with pytest.raises(LightTransferError, match=installed.split("+")[0]):
            version.check_vllm_version(installed)


def test_register_on_an_unsupported_vllm_registers_nothing_and_says_so(monkeypatch, caplog):
    import lighttransfer.serving.vllm as plugin

    monkeypatch.setattr(version, "installed_vllm", lambda: "0.20.0")
    monkeypatch.setattr(plugin, "_registered", False)
    with caplog.at_level(logging.WARNING, logger="lighttransfer"):
        plugin.register()
    assert not plugin._registered
    assert any("vLLM 0.20.0 is outside" in r.getMessage() and "dense" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("streaming,full,size,pads", [
    (16, 16, 16, (0, 0)), (12, 18, 12, (0, 6)), (15, 17, 17, (2, 0)), (8, 24, 8, (0, 0)), (2, 2, 2, (0, 0)),
], ids=["equal", "12-18-pads-full", "15-17-pads-streaming", "1-to-3", "tiny"])
def test_vllm_grouping_rule(streaming, full, size, pads):
    from lighttransfer.serving.vllm.grouping import vllm_grouping

    g = vllm_grouping(streaming, full)
    assert g.group_size == size and (g.streaming_padding, g.full_padding) == pads
    assert (g.streaming_groups + g.full_groups) * size == streaming + full + sum(pads)
    assert ("more full layers" in g.describe()) == (pads[1] > 0)
    assert vllm_grouping(0, 32) is None


def test_importing_the_vllm_side_on_an_unsupported_vllm_is_one_line(monkeypatch):
    import importlib
    import sys

    monkeypatch.setattr(version, "installed_vllm", lambda: "0.20.0")
    monkeypatch.delitem(sys.modules, "lighttransfer.serving.vllm.internals", raising=False)
    with pytest.raises(LightTransferError, match=r"vLLM 0\.20\.0 is outside .*0\.26\.x or 0\.32\.x"):
        importlib.import_module("lighttransfer.serving.vllm.internals")
