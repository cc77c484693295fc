"""Healing: train a compressed student toward the dense teacher for a token budget, with AdamW on a warm-up +
cosine schedule, a held-out loss, a progress bar, and checkpoints that a resumed run continues from exactly."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from pydantic import BaseModel
from torch import nn
from tqdm.auto import tqdm

from ..cache import atomic_torch_save, stable_hash, torch_load_or_none
from ..config import HealSetting
from ..data.training import TrainingStream
from ..environment import native_bf16
from ..errors import HealInterrupted, SettingsError
from .lora import lora_adapters
from .losses import LOSSES, NEEDS_TEACHER, Outputs, forward, logit_kl
from .schedule import Schedule

CHECKPOINT_FILE = "heal-checkpoint.pt"


class HealReport(BaseModel):
    """What healing did: method, budget, data, schedule, the loss curve and the held-out losses, speed, memory."""

    method: str
    objective: str
    tokens: int
    steps: int
    first_step: int
    schedule: dict[str, Any]
    setting: dict[str, Any]
    data: dict[str, Any]
    trainable_parameters: int
    curve: list[dict[str, float]]
    heldout: list[dict[str, Optional[float]]]
    train_seconds: float
    tokens_per_s: float
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: Optional[int] = None
    resumed_at_step: Optional[int] = None
    bf16_autocast: bool = False


def autocast_enabled(setting: HealSetting, device: torch.device) -> bool:
    """Whether healing computes under bfloat16 autocast on ``device`` (``auto``: where bf16 is native)."""
    return setting.autocast == "bf16" or (setting.autocast == "auto" and native_bf16(device))


def _autocast(setting: HealSetting, device: torch.device) -> contextlib.AbstractContextManager:
    if not autocast_enabled(setting, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@torch.no_grad()
def heldout_losses(student: nn.Module, teacher: Optional[nn.Module], windows: torch.Tensor, setting: HealSetting,
                   batch_size: int = 4) -> dict[str, Optional[float]]:
    """The student's mean next-token NLL on ``windows`` and, with a teacher, its mean KL from the teacher."""
    if windows.shape[0] == 0:
        return {"nll": None, "kl": None}
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    nll = kl = 0.0
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            with _autocast(setting, device):
                out = forward(student, batch)
                nll += float(LOSSES.get("lm")(out, None, batch, setting)) * batch.shape[0]
                if teacher is not None:
                    kl += float(logit_kl(out.logits, forward(teacher, batch).logits)) * batch.shape[0]
    finally:
        student.train(was_training)
    count = windows.shape[0]
    return {"nll": round(nll / count, 5), "kl": round(kl / count, 5) if teacher is not None else None}


