"""``layerwise`` command line: parses, calls the API, prints with rich. Errors: one sentence, exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import Budget, RunSettings
from .errors import LayerwiseError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Find, apply and measure per-layer compression plans for language models.")
console = Console()
err_console = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="smollm2-135m, tiny-llama, a model directory or a .gguf file.")]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output directory (must not exist unless --overwrite).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
Corpus = Annotated[str, typer.Option(help="Evaluation/calibration corpus: wiki or ptb.")]
EvalText = Annotated[Optional[Path], typer.Option("--eval-text", help="Evaluate on this text file instead.")]
CalibText = Annotated[Optional[Path], typer.Option("--calib-text", help="Calibrate on this text file instead.")]
Seqlen = Annotated[int, typer.Option(help="Evaluation window length in tokens.")]
MaxWindows = Annotated[Optional[int], typer.Option("--max-windows", help="Evaluate at most N windows (quick runs).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]
Dtype = Annotated[str, typer.Option(help="float32 (default), bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")]
Seed = Annotated[int, typer.Option(help="Seed for calibration sampling and searches.")]
Nsamples = Annotated[int, typer.Option(help="Calibration windows.")]
Method = Annotated[str, typer.Option(help="Sparsity method of the backend (magnitude, ...).")]
Allocator = Annotated[str, typer.Option(help="Per-layer allocator (uniform, ...).")]
Sparsity = Annotated[float, typer.Option(help="Target mean sparsity over decoder linears, in [0, 1).")]


def cli_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one clear sentence on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LayerwiseError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: no output was written.")
            raise typer.Exit(code=130) from None

    return wrapper


def _settings(**values: Any) -> RunSettings:
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    return RunSettings(**values)


def _fmt_bytes(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def _print_compression_table(record: dict, out: Path) -> None:
    metrics, dense, protocol = record["metrics"], record["metrics"]["dense"], record["protocol"]
    table = Table(title=f"{record['model']['spec']}: {record['method']} / {record['allocator']}")
    table.add_column("metric")
    table.add_column("dense", justify="right")
    table.add_column("compressed", justify="right")
    table.add_row("perplexity", f"{metrics['dense_ppl']:.3f}", f"{metrics['ppl']:.3f}")
    table.add_row("sparsity (decoder linears)", f"{dense['sparsity']:.2%}", f"{metrics['sparsity']:.2%}")
    table.add_row("parameters", f"{dense['parameters']:,}", f"{metrics['parameters']:,}")
    table.add_row("non-zero parameters", f"{dense['nonzero_parameters']:,}", f"{metrics['nonzero_parameters']:,}")
    table.add_row("weight bytes (stored)", _fmt_bytes(dense["weight_bytes"]), _fmt_bytes(metrics["weight_bytes"]))
    table.add_row("wall time", "", f"{record['timings']['total_s']:.1f} s")
    console.print(table)
    console.print(
        f"protocol: {protocol['corpus']}/{protocol['split']}, {protocol['windows']} windows x {protocol['seqlen']} tokens, "
        f"{protocol['dtype']}; masked sparsity saves no bytes or time by itself.\nsaved to {out}"
    )


@app.command()
@cli_errors
def compress(
    model: ModelOpt = "smollm2-135m",
    out: OutDir = Path("layerwise-out"),
    method: Method = "magnitude",
    allocator: Allocator = "uniform",
    sparsity: Sparsity = 0.5,
    overwrite: Overwrite = False,
    corpus: Corpus = "wiki",
    eval_text: EvalText = None,
    calib_text: CalibText = None,
    seqlen: Seqlen = 512,
    max_windows: MaxWindows = None,
    batch_size: BatchSize = 4,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    seed: Seed = 0,
    nsamples: Nsamples = 128,
) -> None:
    """Load, plan, apply, evaluate and save; print dense vs compressed metrics."""
    from .pipeline import compress as run_compress

    budget = Budget.for_sparsity(sparsity)
    settings = _settings(corpus=corpus, eval_text=eval_text, calib_text=calib_text, seqlen=seqlen,
                         max_windows=max_windows, batch_size=batch_size, dtype=dtype, device=device, seed=seed,
                         nsamples=nsamples)
    record = run_compress(model, budget, method, allocator, settings, out, overwrite)
    _print_compression_table(record, out)


@app.command("eval")
@cli_errors
def eval_command(
    model: ModelOpt = "smollm2-135m",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write DIR/result.json.")] = None,
    overwrite: Overwrite = False,
    corpus: Corpus = "wiki",
    eval_text: EvalText = None,
    seqlen: Seqlen = 512,
    max_windows: MaxWindows = None,
    batch_size: BatchSize = 4,
    dtype: Dtype = "float32",
    device: Device = "cpu",
) -> None:
    """Perplexity and size of a model (named, a path, or a directory written by layerwise)."""
    from .pipeline import evaluate_model

    settings = _settings(corpus=corpus, eval_text=eval_text, seqlen=seqlen, max_windows=max_windows,
                         batch_size=batch_size, dtype=dtype, device=device)
    record = evaluate_model(model, settings, out, overwrite)
    metrics, protocol = record["metrics"], record["protocol"]
    table = Table(title=f"{model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("perplexity", f"{metrics['ppl']:.3f}")
    table.add_row("sparsity (decoder linears)", f"{metrics['sparsity']:.2%}")
    table.add_row("parameters", f"{metrics['parameters']:,}")
    table.add_row("weight bytes (stored)", _fmt_bytes(metrics["weight_bytes"]))
    console.print(table)
    console.print(f"protocol: {protocol['corpus']}/{protocol['split']}, {protocol['windows']} windows x {protocol['seqlen']} tokens")


@app.command()
@cli_errors
def plan(
    out: Annotated[Path, typer.Option("--out", "-o", help="Plan JSON file to write.")],
    model: ModelOpt = "smollm2-135m",
    method: Method = "magnitude",
    allocator: Allocator = "uniform",
    sparsity: Sparsity = 0.5,
    overwrite: Overwrite = False,
    seed: Seed = 0,
) -> None:
    """Compute a plan and write it as JSON, without touching any weights."""
    from .models import load
    from .pipeline import make_plan

    budget = Budget.for_sparsity(sparsity)
    if out.exists() and not overwrite:
        from .errors import OutputExistsError

        raise OutputExistsError(f"Plan file {out} already exists; pass --overwrite to replace it.")
    the_plan = make_plan(load(model), budget, method, allocator, seed)
    the_plan.save(out)
    console.print(f"{len(the_plan.actions)} actions ({the_plan.method} / {the_plan.allocator}) written to {out}")


@app.command()
@cli_errors
def apply(
    plan_file: Annotated[Path, typer.Option("--plan", "-p", help="Plan JSON written by `layerwise plan`.")],
    model: ModelOpt = "smollm2-135m",
    out: OutDir = Path("layerwise-out"),
    overwrite: Overwrite = False,
    corpus: Corpus = "wiki",
    eval_text: EvalText = None,
    seqlen: Seqlen = 512,
    max_windows: MaxWindows = None,
    batch_size: BatchSize = 4,
    dtype: Dtype = "float32",
    device: Device = "cpu",
) -> None:
    """Apply a saved plan to a fresh copy of the model, evaluate it and save it."""
    from .pipeline import apply_plan_file

    settings = _settings(corpus=corpus, eval_text=eval_text, seqlen=seqlen, max_windows=max_windows,
                         batch_size=batch_size, dtype=dtype, device=device)
    record = apply_plan_file(model, plan_file, settings, out, overwrite)
    _print_compression_table(record, out)


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="layerwise")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
