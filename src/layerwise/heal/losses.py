"""The losses healing trains on, one registered function each: ``kd`` (KL divergence from the dense teacher's
next-token distribution, as Minitron distils) and ``lm`` (plain next-token cross-entropy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import HealSetting
from ..registry import Registry


@dataclass
class Outputs:
    """What one forward pass gave: logits [B, T, V] and, when asked for, every block's output."""

    logits: torch.Tensor
    hidden: Optional[tuple[torch.Tensor, ...]] = None


Loss = Callable[[Outputs, Optional[Outputs], torch.Tensor, HealSetting], torch.Tensor]
LOSSES: Registry[Loss] = Registry("healing loss")
NEEDS_TEACHER = {"kd"}


def forward(model: torch.nn.Module, batch: torch.Tensor, hidden: bool = False) -> Outputs:
    """The model's logits (and block outputs when ``hidden``) on ``batch`` [B, T]."""
    out = model(input_ids=batch, use_cache=False, output_hidden_states=hidden)
    return Outputs(out.logits, out.hidden_states[1:] if hidden else None)


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
             top_k: int | None = None) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions at ``temperature``, scaled
    by T² so gradients keep their size across temperatures; with ``top_k``, the teacher's k most likely tokens
    only (renormalised), against the student's full-vocabulary log-probabilities at those tokens."""
    student = student.float() / temperature
    teacher = teacher.float() / temperature
    log_q = F.log_softmax(student, dim=-1).flatten(0, -2)
    if top_k is not None and top_k < teacher.shape[-1]:
        values, index = teacher.topk(top_k, dim=-1)
        log_p = F.log_softmax(values, dim=-1).flatten(0, -2)
        log_q = log_q.gather(-1, index.flatten(0, -2))
    else:
        log_p = F.log_softmax(teacher, dim=-1).flatten(0, -2)
    # torch's fused kl_div: half the time of the same sum written out, on SmolLM2's 49k vocabulary here
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2


def hidden_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over blocks of the MSE between student and teacher block outputs, each normalised by the teacher's
    mean square (blocks keep the hidden width under width and depth pruning, so they compare one to one)."""
    terms = [((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp_min(1e-12)
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


@LOSSES.register("kd")
def distillation_loss(student: Outputs, teacher: Optional[Outputs], batch: torch.Tensor,
                      setting: HealSetting) -> torch.Tensor:
    """Logit distillation from the dense teacher, plus the hidden-state term when its weight is set."""
    assert teacher is not None, "kd needs the teacher's outputs"
    loss = logit_kl(student.logits, teacher.logits, setting.temperature, setting.top_k)
    if setting.hidden_weight > 0 and student.hidden is not None and teacher.hidden is not None:
        loss = loss + setting.hidden_weight * hidden_mse(student.hidden, teacher.hidden)
    return loss


@LOSSES.register("lm")
def next_token_loss(student: Outputs, teacher: Optional[Outputs], batch: torch.Tensor,
                    setting: HealSetting) -> torch.Tensor:
    """Cross-entropy of each next token of the window (the first token is only context)."""
    logits = student.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
