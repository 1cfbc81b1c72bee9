"""One autotuned prefill launch at a given shape, for a profiler to attach to (``ncu``/``nsys``).

    ncu --kernel-name regex:_streaming_attn_fwd --launch-skip 40 --launch-count 1 --set full \
        python3 -m lighttransfer.bench.prefill_profile --n 32768 --sink 4 --window 1020

The first calls autotune (several launches per candidate); the profiler should skip them.
"""

from __future__ import annotations

import argparse

import torch
from lighttransfer.kernels import streaming_attention


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--calls", type=int, default=3, help="launches after autotuning")
    args = parser.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, args.n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, args.n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 8, args.n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    streaming_attention(q, k, v, sink=args.sink, window=args.window)  # autotune
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(args.calls):
        streaming_attention(q, k, v, sink=args.sink, window=args.window)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
