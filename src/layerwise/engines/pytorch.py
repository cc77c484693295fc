"""The PyTorch engine: any model ``layerwise.load`` opens, measured in memory (perplexity cached per weights)."""

from __future__ import annotations

import contextlib

from torch import nn

from ..config import LatencySetting, RunSettings
from ..cost.latency import PairedLatency, measure_paired_latency
from ..cost.latency_table import PAIRED_LATENCY
from ..cost import measure_size
from ..evaluate.kld import pytorch_logits, settings_kld
from ..measure import Timings, measure_model, timed
from ..models import LoadedModel, load
from .base import ENGINES, Evaluation
from .reference import reference_logits


@ENGINES.register("pytorch", "torch")
def evaluate_pytorch(spec: str, settings: RunSettings, timings: Timings) -> Evaluation:
    with timed(timings, "load_s"):
        loaded = load(spec, dtype=settings.dtype, device=settings.device)
    measured = measure_model(loaded, settings, timings, "", cached=True)
    metrics = {"ppl": measured.get("ppl"), **measure_size(loaded.model).as_dict(), "zeroshot": measured["zeroshot"],
               "latency": measured["latency"], "kld": None}
    if settings.kld and settings.perplexity and settings.reference:
        with timed(timings, "kld_s"):
            metrics["kld"] = pytorch_kld(loaded, settings)
    return Evaluation({"spec": loaded.spec, "source": loaded.source}, metrics, measured.get("protocol"),
                      {"saved_plan": loaded.meta.get("has_plan", False)})


def pytorch_kld(loaded: LoadedModel, settings: RunSettings, dense: nn.Module | None = None) -> dict:
    """KL divergence of a PyTorch model to ``settings.reference`` (a .gguf file runs in llama.cpp) or, without
    one, to the ``dense`` model it was compressed from, on the protocol's windows."""
    with contextlib.ExitStack() as stack:
        if settings.reference:
            reference, name = stack.enter_context(reference_logits(settings.reference, settings)), settings.reference
        else:
            reference, name = pytorch_logits(dense), "dense"
        return settings_kld(pytorch_logits(loaded.model), reference, loaded.tokenizer, settings, name,
                            settings.dtype).model_dump()


def paired_pytorch_latency(reference: LoadedModel, model: LoadedModel, setting: LatencySetting, outtype: str = "f16",
                           embedding_type: str | None = None) -> PairedLatency:
    """Two loaded models timed in alternating runs in PyTorch, as they are (their dtype and device; the GGUF types
    only a file engine stores do not apply)."""
    return measure_paired_latency(reference.model, model.model, setting)


PAIRED_LATENCY.add("pytorch", paired_pytorch_latency, "torch")
