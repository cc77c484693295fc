"""Deployment of a run: export the compressed model as a GGUF file and measure it in llama.cpp under the same
perplexity protocol and latency setting, beside the dense model exported the same way (a cached reference),
so the run reports what the plan buys where the model will be served."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

from .cache import atomic_write_json, cache_dir, read_json, stable_hash
from .config import RunSettings
from .data import load_corpus
from .export import export_gguf
from .measure import Timings, timed
from .models import LoadedModel
from .models.fingerprint import model_fingerprint

GGUF_FILE = "model.gguf"


def measure_gguf(path: Path, loaded: LoadedModel, settings: RunSettings) -> dict[str, Any]:
    """Perplexity (the model's own tokenizer makes the protocol's ids) and latency of a GGUF file in llama.cpp,
    each when ``settings`` asks for it."""
    from .engines.llamacpp import llamacpp_latency
    from .engines.llamacpp_eval import gguf_perplexity, gguf_size

    measured: dict[str, Any] = {**gguf_size(path), "ppl": None, "protocol": None, "latency": None}
    if settings.perplexity:
        corpus = load_corpus(settings.corpus, settings.eval_text, settings.calib_text)
        result = gguf_perplexity(path, loaded.tokenizer, corpus, settings)
        measured.update(ppl=result.ppl, protocol=result.protocol.model_dump())
    if settings.latency:
        measured["latency"] = llamacpp_latency(path, settings.latency, settings.threads).model_dump()
    return measured


def dense_reference(loaded: LoadedModel, settings: RunSettings, timings: Timings) -> dict[str, Any]:
    """The dense model exported as ``settings.deploy`` says and measured in llama.cpp; file facts and perplexity
    are cached per weights and protocol, latency is measured anew (it belongs to this machine, now)."""
    deploy = settings.deploy
    if not deploy.measure:
        return {}
    key = stable_hash({"model": model_fingerprint(loaded.model), "deploy": deploy.model_dump(),
                       "protocol": [settings.corpus, settings.eval_text, settings.seqlen, settings.max_windows,
                                    settings.perplexity]})
    path = cache_dir("deploy") / f"{key}.json"
    cached = read_json(path)
    if cached is not None and not settings.latency:
        return {**cached, "latency": None, "outtype": deploy.outtype}
    with timed(timings, "dense_deploy_s"), tempfile.TemporaryDirectory() as directory:
        gguf = Path(directory) / GGUF_FILE
        export_gguf(loaded, gguf, deploy.outtype, deploy.embedding_type)
        if cached is None:
            cached = measure_gguf(gguf, loaded, settings.model_copy(update={"latency": None}))
            atomic_write_json(path, cached)
        latency = measure_gguf(gguf, loaded, settings.model_copy(update={"perplexity": False}))["latency"] \
            if settings.latency else None
    return {**cached, "latency": latency, "outtype": deploy.outtype}


def deploy_run(loaded: LoadedModel, settings: RunSettings, directory: Path, timings: Timings) -> dict[str, Any]:
    """Export the (compressed) model into ``directory`` and measure the file in llama.cpp when asked."""
    deploy = settings.deploy
    path = directory / GGUF_FILE
    with timed(timings, "export_s"):
        report = export_gguf(loaded, path, deploy.outtype, deploy.embedding_type, overwrite=True)
    with timed(timings, "deploy_eval_s"):
        measured = measure_gguf(path, loaded, settings) if deploy.measure else {}
    return {"file": GGUF_FILE, "sha256": _sha256(path), "export": report.model_dump(exclude={"path"}), **measured}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
