"""Controls for a deployed plan: the GGUF files a user would otherwise pick, measured beside it on the same
windows against the same dense export — llama.cpp's own recipe nearest in size with the same importance
matrix (``recipe``), and the GGUF file the model was loaded from, as distributed (``source``)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .config import RunSettings
from .deploy import DenseDeployment, measure_gguf
from .engines.llamacpp_eval import gguf_size
from .export.gguf_export import source_gguf
from .export.llama_quantize import llama_quantize
from .measure import Timings, timed
from .models import LoadedModel
from .registry import Registry

# llama.cpp's recipes a control may be (f16/f32 are the dense reference itself)
CONTROL_RECIPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M")


@dataclass
class ControlContext:
    """What a control may use: the dense model and its export, the plan's file size, a scratch folder."""

    loaded: LoadedModel
    dense: DenseDeployment
    tensor_bytes: int
    scratch: Path


# a control: the file to measure and what it is (None: this model has no such control, e.g. no source GGUF)
Control = Callable[[ControlContext], Optional[tuple[Path, dict[str, Any]]]]
CONTROLS: Registry[Control] = Registry("deployment control")


@CONTROLS.register("recipe")
def nearest_recipe(context: ControlContext) -> tuple[Path, dict[str, Any]]:
    """llama.cpp's recipe whose tensor bytes lie nearest the plan's, quantized from the dense export with the
    dense calibration profile's importance matrix (as ``llama-quantize --imatrix`` would)."""
    best: tuple[int, str, Path] | None = None
    for recipe in CONTROL_RECIPES:
        path = context.scratch / f"recipe-{recipe}.gguf"
        llama_quantize(context.dense.path, path, recipe, context.dense.imatrix)
        size = gguf_size(path)["weight_bytes"]
        if best is None or abs(size - context.tensor_bytes) < abs(best[0] - context.tensor_bytes):
            if best is not None:
                best[2].unlink()
            best = (size, recipe, path)
        else:
            path.unlink()
    return best[2], {"recipe": best[1], "imatrix": context.dense.imatrix is not None}


@CONTROLS.register("source")
def source_file(context: ControlContext) -> Optional[tuple[Path, dict[str, Any]]]:
    """The GGUF file the model was loaded from, as distributed (None when it came from elsewhere)."""
    path = source_gguf(context.loaded)
    return (path, {"file": path.name}) if path is not None else None


def measure_controls(loaded: LoadedModel, settings: RunSettings, dense: DenseDeployment, plan_tensor_bytes: int,
                     timings: Timings) -> dict[str, Any]:
    """Each of ``settings.deploy.controls`` measured like the plan's own file (size, KLD to the dense export,
    perplexity, llama.cpp latency); controls this model has none of are left out."""
    measured: dict[str, Any] = {}
    with timed(timings, "controls_s"), tempfile.TemporaryDirectory(prefix="layerwise-controls-") as scratch:
        context = ControlContext(loaded, dense, plan_tensor_bytes, Path(scratch))
        for name in settings.deploy.controls:
            made = CONTROLS.get(name)(context)
            if made is not None:
                path, what = made
                measured[name] = {**what, **measure_gguf(path, loaded, settings, dense.path)}
    return measured
