"""Pydantic settings shared by the API, the CLI and the benchmarks: budgets and the run protocol."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .data.zeroshot_tasks import parse_tasks
from .errors import BudgetError
from .registry import Registry

# the evaluation engines (engines/ registers each when the package is imported); a setting names one, and the name
# is checked and made canonical here, where the settings are made
ENGINES: Registry = Registry("engine")


class Budget(BaseModel):
    """What the plan must reach: a mean sparsity over all decoder linears (weighted by parameter count),
    or, for depth pruning, a predicted speedup or a number of sublayers to remove, or, for width pruning,
    the fraction of the eligible attention/MLP weights to slice away, or, for quantization, the
    parameter-weighted average bit width of the decoder linears."""

    model_config = ConfigDict(extra="forbid")
    sparsity: Optional[float] = Field(None, ge=0.0, lt=1.0)
    target_speedup: Optional[float] = Field(None, gt=1.0)
    remove_sublayers: Optional[int] = Field(None, ge=1)
    pruning_ratio: Optional[float] = Field(None, gt=0.0, lt=1.0)
    avg_bits: Optional[float] = Field(None, gt=0.0, le=16.0)
    max_bytes: Optional[int] = Field(None, ge=1, description="quant with GGUF types: tensor bytes of the GGUF file")

    @classmethod
    def for_sparsity(cls, sparsity: float) -> "Budget":
        """A sparsity budget, or ``BudgetError`` when it lies outside [0, 1)."""
        if not 0.0 <= sparsity < 1.0:
            raise BudgetError(f"Sparsity must lie in [0, 1) (got {sparsity}).")
        return cls(sparsity=sparsity)

    @classmethod
    def for_depth(cls, target_speedup: float | None = None, remove_sublayers: int | None = None) -> "Budget":
        """A depth budget: remove sublayers until the predicted speedup is reached, or exactly K of them."""
        if (target_speedup is None) == (remove_sublayers is None):
            raise BudgetError("Depth pruning needs exactly one of --target-speedup or --num-remove-sublayers.")
        if target_speedup is not None and target_speedup <= 1.0:
            raise BudgetError(f"--target-speedup must exceed 1 (got {target_speedup}).")
        if remove_sublayers is not None and remove_sublayers < 1:
            raise BudgetError(f"--num-remove-sublayers must be at least 1 (got {remove_sublayers}).")
        return cls(target_speedup=target_speedup, remove_sublayers=remove_sublayers)


    @classmethod
    def for_joint(cls, max_bytes: int | None, target_speedup: float | None) -> "Budget":
        """A joint budget: at most ``max_bytes`` GGUF tensor bytes and/or at least ``target_speedup``."""
        if max_bytes is None and target_speedup is None:
            raise BudgetError("The joint search needs --max-bytes and/or --target-speedup.")
        if target_speedup is not None and target_speedup <= 1.0:
            raise BudgetError(f"--target-speedup must exceed 1 (got {target_speedup}).")
        if max_bytes is not None and max_bytes < 1:
            raise BudgetError(f"--max-bytes must be positive (got {max_bytes}).")
        return cls(max_bytes=max_bytes, target_speedup=target_speedup)

    @classmethod
    def for_width(cls, pruning_ratio: float | None) -> "Budget":
        """A width budget: remove this fraction of the eligible parameters (heads and FFN channels)."""
        if pruning_ratio is None:
            raise BudgetError("Width pruning needs --pruning-ratio.")
        if not 0.0 < pruning_ratio < 1.0:
            raise BudgetError(f"--pruning-ratio must lie in (0, 1) (got {pruning_ratio}).")
        return cls(pruning_ratio=pruning_ratio)


    @classmethod
    def for_bits(cls, avg_bits: float | None, max_bytes: int | None = None) -> "Budget":
        """A quantization budget: at most ``avg_bits`` stored bits per decoder-linear weight on average and/or
        at most ``max_bytes`` tensor bytes in the GGUF file (None: the allocator's own choice)."""
        if avg_bits is not None and not 0.0 < avg_bits <= 16.0:
            raise BudgetError(f"--avg-bits must lie in (0, 16] (got {avg_bits}).")
        if max_bytes is not None and max_bytes < 1:
            raise BudgetError(f"--max-bytes must be positive (got {max_bytes}).")
        return cls(avg_bits=avg_bits, max_bytes=max_bytes)


# Items per zero-shot task unless told otherwise: the default task set scores in under 15 minutes on 2 CPU
# cores for smollm2-135m (benchmarks/RESULTS.md, zero-shot section); pass None for every item.
DEFAULT_TASK_LIMIT = 500


class LatencySetting(BaseModel):
    """The deployment setting latency is measured for: prompt, generated tokens, batch, warm-up, repeats."""

    model_config = ConfigDict(extra="forbid")
    prompt_length: int = Field(128, ge=1)
    generation: bool = Field(True, description="decode generation_length tokens after the prompt (else prefill only)")
    generation_length: int = Field(32, ge=0)
    batch_size: int = Field(1, ge=1)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(5, ge=1)
    paired: bool = Field(True, description="time the dense and the compressed model in alternating runs and take "
                                           "the median of each pair's ratio (keeps a copy of the dense model while "
                                           "the plan is applied and measured); off: time each alone, before and after")

    @property
    def decode_steps(self) -> int:
        return self.generation_length if self.generation else 0


class DeploySetting(BaseModel):
    """Export the compressed model for a deployment engine and measure it there (dense reference included)."""

    model_config = ConfigDict(extra="forbid")
    format: str = Field("gguf", description="deployment format: gguf (llama.cpp)")
    outtype: str = Field("f16", description="GGUF type of linears that stay float (f32, f16, bf16)")
    embedding_type: Optional[str] = Field(None, description="GGUF type of the token embedding (default: q8_0 when "
                                                             "linears are quantized, else outtype)")
    measure: bool = Field(True, description="measure perplexity and latency of the file in llama.cpp")
    controls: list[str] = Field(default_factory=list, description="files measured beside the plan's: recipe "
                                "(llama.cpp's recipe nearest in size, same importance matrix), source (the GGUF "
                                "file the model was loaded from)")
    reference_logits: Optional[str] = Field(None, description="keep the dense export's llama.cpp logits in this "
                                             "folder, window by window, and reuse them for every file compared with "
                                             "the same export (as llama-perplexity --kl-divergence-base; 100 MB per "
                                             "512-token window of a 49k vocabulary); default: recompute per file")


HEAL_METHODS = ("kd", "lm", "lora")


class HealSetting(BaseModel):
    """Training a compressed model back toward the dense one within a token budget (``layerwise heal``,
    ``compress --heal``): what is trained, on which text, with which optimiser schedule."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field("kd", description="kd: KL divergence to the dense teacher's next-token distribution "
                                          "(Minitron's logit distillation); lm: plain next-token loss; lora: "
                                          "peft LoRA adapters trained with --heal-loss, merged back")
    tokens: int = Field(262144, ge=1, description="training tokens (the budget: steps = tokens / (batch x seqlen))")
    lr: float = Field(1e-4, gt=0.0, description="peak AdamW learning rate (after the warm-up)")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="the cosine schedule ends at lr x this")
    warmup: float = Field(0.05, ge=0.0, lt=1.0, description="fraction of the tokens spent warming the lr up")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradients are clipped to this global norm")
    batch_size: int = Field(4, ge=1, description="windows per optimiser step")
    seqlen: int = Field(512, ge=2, description="tokens per training window (packed)")
    temperature: float = Field(1.0, gt=0.0, description="kd: softmax temperature of teacher and student")
    top_k: Optional[int] = Field(None, ge=1, description="kd: distil the teacher's top-k tokens only (large "
                                                          "vocabularies)")
    hidden_weight: float = Field(0.0, ge=0.0, description="kd: weight of a normalised MSE between the student's "
                                                           "and the teacher's block outputs (Minitron)")
    loss: str = Field("kd", description="lora: the loss its adapters train on (kd or lm)")
    lora_rank: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    autocast: str = Field("auto", description="bf16: bfloat16 autocast; none: the model's dtype throughout; auto: "
                                              "bf16 where the device computes it natively (CUDA, CPUs with "
                                              "AVX-512 BF16/AMX), else none (emulated bf16 ran 3.6-4.9x slower "
                                              "than float32 on an AVX2 CPU)")
    gradient_checkpointing: bool = Field(False, description="recompute block activations in the backward pass "
                                                            "(less memory, ~30% more time)")
    corpus: str = Field("wiki+ptb", description="training text: '+'-joined corpus names whose training parts "
                                                "are used (wiki's calibration articles, ptb's train split)")
    train_text: Optional[str] = Field(None, description="train on this text file instead of the corpora")
    heldout_windows: int = Field(8, ge=0, description="training-text windows kept out for the held-out loss")
    eval_every: int = Field(32768, ge=1, description="held-out loss every this many training tokens")
    checkpoint_every: int = Field(65536, ge=1, description="write a resumable checkpoint every this many tokens")
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in HEAL_METHODS:
            raise ValueError(f"unknown healing method '{method}' (choose one of: {', '.join(HEAL_METHODS)})")
        return method

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, loss: str) -> str:
        if loss not in ("kd", "lm"):
            raise ValueError(f"unknown healing loss '{loss}' (choose kd or lm)")
        return loss

    @field_validator("autocast")
    @classmethod
    def _known_autocast(cls, autocast: str) -> str:
        if autocast not in ("auto", "bf16", "none"):
            raise ValueError(f"unknown autocast '{autocast}' (choose auto, bf16 or none)")
        return autocast

    @property
    def objective(self) -> str:
        """The loss trained: kd or lm (lora trains its adapters on ``loss``)."""
        return self.loss if self.method == "lora" else self.method

    @property
    def window_tokens(self) -> int:
        return self.batch_size * self.seqlen

    @property
    def steps(self) -> int:
        """Optimiser steps the token budget buys (at least one)."""
        return max(1, -(-self.tokens // self.window_tokens))


class RunSettings(BaseModel):
    """The evaluation protocol and calibration sampling of a run (stored beside every number)."""

    model_config = ConfigDict(extra="forbid")
    corpus: str = "wiki"
    eval_text: Optional[str] = None
    calib_text: Optional[str] = None
    seqlen: int = Field(512, ge=2)
    max_windows: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    dtype: str = "float32"
    device: str = "cpu"
    nsamples: int = Field(128, ge=1)
    calib_seqlen: Optional[int] = Field(None, ge=2, description="calibration window; None = seqlen")
    calib_batch_size: int = Field(8, ge=1)
    seed: int = 0
    perplexity: bool = Field(True, description="measure perplexity (off: zero-shot/latency only)")
    kld: bool = Field(True, description="KL divergence to the reference model on the perplexity windows")
    reference: Optional[str] = Field(None, description="the KL divergence's reference model (default: the dense "
                                                       "model a compress or apply run started from; eval needs one)")
    tasks: list[str] = Field(default_factory=list, description="zero-shot tasks scored through lm-eval")
    task_limit: Optional[int] = Field(
        DEFAULT_TASK_LIMIT, ge=1, description="items per task, a seeded random subset; None = every item"
    )
    task_batch_size: int = Field(16, ge=1)
    latency: Optional[LatencySetting] = Field(default_factory=LatencySetting, description="None: not measured")
    recover_steps: int = Field(0, ge=0, description="LoRA fine-tune steps on the calibration windows after pruning")
    recover_lr: float = Field(1e-4, gt=0.0)
    deploy: Optional[DeploySetting] = Field(None, description="export and measure in a deployment engine")
    heal: Optional[HealSetting] = Field(None, description="train the compressed model toward the dense one")
    engine: str = Field("pytorch", description="engine that measures: pytorch or llama.cpp (a GGUF file)")
    latency_engine: Optional[str] = Field(None, description="engine that times the searches' latency tables "
                                                             "(depth: pytorch when unset; width: none when unset)")
    threads: Optional[int] = Field(None, ge=1, description="llama.cpp threads (default: PyTorch's thread count)")

    @field_validator("engine", "latency_engine")
    @classmethod
    def _known_engine(cls, engine: str | None) -> str | None:
        return None if engine is None else ENGINES.canonical(engine)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        """Canonical task names, so an unknown one fails before any model loads."""

        return parse_tasks(tasks) if tasks else []