class _Checkpoint:
    """A resumable checkpoint in ``directory``: trainable weights, optimizer state, progress. Written atomically;
    its key ties it to the setting, the data and the stage, so a resume with other options is refused."""

    def __init__(self, directory: Optional[Path], key: str) -> None:
        self.path = None if directory is None else Path(directory) / CHECKPOINT_FILE
        self.key = key

    def save(self, step: int, trainable: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
             progress: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"key": self.key, "step": step, "optimizer": optimizer.state_dict(), "progress": progress,
                 "trainable": {name: p.detach().cpu().clone() for name, p in trainable.items()}}
        atomic_torch_save(state, self.path)

    def load(self) -> Optional[dict[str, Any]]:
        if self.path is None:
            return None
        state = torch_load_or_none(self.path)
        if state is None:
            raise SettingsError(f"--resume found no healing checkpoint at {self.path}.")
        if state.get("key") != self.key:
            raise SettingsError(f"The healing checkpoint at {self.path} was written with other healing options or "
                                "data; rerun with the same options, or without --resume to start over.")
        return state

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def heal(
    student: nn.Module,
    teacher: Optional[nn.Module],
    stream: TrainingStream,
    setting: HealSetting,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    schedule: Optional[Schedule] = None,
    first_step: int = 0,
    on_step: Optional[Callable[[int], None]] = None,
    desc: str = "healing",
) -> HealReport:
    """Train ``student`` in place for ``setting.tokens`` tokens of ``stream`` (``setting.steps`` optimiser steps
    from global step ``first_step``), toward ``teacher`` for kd. With ``checkpoint_dir`` a checkpoint is written
    every ``checkpoint_every`` tokens and on Ctrl-C (then ``HealInterrupted``); ``resume`` continues from it to
    the same weights as an uninterrupted run. LoRA adapters are merged into the weights before returning."""
    if setting.objective in NEEDS_TEACHER and teacher is None:
        raise SettingsError(f"Healing with {setting.objective} needs the dense teacher model.")
    device = next(student.parameters()).device
    schedule = schedule or Schedule.for_setting(setting)
    checkpoint = _Checkpoint(checkpoint_dir, stable_hash([setting.model_dump(), stream.fingerprint, first_step,
                                                          schedule.__dict__]))
    state = checkpoint.load() if resume else None
    if teacher is not None:
        teacher.eval()
    started = time.perf_counter()
    with lora_adapters(student, setting) as trained, _gradient_checkpointing(trained, setting.gradient_checkpointing):
        trainable = {name: p for name, p in trained.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(trainable.values(), lr=schedule.lr(first_step), betas=(0.9, 0.95),
                                      weight_decay=setting.weight_decay)
        progress: dict[str, Any] = {"curve": [], "heldout": [], "train_seconds": 0.0}
        done = 0
        if state is not None:
            with torch.no_grad():
                for name, value in state["trainable"].items():
                    trainable[name].copy_(value.to(trainable[name].device))
            optimizer.load_state_dict(state["optimizer"])
            progress, done = state["progress"], state["step"]
        loop = _Loop(trained, teacher, stream, setting, schedule, first_step, optimizer, trainable, checkpoint,
                     progress)
        loop.run(done, on_step, desc)
        checkpoint.remove()
    seconds = time.perf_counter() - started
    trained_tokens = setting.steps * setting.window_tokens
    return HealReport(
        method=setting.method, objective=setting.objective, tokens=trained_tokens, steps=setting.steps,
        first_step=first_step, schedule=schedule.__dict__, setting=setting.model_dump(), data=stream.describe(),
        trainable_parameters=sum(p.numel() for p in trainable.values()), curve=progress["curve"],
        heldout=progress["heldout"], train_seconds=round(progress["train_seconds"], 3),
        tokens_per_s=round(trained_tokens / max(progress["train_seconds"], 1e-9), 2), seconds=round(seconds, 3),
        peak_rss_bytes=_peak_rss_bytes(),
        peak_gpu_bytes=int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None,
        resumed_at_step=None if state is None else int(state["step"]),
        bf16_autocast=autocast_enabled(setting, device),
    )


class _Loop:
    """The optimisation loop of one ``heal`` call (its state lives in ``progress`` so a checkpoint holds it)."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], stream: TrainingStream,
                 setting: HealSetting, schedule: Schedule, first_step: int, optimizer: torch.optim.Optimizer,
                 trainable: dict[str, nn.Parameter], checkpoint: _Checkpoint, progress: dict[str, Any]) -> None:
        self.student, self.teacher, self.stream, self.setting = student, teacher, stream, setting
        self.schedule, self.first_step, self.optimizer = schedule, first_step, optimizer
        self.trainable, self.checkpoint, self.progress = trainable, checkpoint, progress
        self.device = next(student.parameters()).device
        self.loss = LOSSES.get(setting.objective)
        self.hidden = setting.objective == "kd" and setting.hidden_weight > 0

    def run(self, done: int, on_step: Optional[Callable[[int], None]], desc: str) -> None:
        setting = self.setting
        window = setting.window_tokens
        if done == 0:
            self._heldout(0)
        bar = tqdm(total=setting.steps * window, initial=done * window, desc=desc, unit="tok", unit_scale=True,
                   disable=None, leave=False)
        step = done
        try:
            for step in range(done, setting.steps):
                loss = self._step(step)
                tokens = (step + 1) * window
                bar.update(window)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(self.progress['train_seconds'], 1e-9):.0f}")
                if tokens // setting.eval_every != step * window // setting.eval_every or step + 1 == setting.steps:
                    self._heldout(tokens)
                if tokens // setting.checkpoint_every != step * window // setting.checkpoint_every:
                    self.checkpoint.save(step + 1, self.trainable, self.optimizer, self.progress)
                if on_step is not None:
                    on_step(step + 1)
        except KeyboardInterrupt:
            completed = len(self.progress["curve"])
            self.checkpoint.save(completed, self.trainable, self.optimizer, self.progress)
            where = (f"a checkpoint is in {self.checkpoint.path.parent}: run the same command with --resume to "
                     "continue") if self.checkpoint.path is not None else "no checkpoint directory was given"
            raise HealInterrupted(f"Healing was interrupted after {completed * window:,} of "
                                  f"{setting.steps * window:,} tokens; {where}.") from None
        finally:
            bar.close()

    def _step(self, step: int) -> float:
        global_step = self.first_step + step
        lr = self.schedule.lr(global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.stream.batch(global_step, self.setting.batch_size).to(self.device)
        start = time.perf_counter()
        self.student.train()
        with _autocast(self.setting, self.device):
            teacher = self._teacher(batch)
            loss = self.loss(forward(self.student, batch, self.hidden), teacher, batch, self.setting)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable.values(), self.setting.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress["train_seconds"] += time.perf_counter() - start
        value = float(loss.detach())
        self.progress["curve"].append({"step": global_step + 1, "tokens": (step + 1) * self.setting.window_tokens,
                                       "loss": round(value, 5), "lr": lr})
        return value

    @torch.no_grad()
    def _teacher(self, batch: torch.Tensor) -> Optional[Outputs]:
        if self.teacher is None or self.setting.objective not in NEEDS_TEACHER:
            return None
        return forward(self.teacher, batch, self.hidden)

    def _heldout(self, tokens: int) -> None:
        if self.stream.heldout.shape[0] == 0:
            return
        losses = heldout_losses(self.student, self.teacher, self.stream.heldout, self.setting)
        self.progress["heldout"].append({"tokens": tokens, **losses})


@contextlib.contextmanager
def _gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Transformers' activation checkpointing for the duration (non-reentrant, so frozen inputs are fine)."""
    if not enabled or not hasattr(model, "gradient_checkpointing_enable"):
        yield
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()
