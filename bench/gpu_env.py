"""What a GPU benchmark records besides its timings: the machine, the software, and the measured ceilings."""

from __future__ import annotations

import statistics
import time

import torch

from ..environment import device_facts, gpu_driver, software_versions


def environment() -> dict:
    """GPU name, compute capability, SM count, driver, and the versions of Python, torch, CUDA and Triton."""
    info = {**software_versions(), **device_facts()}
    if torch.cuda.is_available():
        info.update(memory_gib=round(info["gpu_memory_bytes"] / 2**30, 1), driver=gpu_driver())
    return info


def median_us(fn, *, graph: bool, cuda: bool = True, rounds: int = 20) -> float:
    """Median microseconds per call of ``fn``, called once first (compile and autotune outside the timed region and
    the graph capture). CUDA: Triton's ``do_bench_cudagraph`` (``graph``) or ``do_bench``; CPU: ``rounds`` calls
    timed by the wall clock."""
    fn()
    if cuda:
        from triton.testing import do_bench, do_bench_cudagraph

        torch.cuda.synchronize()
        if graph:
            return 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")
        return 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - t0))
    return statistics.median(times)


def measure_peaks(*, copy_gib: float = 4.0) -> dict:
    """Measured ceilings: device-to-device copy bandwidth (bytes read + written, GB/s) and bf16 matmul TFLOP/s."""
    from triton.testing import do_bench

    def copy_ms(n: int) -> float:
        src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        return do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")

    def matmul_ms(size: int) -> float:
        a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
        return do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")

    n = int(copy_gib * 2**30) // 2
    copy = copy_ms(n)
    torch.cuda.empty_cache()
    return {"hbm_copy_gbps": 2 * n * 2 / copy / 1e6, "bf16_matmul_tflops": 2 * 8192**3 / matmul_ms(8192) / 1e9}


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def environment_markdown(env: dict, peaks: dict) -> str:
    return (f"GPU: {env.get('gpu')} (sm_{env.get('capability', '?').replace('.', '')}, {env.get('sms')} SMs), "
            f"driver {env.get('driver')}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}.  \n"
            f"Measured ceilings: copy {peaks['hbm_copy_gbps']:.0f} GB/s (read+write), "
            f"bf16 matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s.\n")


__all__ = ["environment", "measure_peaks", "markdown_table",
           "environment_markdown"]
