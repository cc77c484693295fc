"""``layerwise`` command line: parses, calls the API, prints with rich. Errors: one sentence, exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from .config import Budget, RunSettings
from .errors import LayerwiseError, SettingsError

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
Tasks = Annotated[Optional[str], typer.Option(help="Zero-shot tasks through lm-eval, e.g. arc_easy,piqa ('default': the standard set).")]
Limit = Annotated[Optional[int], typer.Option(help="Zero-shot items per task, a seeded random subset (default 500; 0 = all).")]
PromptLength = Annotated[int, typer.Option("--prompt-length", help="Latency: prompt tokens for prefill.")]
GenerationLength = Annotated[int, typer.Option("--generation-length", help="Latency: decoded tokens.")]
Latency = Annotated[bool, typer.Option("--latency/--no-latency", help="Measure prefill/decode latency.")]


def _measurement(tasks: Optional[str], limit: Optional[int], prompt_length: int, generation_length: int,
                 latency: bool) -> dict[str, Any]:
    """RunSettings fields for zero-shot scoring and latency measurement."""
    setting = {"prompt_length": prompt_length, "generation_length": generation_length} if latency else None
    measurement = {"tasks": tasks.split(",") if tasks else [], "latency": setting}
    if limit is not None:
        measurement["task_limit"] = limit or None  # 0: every item
    return measurement


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


# RunSettings fields whose option name is not the field name with dashes
OPTION_NAMES = {"task_limit": "--limit", "latency.prompt_length": "--prompt-length",
                "latency.generation_length": "--generation-length"}


def _settings(**values: Any) -> RunSettings:
    """RunSettings from CLI values; an out-of-range value becomes one sentence naming its option."""
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    try:
        return RunSettings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        option = OPTION_NAMES.get(field, "--" + field.split(".")[0].replace("_", "-"))
        raise SettingsError(f"Invalid {option}: {error['msg'][0].lower()}{error['msg'][1:]}.") from None


def _fmt_bytes(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _measured_rows(metrics: dict) -> list[tuple[str, str]]:
    """Table rows for perplexity, zero-shot scores and latency, each only when measured."""
    rows = []
    if metrics.get("ppl") is not None:
        rows.append(("perplexity", f"{metrics['ppl']:.3f}"))
    for name, score in ((metrics.get("zeroshot") or {}).get("scores") or {}).items():
        label = "acc_norm" if score.get("acc_norm") is not None else "acc"
        stderr = score.get(f"{label}_stderr")
        rows.append((f"{name} {label} (n={score['items']})", f"{score[label]:.3f}" + (f" ± {stderr:.3f}" if stderr else "")))
    latency = metrics.get("latency")
    if latency:
        rows.append((f"prefill {latency['setting']['prompt_length']} tokens", f"{latency['prefill_ms']:.1f} ms"))
        rows.append(("decode", f"{_fmt(latency['decode_tokens_per_s'], '.1f')} tokens/s"))
    return rows


def _print_protocols(record: dict) -> None:
    protocol = record.get("protocol")
    if protocol:
        console.print(f"perplexity: {protocol['corpus']}/{protocol['split']}, {protocol['windows']} windows x "
                      f"{protocol['seqlen']} tokens, {protocol['dtype']}")
    zeroshot = record["metrics"].get("zeroshot")
    if zeroshot:
        p = zeroshot["protocol"]
        console.print(f"zero-shot: lm-eval {p['lm_eval_version']}, limit {p['limit'] or 'none'} (seed {p['seed']}), "
                      f"{zeroshot['seconds']:.0f} s")


def _print_compression_table(record: dict, out: Path) -> None:
    metrics, dense = record["metrics"], record["metrics"]["dense"]
    table = Table(title=f"{record['model']['spec']}: {record['method']} / {record['allocator']}")
    table.add_column("metric")
    table.add_column("dense", justify="right")
    table.add_column("compressed", justify="right")
    dense_rows = dict(_measured_rows({"ppl": metrics.get("dense_ppl"), "latency": dense.get("latency")}))
    for label, value in _measured_rows(metrics):
        table.add_row(label, dense_rows.get(label, ""), value)
    table.add_row("sparsity (decoder linears)", f"{dense['sparsity']:.2%}", f"{metrics['sparsity']:.2%}")
    table.add_row("parameters", f"{dense['parameters']:,}", f"{metrics['parameters']:,}")
    table.add_row("non-zero parameters", f"{dense['nonzero_parameters']:,}", f"{metrics['nonzero_parameters']:,}")
    table.add_row("weight bytes (stored)", _fmt_bytes(dense["weight_bytes"]), _fmt_bytes(metrics["weight_bytes"]))
    table.add_row("wall time", "", f"{record['timings']['total_s']:.1f} s")
    console.print(table)
    _print_protocols(record)
    console.print(f"masked sparsity saves no bytes or time by itself.\nsaved to {out}")


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
    tasks: Tasks = None,
    limit: Limit = None,
    prompt_length: PromptLength = 128,
    generation_length: GenerationLength = 32,
    latency: Latency = True,
) -> None:
    """Load, plan, apply, evaluate and save; print dense vs compressed metrics."""
    from .pipeline import compress as run_compress

    budget = Budget.for_sparsity(sparsity)
    settings = _settings(corpus=corpus, eval_text=eval_text, calib_text=calib_text, seqlen=seqlen,
                         max_windows=max_windows, batch_size=batch_size, dtype=dtype, device=device, seed=seed,
                         nsamples=nsamples, calib_seqlen=calib_seqlen,
                         **_measurement(tasks, limit, prompt_length, generation_length, latency))
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
    seed: Seed = 0,
    tasks: Tasks = None,
    limit: Limit = None,
    perplexity: Annotated[bool, typer.Option("--perplexity/--no-perplexity", help="Measure perplexity.")] = True,
    prompt_length: PromptLength = 128,
    generation_length: GenerationLength = 32,
    latency: Latency = True,
) -> None:
    """Perplexity, zero-shot accuracy, size and latency of a model (named, a path, or a layerwise directory)."""
    from .pipeline import evaluate_model

    settings = _settings(corpus=corpus, eval_text=eval_text, seqlen=seqlen, max_windows=max_windows,
                         batch_size=batch_size, dtype=dtype, device=device, seed=seed, perplexity=perplexity,
                         **_measurement(tasks, limit, prompt_length, generation_length, latency))
    record = evaluate_model(model, settings, out, overwrite)
    metrics = record["metrics"]
    table = Table(title=f"{model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in _measured_rows(metrics):
        table.add_row(label, value)
    table.add_row("sparsity (decoder linears)", f"{metrics['sparsity']:.2%}")
    table.add_row("parameters", f"{metrics['parameters']:,}")
    table.add_row("weight bytes (stored)", _fmt_bytes(metrics["weight_bytes"]))
    console.print(table)
    _print_protocols(record)


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
    tasks: Tasks = None,
    limit: Limit = None,
    prompt_length: PromptLength = 128,
    generation_length: GenerationLength = 32,
    latency: Latency = True,
) -> None:
    """Apply a saved plan to a fresh copy of the model, evaluate it and save it."""
    from .pipeline import apply_plan_file

    settings = _settings(corpus=corpus, eval_text=eval_text, calib_text=calib_text, seqlen=seqlen,
                         max_windows=max_windows, batch_size=batch_size, dtype=dtype, device=device, seed=seed,
                         nsamples=nsamples, calib_seqlen=calib_seqlen,
                         **_measurement(tasks, limit, prompt_length, generation_length, latency))
    record = apply_plan_file(model, plan_file, settings, out, overwrite)
    _print_compression_table(record, out)


@app.command()
@cli_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories written by compress, apply or eval --out.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="File to write (default: inside the one run's directory).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="html (default), md, or png (one run's allocation).")] = None,
) -> None:
    """Compare runs: an HTML page (table, Pareto plots, per-layer allocations), a markdown table or a PNG."""
    from .report import write_report

    path = write_report(run_dirs, out, fmt)
    console.print(f"wrote {path}")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="layerwise")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
