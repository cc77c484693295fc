"""The evaluation protocol and deployment setting as command-line options, declared once as a pydantic model:
compress, apply and eval take all of them, plan and heal the ones they need, and their flags, help and defaults
come from the fields; ``run_settings`` turns the values into RunSettings' fields."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Iterable, Optional

import typer
from pydantic import BaseModel, ConfigDict, Field


def _option(default: Any, help: str, flags: str | None = None, setting: str | None = None) -> Any:
    """A field that is also a CLI option: its ``flags`` (default ``--field-name``) and the RunSettings field it sets
    (``setting``, dotted into the latency setting; default: the field's own name)."""
    return Field(default, description=help, json_schema_extra={"flags": flags, "setting": setting})


class EvaluationOptions(BaseModel):
    """How a model is measured: perplexity windows, zero-shot tasks, the latency setting, the KL reference."""

    model_config = ConfigDict(extra="forbid")

    corpus: str = _option("wiki", "Evaluation/calibration corpus: wiki or ptb.")
    eval_text: Optional[Path] = _option(None, "Evaluate on this text file instead.")
    seqlen: int = _option(512, "Evaluation window length in tokens.")
    max_windows: Optional[int] = _option(None, "Evaluate at most N windows (quick runs).")
    batch_size: int = _option(4, "Windows per forward pass.")
    dtype: str = _option("float32", "float32 (default), bfloat16 or float16.")
    device: str = _option("cpu", "cpu, cuda, cuda:1, ...")
    seed: int = _option(0, "Seed for calibration sampling and searches.")
    tasks: Optional[str] = _option(None, "Zero-shot tasks through lm-eval, e.g. arc_easy,piqa ('default': the "
                                         "standard set).")
    limit: Optional[int] = _option(None, "Zero-shot items per task, a seeded random subset (default 500; 0 = all).",
                                   setting="task_limit")
    prompt_length: int = _option(128, "Latency: prompt tokens for prefill.", setting="latency.prompt_length")
    generation_length: int = _option(32, "Latency: decoded tokens.", setting="latency.generation_length")
    latency: bool = _option(True, "Measure prefill/decode latency.", "--latency/--no-latency")
    generation: bool = _option(True, "Latency objective: prompt + generated tokens (default), or prefill only.",
                               "--generation/--no-generation", "latency.generation")
    speedup_batch_size: int = _option(1, "Latency: batch size.", setting="latency.batch_size")
    speedup_iterations: int = _option(5, "Latency: timed repeats (median reported).", setting="latency.repeats")
    paired_latency: bool = _option(
        True, "Latency of compress and apply: time the dense and the compressed model in alternating runs (default; "
        "keeps a copy of the dense model in memory), or each alone before and after (eval times one model).",
        "--paired-latency/--separate-latency", "latency.paired")
    kld: bool = _option(True, "KL divergence to the reference on the perplexity windows: mean, median, 99% and 99.9% "
                        "KLD and the same-top-token rate (compress/apply: against the dense model; eval: needs "
                        "--reference).", "--kld/--no-kld")
    reference: Optional[str] = _option(None, "The KL divergence's reference model: a name, a directory, or a .gguf "
                                             "file (run in llama.cpp); default for compress/apply: the dense model "
                                             "the run started from.")

    @classmethod
    def setting_of(cls, name: str) -> str:
        """The RunSettings field (dotted into the latency setting) that option ``name`` sets."""
        return (cls.model_fields[name].json_schema_extra or {}).get("setting") or name

    @classmethod
    def flag_of(cls, name: str) -> str:
        """The option's flag (the first of an on/off pair)."""
        flags = (cls.model_fields[name].json_schema_extra or {}).get("flags")
        return (flags or "--" + name.replace("_", "-")).split("/")[0]

    @classmethod
    def annotation(cls, name: str, default_from_run: bool = False) -> Any:
        """The typer annotation of option ``name``; with ``default_from_run`` it is optional (unset: as a saved
        run measured)."""
        field = cls.model_fields[name]
        flags = (field.json_schema_extra or {}).get("flags")
        kind = Optional[field.annotation] if default_from_run else field.annotation
        return Annotated[kind, typer.Option(*([flags] if flags else []), help=field.description)]

    @classmethod
    def parameters(cls, names: Iterable[str] | None = None) -> list[inspect.Parameter]:
        """Options ``names`` (default: all) as typer keyword parameters with the fields' defaults."""
        return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=cls.model_fields[name].default,
                                  annotation=cls.annotation(name))
                for name in (names if names is not None else cls.model_fields)]

    @classmethod
    def run_settings(cls, values: dict[str, Any]) -> dict[str, Any]:
        """RunSettings fields from the options given in ``values`` (the latency setting only when latency is on;
        ``limit`` 0 means every item)."""
        settings: dict[str, Any] = {}
        latency: dict[str, Any] = {}
        for name, value in values.items():
            target = cls.setting_of(name)
            if target.startswith("latency."):
                latency[target.split(".", 1)[1]] = value
            elif name == "tasks":
                settings["tasks"] = value.split(",") if value else []
            elif name == "limit":
                if value is not None:
                    settings["task_limit"] = value or None
            elif name == "latency":
                continue
            else:
                settings[target] = str(value) if isinstance(value, Path) else value
        if "latency" in values or latency:
            settings["latency"] = latency if values.get("latency", True) else None
        return settings
