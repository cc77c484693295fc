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
Nsamples = Annotated[Optional[int], typer.Option(help="Calibration windows (default 128; depth: 8 of 256 tokens, the depth table's setting, so a search takes minutes on a CPU rather than hours).")]
Method = Annotated[Optional[str], typer.Option(help="unstructured: magnitude (default), wanda, sparsegpt (or *_ww); width: importance taylor (default) or act; quant: rtn (default) or gptq, gguf with GGUF types.")]
Allocator = Annotated[str, typer.Option(help="Per-layer allocator: uniform, owl, alpha; depth: sprint, sleb, shortgpt, drop-last; width: uniform, adapt, rl, rl-refine; quant: uniform, greedy, automp-rl. Expected search time at the defaults, smollm2-135m on 2 CPU cores (benchmarks/RESULTS.md): sprint 4 min and sleb 10 min to 1.4x, rl 1.5 min, rl-refine 4 min, greedy 5 min and automp-rl 9 min (4.5 for the shared sensitivity pass, cached); it grows with the calibration tokens and the model; every search shows its progress and time left.")]
Sparsity = Annotated[Optional[float], typer.Option(help="Target mean sparsity over decoder linears, in [0, 1) (default 0.5).")]
Structure = Annotated[str, typer.Option(help="unstructured (sparsity per linear), depth (remove attention/MLP sublayers), width (slice heads and FFN channels) or quant (bits per linear).")]
PruningRatio = Annotated[Optional[float], typer.Option("--pruning-ratio", help="width: fraction of the eligible attention/MLP parameters removed.")]
AttnLayers = Annotated[Optional[str], typer.Option("--attn-layers", help="width: attention layers that may be pruned, start:end (default all).")]
MlpLayers = Annotated[Optional[str], typer.Option("--mlp-layers", help="width: MLP layers that may be pruned, start:end (default all).")]
ChannelMultiple = Annotated[Optional[int], typer.Option("--channel-multiple", help="width: FFN widths move in multiples of this (default 8).")]
TaylorSeqLen = Annotated[Optional[int], typer.Option("--taylor-seq-len", help="width/taylor: calibration sequence length (default 64).")]
RlSteps = Annotated[Optional[int], typer.Option("--rl-steps", help="rl/rl-refine: environment steps of training (default 3000 / 320).")]
RlAlgo = Annotated[Optional[str], typer.Option("--rl-algo", help="rl/rl-refine: ppo (default) or a2c.")]
RlWAcc = Annotated[Optional[float], typer.Option("--rl-w-acc", help="rl/rl-refine: weight of the accuracy term (default 1.0).")]
RlAlpha = Annotated[Optional[float], typer.Option("--rl-alpha", help="rl/rl-refine: weight of FLOPs (default 0.2).")]
RlBeta = Annotated[Optional[float], typer.Option("--rl-beta", help="rl/rl-refine: weight of weight bytes (default 0.6).")]
RlGamma = Annotated[Optional[float], typer.Option("--rl-gamma", help="rl/rl-refine: weight of peak activation (default 0.2).")]
RlDelta = Annotated[Optional[float], typer.Option("--rl-delta", help="rl/rl-refine: weight of KV-cache bytes (default 0.4).")]
RefineMoves = Annotated[Optional[int], typer.Option("--refine-moves", help="rl-refine: moves per episode (default 8).")]
RefineBlock = Annotated[Optional[int], typer.Option("--refine-block", help="rl-refine: FFN channels moved at once (default 64).")]
AdaptAmplitude = Annotated[Optional[float], typer.Option("--adapt-amplitude", help="adapt/rl-refine: layer ratios within +- this of the global one (default 0.2).")]
TargetSpeedup = Annotated[Optional[float], typer.Option("--target-speedup", help="depth: remove sublayers until this predicted speedup.")]
NumRemove = Annotated[Optional[int], typer.Option("--num-remove-sublayers", help="depth: remove exactly this many sublayers.")]
EvalSpeedups = Annotated[Optional[str], typer.Option("--eval-speedups", help="depth: also evaluate the search state at these predicted speedups, e.g. 1.2,1.4.")]
Normalize = Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="sprint: divide L2 distances by the reference norm.")]
LatencyAware = Annotated[Optional[bool], typer.Option("--latency-aware/--no-latency-aware", help="sprint: divide sensitivity by the latency saved (default on).")]
NumCandidates = Annotated[Optional[int], typer.Option("--num-candidate-sublayers", help="sprint: candidates rescored after tuning (default 4; the reference's 5; 0 = no tuning).")]
TuningRatio = Annotated[Optional[float], typer.Option("--in-comp-tuning-ratio", help="sprint: share of the down projection's columns (in_channel) or rows (out_channel) refitted (default 0.1; the reference's 1.0).")]
Damping = Annotated[Optional[float], typer.Option("--damping-coefficient", help="sprint: damping of the refit towards the original weights (default 0.01 relative; the reference's 0).")]
RelativeDamping = Annotated[Optional[bool], typer.Option("--relative-damping/--absolute-damping", help="sprint: damping relative to mean diag(XᵀX) as a ridge (default), or absolute as the reference code stacks it.")]
Direction = Annotated[Optional[str], typer.Option("--direction", help="sprint: refit down_proj's input columns, the others held fixed (in_channel, default) or its output rows over all inputs (out_channel, the reference's).")]
TuningSublayer = Annotated[Optional[str], typer.Option("--tuning-sublayer", help="sprint: the sublayer tuned after a removal (mlp).")]
UpdateTuned = Annotated[Optional[bool], typer.Option("--update-tuned-weights/--no-update-tuned-weights", help="sprint: keep the tuning of removed candidates (default on).")]
NumCheckpoints = Annotated[Optional[int], typer.Option("--num-checkpoints", help="sprint: activation checkpoints along the model (default 8).")]
CheckpointCpu = Annotated[Optional[bool], typer.Option("--checkpointing-on-cpu/--checkpointing-on-device", help="sprint/sleb: keep checkpoints in CPU memory.")]
Generation = Annotated[bool, typer.Option("--generation/--no-generation", help="Latency objective: prompt + generated tokens (default), or prefill only.")]
SpeedupBatch = Annotated[int, typer.Option("--speedup-batch-size", help="Latency: batch size.")]
SpeedupIterations = Annotated[int, typer.Option("--speedup-iterations", help="Latency: timed repeats (median reported).")]
CalibSeqlen = Annotated[Optional[int], typer.Option("--calib-seqlen", help="Calibration window (default: --seqlen).")]
NM = Annotated[Optional[str], typer.Option("--nm", help="Semi-structured N:M pattern, e.g. 2:4 (uniform, sparsity N/M).")]
Epsilon = Annotated[Optional[float], typer.Option(help="alpha: sparsities span [1-eps, 1+eps] x target (default 0.2).")]
Metric = Annotated[Optional[str], typer.Option(help="alpha: alpha_peak (default) or alpha_mid; sprint: l2-sentence (default), l2-token, cosine-token, cosine-sentence.")]
MetricCache = Annotated[Optional[Path], typer.Option("--metric-cache", help="alpha: directory caching metric values.")]
OwlM = Annotated[Optional[float], typer.Option("--owl-m", help="owl: outlier threshold M x mean (default 5).")]
OwlLambda = Annotated[Optional[float], typer.Option("--owl-lambda", help="owl: sparsity range +-lambda (default 0.08).")]
Tasks = Annotated[Optional[str], typer.Option(help="Zero-shot tasks through lm-eval, e.g. arc_easy,piqa ('default': the standard set).")]
Limit = Annotated[Optional[int], typer.Option(help="Zero-shot items per task, a seeded random subset (default 500; 0 = all).")]
PromptLength = Annotated[int, typer.Option("--prompt-length", help="Latency: prompt tokens for prefill.")]
GenerationLength = Annotated[int, typer.Option("--generation-length", help="Latency: decoded tokens.")]
Bits = Annotated[Optional[str], typer.Option("--bits", help="quant: bit width (uniform), or the choices 3,4,8 (greedy); or GGUF types, e.g. q4_k,q5_0,q6_k,q8_0 (llama.cpp's grids and quantizers).")]
GroupSize = Annotated[Optional[int], typer.Option("--group-size", help="quant: inputs per scale group (default 128; a shorter last group when it does not divide; 0 = per channel).")]
Symmetric = Annotated[Optional[bool], typer.Option("--symmetric/--asymmetric", help="quant: symmetric codes (default asymmetric).")]
Awq = Annotated[Optional[bool], typer.Option("--awq/--no-awq", help="quant: AWQ first (its scale and clipping searches, as llm-awq runs them), then rtn or gptq.")]
ActOrder = Annotated[Optional[bool], typer.Option("--act-order/--no-act-order", help="quant gptq: columns by decreasing Hessian diagonal, static groups (default on).")]
AvgBits = Annotated[Optional[float], typer.Option("--avg-bits", help="quant: average bits per decoder-linear weight the plan may use.")]
Episodes = Annotated[Optional[int], typer.Option("--episodes", help="automp-rl: sampled configurations (default 300).")]
MpAlpha = Annotated[Optional[float], typer.Option("--alpha", help="automp-rl: weight of the perplexity term (default 0.7).")]
MpBeta = Annotated[Optional[float], typer.Option("--beta", help="automp-rl: weight of the memory saving (default 2.0).")]
EvalSamples = Annotated[Optional[int], typer.Option("--eval-samples", help="automp-rl: calibration windows of 128 tokens scoring each candidate (default 4).")]
Seeds = Annotated[Optional[int], typer.Option("--seeds", help="automp-rl: independent searches (seed, seed+1, ...); the best configuration of any is kept (default 1).")]
Sensitivity = Annotated[Optional[str], typer.Option("--sensitivity", help="greedy / automp-rl: per-linear sensitivity with only that linear rounded: kl (default: output KL divergence from dense), ppl (ln PPL increase) or error (activation-weighted RTN error, no forward passes).")]
RecoverSteps = Annotated[int, typer.Option("--recover-steps", help="LoRA (peft) fine-tune steps on the calibration windows after pruning (0 = none).")]
RecoverLr = Annotated[float, typer.Option("--recover-lr", help="Learning rate of the LoRA recovery.")]
Latency = Annotated[bool, typer.Option("--latency/--no-latency", help="Measure prefill/decode latency.")]
MaxBytes = Annotated[Optional[int], typer.Option("--max-bytes", help="quant with GGUF types: at most this many tensor bytes in the GGUF file (embeddings and norms included).")]
Imatrix = Annotated[Optional[bool], typer.Option("--imatrix/--no-imatrix", help="quant with GGUF types: weight llama.cpp's quantizer by the calibration's mean squared inputs (an importance matrix).")]
LlamacppActivations = Annotated[Optional[bool], typer.Option("--llamacpp-activations/--float-activations", help="quant with GGUF types: the searches score candidates with llama.cpp's rounding of activations (q8_0/q8_K blocks, f16) simulated, as the file will compute.")]
EmbeddingType = Annotated[Optional[str], typer.Option("--embedding-type", help="GGUF type of the token embedding in the export and in --max-bytes (default q8_0 for quantized plans).")]
Export = Annotated[Optional[str], typer.Option("--export", help="Also write the compressed model for deployment: gguf (RUN/model.gguf, measured in llama.cpp beside the dense model).")]
ExportType = Annotated[str, typer.Option("--export-type", help="GGUF type of linears that stay float in the export: f32, f16 (default) or bf16.")]
Engine = Annotated[str, typer.Option("--engine", help="pytorch (any model) or llama.cpp (a .gguf file).")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="llama.cpp threads (default: as many as PyTorch uses).")]
LatencyEngine = Annotated[Optional[str], typer.Option("--latency-engine", help="Engine that times the searches' latency tables: pytorch or llama.cpp (GGUF exports, where the model will run). depth: pytorch when unset; width: adds a measured latency prediction beside the FLOP one.")]


