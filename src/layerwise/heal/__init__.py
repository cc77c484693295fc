"""Healing: train a compressed model toward the dense one (logit distillation, next-token loss or LoRA) within
a token budget, and Adapt-Accel's interleaving of pruning steps with healing."""

from .lora import lora_adapters, lora_targets
from .losses import LOSSES, hidden_mse, logit_kl
from .schedule import Schedule
from .trainer import CHECKPOINT_FILE, HealReport, heal, heldout_losses

__all__ = ["CHECKPOINT_FILE", "HealReport", "LOSSES", "Schedule", "heal", "heldout_losses", "hidden_mse",
           "logit_kl", "lora_adapters", "lora_targets"]
