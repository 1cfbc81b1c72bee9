"""The lighttransfer block of config.json: validation, (de)serialization, queries."""

from __future__ import annotations

import json

import pytest
from lighttransfer.errors import LightTransferError
from lighttransfer.hybrid_format import CONFIG_KEY, FORMAT_VERSION, HybridConfig


def _cfg(**kw) -> HybridConfig:
    return HybridConfig(**{"num_layers": 4, "num_kv_heads": 2, **kw})


def test_round_trip_through_json_with_int_layer_keys():
    cfg = _cfg(streaming_layers=[3, 1], head_masks={2: [True, False]}, sink=2, window=64, prefill="full",
               granularity="head", source={"model_id": "m", "fingerprint": "abc"}, native_swa=True)
    text = json.dumps(cfg.to_dict(), sort_keys=True)
    again = HybridConfig.from_dict(json.loads(text))
    assert again == cfg
    assert again.streaming_layers == [1, 3] and again.head_masks == {2: [True, False]}
    assert list(cfg.to_dict()["head_masks"]) == ["2"]


def test_blocks_written_before_native_swa_existed_still_load():
    block = _cfg(streaming_layers=[1]).to_dict()
    del block["native_swa"]
    assert HybridConfig.from_dict(block).native_swa is False


def test_from_model_config_reads_dicts_and_objects():
    cfg = _cfg(streaming_layers=[0])

    class Config:
        pass

    obj = Config()
    cfg.attach(obj)
    assert HybridConfig.from_model_config(obj) == cfg
    assert HybridConfig.from_model_config({CONFIG_KEY: cfg.to_dict()}) == cfg
    assert HybridConfig.from_model_config({"model_type": "llama"}) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(window=0), "window"),
        (dict(sink=-1), "sink"),
        (dict(prefill="lazy"), "prefill"),
        (dict(granularity="block"), "granularity"),
        (dict(streaming_layers=[4]), "out of range"),
        (dict(streaming_layers=[1, 1]), "duplicates"),
        (dict(head_masks={1: [True]}), "KV heads"),
        (dict(streaming_layers=[1], head_masks={1: [True, False]}), "both"),
        (dict(format_version=FORMAT_VERSION + 1), "format_version"),
    ],
    ids=["window", "sink", "prefill", "granularity", "layer-range", "duplicates", "mask-width", "both", "version"],
)
def test_inconsistent_blocks_are_refused(kwargs, match):
    with pytest.raises(LightTransferError, match=match) as info:
        _cfg(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_keys_and_non_object_block_are_refused():
    with pytest.raises(LightTransferError, match="unknown keys"):
        HybridConfig.from_dict({**_cfg().to_dict(), "surprise": 1})
    with pytest.raises(LightTransferError, match="must be an object"):
        HybridConfig.from_model_config({CONFIG_KEY: [1, 2]})


def test_layer_kinds_and_kv_fraction():
    cfg = _cfg(streaming_layers=[0], head_masks={1: [True, False], 2: [True, True]}, sink=4, window=12)
    assert [cfg.layer_kind(i) for i in range(4)] == ["streaming", "mixed", "streaming", "full"]
    assert cfg.streaming_kv_heads == 5
    # 8 KV heads; 5 keep 16 tokens, 3 keep all 64
    assert cfg.layout().kv_fraction(64) == pytest.approx((3 * 64 + 5 * 16) / (8 * 64))
    assert cfg.layout().kv_fraction(10) == 1.0
