"""The llama.cpp engine: a GGUF file's perplexity under the protocol (the file's own tokenizer makes the ids,
llama.cpp computes the logits) and its prefill/decode latency, with the file's size by tensor type."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from gguf import GGUFReader

from ..config import RunSettings
from ..data import load_corpus
from ..errors import SettingsError
from ..evaluate.perplexity import next_token_nll, protocol_perplexity
from ..measure import Timings, timed
from .base import ENGINES, Evaluation
from ..gguf.files import check_gguf_file
from .llamacpp import LlamaCppModel, llamacpp_latency
from .reference import llamacpp_logits, reference_logits
from ..evaluate.kld import settings_kld


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
    from ..gguf.tokenizer import tokenizer_from_gguf

    if settings.tasks:
        raise SettingsError("Zero-shot tasks run in the PyTorch engine only; drop --tasks or use --engine pytorch.")
    path = check_gguf_file(spec)
    metrics: dict = {**gguf_size(path), "ppl": None, "latency": None, "zeroshot": None, "kld": None}
    protocol = None
    if settings.perplexity:
        with timed(timings, "eval_s"):
            tokenizer = tokenizer_from_gguf(path)
            corpus = load_corpus(settings.corpus, settings.eval_text, settings.calib_text)
            result = gguf_perplexity(path, tokenizer, corpus, settings)
        metrics["ppl"], protocol = result.ppl, result.protocol.model_dump()
        if settings.kld and settings.reference:
            with timed(timings, "kld_s"), LlamaCppModel(path, settings.seqlen, settings.threads) as model, \
                    reference_logits(settings.reference, settings) as reference:
                metrics["kld"] = settings_kld(llamacpp_logits(model), reference, tokenizer, settings,
                                              settings.reference, "gguf", "llama.cpp").model_dump()
    if settings.latency:
        with timed(timings, "latency_s"):
            metrics["latency"] = llamacpp_latency(path, settings.latency, settings.threads).model_dump()
    return Evaluation({"spec": str(spec), "source": f"GGUF file {path.resolve()} (llama.cpp)"}, metrics, protocol)


def gguf_perplexity(path: str | Path, tokenizer, corpus, settings: RunSettings):
    """The protocol's perplexity of a GGUF file in llama.cpp: one window per llama.cpp evaluation."""
    with LlamaCppModel(path, settings.seqlen, settings.threads) as model:

        def score(batch: torch.Tensor) -> float:
            return sum(next_token_nll(model.logits(window)[None], window[None])[0] for window in batch)

        return protocol_perplexity(score, tokenizer, corpus, settings.seqlen, settings.max_windows,
                                   settings.batch_size, "evaluation", "gguf", engine="llama.cpp")
