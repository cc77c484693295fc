"""``layerwise`` command line: parses, calls the API, prints with rich. Errors: one sentence, exit 2."""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from .cache import atomic_write_text, ensure_output_free
from .cli_common import cli_errors, console
from .cli_heal import gather_heal, heal_parameters
from .config import RunSettings
from .deploy_controls import CONTROLS
from .errors import SettingsError
from .evaluate.zeroshot import headline_metric
from .engines import ENGINES
from .export import export_gguf
from .formatting import fmt, fmt_bytes
from .gguf import gguf_type
from .healing import heal_run
from .models import load
from .options import PlanOptions, cli_parameters, collect, option_parameters
from .pipeline import apply_plan_file, compress_staged, evaluate_model, plan_to_file
from .pipeline import compress as run_compress
from .report import write_report
from .runtime.cli import runtime_app, serve
from .stages import StagedRecipe
from .run_options import EvaluationOptions
from .structures import STRUCTURES

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Find, apply and measure per-layer compression plans for language models.")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="smollm2-135m, tiny-llama, a model directory or a .gguf file.")]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output directory (must not exist unless --overwrite).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
EvalSpeedups = Annotated[Optional[str], typer.Option("--eval-speedups", help="depth: also evaluate the search state at these predicted speedups, e.g. 1.2,1.4.")]
RecoverSteps = Annotated[int, typer.Option("--recover-steps", help="LoRA (peft) fine-tune steps on the calibration windows after pruning (0 = none).")]
RecoverLr = Annotated[float, typer.Option("--recover-lr", help="Learning rate of the LoRA recovery.")]
EmbeddingType = Annotated[Optional[str], typer.Option("--embedding-type", help="GGUF type of the token embedding in the export and in --max-bytes (default q8_0 for quantized plans).")]
Export = Annotated[Optional[str], typer.Option("--export", help="Also write the compressed model for deployment: gguf (RUN/model.gguf, measured in llama.cpp beside the dense model).")]
DeployControls = Annotated[Optional[str], typer.Option("--deploy-controls", help="With --export: also measure, beside the plan's file and on the same windows, recipe (llama.cpp's own recipe nearest in size, same importance matrix) and/or source (the GGUF file the model was loaded from, as distributed), comma-separated.")]
ExportType = Annotated[str, typer.Option("--export-type", help="GGUF type of linears that stay float in the export: f32, f16 (default) or bf16.")]
Engine = Annotated[str, typer.Option("--engine", help=f"Engine that measures: {', '.join(ENGINES.names())} (pytorch: any model; llama.cpp: a .gguf file).")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="llama.cpp threads (default: as many as PyTorch uses).")]


def option_group(parameters: list[inspect.Parameter], gather: Callable[[dict[str, Any]], Any],
                 name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options ``parameters`` after its own and call it with ``gather(values)`` (which takes
    them out of the values) as keyword ``name``: commands sharing a group take the same options by construction."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != name]
        signature = own + parameters

        @functools.wraps(func)
        def wrapper(**values: Any) -> Any:
            gathered = gather(values)
            return func(**values, **{name: gathered})

        wrapper.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in signature}
        del wrapper.__wrapped__  # typer must read the signature above, not the function's own
        return wrapper

    return decorate


def _planning(values: dict[str, Any]) -> "PlanOptions | StagedRecipe":
    """The planning options of one call, or the staged recipe --recipe names (then no planning flag may be given:
    each stage holds its own)."""
    recipe = values.get("recipe")
    staged = StagedRecipe.read(recipe) if recipe is not None else None
    if staged is None:
        return collect(values)
    values.pop("recipe")
    given = PlanOptions.parse({name: values.pop(name) for name in PlanOptions.model_fields if name in values})
    if given.model_dump(exclude_none=True):
        flag = "--" + next(iter(given.model_dump(exclude_none=True))).replace("_", "-")
        raise SettingsError(f"{staged.source} has stages, and each stage holds its own planning options; drop {flag} "
                            "from the command line or put it into a stage.")
    return staged


# every planning option (PlanOptions' fields and --recipe), collected into ``options``: plan and compress
planning_command = option_group(cli_parameters(), _planning, "options")


