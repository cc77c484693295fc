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
from .engines.llamacpp import LlamaCppModel
from .engines.llamacpp_eval import measure_gguf as measure_file
from .engines.reference import llamacpp_logits
from .evaluate.kld import stored_logits
from .export import export_gguf
from .measure import Timings, timed
from .models import LoadedModel
from .models.fingerprint import model_fingerprint

GGUF_FILE = "model.gguf"


def measure_gguf(path: Path, loaded: LoadedModel, settings: RunSettings, reference: Path | None = None,
                 reference_store: Path | None = None) -> dict[str, Any]:
    """A deployed GGUF file in llama.cpp (``engines.llamacpp_eval.measure_gguf``; the model's own tokenizer makes
    the protocol's ids) beside the ``reference`` GGUF file: the KL divergence to it (its logits kept in
    ``reference_store``, or the deploy setting's, when given) and the latency timed in alternating runs with it."""
    with contextlib.ExitStack() as stack:
        reference_logits = None
        if reference is not None and settings.perplexity and settings.kld:
            dense = stack.enter_context(LlamaCppModel(reference, settings.seqlen, settings.threads))
            reference_logits = llamacpp_logits(dense)
            if reference_store is None and settings.deploy is not None and settings.deploy.reference_logits:
                reference_store = Path(settings.deploy.reference_logits)  # the run's own kept reference
            if reference_store is not None:
                reference_logits = stored_logits(reference_logits, reference_store / _sha256(reference)[:16])
        return measure_file(path, loaded.tokenizer, settings, reference_logits,
                            f"dense export ({reference.name})" if reference else "", reference)


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
