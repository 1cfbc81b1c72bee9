"""Prefill against the compute floor on one GPU: stock transformers, our runtime with nothing streaming, and a
ratio-0.5 hybrid (Llama-3-8B shape, random bf16 weights, batch 1), the runtime rows once per full-layer prefill
backend, each profiled into matmul / attention / other time.

    PYTHONPATH=<dir with a lighttransfer link> LIGHTTRANSFER_TRITON_AUTOTUNE=0 \
        python3 bench/scripts/prefill_floor.py OUT_DIR [TOKENS]

Writes ``OUT_DIR/prefill_floor.{json,md}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lighttransfer.bench.prefill_floor import markdown, run
from lighttransfer.output_files import write_json


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    result = run(n=tokens, progress=lambda line: print(line, flush=True))
    write_json(out / "prefill_floor.json", result)
    (out / "prefill_floor.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