def _evaluation(values: dict[str, Any]) -> dict[str, Any]:
    """RunSettings fields of the evaluation group's values (taken out of ``values``)."""
    return EvaluationOptions.run_settings({name: values.pop(name) for name in EvaluationOptions.model_fields
                                           if name in values})


# the evaluation protocol and deployment setting of compress, apply and eval, as RunSettings fields
evaluation_command = option_group(EvaluationOptions.parameters(), _evaluation, "evaluation")
# plan times the searches' latency tables in the deployment setting; it evaluates nothing
PLAN_EVALUATION = ("corpus", "seqlen", "dtype", "device", "seed", "prompt_length", "generation_length", "generation",
                   "speedup_batch_size", "speedup_iterations")
plan_evaluation_command = option_group(EvaluationOptions.parameters(PLAN_EVALUATION), _evaluation, "evaluation")

# healing's options (HealSetting's fields): compress heals when --heal is given; `heal` always does
healing_command = option_group(heal_parameters(), lambda values: gather_heal(values, required=False), "healing")
heal_options = option_group(heal_parameters(), lambda values: gather_heal(values, required=True), "healing")
Resume = Annotated[bool, typer.Option("--resume", help="Continue healing from the checkpoint an interrupted run "
                                                       "of the same command left beside --out.")]

# apply's calibration options, the planning options of the same names: a plan's record must agree with them
CALIBRATION_OPTIONS = ("nsamples", "calib_seqlen", "calib_text")
calibration_command = option_group(
    option_parameters(CALIBRATION_OPTIONS, "Calibration"),
    lambda values: PlanOptions.parse({name: values.pop(name) for name in CALIBRATION_OPTIONS}), "calibration")


# RunSettings fields whose option name is not the field name with dashes
OPTION_NAMES = {EvaluationOptions.setting_of(name): EvaluationOptions.flag_of(name)
                for name in EvaluationOptions.model_fields if EvaluationOptions.setting_of(name) != name}


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


def _speedups(text: Optional[str]) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()] if text else []
    except ValueError:
        raise SettingsError(f"--eval-speedups must be numbers separated by commas (got '{text}').") from None


def _measured_rows(metrics: dict) -> list[tuple[str, str]]:
    """Table rows for perplexity, zero-shot scores and latency, each only when measured."""

    rows = []
    if metrics.get("ppl") is not None:
        rows.append(("perplexity", f"{metrics['ppl']:.3f}"))
    kld = metrics.get("kld")
    if kld:
        rows.append((f"KLD to {kld['reference']}: mean / median / 99% / 99.9%",
                     f"{kld['mean']:.4f} / {kld['median']:.4f} / {kld['p99']:.4f} / {kld['p999']:.4f}"))
        rows.append(("same top token", f"{kld['same_top']:.2%}"))
    for name, score in ((metrics.get("zeroshot") or {}).get("scores") or {}).items():
        label = headline_metric(score)
        stderr = score.get(f"{label}_stderr")
        rows.append((f"{name} {label} (n={score['items']})", f"{score[label]:.3f}" + (f" ± {stderr:.3f}" if stderr else "")))
    latency = metrics.get("latency")
    if latency:
        rows.append((f"prefill {latency['setting']['prompt_length']} tokens", f"{latency['prefill_ms']:.1f} ms"))
        rows.append(("decode", f"{fmt(latency['decode_tokens_per_s'], '.1f')} tokens/s"))
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
    table.add_row("weight bytes (stored)", fmt_bytes(dense["weight_bytes"]), fmt_bytes(metrics["weight_bytes"]))
    for name in STRUCTURES:  # each structure's own rows (removals, widths, bits), when its metrics are there
        for row in STRUCTURES.get(name).table_rows(record):
            table.add_row(*row)
    if metrics.get("healing"):
        healing = metrics["healing"]
        table.add_row("healing", "", f"{healing['method']}, {healing['tokens']:,} tokens, "
                                     f"{healing['tokens_per_s']:.0f} tok/s")
        table.add_row("PPL before / after healing", "",
                      f"{fmt(healing.get('ppl_before'), '.3f')} / {fmt(healing.get('ppl_after'), '.3f')}")
    if metrics.get("recovery"):
        recovery = metrics["recovery"]
        table.add_row(f"PPL before / after LoRA ({recovery['steps']} steps)", "",
                      f"{fmt(recovery['ppl_before'], '.3f')} / {fmt(recovery['ppl_after'], '.3f')}")
    table.add_row("wall time", "", f"{record['timings']['total_s']:.1f} s")
    console.print(table)
    if record.get("deployment"):
        _print_deployment(record["deployment"], out)
    _print_protocols(record)
    if all(action["op"] == "sparsify" for action in record["plan"]["actions"]):
        console.print("masked sparsity saves no bytes or time by itself.")
    console.print(f"saved to {out}")


