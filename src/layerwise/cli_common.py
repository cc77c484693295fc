"""What every command module shares: the consoles and the error boundary (one sentence, exit 2 — typed errors and
running out of memory; Ctrl-C 130)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import typer
from rich.console import Console

from .errors import HealInterrupted, LayerwiseError

console = Console()
err_console = Console(stderr=True)


def out_of_memory(exc: BaseException) -> str | None:
    """Which memory ran out ("GPU" or "RAM") when ``exc`` says so; None for any other error. PyTorch's CPU
    allocator raises a plain RuntimeError, its CUDA allocator ``torch.OutOfMemoryError``."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "GPU"
    if isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(exc):
        return "RAM"
    return None


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
        except (MemoryError, RuntimeError) as exc:  # nothing was written: outputs are staged
            device = out_of_memory(exc)
            if device is None:
                raise
            err_console.print(f"[bold red]error:[/] Out of {device} memory; nothing was written. Try a smaller "
                              "--batch-size, --nsamples or --heal-batch-size, or a machine with more memory.",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: no output was written.")
            raise typer.Exit(code=130) from None

    return wrapper
