"""Options and consoles every command shares: ``--verbose``/``--quiet``, ``--device``/``--dtype``, rich consoles."""

from __future__ import annotations

import logging
from collections.abc import Callable

import click

# set by --verbose anywhere on the command line; read by the error handler of :func:`lighttransfer.cli.main`
_state = {"verbose": False}


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


def token_select_options(who: str = "TokenSelect", defaults: str = "", *, reuse_note: str = "",
                         max_age_note: str = " before the query rescores") -> Callable:
    """``--select-k``, ``--select-init``, ``--select-local``, ``--select-reuse``, ``--select-reuse-max-age`` and
    ``--select-reuse-against`` (each ``None`` when not given), their help opening with ``who``; ``defaults`` names
    where a missing one comes from before TokenSelect's own default (e.g. ``"the hybrid's, else "``)."""

    def default(value: str) -> str:
        return f"[default: {defaults}{value}]"

    options = [
        ("--select-k", int, f"keys selected per query by the soft vote {default('2048')}."),
        ("--select-init", int, f"first tokens always attended {default('128')}."),
        ("--select-local", int, f"recent tokens always attended {default('512')}."),
        ("--select-reuse", float, "Selection Cache threshold on the cosine similarity of a query and the one it is "
                                  f"compared with (--select-reuse-against), 1 = off{reuse_note} {default('0.9')}."),
        ("--select-reuse-max-age", int, f"steps a reused selection may serve{max_age_note} {default('64')}."),
        ("--select-reuse-against", click.Choice(["anchor", "previous"]),
         "the Selection Cache compares each query with the selection's anchor query (the one it was computed from) "
         f"or the previous query {default('anchor')}."),
    ]

    def decorate(f: Callable) -> Callable:
        for name, kind, text in reversed(options):
            f = click.option(name, type=kind, default=None, help=f"{who}: {text}")(f)
        return f

    return decorate


def is_quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if isinstance(ctx.obj, dict) and ctx.obj.get("quiet"):
            return True
        ctx = ctx.parent
    return False


__all__ = ["model_options", "device_options", "token_select_options", "verbosity_options", "is_quiet",
           "stderr_console", "stdout_console"]
