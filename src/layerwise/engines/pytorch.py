"""The PyTorch engine: any model ``layerwise.load`` opens, measured in memory (perplexity cached per weights)."""

from __future__ import annotations

from ..config import RunSettings
from ..cost import measure_size
from ..measure import Timings, measure_model, timed
from ..models import load
from ..evaluate.kld import pytorch_logits, settings_kld
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
        with timed(timings, "kld_s"), reference_logits(settings.reference, settings) as reference:
            metrics["kld"] = settings_kld(pytorch_logits(loaded.model), reference, loaded.tokenizer, settings,
                                          settings.reference, settings.dtype).model_dump()
    return Evaluation({"spec": loaded.spec, "source": loaded.source}, metrics, measured.get("protocol"),
                      {"saved_plan": loaded.meta.get("has_plan", False)})
