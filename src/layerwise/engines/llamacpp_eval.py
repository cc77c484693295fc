"""The llama.cpp engine: a GGUF file's perplexity under the protocol (the file's own tokenizer makes the ids,
llama.cpp computes the logits) and its prefill/decode latency, with the file's size by tensor type."""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader

from ..config import RunSettings
from ..cost.latency import measure_latency, measure_paired_latency
from ..data import load_corpus
from ..errors import SettingsError
from ..evaluate.kld import WindowLogits, settings_kld
from ..evaluate.perplexity import next_token_nll, protocol_perplexity
from ..gguf.files import check_gguf_file
from ..gguf.tokenizer import tokenizer_from_gguf
from ..measure import Timings, timed
from .base import ENGINES, Evaluation
from .llamacpp import LlamaCppModel
from .reference import llamacpp_logits, reference_logits


def gguf_size(path: Path) -> dict:
    """File bytes, tensor bytes, parameters and bytes per tensor type of a GGUF file."""
    reader = GGUFReader(path)
    by_type: Counter = Counter()
    for tensor in reader.tensors:
        by_type[tensor.tensor_type.name.lower()] += int(tensor.n_bytes)
    return {"file_bytes": path.stat().st_size, "weight_bytes": sum(by_type.values()),
            "parameters": sum(int(t.n_elements) for t in reader.tensors), "bytes_by_type": dict(by_type),
            "architecture": str(reader.fields["general.architecture"].contents())}


@ENGINES.register("llama.cpp", "llamacpp")
def evaluate_llamacpp(spec: str, settings: RunSettings, timings: Timings) -> Evaluation:
    if settings.tasks:
        raise SettingsError("Zero-shot tasks run in the PyTorch engine only; drop --tasks or use --engine pytorch.")
    path = check_gguf_file(spec)
    tokenizer = tokenizer_from_gguf(path) if settings.perplexity else None
    with contextlib.ExitStack() as stack:
        reference = stack.enter_context(reference_logits(settings.reference, settings)) \
            if settings.perplexity and settings.kld and settings.reference else None
        measured = measure_gguf(path, tokenizer, settings, reference, settings.reference, timings=timings)
    protocol = measured.pop("protocol")
    if measured["kld"] is not None:  # eval's KLD record carries its protocol, as the PyTorch engine's does
        measured["kld"]["protocol"] = protocol
    return Evaluation({"spec": str(spec), "source": f"GGUF file {path.resolve()} (llama.cpp)"},
                      {**measured, "zeroshot": None}, protocol)


def measure_gguf(path: Path, tokenizer, settings: RunSettings, reference: WindowLogits | None = None,
                 reference_name: str = "", timed_beside: Path | None = None, timings: Timings | None = None
                 ) -> dict[str, Any]:
    """A GGUF file in llama.cpp, each part when ``settings`` asks for it: size by tensor type; perplexity under the
    protocol (``tokenizer`` makes the ids), from the KL-divergence pass when there is a ``reference`` (one pass,
    as ``llama-perplexity --kl-divergence``); latency, timed in alternating runs with the file ``timed_beside``
    under paired latency (``speedup``: its time / this file's). Every path that measures a GGUF file runs this."""
    timings = {} if timings is None else timings
    measured: dict[str, Any] = {**gguf_size(path), "ppl": None, "protocol": None, "latency": None, "kld": None}
    if settings.perplexity and settings.kld and reference is not None:
        with timed(timings, "eval_s"), LlamaCppModel(path, settings.seqlen, settings.threads) as model:
            kld = settings_kld(llamacpp_logits(model), reference, tokenizer, settings, reference_name, "gguf",
                               "llama.cpp")
        measured.update(ppl=kld.ppl, protocol=kld.protocol.model_dump(), kld=kld.model_dump(exclude={"protocol"}))
    elif settings.perplexity:
        with timed(timings, "eval_s"):
            corpus = load_corpus(settings.corpus, settings.eval_text, settings.calib_text)
            result = gguf_perplexity(path, tokenizer, corpus, settings)
        measured.update(ppl=result.ppl, protocol=result.protocol.model_dump())
    if settings.latency and timed_beside is not None and settings.latency.paired:
        with timed(timings, "latency_s"), \
                LlamaCppModel.for_latency(timed_beside, settings.latency, settings.threads) as dense, \
                LlamaCppModel.for_latency(path, settings.latency, settings.threads) as model:
            pair = measure_paired_latency(dense, model, settings.latency)
        measured.update(latency=pair.model.model_dump(), reference_latency=pair.reference.model_dump(),
                        speedup=pair.speedup)
    elif settings.latency:
        with timed(timings, "latency_s"), LlamaCppModel.for_latency(path, settings.latency, settings.threads) as model:
            measured["latency"] = measure_latency(model, settings.latency).model_dump()
    return measured


def gguf_perplexity(path: str | Path, tokenizer, corpus, settings: RunSettings):
    """The protocol's perplexity of a GGUF file in llama.cpp: one window per llama.cpp evaluation."""
    with LlamaCppModel(path, settings.seqlen, settings.threads) as model:

        def score(batch: torch.Tensor) -> float:
            return sum(next_token_nll(model.logits(window)[None], window[None])[0] for window in batch)

        return protocol_perplexity(score, tokenizer, corpus, settings.seqlen, settings.max_windows,
                                   settings.batch_size, "evaluation", "gguf", engine="llama.cpp")