def _measurement(tasks: Optional[str], limit: Optional[int], prompt_length: int, generation_length: int,
                 latency: bool, generation: bool = True, batch: int = 1, iterations: int = 5) -> dict[str, Any]:
    """RunSettings fields for zero-shot scoring and latency measurement."""
    setting = {"prompt_length": prompt_length, "generation_length": generation_length, "generation": generation,
               "batch_size": batch, "repeats": iterations} if latency else None
    measurement = {"tasks": tasks.split(",") if tasks else [], "latency": setting}
    if limit is not None:
        measurement["task_limit"] = limit or None  # 0: every item
    return measurement


def _allocator_params(**values: Any) -> dict[str, Any]:
    """Only the allocator options the user gave; the allocator checks they are its own."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if v is not None}


def _width_params(attn_layers, mlp_layers, channel_multiple, taylor_seq_len, rl_steps, rl_algo, rl_w_acc,
                  rl_alpha, rl_beta, rl_gamma, rl_delta, refine_moves, refine_block, adapt_amplitude) -> dict[str, Any]:
    """The width structure's and width allocators' options, as given."""
    return _allocator_params(attn_layers=attn_layers, mlp_layers=mlp_layers, channel_multiple=channel_multiple,
                             taylor_seq_len=taylor_seq_len, rl_steps=rl_steps, rl_algo=rl_algo, rl_w_acc=rl_w_acc,
                             rl_alpha=rl_alpha, rl_beta=rl_beta, rl_gamma=rl_gamma, rl_delta=rl_delta,
                             refine_moves=refine_moves, refine_block=refine_block, adapt_amplitude=adapt_amplitude)


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
                "latency.generation_length": "--generation-length", "latency.repeats": "--speedup-iterations",
                "latency.batch_size": "--speedup-batch-size"}


# Calibration a search of this structure gets when the user names none: SPRINT's and SLEB's searches cost
# a forward pass per candidate and step, so the 128 x 512 default of the one-pass methods would run for
# hours on a CPU (the depth table uses 8 x 256 and takes 4-10 minutes per method to 1.6x).
CALIBRATION_DEFAULTS: dict[str, dict[str, int]] = {"depth": {"nsamples": 8, "calib_seqlen": 256}}


def _calibration(structure: str, nsamples: Optional[int], calib_seqlen: Optional[int]) -> dict[str, Any]:
    """``nsamples`` and ``calib_seqlen`` as given, else the structure's defaults (else RunSettings')."""
    defaults = CALIBRATION_DEFAULTS.get(structure, {})
    given = {"nsamples": nsamples, "calib_seqlen": calib_seqlen}
    if any(value is not None for value in given.values()):
        defaults = {}  # a user who sets either sets the calibration; the other keeps its general default
    return {k: v if v is not None else defaults.get(k, RunSettings.model_fields[k].default) for k, v in given.items()}


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


def _budget(structure: str, sparsity: Optional[float], target_speedup: Optional[float],
            num_remove: Optional[int], pruning_ratio: Optional[float] = None,
            avg_bits: Optional[float] = None, max_bytes: Optional[int] = None) -> Budget:
    if structure == "depth":
        return Budget.for_depth(target_speedup, num_remove)
    if structure == "width":
        return Budget.for_width(pruning_ratio)
    if structure == "quant":
        return Budget.for_bits(avg_bits, max_bytes)
    return Budget.for_sparsity(0.5 if sparsity is None else sparsity)


def _speedups(text: Optional[str]) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()] if text else []
    except ValueError:
        raise SettingsError(f"--eval-speedups must be numbers separated by commas (got '{text}').") from None


def _fmt_bytes(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _measured_rows(metrics: dict) -> list[tuple[str, str]]:
    """Table rows for perplexity, zero-shot scores and latency, each only when measured."""
    from .evaluate.zeroshot import headline_metric

    rows = []
    if metrics.get("ppl") is not None:
        rows.append(("perplexity", f"{metrics['ppl']:.3f}"))
    for name, score in ((metrics.get("zeroshot") or {}).get("scores") or {}).items():
        label = headline_metric(score)
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
    if metrics.get("removed_sublayers"):
        speedup = metrics.get("speedup") or {}
        table.add_row("sublayers removed", "", str(len(metrics["removed_sublayers"])))
        table.add_row("speedup predicted / measured", "", f"{metrics['predicted_speedup']:.2f}x / "
                      f"{_fmt(speedup.get('total'), '.2f')}x")
        table.add_row("pruning search time", "", f"{metrics['pruning_s']:.1f} s")
    if metrics.get("widths"):
        _width_rows(table, metrics)
    avg_bits = record["plan"]["prediction"].get("avg_bits")
    if avg_bits is not None:
        table.add_row("average bits (decoder linears)", "", f"{avg_bits:.3f}")
        table.add_row("quantized linears, stored MiB (vs 16-bit)", f"{2 * metrics['quantized_weights'] / 2**20:.1f}",
                      f"{metrics['quantized_bytes'] / 2**20:.1f} (-{metrics['memory_reduction_vs_16bit']:.1%})")
    if metrics.get("recovery"):
        recovery = metrics["recovery"]
        table.add_row(f"PPL before / after LoRA ({recovery['steps']} steps)", "",
                      f"{_fmt(recovery['ppl_before'], '.3f')} / {_fmt(recovery['ppl_after'], '.3f')}")
    table.add_row("wall time", "", f"{record['timings']['total_s']:.1f} s")
    console.print(table)
    if record.get("deployment"):
        _print_deployment(record["deployment"], out)
    _print_protocols(record)
    if all(action["op"] == "sparsify" for action in record["plan"]["actions"]):
        console.print("masked sparsity saves no bytes or time by itself.")
    console.print(f"saved to {out}")


def _print_deployment(deployment: dict, out: Path) -> None:
    """Dense and compressed GGUF files as llama.cpp runs them: size, perplexity, prefill and decode speed."""
    dense, compressed = deployment.get("dense") or {}, deployment["compressed"]
    table = Table(title=f"deployed in llama.cpp: {out / compressed['file']}")
    table.add_column("metric")
    table.add_column(f"dense ({dense.get('outtype', 'float')})" if dense else "dense", justify="right")
    table.add_column("compressed", justify="right")
    table.add_row("GGUF file", _fmt_bytes(dense["file_bytes"]) if dense else "",
                  _fmt_bytes(compressed["file_bytes"]))
    dense_rows = dict(_measured_rows(dense)) if dense else {}
    for label, value in _measured_rows(compressed):
        table.add_row(f"{label} (llama.cpp)", dense_rows.get(label, ""), value)
    console.print(table)
    for note in compressed["export"]["notes"]:
        console.print(f"note: {note}")


def _width_rows(table: Table, metrics: dict) -> None:
    """Width runs: the cost model's proxies dense vs compressed, FLOP-predicted vs measured speed, search time."""
    dense, costs = metrics.get("dense_costs") or {}, metrics.get("costs") or {}
    for key, label in (("flops", "FLOPs (prefill + decode)"), ("peak_activation_bytes", "peak activation"),
                       ("kv_bytes", "KV cache")):
        if key in costs:
            value = (lambda v: f"{v / 1e9:.2f} G") if key == "flops" else (lambda v: _fmt_bytes(v))
            table.add_row(label, value(dense[key]), value(costs[key]))
    predicted, measured = metrics.get("flop_speedup") or {}, metrics.get("speedup") or {}
    for phase in ("prefill", "decode"):
        table.add_row(f"{phase} speedup FLOP-predicted / measured", "",
                      f"{_fmt(predicted.get(phase), '.2f')}x / {_fmt(measured.get(phase), '.2f')}x")
    table.add_row("allocation search time", "", f"{_fmt(metrics.get('pruning_s'), '.1f')} s")