def _print_deployment(deployment: dict, out: Path) -> None:
    """Dense and compressed GGUF files as llama.cpp runs them, beside the controls when measured: size, KL
    divergence to the dense export, perplexity, prefill and decode speed."""
    dense, compressed = deployment.get("dense") or {}, deployment["compressed"]
    columns = {f"dense ({dense.get('outtype', 'float')})" if dense else "dense": dense, "compressed": compressed}
    for name, control in (deployment.get("controls") or {}).items():
        columns[_control_label(name, control)] = control
    table = Table(title=f"deployed in llama.cpp: {out / compressed['file']}")
    table.add_column("metric")
    for label in columns:
        table.add_column(label, justify="right")
    rows = {label: dict(_measured_rows(measured)) if measured else {} for label, measured in columns.items()}
    table.add_row("GGUF file", *(fmt_bytes(m["file_bytes"]) if m else "" for m in columns.values()))
    for metric in dict.fromkeys(metric for measured in rows.values() for metric in measured):
        table.add_row(f"{metric} (llama.cpp)", *(rows[label].get(metric, "") for label in columns))
    console.print(table)
    for note in compressed["export"]["notes"]:
        console.print(f"note: {note}")


def _control_label(name: str, control: dict) -> str:
    if name == "recipe":
        return f"llama.cpp {control['recipe']}{' + imatrix' if control.get('imatrix') else ''}"
    if name == "source":
        return f"as distributed ({control['file']})"
    return name


@app.command()
@cli_errors
@planning_command
@evaluation_command
@healing_command
def compress(
    model: ModelOpt = "smollm2-135m",
    out: OutDir = Path("layerwise-out"),
    overwrite: Overwrite = False,
    eval_speedups: EvalSpeedups = None,
    recover_steps: RecoverSteps = 0,
    recover_lr: RecoverLr = 1e-4,
    export: Export = None,
    export_type: ExportType = "f16",
    deploy_controls: DeployControls = None,
    threads: Threads = None,
    resume: Resume = False,
    iterative_steps: Annotated[int, typer.Option("--iterative-steps", min=1, help="width/depth: reach the budget in K pruning stages, re-scoring and re-allocating on the current model each time, with --heal's tokens split between the stages (Adapt-Pruner's Adapt-Accel).")] = 1,
    *,
    options: PlanOptions,
    evaluation: dict[str, Any],
    healing: Any,
) -> None:
    """Load, plan, apply, [heal,] evaluate and save; print dense vs compressed metrics. Planning options (the
    same as `plan`'s) may come from --recipe."""

    if isinstance(options, StagedRecipe):
        if healing is not None:
            raise SettingsError(f"{options.source} has stages; put healing into a heal stage instead of --heal.")
        settings = _settings(**evaluation, recover_steps=recover_steps, recover_lr=recover_lr, threads=threads,
                             deploy=_deploy(export or options.export, export_type, None, deploy_controls),
                             heal=options.healing.model_dump() if options.healing else None)
        record = compress_staged(model, options, settings, out, overwrite, resume)
        _print_compression_table(record, out)
        return
    budget = options.budget()
    settings = _settings(**evaluation, **options.calibration(), recover_steps=recover_steps, recover_lr=recover_lr,
                         threads=threads, deploy=_deploy(export, export_type, options.embedding_type,
                                                         deploy_controls),
                         heal=healing.model_dump() if healing else None)
    record = run_compress(model, budget, options.method, options.chosen_allocator, settings, out, overwrite,
                          options.nm, options.chosen_structure, _speedups(eval_speedups), resume, iterative_steps,
                          **options.allocator_params())
    _print_compression_table(record, out)


