"""The settings every fine-tuning method shares, and the checks each method's settings reuse.

A method's settings dataclass (engine/methods/<method>.py) subclasses ``TrainConfig`` and adds
its own fields; ``__post_init__`` validates the shared fields here and the method's own there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.settings import Settings

PARAM_SETS = ("xattn", "noxattn", "full", "selfattn-q", "lora")
OPTIMIZERS = ("adam", "adamw", "adamw8bit")

# The base of every fine-tuning method's ``toy`` preset: the published settings are for SD's
# 860M-parameter UNet; the toy world's has 6M parameters and 8x8 latents and learns at a larger
# step. Measured on the toy world (benchmarks/toy_methods.py): one identity erased in 300 steps.
TOY_TRAINING = {"iterations": 300, "lr": 1e-4, "batch_size": 4, "sample_steps": 25, "trajectories": 4}


def check_choices(cfg, choices: dict) -> None:
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"config field {name!r} must be one of {allowed}, got {getattr(cfg, name)!r}")


def check_positive_ints(cfg, names) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")


def check_numbers(cfg, names, nullable=(), positive=()) -> None:
    """Finite numbers >= 0 (``nullable`` ones may be None; ``positive`` ones must be > 0)."""
    for name in (*names, *nullable):
        value = getattr(cfg, name)
        if value is None and name in nullable:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            allowed = " or null" if name in nullable else ""
            raise ValueError(f"config field {name!r} must be a finite number >= 0{allowed}, got {value!r}")
        if name in positive and value == 0:
            raise ValueError(f"config field {name!r} must be > 0")


@dataclass(frozen=True)
class TrainConfig(Settings):
    """What the trainer, the parameter sets and the cached trajectories need (ESD's defaults)."""

    params: str = "xattn"  # xattn (ESD-x) | noxattn (ESD-u) | full | selfattn-q | lora
    lora_rank: int = 4  # params=lora: rank of the adapters on the cross-attention projections
    iterations: int = 1000
    lr: float = 1e-5
    batch_size: int = 1
    sample_steps: int = 50  # DDIM steps of the trajectories x_t is taken from
    sample_guidance: float = 3.0
    trajectories: int = 4  # cached trajectories per concept prompt
    optimizer: str = "adam"  # adam | adamw | adamw8bit (bitsandbytes)
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 100  # steps between checkpoints (0: none)
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 autocast on GPUs that support it) | fp32 | bf16
    loss_backend: str = "auto"  # the fused losses: auto | triton | torch
    distributed: str = "none"  # none | deepspeed (data-parallel ZeRO under torchrun; engine/distributed.py)
    zero_stage: int = 2  # distributed="deepspeed": 2 (optimizer state + gradients sharded) or 3 (+ parameters)
    progress: bool = True

    def __post_init__(self):
        check_choices(self, {"params": PARAM_SETS, "optimizer": OPTIMIZERS, "loss_backend": ("auto", "triton", "torch"),
                             "precision": ("auto", "fp32", "bf16"), "distributed": ("none", "deepspeed"),
                             "zero_stage": (2, 3)})
        check_positive_ints(self, ("iterations", "batch_size", "sample_steps", "trajectories", "lora_rank"))
        check_numbers(self, ("lr", "sample_guidance", "weight_decay"), positive=("lr",))
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"config field 'checkpoint_every' must be an integer >= 0, got {self.checkpoint_every!r}")

