"""The GPU configurations of the kernels fit a Hopper block's shared memory, checked without a GPU.

The interpreter has no shared memory, so a tile too large for the GPU passes every CPU test and fails at its
first launch on the GPU (it happened: the block-mass kernel unrolled 2048-wide rows into 768 KiB). Here each
launcher runs on CPU tensors up to its launch, and the kernel is compiled for sm_90 with the constexprs, warps
and stages the GPU would take (``ahead_of_time.py``; the cases in ``shared_memory_cases.py``, run in a process
where Triton compiles instead of interpreting). The analytic estimate the decode launchers filter their
candidates with (:func:`~lighttransfer.kernels.decode_launch.shared_memory` plus the margin) must not be below
what the compiler reports, or a candidate judged to fit could fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ahead_of_time import ptxas_or_skip
from lighttransfer.kernels.decode_launch import HOPPER_SHARED_MEMORY
from shared_memory_cases import CASES


@pytest.fixture(scope="module")
def compiled():
    ptxas_or_skip()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("shared_memory_cases.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_configurations_fit_hopper_shared_memory(compiled, case):
    configs = compiled[case]
    assert configs, f"{case}: no configuration admitted"
    for name, sizes in configs.items():
        assert sizes["used"] <= HOPPER_SHARED_MEMORY, f"{case} {name}: {sizes['used']} bytes of shared memory"
        if "estimate" in sizes:
            assert sizes["used"] <= sizes["estimate"], (
                f"{case} {name}: the compiler takes {sizes['used']} bytes, the launcher's filter assumed "
                f"{sizes['estimate']}")
