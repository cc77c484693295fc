"""Planning options declared once, as one pydantic model: `plan` and `compress` take exactly these, their CLI
help comes from the field descriptions, and a recipe file (``--recipe r.yaml``) holds the same fields."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional, get_args

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import Budget, RunSettings
from .errors import SettingsError

RECIPE_FORMAT = "layerwise.recipe/1"


def option(help: str, flags: str | None = None, param: str | None = None, only: str | None = None) -> Any:
    """A planning option: its help text, its CLI flag(s) when not ``--field-name``, when it differs the name of
    the allocator or structure parameter it sets, and the one allocator it belongs to when its name is shared."""
    return Field(None, description=help, json_schema_extra={"flags": flags, "param": param, "only": only})


class PlanOptions(BaseModel):
    """Everything that decides a plan: structure, method, allocator, budget, calibration and every option of
    the structure and allocator chosen (unset ones keep their component's default)."""

    model_config = ConfigDict(extra="forbid")

    structure: Optional[str] = option("unstructured (sparsity per linear, default), depth (remove attention/MLP "
                                      "sublayers), width (slice heads and FFN channels) or quant (bits per linear).")
    method: Optional[str] = option("unstructured: magnitude (default), wanda, sparsegpt (or *_ww); width: importance "
                                   "taylor (default) or act; quant: rtn (default) or gptq, gguf with GGUF types.")
    allocator: Optional[str] = option(
        "Per-layer allocator: uniform (default), owl, alpha; depth: sprint, sleb, shortgpt, drop-last; width: uniform, "
        "adapt, rl, rl-refine; quant: uniform, greedy, automp-rl. Expected search time at the defaults, "
        "smollm2-135m on 2 CPU cores (benchmarks/RESULTS.md): sprint 4 min and sleb 10 min to 1.4x, rl 1.5 min, "
        "rl-refine 4 min, greedy 5 min and automp-rl 9 min (4.5 for the shared sensitivity pass, cached); it grows "
        "with the calibration tokens and the model; every search shows its progress and time left.")
    # budget
    sparsity: Optional[float] = option("Target mean sparsity over decoder linears, in [0, 1) (default 0.5).")
    nm: Optional[str] = option("Semi-structured N:M pattern, e.g. 2:4 (uniform, sparsity N/M).")
    target_speedup: Optional[float] = option("depth: remove sublayers until this predicted speedup.")
    num_remove_sublayers: Optional[int] = option("depth: remove exactly this many sublayers.")
    pruning_ratio: Optional[float] = option("width: fraction of the eligible attention/MLP parameters removed.")
    avg_bits: Optional[float] = option("quant: average bits per decoder-linear weight the plan may use.")
    max_bytes: Optional[int] = option("quant with GGUF types: at most this many tensor bytes in the GGUF file "
                                      "(embeddings and norms included).")
    # calibration
    nsamples: Optional[int] = option("Calibration windows (default 128; depth: 8 of 256 tokens, the depth table's "
                                     "setting, so a search takes minutes on a CPU rather than hours).")
    calib_seqlen: Optional[int] = option("Calibration window (default: --seqlen).")
    calib_text: Optional[Path] = option("Calibrate on this text file instead.")
    # unstructured allocators
    epsilon: Optional[float] = option("alpha: sparsities span [1-eps, 1+eps] x target (default 0.2).")
    esd_metric: Optional[str] = option("alpha: the spectral metric, alpha_peak (default) or alpha_mid.",
                                       param="metric", only="alpha")
    metric_cache: Optional[Path] = option("alpha: directory caching metric values.")
    owl_m: Optional[float] = option("owl: outlier threshold M x mean (default 5).")
    owl_lambda: Optional[float] = option("owl: sparsity range +-lambda (default 0.08).")
    # depth
    sprint_metric: Optional[str] = option("sprint: distance of the next MLP's input, l2-sentence (default), "
                                          "l2-token, cosine-token or cosine-sentence.", param="metric",
                                          only="sprint")
    normalize: Optional[bool] = option("sprint: divide L2 distances by the reference norm.",
                                       "--normalize/--no-normalize")
    latency_aware: Optional[bool] = option("sprint: divide sensitivity by the latency saved (default on).",
                                           "--latency-aware/--no-latency-aware")
    num_candidate_sublayers: Optional[int] = option("sprint: candidates rescored after tuning (default 4; the "
                                                    "reference's 5; 0 = no tuning).")
    in_comp_tuning_ratio: Optional[float] = option("sprint: share of the down projection's columns (in_channel) or "
                                                   "rows (out_channel) refitted (default 0.1; the reference's 1.0).")
    damping_coefficient: Optional[float] = option("sprint: damping of the refit towards the original weights "
                                                  "(default 0.01 relative; the reference's 0).")
    relative_damping: Optional[bool] = option("sprint: damping relative to mean diag(XᵀX) as a ridge (default), or "
                                              "absolute as the reference code stacks it.",
                                              "--relative-damping/--absolute-damping")
    direction: Optional[str] = option("sprint: refit down_proj's input columns, the others held fixed (in_channel, "
                                      "default) or its output rows over all inputs (out_channel, the reference's).")
    tuning_sublayer: Optional[str] = option("sprint: the sublayer tuned after a removal (mlp).")
    update_tuned_weights: Optional[bool] = option("sprint: keep the tuning of removed candidates (default on).",
                                                  "--update-tuned-weights/--no-update-tuned-weights")
    num_checkpoints: Optional[int] = option("sprint: activation checkpoints along the model (default 8).")
    checkpointing_on_cpu: Optional[bool] = option("sprint/sleb: keep checkpoints in CPU memory.",
                                                  "--checkpointing-on-cpu/--checkpointing-on-device")
    # width
    attn_layers: Optional[str] = option("width: attention layers that may be pruned, start:end (default all).")
    mlp_layers: Optional[str] = option("width: MLP layers that may be pruned, start:end (default all).")
    channel_multiple: Optional[int] = option("width: FFN widths move in multiples of this (default 8).")
    taylor_seq_len: Optional[int] = option("width/taylor: calibration sequence length (default 64).")
    rl_steps: Optional[int] = option("rl/rl-refine: environment steps of training (default 3000 / 320).")
    rl_algo: Optional[str] = option("rl/rl-refine: ppo (default) or a2c.")
    rl_w_acc: Optional[float] = option("rl/rl-refine: weight of the accuracy term (default 1.0).")
    rl_alpha: Optional[float] = option("rl/rl-refine: weight of FLOPs (default 0.2).")
    rl_beta: Optional[float] = option("rl/rl-refine: weight of weight bytes (default 0.6).")
    rl_gamma: Optional[float] = option("rl/rl-refine: weight of peak activation (default 0.2).")
    rl_delta: Optional[float] = option("rl/rl-refine: weight of KV-cache bytes (default 0.4).")
    refine_moves: Optional[int] = option("rl-refine: moves per episode (default 8).")
    refine_block: Optional[int] = option("rl-refine: FFN channels moved at once (default 64).")
    adapt_amplitude: Optional[float] = option("adapt/rl-refine: layer ratios within +- this of the global one "
                                              "(default 0.2).")
    # quantization
    bits: Optional[str] = option("quant: bit width (uniform), or the choices 3,4,8 (greedy); or GGUF types, e.g. "
                                 "q4_k,q5_0,q6_k,q8_0 (llama.cpp's grids and quantizers).")
    group_size: Optional[int] = option("quant: inputs per scale group (default 128; a shorter last group when it "
                                       "does not divide; 0 = per channel).")
    symmetric: Optional[bool] = option("quant: symmetric codes (default asymmetric).", "--symmetric/--asymmetric")
    awq: Optional[bool] = option("quant: AWQ first (its scale and clipping searches, as llm-awq runs them), then rtn "
                                 "or gptq.", "--awq/--no-awq")
    act_order: Optional[bool] = option("quant gptq: columns by decreasing Hessian diagonal, static groups (default "
                                       "on).", "--act-order/--no-act-order")
    episodes: Optional[int] = option("automp-rl: sampled configurations (default 300).")
    mp_alpha: Optional[float] = option("automp-rl: weight of the perplexity term (default 0.7).", param="alpha")
    mp_beta: Optional[float] = option("automp-rl: weight of the memory saving (default 2.0).", param="beta")
    eval_samples: Optional[int] = option("automp-rl: calibration windows of 128 tokens scoring each candidate "
                                         "(default 4).")
    seeds: Optional[int] = option("automp-rl: independent searches (seed, seed+1, ...); the best configuration of "
                                  "any is kept (default 1).")
    sensitivity: Optional[str] = option("greedy / automp-rl: per-linear sensitivity with only that linear rounded: "
                                        "kl (default: output KL divergence from dense), ppl (ln PPL increase) or error "
                                        "(activation-weighted RTN error, no forward passes).")
    imatrix: Optional[bool] = option("quant with GGUF types: weight llama.cpp's quantizer by the calibration's mean "
                                     "squared inputs (an importance matrix).", "--imatrix/--no-imatrix")
    llamacpp_activations: Optional[bool] = option(
        "quant with GGUF types: the searches score candidates with llama.cpp's rounding of activations (q8_0/q8_K "
        "blocks, f16) simulated, as the file will compute.", "--llamacpp-activations/--float-activations")
    embedding_type: Optional[str] = option("GGUF type of the token embedding in the export and in --max-bytes "
                                           "(default q8_0 for quantized plans).")
    # where the plan will run
    latency_engine: Optional[str] = option(
        "Engine that times the searches' latency tables: pytorch or llama.cpp (GGUF exports, where the model will "
        "run). depth: pytorch when unset; width: adds a measured latency prediction beside the FLOP one.")

    # -- what the pipeline needs ------------------------------------------------------------------------------

    @property
    def chosen_structure(self) -> str:
        return self.structure or "unstructured"

    @property
    def chosen_allocator(self) -> str:
        return self.allocator or "uniform"

    def budget(self) -> Budget:
        """The budget of the chosen structure from its budget options (each validated with one sentence)."""
        from .structures import STRUCTURES

        return STRUCTURES.get(self.chosen_structure).budget(self)

    def calibration(self) -> dict[str, Any]:
        """RunSettings' calibration fields: as given, else the structure's defaults (else RunSettings')."""
        from .structures import STRUCTURES

        structure = self.chosen_structure
        defaults = STRUCTURES.get(structure).calibration_defaults if structure in STRUCTURES else {}
        given = {"nsamples": self.nsamples, "calib_seqlen": self.calib_seqlen}
        if any(value is not None for value in given.values()):
            defaults = {}  # a user who sets either sets the calibration; the other keeps its general default
        values = {k: v if v is not None else defaults.get(k, RunSettings.model_fields[k].default)
                  for k, v in given.items()}
        return {**values, "calib_text": None if self.calib_text is None else str(self.calib_text),
                "latency_engine": self.latency_engine}

    def allocator_params(self) -> dict[str, Any]:
        """The structure's and allocator's options the user set, under their parameter names."""
        from .structures.unstructured import METHOD_ALIASES

        allocator = METHOD_ALIASES[self.method][1] if self.method in METHOD_ALIASES else self.chosen_allocator
        params = {}
        for name, value in self.model_dump(exclude_none=True).items():
            if name in NOT_PARAMETERS:
                continue
            only = _extra(name).get("only")
            if only is not None and allocator != only:
                raise SettingsError(f"{flag_of(name)} applies to the {only} allocator, not to {allocator}.")
            params[_param_name(name)] = str(value) if isinstance(value, Path) else value
        return params

    # -- recipes ----------------------------------------------------------------------------------------------

    @classmethod
    def from_recipe(cls, path: str | Path) -> "PlanOptions":
        """Options from a YAML recipe: a mapping of option names (``target_speedup`` or ``target-speedup``)."""
        import yaml

        file = Path(path).expanduser()
        if not file.is_file():
            raise SettingsError(f"Recipe file {file} does not exist.")
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise SettingsError(f"Recipe file {file} is not valid YAML ({str(exc).splitlines()[0]}).") from None
        data = data or {}
        if not isinstance(data, dict):
            raise SettingsError(f"Recipe file {file} must be a mapping of option names to values.")
        recipe_format = data.pop("format", RECIPE_FORMAT)
        if recipe_format != RECIPE_FORMAT:
            raise SettingsError(f"Recipe file {file} has format '{recipe_format}'; this version reads {RECIPE_FORMAT}.")
        return cls.parse({str(k).replace("-", "_"): v for k, v in data.items()}, f"Recipe file {file}")

    @classmethod
    def parse(cls, values: dict[str, Any], origin: str = "The options") -> "PlanOptions":
        """Validate ``values``; an unknown name or a wrong type becomes one sentence naming the option."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else "?"
            if error["type"] == "extra_forbidden":
                raise SettingsError(f"{origin} names an unknown option '{name}'.") from None
            raise SettingsError(f"{origin}: invalid {flag_of(name)}: {error['msg'][0].lower()}{error['msg'][1:]}.") \
                from None

    def merged(self, given: "PlanOptions") -> "PlanOptions":
        """These options (a recipe's) with every option set in ``given`` (the command line's) taking precedence."""
        return self.model_copy(update=given.model_dump(exclude_none=True))

    def to_recipe(self) -> str:
        """The options set, as a recipe file's text."""
        import yaml

        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.model_dump(exclude_none=True).items()}
        return yaml.safe_dump({"format": RECIPE_FORMAT, **values}, sort_keys=False)


