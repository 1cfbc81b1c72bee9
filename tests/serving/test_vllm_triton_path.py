"""The plugin's CUDA path without a GPU: vLLM's own Triton ``unified_attention`` in its prefix-plus-window (R-SWA)
mode, run by Triton's interpreter over the shortened block tables, equals the plain paged sink + window
attention; over the full tables (R-SWA alone) it reads the freed blocks. Needs vLLM (``make test-vllm``) and
Triton; runs in a process of its own (``vllm_triton_check.py``), about a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from lighttransfer.serving.vllm.version import unsupported_reason

_reason = unsupported_reason()
if _reason is None and find_spec("triton") is None:
    _reason = "Triton is not installed (vLLM's Triton kernel runs in Triton's interpreter here)"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_reason is not None, reason=str(_reason))]


def test_vllm_triton_kernel_over_shortened_tables_is_sink_window_attention(tmp_path):
    cases = [{"sink": 4, "window": 40, "shortened": True}, {"sink": 20, "window": 17, "shortened": True},
             {"sink": 4, "window": 40, "shortened": False}]
    # the child finds `lighttransfer` where this process does (never the checkout root itself on its path)
    holders = [p for p in sys.path if p and (Path(p) / "lighttransfer" / "__init__.py").exists()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(holders))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_triton_check.py")), json.dumps(cases)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    short_a, short_b, plain = json.loads(done.stdout.strip().splitlines()[-1])
    for got in (short_a, short_b):
        assert got["finite"] and got["max_error"] < 1e-4, got
    # without the shortening the kernel visits the freed blocks (NaN here) between the sink and the window
    assert not plain["finite"], plain
