"""The ``lighttransfer`` command line: a thin click layer over the library.

Each subcommand lives beside the stage it drives (``analysis/command.py``, ``convert/command.py``, ...)
and is imported only when it runs, so ``lighttransfer --help`` starts without importing torch.

Errors the user can fix print one line and exit non-zero; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import LightTransferError

# name -> ("module:attribute", short help shown by --help without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "analyze": ("lighttransfer.analysis.command:analyze", "Profile attention on calibration text: lazy layers, long-context heads."),
    "convert": ("lighttransfer.convert.command:convert", "Write a hybrid checkpoint whose laziest layers stream."),
    "inspect": ("lighttransfer.convert.command:inspect", "Show a hybrid checkpoint's layout and KV-cache memory."),
    "generate": ("lighttransfer.runtime.command:generate", "Generate text with a hybrid checkpoint."),
    "eval": ("lighttransfer.bench.command:evaluate", "Perplexity and passkey retrieval, hybrid vs original."),
    "bench": ("lighttransfer.bench.command:bench", "Prefill/decode speed and memory, hybrid vs original."),
    "demo": ("lighttransfer.demo:main", "Analyze, convert and run the SmolLM2-135M demo model end to end."),
}

_state = {"verbose": False}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        target, short = COMMANDS[cmd_name]
        module_name, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            # only the command's own module may be missing; a broken import elsewhere is a real error
            if isinstance(exc, ModuleNotFoundError) and exc.name != module_name:
                raise
            return _not_built(cmd_name, short)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # list from the table, so that --help imports no command module (and no torch)
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])


def _not_built(name: str, short: str) -> click.Command:
    def run(**_: Any) -> None:
        raise LightTransferError(f"'lighttransfer {name}' is not built yet in this version.", exit_code=2)

    return click.Command(
        name,
        callback=run,
        help=f"{short} (not built yet)",
        short_help=f"{short} (not built yet)",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


def _set_verbosity(verbose: bool, quiet: bool) -> None:
    if verbose:
        _state["verbose"] = True
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=stderr_console(), show_path=False, show_time=False)
    except ImportError:  # pragma: no cover
        handler = logging.StreamHandler()
    root = logging.getLogger("lighttransfer")
    root.handlers[:] = [handler]
    root.setLevel(level)
    # transformers' own warnings and bars are noise on our terminal unless asked for
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_info() if verbose else hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def stdout_console():
    from rich.console import Console

    return Console(highlight=False)


def _verbosity_callback(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.ensure_object(dict)[param.name] = True
    obj = ctx.ensure_object(dict)
    _set_verbosity(bool(obj.get("verbose")), bool(obj.get("quiet")))
    return value


def verbosity_options(f: Callable) -> Callable:
    """``-v/--verbose`` and ``-q/--quiet``, accepted before or after the subcommand."""
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True,
                     callback=_verbosity_callback, help="Print only results and errors.")(f)
    f = click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True,
                     callback=_verbosity_callback, help="Print debug logs, and tracebacks on errors.")(f)
    return f


def device_options(f: Callable) -> Callable:
    """``--device`` and ``--dtype`` for commands that run a model."""
    f = click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="Compute dtype: auto is bfloat16 on CUDA, float32 on CPU.")(f)
    f = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                     help="Where to run: auto picks CUDA when present, else the CPU.")(f)
    return f


def model_options(f: Callable) -> Callable:
    """Options every command that loads a model shares."""
    f = click.option("--trust-remote-code", is_flag=True,
                     help="Allow the model's own Python code from its repository (off by default).")(f)
    return device_options(f)


def is_quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if isinstance(ctx.obj, dict) and ctx.obj.get("quiet"):
            return True
        ctx = ctx.parent
    return False


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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and turn errors into one line and an exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
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
        stderr_console().print("[red]error:[/red] interrupted; no partial output was left behind.")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LightTransferError as exc:
        if _state["verbose"]:
            traceback.print_exc()
        stderr_console().print(f"[bold red]error:[/bold red] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        stderr_console().print("[red]error:[/red] interrupted; no partial output was left behind.")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a one-line error
        if _state["verbose"]:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        stderr_console().print(
            f"[bold red]error:[/bold red] unexpected {type(exc).__name__}: {first} "
            "(rerun with --verbose for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


__all__ = ["cli", "main", "model_options", "device_options", "verbosity_options", "is_quiet",
           "stderr_console", "stdout_console"]
