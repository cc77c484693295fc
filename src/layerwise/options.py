"""Planning options declared once, as one pydantic model: `plan` and `compress` take exactly these, their CLI
help comes from the field descriptions, and a recipe file (``--recipe r.yaml``) holds the same fields."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Iterable, Optional, get_args

import typer
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .config import Budget, RunSettings
from .errors import SettingsError
from .structures import STRUCTURES
from .structures.base import PARAMETER_FLAGS, option
from .structures.unstructured import METHOD_ALIASES

RECIPE_FORMAT = "layerwise.recipe/1"


class CommonOptions(BaseModel):
    """The options every plan has: structure, method, allocator, calibration, where latency is timed."""

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
    nsamples: Optional[int] = option("Calibration windows (default 128; depth: 8 of 256 tokens, the depth table's "
                                     "setting, so a search takes minutes on a CPU rather than hours).")
    calib_seqlen: Optional[int] = option("Calibration window (default: --seqlen).")
    calib_text: Optional[Path] = option("Calibrate on this text file instead.")
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

        return STRUCTURES.get(self.chosen_structure).budget(self)

    def calibration(self) -> dict[str, Any]:
        """RunSettings' calibration fields: as given, else the structure's defaults (else RunSettings')."""

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

        allocator = METHOD_ALIASES[self.method][1] if self.method in METHOD_ALIASES else self.chosen_allocator
        structure = STRUCTURES.get(self.chosen_structure)
        if structure.allocators is not None and allocator in structure.allocators:
            allocator = structure.allocators.canonical(allocator)
        params = {}
        for name, value in self.model_dump(mode="json", exclude_none=True).items():  # paths as strings
            if name in NOT_PARAMETERS:
                continue
            owners = DECLARED_BY.get(name)
            if owners is not None and allocator not in owners:
                raise SettingsError(f"Allocator '{allocator}' does not take {flag_of(name)} (an option of "
                                    f"{', '.join(sorted(owners))}).")
            params[_param_name(name)] = value
        return params

    # -- recipes ----------------------------------------------------------------------------------------------

    @classmethod
    def from_recipe(cls, path: str | Path) -> "CommonOptions":
        """Options from a YAML recipe: a mapping of option names (``target_speedup`` or ``target-speedup``)."""
        file, data = read_recipe_file(path)
        if not isinstance(data, dict):
            raise SettingsError(f"Recipe file {file} must be a mapping of option names to values.")
        if "stages" in data:
            raise SettingsError(f"Recipe file {file} has stages; they run end to end with `layerwise compress "
                                "--recipe` (layerwise.stages.StagedRecipe), not as one stage's options.")
        recipe_format = data.pop("format", RECIPE_FORMAT)
        if recipe_format != RECIPE_FORMAT:
            raise SettingsError(f"Recipe file {file} has format '{recipe_format}'; this version reads {RECIPE_FORMAT}.")
        return cls.parse({str(k).replace("-", "_"): v for k, v in data.items()}, f"Recipe file {file}")

    @classmethod
    def parse(cls, values: dict[str, Any], origin: str = "The options") -> "CommonOptions":
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

    def merged(self, given: "CommonOptions") -> "CommonOptions":
        """These options (a recipe's) with every option set in ``given`` (the command line's) taking precedence."""
        return self.model_copy(update=given.model_dump(exclude_none=True))

    def to_recipe(self) -> str:
        """The options set, as a recipe file's text."""

        return yaml.safe_dump({"format": RECIPE_FORMAT, **self.model_dump(mode="json", exclude_none=True)},
                              sort_keys=False)


def read_recipe_file(path: str | Path) -> tuple[Path, Any]:
    """A recipe file's path and its parsed YAML ({} when empty), or one sentence on why it cannot be read."""

    file = Path(path).expanduser()
    if not file.is_file():
        raise SettingsError(f"Recipe file {file} does not exist.")
    try:
        return file, yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SettingsError(f"Recipe file {file} is not valid YAML ({str(exc).splitlines()[0]}).") from None


def _same(first: Any, second: Any) -> bool:
    """Two declarations of one option agree (an allocator's options inherited by another's)."""
    return (first.annotation, first.description, first.json_schema_extra) == (
        second.annotation, second.description, second.json_schema_extra)


# option -> the --help panel it is listed in (its structure's); option -> the allocators that declare it
HELP_PANELS: dict[str, str] = {}
DECLARED_BY: dict[str, set[str]] = {}


def _assemble() -> type[CommonOptions]:
    """PlanOptions: the common options, every registered structure's (``Structure.options``) and every option its
    allocators declare, one flat model, so a new structure's or allocator's options reach the CLI and recipes
    from its own module."""

    fields: dict[str, Any] = {}
    for structure in STRUCTURES:
        component = STRUCTURES.get(structure)
        models = [(None, component.options)]
        if component.allocators is not None:
            models += [(name, getattr(component.allocators.get(name), "options", None))
                       for name in component.allocators.names()]
        for allocator, model in models:
            for name, field in (model.model_fields.items() if model is not None else ()):
                if name in CommonOptions.model_fields or (name in fields and not _same(fields[name][1], field)):
                    raise ValueError(f"option '{name}' of the {structure} structure is declared twice")
                fields[name] = (field.annotation, field)
                HELP_PANELS[name] = f"{structure} options"
                if allocator is not None:
                    DECLARED_BY.setdefault(name, set()).add(allocator)
    return create_model("PlanOptions", __base__=CommonOptions, __doc__=CommonOptions.__doc__, **fields)


PlanOptions = _assemble()
# options that are not parameters of a structure or allocator: the common ones and the budgets
NOT_PARAMETERS = set(CommonOptions.model_fields) | {
    name for name, field in PlanOptions.model_fields.items() if (field.json_schema_extra or {}).get("budget")}


def _extra(name: str) -> dict[str, Any]:
    return PlanOptions.model_fields[name].json_schema_extra or {}


def _param_name(name: str) -> str:
    return _extra(name).get("param") or name


def flag_of(name: str) -> str:
    """The CLI flag of option ``name`` (the first of an on/off pair)."""
    flags = _extra(name).get("flags") if name in PlanOptions.model_fields else None
    return (flags or "--" + name.replace("_", "-")).split("/")[0]


def _register_flags() -> None:
    """Tell the structures which flag sets each renamed parameter, for their error messages (a parameter that
    two flags set, such as ``metric``, keeps its own name)."""

    renamed: dict[str, list[str]] = {}
    for name in PlanOptions.model_fields:
        if _param_name(name) != name:
            renamed.setdefault(_param_name(name), []).append(flag_of(name))
    PARAMETER_FLAGS.update({param: flags[0] for param, flags in renamed.items() if len(flags) == 1})


_register_flags()


def option_parameters(names: Iterable[str], panel: str | None = None) -> list[inspect.Parameter]:
    """The planning options ``names`` as typer keyword parameters (default None: unset), listed in ``panel`` of
    --help (default: their structure's, else "Planning")."""
    parameters = []
    for name in names:
        field = PlanOptions.model_fields[name]
        kind = next(t for t in get_args(field.annotation) if t is not type(None))
        flags = _extra(name).get("flags") or "--" + name.replace("_", "-")
        annotation = Annotated[Optional[kind], typer.Option(flags, help=field.description, show_default=False,
                                                            rich_help_panel=panel or HELP_PANELS.get(name, "Planning"))]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return parameters


def cli_parameters() -> list[inspect.Parameter]:
    """Every planning option as a typer keyword parameter, plus ``--recipe``."""
    recipe = inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option("--recipe", help="YAML file of planning options (the names below, without "
                                                      "dashes or with); options given here override it.")])
    return [recipe, *option_parameters(PlanOptions.model_fields)]


def collect(values: dict[str, Any]) -> CommonOptions:
    """The planning options of one command call: its recipe (if any) overridden by the options given."""
    recipe = values.pop("recipe", None)
    given = PlanOptions.parse({name: values.pop(name) for name in PlanOptions.model_fields if name in values})
    return PlanOptions.from_recipe(recipe).merged(given) if recipe is not None else given
