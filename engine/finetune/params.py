"""Which UNet tensors a run trains (``params``), the LoRA wrappers, and the optimizer.

Parameter sets: ``xattn`` (cross-attention ``attn2``: ESD-x, for styles and objects),
``noxattn`` (everything but ``attn2``: ESD-u, for global concepts such as nudity), ``full``,
``selfattn-q`` (TRCE's: self-attention and ``attn2.to_q``), ``lora`` (rank ``lora_rank``
adapters on the cross-attention projections, merged into them at the end: the delta is then
exactly rank r per layer and ``export_lora`` writes it losslessly). An IP-Adapter's own weights
are never trained.
"""

from __future__ import annotations

import torch

from engine.finetune.config import OPTIMIZERS, PARAM_SETS, TrainConfig

LORA_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # ESD-x's layers


def trainable_parameters(unet, params: str) -> dict[str, torch.nn.Parameter]:
    """The UNet parameters a parameter set trains, by state-dict key."""
    if params not in PARAM_SETS:
        raise ValueError(f"params must be one of {PARAM_SETS}, got {params!r}")
    # An IP-Adapter's own weights (attention processors' to_k_ip/to_v_ip, the image projection)
    # only carry the image branch during training; they are never trained or exported.
    named = {k: p for k, p in unet.named_parameters() if ".processor." not in k and not k.startswith("encoder_hid_proj")}
    if params == "full":
        return named
    if params == "lora":  # the weights the merged adapters change
        chosen = {k: p for k, p in named.items() if k.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS))}
        if not chosen:
            raise ValueError("the UNet has no cross-attention projections for LoRA")
        return chosen
    if params == "selfattn-q":  # TRCE stage 2: self-attention and the cross-attention queries
        chosen = {k: p for k, p in named.items() if ".attn1." in k or ".attn2.to_q." in k}
        if not chosen:
            raise ValueError("the UNet has no attention layers (attn1 / attn2.to_q)")
        return chosen
    in_xattn = {k: ".attn2." in k for k in named}
    if not any(in_xattn.values()):
        raise ValueError("the UNet has no cross-attention (attn2) layers")
    return {k: p for k, p in named.items() if in_xattn[k] == (params == "xattn")}


class LoRALinear(torch.nn.Module):
    """``base(x) + x A^T B^T``: a rank-r adapter beside a frozen linear layer. B starts at zero,
    so training starts from the original model."""

    def __init__(self, base: torch.nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(self.initial_A(base, rank, generator))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                                     dtype=base.weight.dtype))

    @staticmethod
    def initial_A(base: torch.nn.Linear, rank: int, generator: torch.Generator) -> torch.Tensor:
        a = torch.randn(rank, base.in_features, generator=generator) / rank
        return a.to(base.weight.device, base.weight.dtype)

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t()


LORA_SEED_OFFSET = 99  # adapters draw their initial A from seed + 99


def wrap_lora_targets(unet, make) -> dict[str, torch.nn.Module]:
    """Replace every cross-attention projection (``LORA_TARGETS``) by ``make(linear)``, in
    ``trainable_parameters`` order; returns the new modules by module name."""
    wrapped = {}
    for name in (k.removesuffix(".weight") for k in trainable_parameters(unet, "lora")):
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        wrapped[name] = make(getattr(parent, child))
        setattr(parent, child, wrapped[name])
    return wrapped


def unwrap_lora_targets(unet, wrapped: dict[str, torch.nn.Module]) -> None:
    """Put the plain layers (each wrapper's ``base``) back."""
    for name, module in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, module.base)


def lora_parameters(wrapped: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """The adapters' trained tensors by name: "<module>.lora_A" and "<module>.lora_B"."""
    return {f"{n}.{p}": getattr(m, p) for n, m in wrapped.items() for p in ("lora_A", "lora_B")}


def add_lora(unet, rank: int, seed: int) -> dict[str, LoRALinear]:
    """Wrap every cross-attention projection (``LORA_TARGETS``) in a ``LoRALinear``; by module name."""
    gen = torch.Generator().manual_seed(seed + LORA_SEED_OFFSET)
    return wrap_lora_targets(unet, lambda base: LoRALinear(base, rank, gen))


@torch.no_grad()
def merge_lora(unet, wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """Fold each adapter into its layer (W + B A), put the plain layers back; returns the new weights."""
    for module in wrapped.values():
        module.base.weight += module.lora_B @ module.lora_A
    unwrap_lora_targets(unet, wrapped)
    return {f"{name}.weight": module.base.weight.detach() for name, module in wrapped.items()}


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    """torch Adam / AdamW, or bitsandbytes' 8-bit AdamW (states in 8 bits: 4x less memory)."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # pragma: no cover - bitsandbytes is a declared dependency
            raise ImportError("optimizer 'adamw8bit' needs bitsandbytes: pip install 'erasure-engine[train]'") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def start_training(unet, trained: dict[str, torch.nn.Parameter], cfg: TrainConfig):
    """Make ``trained`` trainable, put ``unet`` in training mode (with gradient checkpointing if
    asked) and return the optimizer over ``trained``."""
    for p in trained.values():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return make_optimizer(cfg.optimizer, trained.values(), cfg.lr, cfg.weight_decay)