@app.command()
@cli_errors
def compress(
    model: ModelOpt = "smollm2-135m",
    out: OutDir = Path("layerwise-out"),
    method: Method = None,
    allocator: Allocator = "uniform",
    sparsity: Sparsity = None,
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
    nsamples: Nsamples = None,
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
    structure: Structure = "unstructured",
    target_speedup: TargetSpeedup = None,
    num_remove_sublayers: NumRemove = None,
    eval_speedups: EvalSpeedups = None,
    normalize: Normalize = None,
    latency_aware: LatencyAware = None,
    num_candidate_sublayers: NumCandidates = None,
    in_comp_tuning_ratio: TuningRatio = None,
    damping_coefficient: Damping = None,
    direction: Direction = None,
    relative_damping: RelativeDamping = None,
    tuning_sublayer: TuningSublayer = None,
    update_tuned_weights: UpdateTuned = None,
    num_checkpoints: NumCheckpoints = None,
    checkpointing_on_cpu: CheckpointCpu = None,
    generation: Generation = True,
    speedup_batch_size: SpeedupBatch = 1,
    speedup_iterations: SpeedupIterations = 5,
    pruning_ratio: PruningRatio = None,
    attn_layers: AttnLayers = None,
    mlp_layers: MlpLayers = None,
    channel_multiple: ChannelMultiple = None,
    taylor_seq_len: TaylorSeqLen = None,
    rl_steps: RlSteps = None,
    rl_algo: RlAlgo = None,
    rl_w_acc: RlWAcc = None,
    rl_alpha: RlAlpha = None,
    rl_beta: RlBeta = None,
    rl_gamma: RlGamma = None,
    rl_delta: RlDelta = None,
    refine_moves: RefineMoves = None,
    refine_block: RefineBlock = None,
    adapt_amplitude: AdaptAmplitude = None,
    recover_steps: RecoverSteps = 0,
    recover_lr: RecoverLr = 1e-4,
    bits: Bits = None,
    group_size: GroupSize = None,
    symmetric: Symmetric = None,
    avg_bits: AvgBits = None,
    awq: Awq = None,
    act_order: ActOrder = None,
    episodes: Episodes = None,
    alpha: MpAlpha = None,
    beta: MpBeta = None,
    eval_samples: EvalSamples = None,
    seeds: Seeds = None,
    sensitivity: Sensitivity = None,
    max_bytes: MaxBytes = None,
    imatrix: Imatrix = None,
    llamacpp_activations: LlamacppActivations = None,
    embedding_type: EmbeddingType = None,
    export: Export = None,
    export_type: ExportType = "f16",
    threads: Threads = None,
    latency_engine: LatencyEngine = None,
) -> None:
    """Load, plan, apply, evaluate and save; print dense vs compressed metrics."""
    from .pipeline import compress as run_compress

    budget = _budget(structure, sparsity, target_speedup, num_remove_sublayers, pruning_ratio, avg_bits, max_bytes)
    settings = _settings(corpus=corpus, eval_text=eval_text, calib_text=calib_text, seqlen=seqlen,
                         max_windows=max_windows, batch_size=batch_size, dtype=dtype, device=device, seed=seed,
                         **_calibration(structure, nsamples, calib_seqlen), recover_steps=recover_steps,
                         recover_lr=recover_lr, threads=threads, latency_engine=latency_engine,
                         deploy=_deploy(export, export_type, embedding_type),
                         **_measurement(tasks, limit, prompt_length, generation_length, latency, generation,
                                        speedup_batch_size, speedup_iterations))
    params = _allocator_params(epsilon=epsilon, metric=metric, metric_cache=metric_cache, owl_m=owl_m,
                               owl_lambda=owl_lambda, normalize=normalize, latency_aware=latency_aware,
                               num_candidate_sublayers=num_candidate_sublayers,
                               in_comp_tuning_ratio=in_comp_tuning_ratio, damping_coefficient=damping_coefficient,
                               direction=direction, relative_damping=relative_damping,
                               tuning_sublayer=tuning_sublayer, update_tuned_weights=update_tuned_weights,
                               num_checkpoints=num_checkpoints, checkpointing_on_cpu=checkpointing_on_cpu,
                               **_width_params(attn_layers, mlp_layers, channel_multiple, taylor_seq_len, rl_steps,
                                               rl_algo, rl_w_acc, rl_alpha, rl_beta, rl_gamma, rl_delta,
                                               refine_moves, refine_block, adapt_amplitude),
                               **_allocator_params(bits=bits, group_size=group_size, symmetric=symmetric, awq=awq,
                                                   act_order=act_order,
                                                   episodes=episodes, alpha=alpha, beta=beta,
                                                   eval_samples=eval_samples, seeds=seeds,
                                                   sensitivity=sensitivity, imatrix=imatrix,
                                                   embedding_type=embedding_type,
                                                   llamacpp_activations=llamacpp_activations))
    record = run_compress(model, budget, method, allocator, settings, out, overwrite, nm, structure,
                          _speedups(eval_speedups), **params)
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
    engine: Engine = "pytorch",
    threads: Threads = None,
) -> None:
    """Perplexity, zero-shot accuracy, size and latency of a model (named, a path, a layerwise directory, or a
    .gguf file run by llama.cpp with --engine llama.cpp)."""
    from .pipeline import evaluate_model

    settings = _settings(corpus=corpus, eval_text=eval_text, seqlen=seqlen, max_windows=max_windows,
                         batch_size=batch_size, dtype=dtype, device=device, seed=seed, perplexity=perplexity,
                         engine=engine, threads=threads,
                         **_measurement(tasks, limit, prompt_length, generation_length, latency))
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
    table.add_row("weight bytes (stored)", _fmt_bytes(metrics["weight_bytes"]))
    if "file_bytes" in metrics:
        table.add_row("file size", _fmt_bytes(metrics["file_bytes"]))
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
    from .export import export_gguf
    from .models import load
    from .pipeline import ensure_output_free

    if fmt != "gguf":
        raise SettingsError(f"Unknown export format '{fmt}'; the supported one is gguf.")
    ensure_output_free(out, overwrite, "Output file")
    report = export_gguf(load(model), out, outtype, embedding_type, overwrite)
    table = Table(title=f"{out} ({report.architecture})")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("file size", _fmt_bytes(report.file_bytes))
    table.add_row("tensors by type", ", ".join(f"{k} {v}" for k, v in sorted(report.tensor_types.items())))
    table.add_row("tokenizer", report.tokenizer_from)
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")


