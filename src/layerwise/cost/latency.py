"""Measured latency on this machine: prefill of a prompt and per-token decode with the KV cache, for the
whole model and (optionally) each attention/MLP sublayer; warm-up first, then the median of repeats."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from typing import Iterator, Optional, Protocol

import torch
from pydantic import BaseModel

from ..config import LatencySetting
from ..errors import EngineError
from ..models.adapter import get_adapter

Run = tuple[float, float]  # (prefill seconds, decode seconds) of one timed run


class SublayerLatency(BaseModel):
    prefill_ms: float
    decode_ms_per_token: Optional[float]


class LatencyReport(BaseModel):
    """Medians over ``setting.repeats`` runs; decode is per generated token (the whole batch)."""

    setting: LatencySetting
    total_ms: float  # prefill + every decoded token: the latency of the deployment setting
    prefill_ms: float
    decode_ms_per_token: Optional[float]
    decode_tokens_per_s: Optional[float]
    device: str
    threads: int
    sublayers: Optional[dict[str, SublayerLatency]] = None
    # the spread over the runs (min, max), so a reader can tell a difference from noise
    prefill_ms_range: Optional[tuple[float, float]] = None
    decode_tokens_per_s_range: Optional[tuple[float, float]] = None


class _SublayerClock:
    """Forward hooks adding each sublayer's wall time (synchronising CUDA around it) per phase; the
    phase is decode whenever the model is called with a KV cache, prefill otherwise."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.phase = "prefill"
        self.totals: dict[tuple[str, str], float] = defaultdict(float)
        self._starts: dict[str, float] = {}
        self._handles = [model.register_forward_pre_hook(self._set_phase, with_kwargs=True)]
        for name, module in _sublayer_modules(model).items():
            self._handles.append(module.register_forward_pre_hook(self._start(name)))
            self._handles.append(module.register_forward_hook(self._stop(name)))

    def _set_phase(self, module, args, kwargs) -> None:
        self.phase = "decode" if kwargs.get("past_key_values") is not None else "prefill"

    def _start(self, name: str):
        def hook(module, args):
            _synchronize(self.device)
            self._starts[name] = time.perf_counter()

        return hook

    def _stop(self, name: str):
        def hook(module, args, output):
            _synchronize(self.device)
            self.totals[(name, self.phase)] += time.perf_counter() - self._starts.pop(name)

        return hook

    def reset(self) -> None:
        self.totals.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sublayer_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    adapter = get_adapter(model)
    modules = {}
    for index in range(adapter.num_blocks):
        for sublayer in adapter.sublayers(index):
            modules[sublayer.name] = sublayer.module
    return modules


def _runs(model: torch.nn.Module, setting: LatencySetting, device: torch.device) -> Iterator[tuple[float, float]]:
    """(prefill seconds, decode seconds) per run, each from a fresh KV cache."""
    prompt = latency_prompt(model.get_input_embeddings().num_embeddings, setting).to(device)
    while True:
        _synchronize(device)
        start = time.perf_counter()
        output = model(input_ids=prompt, use_cache=True, logits_to_keep=1)  # as generate does
        _synchronize(device)
        prefill = time.perf_counter() - start
        cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(setting.decode_steps):
            output = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        _synchronize(device)
        yield prefill, time.perf_counter() - start


class Timed(Protocol):
    """What latency is measured on, in any engine: a prepared model's runs of a setting, and where it ran."""

    device: str
    threads: int

    def timed_runs(self, setting: LatencySetting) -> Iterator[Run]: ...


