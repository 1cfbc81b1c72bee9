"""The ``lighttransfer`` command line: a thin click layer over the library, the roof over every stage.

Each subcommand is a module of this package (``cli/analyze.py``, ``cli/convert.py``, ...) of a few lines over one
library function, imported only when it runs, so ``lighttransfer --help`` starts without importing torch. No
stage imports this package.

Errors the user can fix print one line and exit non-zero; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback

import click

from .. import __version__
from ..errors import LightTransferError
from .options import (
    _state,
    device_options,
    is_quiet,
    model_options,
    stderr_console,
    stdout_console,
    verbosity_options,
)

# name -> ("module:attribute", short help shown by --help without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "analyze": ("lighttransfer.cli.analyze:analyze", "Profile attention on calibration text: lazy layers, long-context heads."),
    "convert": ("lighttransfer.cli.convert:convert", "Write a hybrid checkpoint whose laziest layers stream."),
    "inspect": ("lighttransfer.cli.convert:inspect", "Show a hybrid checkpoint's layout and KV-cache memory."),
    "generate": ("lighttransfer.cli.generate:generate", "Generate text with a hybrid checkpoint."),
    "finetune": ("lighttransfer.cli.finetune:finetune", "Recovery fine-tuning: LoRA trained with the hybrid's masks."),
    "eval": ("lighttransfer.cli.evaluate:evaluate", "Perplexity, passkey and RULER-style tasks, hybrid vs original."),
    "eval-merge": ("lighttransfer.cli.evaluate:eval_merge", "Join evaluation results whose rows ran apart."),
    "bench": ("lighttransfer.cli.bench:bench", "Prefill/decode speed and memory, hybrid vs original."),
    "sparse-mass": ("lighttransfer.cli.sparse_mass:sparse_mass", "Sparse prefill: attention mass kept vs density per layer."),
    "demo": ("lighttransfer.cli.demo:main", "Analyze, convert and run the SmolLM2-135M demo model end to end."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[cmd_name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # list from the table, so that --help imports no command module (and no torch)
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="lighttransfer")
@verbosity_options
def cli() -> None:
    """Turn a long-context causal LM into a hybrid of full and streaming attention layers.

    \b
    Typical flow:
      lighttransfer analyze MODEL --calib book.txt --out report.json --plot heatmap.png
      lighttransfer convert MODEL --report report.json --ratio 0.5 --out hybrid/
      lighttransfer generate hybrid/ --prompt "Once upon a time"
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and temp-directory cleanup runs."""


_signalled = {"term": False}


def _on_sigterm(signum, frame) -> None:
    _signalled["term"] = True  # click turns any KeyboardInterrupt into Abort: remember which one it was
    raise Terminated()


# what a command keeps on purpose when it is stopped (e.g. eval's finished rows), said in the stop's line
_kept: dict[str, str] = {}


def keep_on_interrupt(key: str, what: str | None) -> None:
    """Say ``what`` (e.g. "the finished rows are in X") if the command is stopped; ``None`` withdraws it."""
    if what is None:
        _kept.pop(key, None)
    else:
        _kept[key] = what


def _interrupted(exc: BaseException) -> None:
    from rich.markup import escape

    term = isinstance(exc, Terminated) or _signalled["term"]
    kept = "; ".join(_kept.values())
    said = f"only what it keeps on purpose is left: {kept}" if kept else "no partial output was left behind"
    stderr_console().print(f"[red]error:[/red] {'terminated' if term else 'interrupted'}; {escape(said)}.",
                           soft_wrap=True)
    sys.exit(143 if term else 130)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and turn errors into one line and an exit status.

    SIGTERM (a scheduler's kill, ``timeout``) is handled like Ctrl-C: temp files and directories are removed."""
    from rich.markup import escape

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    if "-v" in args or "--verbose" in args:
        _state["verbose"] = True
    else:
        # third-party tqdm bars (transformers' GGUF dequantization) would interleave with ours; tqdm reads this
        # when it is imported, so it must be set before any model code is
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        result = cli.main(args=args, prog_name="lighttransfer", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:  # click's form of Ctrl-C
        _interrupted(KeyboardInterrupt())
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LightTransferError as exc:
        if _state["verbose"]:
            traceback.print_exc()
        stderr_console().print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a one-line error
        if _state["verbose"]:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        stderr_console().print(
            f"[bold red]error:[/bold red] unexpected {type(exc).__name__}: {escape(first)} "
            "(rerun with --verbose for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(result if isinstance(result, int) else 0)


__all__ = ["cli", "main", "model_options", "device_options", "verbosity_options", "is_quiet",
           "stderr_console", "stdout_console"]
