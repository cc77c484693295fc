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
Method = Annotated[str, typer.Option(help="Backend: magnitude, wanda, sparsegpt (or magnitude_ww, wanda_ww, sparsegpt_ww).")]
Allocator = Annotated[str, typer.Option(help="Per-layer allocator: uniform, owl, alpha.")]
Sparsity = Annotated[float, typer.Option(help="Target mean sparsity over decoder linears, in [0, 1).")]
CalibSeqlen = Annotated[Optional[int], typer.Option("--calib-seqlen", help="Calibration window (default: --seqlen).")]
NM = Annotated[Optional[str], typer.Option("--nm", help="Semi-structured N:M pattern, e.g. 2:4 (uniform, sparsity N/M).")]
Epsilon = Annotated[Optional[float], typer.Option(help="alpha: sparsities span [1-eps, 1+eps] x target (default 0.2).")]
Metric = Annotated[Optional[str], typer.Option(help="alpha: alpha_peak (default) or alpha_mid.")]
MetricCache = Annotated[Optional[Path], typer.Option("--metric-cache", help="alpha: directory caching metric values.")]
OwlM = Annotated[Optional[float], typer.Option("--owl-m", help="owl: outlier threshold M x mean (default 5).")]
OwlLambda = Annotated[Optional[float], typer.Option("--owl-lambda", help="owl: sparsity range +-lambda (default 0.08).")]


def _allocator_params(**values: Any) -> dict[str, Any]:
    """Only the allocator options the user gave; the allocator checks they are its own."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if v is not None}


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
    calib_seqlen: CalibSeqlen = None,
    nm: NM = None,
    epsilon: Epsilon = None,
    metric: Metric = None,
    metric_cache: MetricCache = None,
    owl_m: OwlM = None,
    owl_lambda: OwlLambda = None,
) -> None:
    """Load, plan, apply, evaluate and save; print dense vs compressed metrics."""
    from .pipeline import compress as run_compress

    budget = Budget.for_sparsity(sparsity)
    settings = _settings(corpus=corpus, eval_text=eval_text, calib_text=calib_text, seqlen=seqlen,
                         max_windows=max_windows, batch_size=batch_size, dtype=dtype, device=device, seed=seed,
                         nsamples=nsamples, calib_seqlen=calib_seqlen)
    params = _allocator_params(epsilon=epsilon, metric=metric, metric_cache=metric_cache, owl_m=owl_m,
                               owl_lambda=owl_lambda)
    record = run_compress(model, budget, method, allocator, settings, out, overwrite, nm, **params)
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
    corpus: Corpus = "wiki",
    calib_text: CalibText = None,
    seqlen: Seqlen = 512,
    seed: Seed = 0,
    nsamples: Nsamples = 128,
    calib_seqlen: CalibSeqlen = None,
    nm: NM = None,
    epsilon: Epsilon = None,
    metric: Metric = None,
    metric_cache: MetricCache = None,
    owl_m: OwlM = None,
    owl_lambda: OwlLambda = None,
) -> None:
    """Compute a plan and write it as JSON, without touching any weights."""
    from .pipeline import plan_to_file

    budget = Budget.for_sparsity(sparsity)
    settings = _settings(corpus=corpus, calib_text=calib_text, seqlen=seqlen, seed=seed, nsamples=nsamples,
                         calib_seqlen=calib_seqlen)
    params = _allocator_params(epsilon=epsilon, metric=metric, metric_cache=metric_cache, owl_m=owl_m,
                               owl_lambda=owl_lambda)
    the_plan = plan_to_file(model, budget, out, method, allocator, settings, overwrite, nm, **params)
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
    calib_text: CalibText = None,
    seed: Seed = 0,
    nsamples: Nsamples = 128,
    calib_seqlen: CalibSeqlen = None,
) -> None:
    """Apply a saved plan to a fresh copy of the model, evaluate it and save it."""
    from .pipeline import apply_plan_file

    settings = _settings(corpus=corpus, eval_text=eval_text, calib_text=calib_text, seqlen=seqlen,
                         max_windows=max_windows, batch_size=batch_size, dtype=dtype, device=device, seed=seed,
                         nsamples=nsamples, calib_seqlen=calib_seqlen)
    record = apply_plan_file(model, plan_file, settings, out, overwrite)
    _print_compression_table(record, out)


@app.command()
@cli_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by compress or apply.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="PNG to write (default RUN_DIR/allocation.png).")] = None,
) -> None:
    """Draw a run's per-layer allocation (sparsity per block, and the allocator's metric) as a PNG."""
    from .report import plot_allocation, read_result

    record = read_result(run_dir)
    path = plot_allocation(record, out or run_dir / "allocation.png")
    console.print(f"wrote {path}")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="layerwise")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