@app.command("heal")
@cli_errors
@heal_options
def heal_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by compress or apply.")],
    out: OutDir,
    overwrite: Overwrite = False,
    resume: Resume = False,
    max_windows: EvaluationOptions.annotation("max_windows") = None,
    tasks: EvaluationOptions.annotation("tasks") = None,
    limit: EvaluationOptions.annotation("limit") = None,
    latency: Annotated[Optional[bool], typer.Option("--latency/--no-latency", help="Measure latency (default: as the run did).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, ... (default: the run's).")] = None,
    export: Export = None,
    export_type: ExportType = "f16",
    *,
    healing: Any,
) -> None:
    """Train a compressed run toward the dense model it came from (logit distillation by default), evaluate it
    under the run's own evaluation settings and save it as a new run directory."""

    given = {"max_windows": max_windows, "device": device, "tasks": None if tasks is None else tasks.split(","),
             "task_limit": None if limit is None else limit or None, "deploy": _deploy(export, export_type, None)}
    overrides = {name: value for name, value in given.items() if value is not None}
    if limit == 0:
        overrides["task_limit"] = None  # every item
    if latency is False:
        overrides["latency"] = None
    record = heal_run(run_dir, out, healing, overrides, overwrite, resume)
    _print_compression_table(record, out)


@app.command("eval")
@cli_errors
@evaluation_command
def eval_command(
    model: ModelOpt = "smollm2-135m",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write DIR/result.json.")] = None,
    overwrite: Overwrite = False,
    perplexity: Annotated[bool, typer.Option("--perplexity/--no-perplexity", help="Measure perplexity.")] = True,
    engine: Engine = "pytorch",
    threads: Threads = None,
    *,
    evaluation: dict[str, Any],
) -> None:
    """Perplexity, zero-shot accuracy, size and latency of a model (named, a path, a layerwise directory, or a
    .gguf file run by llama.cpp with --engine llama.cpp)."""

    settings = _settings(**evaluation, perplexity=perplexity, engine=engine, threads=threads)
    record = evaluate_model(model, settings, out, overwrite)
    metrics = record["metrics"]
    table = Table(title=f"{model} ({record['settings']['engine']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in _measured_rows(metrics):
        table.add_row(label, value)
    if "sparsity" in metrics:
        table.add_row("sparsity (decoder linears)", f"{metrics['sparsity']:.2%}")
    table.add_row("parameters", f"{metrics['parameters']:,}")
    table.add_row("weight bytes (stored)", fmt_bytes(metrics["weight_bytes"]))
    if "file_bytes" in metrics:
        table.add_row("file size", fmt_bytes(metrics["file_bytes"]))
    console.print(table)
    _print_protocols(record)


@app.command("export")
@cli_errors
def export_command(
    model: Annotated[str, typer.Argument(help="A run directory (or any model layerwise loads) to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .gguf file to write.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="Deployment format: gguf.")] = "gguf",
    outtype: ExportType = "f16",
    embedding_type: EmbeddingType = None,
    overwrite: Overwrite = False,
) -> None:
    """Write a model (compressed or not) as a GGUF file that llama.cpp runs; per-layer widths and removed
    sublayers become llama.cpp's deci architecture, GGUF-quantized linears are copied byte for byte."""

    if fmt != "gguf":
        raise SettingsError(f"Unknown export format '{fmt}'; the supported one is gguf.")
    ensure_output_free(out, overwrite, "Output file")
    report = export_gguf(load(model), out, outtype, embedding_type, overwrite)
    table = Table(title=f"{out} ({report.architecture})")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("file size", fmt_bytes(report.file_bytes))
    table.add_row("tensors by type", ", ".join(f"{k} {v}" for k, v in sorted(report.tensor_types.items())))
    table.add_row("tokenizer", report.tokenizer_from)
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")


def _deploy(export: Optional[str], export_type: str, embedding_type: Optional[str],
            controls: Optional[str] = None) -> Optional[dict]:
    """RunSettings.deploy from --export/--export-type/--embedding-type/--deploy-controls (None: no export)."""
    if export is None:
        if controls:
            raise SettingsError("--deploy-controls measures files beside the exported one; add --export gguf.")
        return None
    if export != "gguf":
        raise SettingsError(f"Unknown --export format '{export}'; the supported one is gguf.")

    gguf_type(export_type)
    if embedding_type is not None:
        gguf_type(embedding_type)

    chosen = [name.strip() for name in (controls or "").split(",") if name.strip()]
    for name in chosen:
        CONTROLS.get(name)  # an unknown one is one sentence naming the known
    return {"format": export, "outtype": export_type, "embedding_type": embedding_type, "controls": chosen}


@app.command()
@cli_errors
@planning_command
@plan_evaluation_command
def plan(
    out: Annotated[Path, typer.Option("--out", "-o", help="Plan JSON file to write.")],
    model: ModelOpt = "smollm2-135m",
    overwrite: Overwrite = False,
    threads: Threads = None,
    recipe_out: Annotated[Optional[Path], typer.Option("--recipe-out", help="Also write the planning options as a recipe file.")] = None,
    *,
    options: PlanOptions,
    evaluation: dict[str, Any],
) -> None:
    """Compute a plan and write it as JSON, without touching any weights. Takes every planning option
    `compress` takes (or a --recipe); the plan records its calibration, so `apply` rebuilds `compress`'s model."""

    if isinstance(options, StagedRecipe):
        raise SettingsError(f"{options.source} has stages, which run end to end with `layerwise compress --recipe`; "
                            "`plan` computes one stage's plan.")
    if recipe_out is not None:
        ensure_output_free(recipe_out, overwrite, "Recipe file")
    settings = _settings(**evaluation, threads=threads, **options.calibration())
    the_plan = plan_to_file(model, options.budget(), out, options.method, options.chosen_allocator, settings, overwrite,
                            options.nm, options.chosen_structure, **options.allocator_params())
    if recipe_out is not None:
        atomic_write_text(recipe_out, options.to_recipe())
    console.print(f"{len(the_plan.actions)} actions ({the_plan.method} / {the_plan.allocator}) written to {out}")


@app.command()
@cli_errors
@evaluation_command
@calibration_command
def apply(
    plan_file: Annotated[Path, typer.Option("--plan", "-p", help="Plan JSON written by `layerwise plan`.")],
    model: ModelOpt = "smollm2-135m",
    out: OutDir = Path("layerwise-out"),
    overwrite: Overwrite = False,
    other_weights: Annotated[bool, typer.Option("--other-weights", help="Apply a plan computed on other weights "
                                                "(a fine-tune, another dtype) of the same architecture.")] = False,
    *,
    calibration: PlanOptions,
    evaluation: dict[str, Any],
) -> None:
    """Apply a saved plan to a fresh copy of the model, evaluate it and save it. A plan records the calibration
    windows it was computed on and is applied on exactly those (so the weights equal `compress`'s); --corpus
    and --seed then choose the evaluation only, and calibration options must agree with the plan's. A plan also
    records the weights it was computed on; other weights are refused unless --other-weights."""

    settings = _settings(**evaluation, **calibration.calibration())
    record = apply_plan_file(model, plan_file, settings, out, overwrite,
                             calibration=calibration.model_dump(mode="json", exclude_none=True),
                             other_weights=other_weights)
    _print_compression_table(record, out)


@app.command()
@cli_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories written by compress, apply or eval --out.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="File to write (default: inside the one run's directory).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="html (default), md, or png (one run's allocation).")] = None,
) -> None:
    """Compare runs: an HTML page (table, Pareto plots, per-layer allocations), a markdown table or a PNG."""

    path = write_report(run_dirs, out, fmt)
    console.print(f"wrote {path}")



app.add_typer(runtime_app, name="runtime")
app.command()(serve)


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="layerwise")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
