"""Deployment of a run: export the compressed model as a GGUF file and measure it in llama.cpp under the same
perplexity protocol and latency setting, beside the dense model exported the same way (its perplexity cached;
the file itself the reference of the KL divergence), so the run reports what the plan buys where the model will
be served."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .cache import atomic_write_json, cache_dir, read_json, stable_hash
from .config import RunSettings
from .data import load_corpus
from .export import export_gguf
from .measure import Timings, timed
from .models import LoadedModel
from .models.fingerprint import model_fingerprint

GGUF_FILE = "model.gguf"


def measure_gguf(path: Path, loaded: LoadedModel, settings: RunSettings, reference: Path | None = None,
                 reference_store: Path | None = None) -> dict[str, Any]:
    """Perplexity (the model's own tokenizer makes the protocol's ids) and latency of a GGUF file in llama.cpp,
    each when ``settings`` asks for it; with a ``reference`` GGUF file also the KL divergence to it on the same
    windows (as ``llama-perplexity --kl-divergence``; that pass yields the perplexity too) and, under paired
    latency, the latency timed in alternating runs with the reference's (``speedup``: reference time / this)."""
    from .engines.llamacpp import LlamaCppModel, llamacpp_latency, llamacpp_paired_latency
    from .engines.llamacpp_eval import gguf_perplexity, gguf_size
    from .engines.reference import llamacpp_logits
    from .evaluate.kld import settings_kld, stored_logits

    measured: dict[str, Any] = {**gguf_size(path), "ppl": None, "protocol": None, "latency": None, "kld": None}
    if settings.perplexity and reference is not None and settings.kld:
        with LlamaCppModel(path, settings.seqlen, settings.threads) as model, \
                LlamaCppModel(reference, settings.seqlen, settings.threads) as dense:
            reference_logits = llamacpp_logits(dense)
            if reference_store is None and settings.deploy is not None and settings.deploy.reference_logits:
                reference_store = Path(settings.deploy.reference_logits)  # the run's own kept reference
            if reference_store is not None:
                reference_logits = stored_logits(reference_logits, reference_store / _sha256(reference)[:16])
            kld = settings_kld(llamacpp_logits(model), reference_logits, loaded.tokenizer, settings,
                               f"dense export ({reference.name})", "gguf", "llama.cpp")
        measured.update(ppl=kld.ppl, protocol=kld.protocol.model_dump(), kld=kld.model_dump(exclude={"protocol"}))
    elif settings.perplexity:
        corpus = load_corpus(settings.corpus, settings.eval_text, settings.calib_text)
        result = gguf_perplexity(path, loaded.tokenizer, corpus, settings)
        measured.update(ppl=result.ppl, protocol=result.protocol.model_dump())
    if settings.latency and reference is not None and settings.latency.paired:
        pair = llamacpp_paired_latency(reference, path, settings.latency, settings.threads)
        measured.update(latency=pair.model.model_dump(), reference_latency=pair.reference.model_dump(),
                        speedup=pair.speedup)
    elif settings.latency:
        measured["latency"] = llamacpp_latency(path, settings.latency, settings.threads).model_dump()
    return measured


@dataclass
class DenseDeployment:
    """The dense model exported as the run's deploy setting says, on disk while the run lasts: measured in
    llama.cpp (``record``), the reference of every deployed file's KL divergence, and what the controls start
    from (``imatrix``: the dense calibration profile's importance matrix, for llama.cpp's recipes)."""

    path: Optional[Path]  # None when the deploy setting measures nothing (then nothing was exported)
    record: dict[str, Any]
    imatrix: Optional[dict] = None


@contextlib.contextmanager
def dense_deployment(loaded: LoadedModel, settings: RunSettings, timings: Timings,
                     imatrix: Optional[dict] = None) -> Iterator[DenseDeployment]:
    """Export the dense model into a scratch folder removed when the block ends; file facts and perplexity are
    cached per weights and protocol, latency is measured anew (it belongs to this machine, now)."""
    deploy = settings.deploy
    if not deploy.measure:
        yield DenseDeployment(None, {}, imatrix)
        return
    key = stable_hash({"model": model_fingerprint(loaded.model),
                       "deploy": deploy.model_dump(exclude={"controls", "reference_logits"}),
                       "protocol": [settings.corpus, settings.eval_text, settings.seqlen, settings.max_windows,
                                    settings.perplexity]})
    with tempfile.TemporaryDirectory(prefix="layerwise-dense-") as directory:
        path = Path(directory) / GGUF_FILE
        with timed(timings, "dense_deploy_s"):
            export_gguf(loaded, path, deploy.outtype, deploy.embedding_type)
            cache = cache_dir("deploy") / f"{key}.json"
            record = read_json(cache) or {}
            if not record:
                record = measure_gguf(path, loaded, settings.model_copy(update={"latency": None}))
                atomic_write_json(cache, record)
            latency = measure_gguf(path, loaded, settings.model_copy(update={"perplexity": False}))["latency"] \
                if settings.latency else None
            record = {**record, "latency": latency, "outtype": deploy.outtype}
        yield DenseDeployment(path, record, imatrix)


def deploy_run(loaded: LoadedModel, settings: RunSettings, directory: Path, timings: Timings,
               dense: DenseDeployment | None = None) -> dict[str, Any]:
    """Export the (compressed) model into ``directory`` and measure the file in llama.cpp when asked, with its KL
    divergence to the ``dense`` export when there is one."""
    deploy = settings.deploy
    path = directory / GGUF_FILE
    with timed(timings, "export_s"):
        report = export_gguf(loaded, path, deploy.outtype, deploy.embedding_type, overwrite=True)
    with timed(timings, "deploy_eval_s"):
        measured = measure_gguf(path, loaded, settings, dense and dense.path) if deploy.measure else {}
    return {"file": GGUF_FILE, "sha256": _sha256(path), "export": report.model_dump(exclude={"path"}), **measured}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
