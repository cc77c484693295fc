"""llama.cpp as a measuring engine: a GGUF file run through llama-cpp-python, fed the protocol's own token ids
(not llama.cpp's tokenization), with logits for every position for perplexity and the same prefill/decode
setting as the PyTorch engine for latency."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import LatencySetting
from ..cost.latency import PairedLatency, latency_prompt, measure_paired_latency
from ..cost.latency_table import PAIRED_LATENCY
from ..cost.typed_latency import TYPE_DEPENDENT_ENGINES
from ..errors import EngineError
from ..export import export_gguf
from ..gguf.files import check_gguf_file
from ..gguf.native import llama_cpp


def default_threads() -> int:
    """Threads llama.cpp computes with: the ones this process may run on (as PyTorch's default)."""
    return torch.get_num_threads() or len(os.sched_getaffinity(0))


class LlamaCppModel:
    """One GGUF model loaded in llama.cpp with a context of ``n_ctx`` tokens."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True,
                 batch: int | None = None) -> None:
        self.path = check_gguf_file(path)
        module = llama_cpp()
        self.threads = threads or default_threads()
        self.n_ctx = n_ctx
        try:
            with _quiet_stderr():
                self.llm = module.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=batch or n_ctx,
                                        n_ubatch=batch or n_ctx, n_threads=self.threads,
                                        n_threads_batch=self.threads, logits_all=logits_all, verbose=False,
                                        seed=0)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {self.path}: {exc}") from None
        self.n_vocab = self.llm.n_vocab()
        self.device = "llama.cpp (cpu)"

    @classmethod
    def for_latency(cls, path: str | Path, setting: LatencySetting, threads: int | None = None) -> "LlamaCppModel":
        """The file loaded to time ``setting``: a context of the prompt and its decoded tokens, no logits kept."""
        return cls(path, setting.prompt_length + setting.decode_steps + 1, threads, logits_all=False,
                   batch=setting.prompt_length)

    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Next-token logits [len(ids), vocab] of one sequence from an empty KV cache."""
        ids = [int(i) for i in ids]
        if len(ids) > self.n_ctx:
            raise EngineError(f"A window of {len(ids)} tokens does not fit llama.cpp's context of {self.n_ctx}.")
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        with contextlib.suppress(Exception):
            self.close()

    def last_token_argmax(self) -> int:
        """Greedy next token after the last evaluated position (logits of the last output only)."""
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def timed_runs(self, setting: LatencySetting) -> Iterator[tuple[float, float]]:
        """(prefill seconds, decode seconds) per run: the seeded prompt, then greedy decoding one token a step."""
        if setting.batch_size != 1:
            raise EngineError("llama.cpp latency is measured for batch size 1 only.")
        prompt = latency_prompt(self.n_vocab, setting)[0].tolist()
        while True:
            self.llm.reset()
            start = time.perf_counter()
            self.llm.eval(prompt)
            prefill = time.perf_counter() - start
            token = self.last_token_argmax()
            start = time.perf_counter()
            for _ in range(setting.decode_steps):
                self.llm.eval([token])
                token = self.last_token_argmax()
            yield prefill, time.perf_counter() - start


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence what llama.cpp prints on C stderr while loading (its errors surface as exceptions)."""
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no stderr to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


TABLE_REPEATS = 15  # a llama.cpp run of the default setting takes well under a second: average more of them


def exported_paired_latency(reference, model, setting: LatencySetting, outtype: str = "f16",
                            embedding_type: str | None = None) -> PairedLatency:
    """Two loaded models as llama.cpp runs them: each exported to a temporary GGUF, then timed in alternating runs
    (at least ``TABLE_REPEATS`` pairs: latency tables subtract such numbers, so noise matters)."""
    setting = setting.model_copy(update={"repeats": max(setting.repeats, TABLE_REPEATS)})
    with tempfile.TemporaryDirectory() as directory:
        paths = [export_gguf(loaded, Path(directory) / f"{name}.gguf", outtype, embedding_type).path
                 for name, loaded in (("reference", reference), ("model", model))]
        with LlamaCppModel.for_latency(paths[0], setting) as dense, LlamaCppModel.for_latency(paths[1], setting) as probe:
            return measure_paired_latency(dense, probe, setting)


PAIRED_LATENCY.add("llama.cpp", exported_paired_latency, "llamacpp")
TYPE_DEPENDENT_ENGINES.add("llama.cpp")  # each GGUF type has its own kernels