class TorchTimed:
    """A PyTorch module as ``Timed``: runs from a fresh KV cache on the module's own device and dtype."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._device = next(model.parameters()).device
        self.device = str(self._device)
        self.threads = torch.get_num_threads()

    def timed_runs(self, setting: LatencySetting) -> Iterator[Run]:
        return _runs(self.model, setting, self._device)


def _timed(model: torch.nn.Module | Timed) -> Timed:
    return TorchTimed(model) if isinstance(model, torch.nn.Module) else model


@contextlib.contextmanager
def _evaluating(*models: object) -> Iterator[None]:
    """PyTorch modules in eval mode and without autograd while they are timed, their modes restored after."""
    modes = [(m, m.training) for m in models if isinstance(m, torch.nn.Module)]
    try:
        for module, _ in modes:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.train(mode)


def measure_latency(model: torch.nn.Module | Timed, setting: LatencySetting | None = None,
                    per_sublayer: bool = False) -> LatencyReport:
    """Median prefill latency and per-token decode latency of ``model`` as it is now: a PyTorch module (its dtype,
    device) or any engine's ``Timed`` model (a GGUF file in llama.cpp), ``setting.warmup`` runs untimed.

    With ``per_sublayer`` each attention and MLP sublayer of a PyTorch module is timed by hooks in the same runs;
    the hooks' synchronisation adds a little to the whole-model figures, so time without them for headline numbers.
    """
    setting = setting or LatencySetting()
    timed = _timed(model)
    if per_sublayer and not isinstance(timed, TorchTimed):
        raise EngineError(f"Sublayers are timed by PyTorch hooks; {timed.device} times the whole model only.")
    clock = _SublayerClock(model, timed._device) if per_sublayer else None
    prefill, decode = [], []
    per_run: list[dict[tuple[str, str], float]] = []
    try:
        with _evaluating(model):
            runs = timed.timed_runs(setting)
            for index in range(setting.warmup + setting.repeats):
                if clock is not None:
                    clock.reset()
                prefill_s, decode_s = next(runs)
                if index >= setting.warmup:
                    prefill.append(prefill_s)
                    decode.append(decode_s)
                    if clock is not None:
                        per_run.append(dict(clock.totals))
    finally:
        if clock is not None:
            clock.remove()
    sublayers = _sublayer_medians(per_run, setting.decode_steps) if clock is not None else None
    return latency_report(setting, prefill, decode, timed.device, timed.threads, sublayers)


class PairedLatency(BaseModel):
    """Two models timed in alternating runs: each one's medians, and the speedup as the median of the pairs' ratios."""

    reference: LatencyReport
    model: LatencyReport
    speedup: dict[str, Optional[float]]  # total, prefill, decode: reference time / model time
    # the median of the pairs' differences in ms (total, prefill, decode per token): what a latency table records
    saved_ms: dict[str, Optional[float]] = {}


def measure_paired_latency(reference: torch.nn.Module | Timed, model: torch.nn.Module | Timed,
                           setting: LatencySetting | None = None) -> PairedLatency:
    """Time ``reference`` and ``model`` (PyTorch modules or one engine's ``Timed`` models) in alternating runs (AB, BA,
    AB, ...) and report the speedup as the median of each pair's ratio. The machine drifts between two separate
    measurements (other load, clocks), and a pair's two runs drift alike: on the 2-core CI machine one plan measured
    1.50-1.73x in four separate before/after measurements and 1.575-1.587x in three paired ones, so only paired
    timing can check a speed budget to 5%."""
    setting = setting or LatencySetting()
    pair = _timed(reference), _timed(model)
    with _evaluating(reference, model):
        timed = alternate((pair[0].timed_runs(setting), pair[1].timed_runs(setting)), setting)
    return paired_report(setting, timed, pair[1].device, pair[1].threads)


def alternate(runs: tuple[Iterator[Run], Iterator[Run]], setting: LatencySetting) -> tuple[list[Run], list[Run]]:
    """Draw from two run generators in alternating order (AB, BA, AB, ...), ``setting.warmup`` pairs untimed, then
    ``setting.repeats`` pairs kept: any engine's paired timing."""
    timed: tuple[list[Run], list[Run]] = ([], [])
    for index in range(setting.warmup + setting.repeats):
        pair = {which: next(runs[which]) for which in ((0, 1) if index % 2 == 0 else (1, 0))}
        if index >= setting.warmup:
            for which in (0, 1):
                timed[which].append(pair[which])
    return timed


def paired_report(setting: LatencySetting, timed: tuple[list[Run], list[Run]], device: str, threads: int
                  ) -> PairedLatency:
    """Each side's medians, the speedup as the median of the pairs' ratios, and the time saved as the median of
    their differences."""
    reports = [latency_report(setting, [p for p, _ in runs_], [d for _, d in runs_], device, threads)
               for runs_ in timed]

    def ratio(part) -> float:
        return round(statistics.median(part(a) / part(b) for a, b in zip(*timed)), 4)

    def saved(part, per: int = 1) -> float:
        return round(1000 * statistics.median(part(a) - part(b) for a, b in zip(*timed)) / per, 6)

    steps = setting.decode_steps
    return PairedLatency(reference=reports[0], model=reports[1], speedup={
        "total": ratio(sum), "prefill": ratio(lambda run: run[0]),
        "decode": ratio(lambda run: run[1]) if steps else None},
        saved_ms={"total": saved(sum), "prefill": saved(lambda run: run[0]),
                  "decode": saved(lambda run: run[1], steps) if steps else None})


def latency_report(setting: LatencySetting, prefill: list[float], decode: list[float], device: str, threads: int,
                   sublayers: dict[str, SublayerLatency] | None = None) -> LatencyReport:
    """Medians of timed runs (seconds of prefill and of all decode steps per run), as every engine reports them."""
    steps = setting.decode_steps
    decode_ms = 1000 * statistics.median(decode) / steps if steps else None
    return LatencyReport(
        setting=setting,
        total_ms=round(1000 * statistics.median(p + d for p, d in zip(prefill, decode)), 3),
        prefill_ms=round(1000 * statistics.median(prefill), 3),
        decode_ms_per_token=round(decode_ms, 3) if decode_ms else None,
        decode_tokens_per_s=round(1000 * setting.batch_size / decode_ms, 2) if decode_ms else None,
        device=device,
        threads=threads,
        sublayers=sublayers,
        prefill_ms_range=(round(1000 * min(prefill), 3), round(1000 * max(prefill), 3)),
        decode_tokens_per_s_range=(round(setting.batch_size * steps / max(decode), 2),
                                   round(setting.batch_size * steps / min(decode), 2)) if steps and min(decode) > 0
        else None,
    )


def latency_prompt(vocab_size: int, setting: LatencySetting) -> torch.Tensor:
    """The prompt every engine times: seeded random token ids [batch, prompt_length]."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (setting.batch_size, setting.prompt_length), generator=generator)


def _sublayer_medians(per_run: list[dict[tuple[str, str], float]], steps: int) -> dict[str, SublayerLatency]:
    names = sorted({name for run in per_run for name, _ in run}, key=_natural_key)
    result = {}
    for name in names:
        prefill = statistics.median(run.get((name, "prefill"), 0.0) for run in per_run)
        decode = statistics.median(run.get((name, "decode"), 0.0) for run in per_run) if steps else None
        result[name] = SublayerLatency(
            prefill_ms=round(1000 * prefill, 4),
            decode_ms_per_token=round(1000 * decode / steps, 4) if decode is not None else None,
        )
    return result


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]
