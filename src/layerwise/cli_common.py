"""What every command module shares: the consoles and the error boundary (one sentence, exit 2; Ctrl-C 130)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import typer
from rich.console import Console

from .errors import HealInterrupted, LayerwiseError

console = Console()
err_console = Console(stderr=True)


def cli_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one clear sentence on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HealInterrupted as exc:  # a checkpoint was kept: say where, as an interrupt
            err_console.print(f"[bold red]interrupted:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=130) from None
        except LayerwiseError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: no output was written.")
            raise typer.Exit(code=130) from None

    return wrapper