# options that are not parameters of a structure or allocator
NOT_PARAMETERS = {"structure", "method", "allocator", "sparsity", "nm", "target_speedup", "num_remove_sublayers",
                  "pruning_ratio", "avg_bits", "max_bytes", "nsamples", "calib_seqlen", "calib_text",
                  "latency_engine"}


def _extra(name: str) -> dict[str, Any]:
    return PlanOptions.model_fields[name].json_schema_extra or {}


def _param_name(name: str) -> str:
    return _extra(name).get("param") or name


def flag_of(name: str) -> str:
    """The CLI flag of option ``name`` (the first of an on/off pair)."""
    flags = _extra(name).get("flags") if name in PlanOptions.model_fields else None
    return (flags or "--" + name.replace("_", "-")).split("/")[0]


def _register_flags() -> None:
    """Tell the structures which flag sets each renamed parameter, for their error messages."""
    from .structures.base import PARAMETER_FLAGS

    for name in PlanOptions.model_fields:
        param = _param_name(name)
        if param != name and not _extra(name).get("only"):  # shared names are checked per allocator above
            PARAMETER_FLAGS[param] = flag_of(name)


_register_flags()


def cli_parameters() -> list[inspect.Parameter]:
    """Every planning option as a typer keyword parameter (default None: unset), plus ``--recipe``."""
    parameters = [inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option("--recipe", help="YAML file of planning options (the names below, without "
                                                      "dashes or with); options given here override it.")])]
    for name, field in PlanOptions.model_fields.items():
        kind = next(t for t in get_args(field.annotation) if t is not type(None))
        flags = _extra(name).get("flags") or "--" + name.replace("_", "-")
        annotation = Annotated[Optional[kind], typer.Option(flags, help=field.description, show_default=False)]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return parameters


def collect(values: dict[str, Any]) -> PlanOptions:
    """The planning options of one command call: its recipe (if any) overridden by the options given."""
    recipe = values.pop("recipe", None)
    given = PlanOptions.parse({name: values.pop(name) for name in PlanOptions.model_fields if name in values})
    return PlanOptions.from_recipe(recipe).merged(given) if recipe is not None else given