def _deploy(export: Optional[str], export_type: str, embedding_type: Optional[str]) -> Optional[dict]:
    """RunSettings.deploy from --export/--export-type/--embedding-type (None: no export)."""
    if export is None:
        return None
    if export != "gguf":
        raise SettingsError(f"Unknown --export format '{export}'; the supported one is gguf.")
    from .gguf import gguf_type

    gguf_type(export_type)
    if embedding_type is not None:
        gguf_type(embedding_type)
    return {"format": export, "outtype": export_type, "embedding_type": embedding_type}


@app.command()
@cli_errors
def plan(
    out: Annotated[Path, typer.Option("--out", "-o", help="Plan JSON file to write.")],
    model: ModelOpt = "smollm2-135m",
    method: Method = None,
    allocator: Allocator = "uniform",
    sparsity: Sparsity = None,
    overwrite: Overwrite = False,
    corpus: Corpus = "wiki",
    calib_text: CalibText = None,
    seqlen: Seqlen = 512,
    seed: Seed = 0,
    nsamples: Nsamples = None,
    calib_seqlen: CalibSeqlen = None,
    nm: NM = None,
    epsilon: Epsilon = None,
    metric: Metric = None,
    metric_cache: MetricCache = None,
    owl_m: OwlM = None,
    owl_lambda: OwlLambda = None,
    structure: Structure = "unstructured",
    target_speedup: TargetSpeedup = None,
    num_remove_sublayers: NumRemove = None,
    latency_aware: LatencyAware = None,
    num_candidate_sublayers: NumCandidates = None,
    pruning_ratio: PruningRatio = None,
    attn_layers: AttnLayers = None,
    mlp_layers: MlpLayers = None,
    channel_multiple: ChannelMultiple = None,
    taylor_seq_len: TaylorSeqLen = None,
    rl_steps: RlSteps = None,
    rl_algo: RlAlgo = None,
    refine_moves: RefineMoves = None,
    adapt_amplitude: AdaptAmplitude = None,
    bits: Bits = None,
    group_size: GroupSize = None,
    symmetric: Symmetric = None,
    avg_bits: AvgBits = None,
    awq: Awq = None,
    act_order: ActOrder = None,
    max_bytes: MaxBytes = None,
    imatrix: Imatrix = None,
    llamacpp_activations: LlamacppActivations = None,
    embedding_type: EmbeddingType = None,
    latency_engine: LatencyEngine = None,
) -> None:
    """Compute a plan and write it as JSON, without touching any weights."""
    from .pipeline import plan_to_file

    budget = _budget(structure, sparsity, target_speedup, num_remove_sublayers, pruning_ratio, avg_bits, max_bytes)
    settings = _settings(corpus=corpus, calib_text=calib_text, seqlen=seqlen, seed=seed,
                         **_calibration(structure, nsamples, calib_seqlen), latency_engine=latency_engine)
    params = _allocator_params(epsilon=epsilon, metric=metric, metric_cache=metric_cache, owl_m=owl_m,
                               owl_lambda=owl_lambda, latency_aware=latency_aware,
                               num_candidate_sublayers=num_candidate_sublayers,
                               **_width_params(attn_layers, mlp_layers, channel_multiple, taylor_seq_len, rl_steps,
                                               rl_algo, None, None, None, None, None, refine_moves, None,
                                               adapt_amplitude),
                               **_allocator_params(bits=bits, group_size=group_size, symmetric=symmetric, awq=awq,
                                                   act_order=act_order, imatrix=imatrix,
                                                   embedding_type=embedding_type,
                                                   llamacpp_activations=llamacpp_activations))
    the_plan = plan_to_file(model, budget, out, method, allocator, settings, overwrite, nm, structure, **params)
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
    nsamples: Nsamples = None,
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
                         **_calibration("", nsamples, calib_seqlen),
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


from .runtime.cli import runtime_app, serve  # noqa: E402  (they reuse cli_errors and console from here)

app.add_typer(runtime_app, name="runtime")
app.command()(serve)


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="layerwise")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
