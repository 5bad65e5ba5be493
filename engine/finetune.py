"""Fine-tuning erasure (DESIGN 2.2) on the fused loss kernels: one trainer loop, four objectives.

* ``esd``: negative guidance on text (below);
* ``co-erasing``: ESD's target with an image branch through an IP-Adapter (``_ImageBranch``);
* ``bi-erasing``: a negative and a positive image branch with masks (``_BiErasing``);
* ``trce``: the stage-1 closed-form edit, then contrastive steering of the early denoising
  steps (``_TRCEStage2``).

For a noisy latent ``x_t`` of concept ``c`` at timestep ``t`` the trainee is regressed onto

    target = eps*(x_t, t, "") - eta (eps*(x_t, t, c) - eps*(x_t, t, ""))

with ``eps*`` the frozen original UNet: ``kernels.guidance_loss`` with frozen predictions
``[eps*(x_t,t,""), eps*(x_t,t,c)]`` and coefficients ``[1 + eta_c, -eta_c]``, where ``eta_c`` is
``eta`` times the concept's weight. Many concepts train in one run: each batch mixes concepts.

Where ``x_t`` comes from (``xt_source``):

* ``"cached"`` (fast, the default): DDIM trajectories of the FROZEN model (``sample_steps``
  steps, guidance ``sample_guidance``) are sampled once per concept before training. Sampling
  with guidance already evaluates ``eps*(x_t, t, c)`` and ``eps*(x_t, t, "")`` at every step, so
  each cached step stores ``x_t`` with both frozen predictions: a training step is then one
  trainee forward and backward, nothing else.
* ``"on-policy"`` (faithful to the paper): each step samples ``x_t`` with the model being
  trained, from fresh noise, stopping at a random DDIM step, then evaluates the frozen model
  there (a frozen copy of the UNet is kept): tens of extra forwards per step.

Parameter sets (``params``): ``xattn`` (cross-attention ``attn2``: ESD-x, for styles and
objects), ``noxattn`` (everything but ``attn2``: ESD-u, for global concepts such as nudity),
``full``, ``selfattn-q`` (TRCE's: self-attention and ``attn2.to_q``), ``lora`` (rank
``lora_rank`` adapters on the cross-attention projections, merged into them at the end: the
delta is then exactly rank r per layer and ``export_lora`` writes it losslessly). An
IP-Adapter's own weights are never trained.

Checkpoints: every ``checkpoint_every`` steps the trained tensors, the optimizer state, the RNG
states and the step are written to ``checkpoint_dir`` as safetensors and JSON (never a pickle), in
a folder per step (``stepNNNNNNNN/``) that ``latest`` names once it is complete; ``resume=True``
continues from the last one exactly as if the run had not stopped (the trajectory cache is
rebuilt deterministically from the seed, or read back from the checkpoint folder). Checkpoints
and caches carry the run's signature (method, settings, concepts and the fingerprint of the
model's weights) and are refused, naming what differs, by a run with another one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.concepts import ConceptSet
from engine.kernels import contrastive_hinge, guidance_loss

PARAM_SETS = ("xattn", "noxattn", "full", "selfattn-q", "lora")
LORA_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # ESD-x's layers
XT_SOURCES = ("cached", "on-policy")
OPTIMIZERS = ("adam", "adamw", "adamw8bit")
LATEST_NAME = "latest"  # names the newest complete checkpoint folder (stepNNNNNNNN)
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
CACHE_NAME = "trajectories.safetensors"
CHECKPOINT_FORMAT = "erasure-engine/checkpoint-v2"
LEGACY_NAMES = ("checkpoint.pt", "trajectories.pt")  # pickles of older versions: never loaded


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of a negative-guidance fine-tuning run; ESD's published defaults."""

    params: str = "xattn"  # xattn (ESD-x) | noxattn (ESD-u) | full | selfattn-q | lora
    lora_rank: int = 4  # params=lora: rank of the adapters on the cross-attention projections
    iterations: int = 1000
    lr: float = 1e-5
    batch_size: int = 1
    eta: float = 1.0  # negative-guidance scale; each concept's weight multiplies it
    xt_source: str = "cached"  # cached | on-policy
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
    # Co-Erasing / Bi-Erasing: the image branch
    ip_adapter: str | None = None  # IP-Adapter weights file (.safetensors), loaded with pipe.load_ip_adapter
    images: str | None = None  # concept images: DIR/<concept name>/*.png (else generated by the original model)
    concept_images: int = 16  # images generated per concept (and per anchor, for Bi-Erasing's positive branch)
    image_guidance: float = 7.5  # guidance of those generations
    negative_weight: float = 0.6  # Bi-Erasing's w_n
    positive_weight: float = 0.4  # Bi-Erasing's w_p
    positive_first: bool = False  # Bi-Erasing: the first half of the steps trains the positive branch only
    # TRCE
    stage1_preserve_weight: float | None = 1e-6  # stage 1's lam (published 1e-6); None: UCE's max(0.1, 1/n)
    early_steps: int = 26  # the first DDIM steps (of sample_steps) that are steered
    steer_guidance: float = 15.0  # g of the safe / unsafe targets
    hinge_beta: float = 1.0
    hinge_delta: float = 0.01
    reg_weight: float = 100.0  # the unconditional regulariser against the stage-1 model
    progress: bool = True

    def __post_init__(self):
        choices = {"params": PARAM_SETS, "xt_source": XT_SOURCES, "optimizer": OPTIMIZERS,
                   "loss_backend": ("auto", "triton", "torch"), "precision": ("auto", "fp32", "bf16"),
                   "distributed": ("none", "deepspeed"), "zero_stage": (2, 3)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config field {name!r} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("iterations", "batch_size", "sample_steps", "trajectories", "early_steps", "concept_images",
                     "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        nullable = ("stage1_preserve_weight",)
        for name in ("lr", "eta", "sample_guidance", "weight_decay", "steer_guidance", "hinge_beta", "hinge_delta",
                     "reg_weight", "image_guidance", "negative_weight", "positive_weight", *nullable):
            value = getattr(self, name)
            if value is None and name in nullable:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                allowed = " or null" if name in nullable else ""
                raise ValueError(f"config field {name!r} must be a finite number >= 0{allowed}, got {value!r}")
        if self.lr == 0 or self.hinge_beta == 0:
            raise ValueError("config fields 'lr' and 'hinge_beta' must be > 0")

        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"config field 'checkpoint_every' must be an integer >= 0, got {self.checkpoint_every!r}")

    def replace(self, **changes) -> "FinetuneConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown fine-tuning option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Published defaults per method. ESD: Adam lr 1e-5, 1000 iterations, batch 1, eta 1, ESD-x.
# TRCE stage 2: AdamW lr 1e-6 on self-attention and attn2.to_q, the first 26 of 50 DDIM steps,
# g 15, delta 0.01, regulariser weight 100; its malicious-prompt trajectories are sampled with
# SD's usual guidance 7.5.
FINETUNE_METHODS: dict[str, FinetuneConfig] = {
    "esd": FinetuneConfig(),
    "trce": FinetuneConfig(params="selfattn-q", optimizer="adamw", lr=1e-6, sample_guidance=7.5),
    "co-erasing": FinetuneConfig(params="noxattn"),
    "bi-erasing": FinetuneConfig(params="noxattn"),
}


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


def start_training(unet, trained: dict[str, torch.nn.Parameter], cfg: "FinetuneConfig"):
    """Make ``trained`` trainable, put ``unet`` in training mode (with gradient checkpointing if
    asked) and return the optimizer over ``trained``."""
    for p in trained.values():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return make_optimizer(cfg.optimizer, trained.values(), cfg.lr, cfg.weight_decay)


# ----------------------------------------------------------------------------- the frozen side


# --- SDXL: the UNet also takes each prompt's pooled text embedding and six size/crop ids. The
# trainer passes a text condition as one (N, rows, D) tensor everywhere (cached, batched, indexed
# by prompt), so for SDXL the pooled embedding rides along as one extra row after the 77 token
# rows, zero-padded to D, and a forward pre-hook on the UNet moves it into added_cond_kwargs.

def _is_sdxl(pipe) -> bool:
    from engine.models import pipeline_family

    return pipeline_family(pipe) == "sdxl"


def _encode_conditions(pipe, texts: list[str], progress: bool) -> torch.Tensor:
    """(N, 77, D) text conditions of ``texts`` (SDXL: (N, 78, D), the pooled embedding last; the
    empty prompt gets zeros, as the pipeline's unconditional branch, with
    ``force_zeros_for_empty_prompt``)."""
    from engine.models import MAX_LENGTH, encode_prompts, encode_sdxl_prompts

    if not _is_sdxl(pipe):
        return encode_prompts(pipe, texts, progress=progress)[0]
    width = pipe.unet.config.cross_attention_dim
    out = torch.zeros(len(texts), MAX_LENGTH + 1, width)
    zero_empty = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    rows = [i for i, text in enumerate(texts) if text or not zero_empty]
    hidden, pooled = encode_sdxl_prompts(pipe, [texts[i] for i in rows], progress=progress)
    if pooled.shape[1] > width:
        raise ValueError(f"pooled text embedding ({pooled.shape[1]}) wider than the UNet's text width ({width})")
    out[rows, :MAX_LENGTH] = hidden.cpu()
    out[rows, MAX_LENGTH, : pooled.shape[1]] = pooled.cpu()
    return out


@contextlib.contextmanager
def sdxl_conditioning(pipe):
    """While open, ``pipe.unet`` (and deep copies made meanwhile) accept the trainer's SDXL text
    conditions (``_encode_conditions``): the extra row becomes ``added_cond_kwargs`` with the
    native-size time ids. Nothing happens for SD1.x / SD2.x pipelines."""
    from engine.models import MAX_LENGTH

    if not _is_sdxl(pipe):
        yield
        return
    config = pipe.unet.config
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)  # original, crop, target

    def split(module, args, kwargs):
        args = list(args)
        positional = len(args) > 2
        cond = args[2] if positional else kwargs.get("encoder_hidden_states")
        if cond is None or cond.shape[1] != MAX_LENGTH + 1:
            return None
        added = dict(kwargs.get("added_cond_kwargs") or {})
        added.update(text_embeds=cond[:, MAX_LENGTH, :pooled_dim],
                     time_ids=time_ids.to(cond.device, cond.dtype).expand(len(cond), -1))
        if positional:
            args[2] = cond[:, :MAX_LENGTH]
        else:
            kwargs["encoder_hidden_states"] = cond[:, :MAX_LENGTH]
        kwargs["added_cond_kwargs"] = added
        return tuple(args), kwargs

    handle = pipe.unet.register_forward_pre_hook(split, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _Prompts:
    """Embeddings of every concept prompt, of its anchor prompt and of the empty prompt, on the
    UNet's device; ``items[i]`` is (concept index, prompt, anchor prompt). SDXL's carry the pooled
    embedding as an extra row (``sdxl_conditioning``)."""

    def __init__(self, pipe, concepts: ConceptSet, progress: bool):
        self.items = []
        for i, concept in enumerate(concepts.concepts):
            self.items += [(i, src, tgt) for _, src, tgt in concept.prompt_pairs()]
        n = len(self.items)
        texts = [src for _, src, _ in self.items] + [tgt for _, _, tgt in self.items] + [""]
        emb = _encode_conditions(pipe, texts, progress).to(pipe.unet.device, pipe.unet.dtype)
        self.cond, self.anchor, self.uncond = emb[:n], emb[n : 2 * n], emb[2 * n :]
        self.eta_scale = torch.tensor([concepts.concepts[i].weight for i, _, _ in self.items])

    def guidance_coeffs(self, items, eta: float, device, sign: float = 1.0) -> torch.Tensor:
        """Loss coefficients [1 + s eta_c, -s eta_c] of the prompts ``items`` (eta_c: ``eta`` times
        the concept's weight); s = +1 erases (ESD's target), s = -1 preserves."""
        eta_c = eta * self.eta_scale[items]
        return torch.stack([1 + sign * eta_c, -sign * eta_c], 1).to(device)


def _latent_shape(pipe) -> tuple[int, int, int]:
    size = pipe.unet.config.sample_size
    return pipe.unet.config.in_channels, size, size


def _ddim(pipe, steps: int):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=pipe.unet.device)
    return scheduler


@torch.no_grad()
def _eps(unet, x, t, *conds) -> list[torch.Tensor]:
    """eps(x, t, c) for each condition (a batch, or one row broadcast), in one UNet call."""
    n = len(x)
    cond = torch.cat([c.expand(n, -1, -1) for c in conds])
    out = unet(x.repeat(len(conds), 1, 1, 1), t.repeat(len(conds)), cond).sample
    return list(out.chunk(len(conds)))


def _guided_eps(unet, x, t, cond, uncond):
    """(eps(x, t, ""), eps(x, t, c)) for a batch, in one UNet call."""
    return tuple(_eps(unet, x, t, uncond, cond))


def _noise(shape, seed: int, row: int) -> torch.Tensor:
    """The starting noise of trajectory ``row``: the same whatever the batching."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + row))


def _sample_trajectories(pipe, cond, uncond, steps: int, keep_steps: int, guidance: float, seed: int, desc: str,
                         progress: bool, record, n: int | None = None) -> None:
    """DDIM with guidance from seeded noise, one trajectory per row of ``cond``; calls
    ``record(rows, step, x, eps_uncond, eps_cond)`` for the first ``keep_steps`` steps.
    ``cond=None``: ``n`` unconditional trajectories, one UNet evaluation per step (eps_cond is
    then eps_uncond)."""
    unet = pipe.unet
    scheduler = _ddim(pipe, steps)
    shape = _latent_shape(pipe)
    n, batch = (len(cond) if cond is not None else n), 16
    with tqdm(total=n, desc=desc, disable=not progress, unit="traj") as bar:
        for lo in range(0, n, batch):
            rows = list(range(lo, min(n, lo + batch)))
            x = torch.stack([_noise(shape, seed, r) for r in rows]).to(unet.device, unet.dtype)
            x = x * scheduler.init_noise_sigma
            for s, t in enumerate(scheduler.timesteps[:keep_steps]):
                if cond is None:
                    (eps_u,) = _eps(unet, x, t.expand(len(rows)), uncond)
                    eps_c = eps_u
                else:
                    eps_u, eps_c = _guided_eps(unet, x, t.expand(len(rows)), cond[rows], uncond)
                record(rows, s, x, eps_u, eps_c)
                x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
            bar.update(len(rows))


def build_trajectory_cache(pipe, prompts: _Prompts, cfg: FinetuneConfig) -> dict[str, torch.Tensor]:
    """For every prompt, ``cfg.trajectories`` DDIM trajectories of the frozen model: per step the
    latent x_t, its timestep and both frozen predictions (CPU, the UNet's dtype).

    Deterministic in ``cfg.seed``: trajectory j of prompt i starts from noise seeded by
    ``cfg.seed``, i and j, whatever the batching.
    """
    unet = pipe.unet
    shape = _latent_shape(pipe)
    prompt = torch.arange(len(prompts.items)).repeat_interleave(cfg.trajectories)
    n = len(prompt)
    out = {name: torch.empty((n, cfg.sample_steps, *shape), dtype=unet.dtype) for name in ("x", "eps_uncond", "eps_cond")}
    out["timesteps"] = _ddim(pipe, cfg.sample_steps).timesteps.cpu().clone()
    out["prompt"] = prompt

    def record(rows, s, x, eps_u, eps_c):
        out["x"][rows, s] = x.cpu()
        out["eps_uncond"][rows, s] = eps_u.cpu()
        out["eps_cond"][rows, s] = eps_c.cpu()

    _sample_trajectories(pipe, prompts.cond[prompt], prompts.uncond, cfg.sample_steps, cfg.sample_steps,
                         cfg.sample_guidance, cfg.seed, "cache trajectories", cfg.progress, record)
    return out


@torch.no_grad()
def _on_policy_xt(trainee, scheduler, cond, uncond, stop: int, guidance: float, gen) -> torch.Tensor:
    """Sample x_t with the model being trained: DDIM from noise, stopped after ``stop`` steps."""
    shape = (len(cond), trainee.config.in_channels, trainee.config.sample_size, trainee.config.sample_size)
    x = torch.randn(shape, generator=gen).to(cond.device, cond.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:stop]:
        eps_u, eps_c = _guided_eps(trainee, x, t.expand(len(x)), cond, uncond)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x


# ----------------------------------------------------------------------------- objectives


class _ESD:
    """ESD's negative guidance (module docstring), x_t cached or on-policy."""

    name = "esd"
    part = slice(None)  # this rank's share of every drawn batch (distributed runs)

    def __init__(self, pipe, concepts: ConceptSet, cfg: FinetuneConfig, cache: dict | None):
        self.cfg, self.prompts = cfg, _Prompts(pipe, concepts, cfg.progress)
        self.frozen = None
        if cfg.xt_source == "cached":
            self.cache = cache if cache is not None else build_trajectory_cache(pipe, self.prompts, cfg)
        else:
            self.cache = None
            self.frozen = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
            self.scheduler = _ddim(pipe, cfg.sample_steps)

    def sample(self, gen, device, dtype):
        """A batch from the cache: x_t, t, the prompts' text states, the frozen predictions
        [eps*(x_t,t,""), eps*(x_t,t,c)] and the loss coefficients [1 + eta_c, -eta_c]."""
        cfg, prompts, cache = self.cfg, self.prompts, self.cache
        rows = torch.randint(0, len(cache["x"]), (cfg.batch_size,), generator=gen)[self.part]
        steps = torch.randint(0, cfg.sample_steps, (cfg.batch_size,), generator=gen)[self.part]
        x = cache["x"][rows, steps].to(device, dtype)
        t = cache["timesteps"][steps].to(device)
        frozen = torch.stack([cache["eps_uncond"][rows, steps], cache["eps_cond"][rows, steps]], 1).to(device)
        items = cache["prompt"][rows]
        return x, t, prompts.cond[items], frozen, prompts.guidance_coeffs(items, cfg.eta, device)

    def loss(self, unet, gen, step: int = 0) -> torch.Tensor:
        cfg, prompts = self.cfg, self.prompts
        device = unet.device
        if self.cache is not None:
            x, t, cond, frozen, coeffs = self.sample(gen, device, unet.dtype)
        else:
            items = torch.randint(0, len(prompts.items), (cfg.batch_size,), generator=gen)
            stop = int(torch.randint(0, cfg.sample_steps, (1,), generator=gen))
            unet.eval()
            x = _on_policy_xt(unet, self.scheduler, prompts.cond[items], prompts.uncond, stop, cfg.sample_guidance, gen)
            unet.train()
            t = self.scheduler.timesteps[stop].expand(cfg.batch_size)
            frozen = torch.stack(_guided_eps(self.frozen, x, t, prompts.cond[items], prompts.uncond), 1)
            cond, coeffs = prompts.cond[items], prompts.guidance_coeffs(items, cfg.eta, device)
        pred = unet(x, t, cond).sample
        return guidance_loss(pred.flatten(1), frozen.flatten(2), coeffs, backend=cfg.loss_backend).mean()


class _TRCEStage2:
    """TRCE stage 2 (DESIGN 2.2): contrastive steering of the early denoising steps.

    Before training, on the ORIGINAL model: ``trajectories`` DDIM trajectories per malicious
    prompt c_m (the concept's prompts), guidance ``sample_guidance``, first ``early_steps``
    steps; at each x_t the targets f_safe = e(c_s) + g (e(c_s) - e("")) and f_unsafe likewise
    with c_m (c_s: the concept's anchor prompt, g = ``steer_guidance``). Then the stage-1
    closed-form edit (``trce-stage1``) is applied, and unconditional trajectories of the
    stage-1 model give the regulariser's targets eps_stage1(x, t, ""). A step's loss:

        sum over anchors a in {eps_theta(x,t,c_m), eps_theta(x,t,"")} of the batch mean of
            max(0, beta (MSE(a, f_safe) - MSE(a, f_unsafe) + delta))
        + reg_weight * MSE(eps_theta(x_u, t, ""), eps_stage1(x_u, t, ""))
    """

    name = "trce"
    part = slice(None)  # this rank's share of every drawn batch (distributed runs)

    def __init__(self, pipe, concepts: ConceptSet, cfg: FinetuneConfig, cache: dict | None):
        from engine.closed_form import METHODS, closed_form_edit

        if cfg.early_steps > cfg.sample_steps:
            raise ValueError(f"early_steps ({cfg.early_steps}) cannot exceed sample_steps ({cfg.sample_steps})")
        missing = [c.name for c in concepts.concepts if not c.anchor]
        if missing:
            raise ValueError(f"trce needs a safe anchor prompt for every concept (its c_s); none for {missing[:5]} "
                             "(set --anchor or the concept's anchor)")
        self.cfg, self.prompts = cfg, _Prompts(pipe, concepts, cfg.progress)
        self.cache = cache if cache is not None else self._malicious_targets(pipe)
        stage1 = METHODS["trce-stage1"].replace(preserve_weight=cfg.stage1_preserve_weight, progress=cfg.progress)
        self.stage1 = closed_form_edit(pipe, concepts, stage1)
        if "uncond_x" not in self.cache:
            self.cache.update(self._uncond_targets(pipe))

    def _malicious_targets(self, pipe) -> dict:
        cfg, prompts, unet = self.cfg, self.prompts, pipe.unet
        prompt = torch.arange(len(prompts.items)).repeat_interleave(cfg.trajectories)
        shape = (len(prompt), cfg.early_steps, *_latent_shape(pipe))
        out = {k: torch.empty(shape, dtype=unet.dtype) for k in ("x", "f_safe", "f_unsafe")}
        out["prompt"] = prompt
        out["timesteps"] = _ddim(pipe, cfg.sample_steps).timesteps[: cfg.early_steps].cpu().clone()
        g = cfg.steer_guidance

        def record(rows, s, x, eps_u, eps_m):
            (eps_s,) = _eps(unet, x, out["timesteps"][s].to(x.device).expand(len(rows)), prompts.anchor[prompt[rows]])
            out["x"][rows, s] = x.cpu()
            out["f_safe"][rows, s] = (eps_s + g * (eps_s - eps_u)).cpu()
            out["f_unsafe"][rows, s] = (eps_m + g * (eps_m - eps_u)).cpu()

        _sample_trajectories(pipe, prompts.cond[prompt], prompts.uncond, cfg.sample_steps, cfg.early_steps,
                             cfg.sample_guidance, cfg.seed, "trce: malicious trajectories", cfg.progress, record)
        return out

    def _uncond_targets(self, pipe) -> dict:
        cfg, prompts = self.cfg, self.prompts
        n = len(prompts.items) * cfg.trajectories
        shape = (n, cfg.early_steps, *_latent_shape(pipe))
        out = {"uncond_x": torch.empty(shape, dtype=pipe.unet.dtype), "uncond_eps": torch.empty(shape, dtype=pipe.unet.dtype)}

        def record(rows, s, x, eps_u, _):
            out["uncond_x"][rows, s] = x.cpu()
            out["uncond_eps"][rows, s] = eps_u.cpu()

        # Seeds after the malicious trajectories' (seed + 1): other starting noise.
        _sample_trajectories(pipe, None, prompts.uncond, cfg.sample_steps, cfg.early_steps, 1.0, cfg.seed + 1,
                             "trce: unconditional trajectories", cfg.progress, record, n=n)
        return out

    @property
    def extra_changed(self) -> dict[str, torch.Tensor]:
        return self.stage1.changed

    def loss(self, unet, gen, step: int = 0) -> torch.Tensor:
        cfg, cache, prompts = self.cfg, self.cache, self.prompts
        device, dtype, n = unet.device, unet.dtype, cfg.batch_size
        rows = torch.randint(0, len(cache["x"]), (n,), generator=gen)[self.part]
        steps = torch.randint(0, cfg.early_steps, (n,), generator=gen)[self.part]
        urows = torch.randint(0, len(cache["uncond_x"]), (n,), generator=gen)[self.part]
        usteps = torch.randint(0, cfg.early_steps, (n,), generator=gen)[self.part]
        b = len(rows)
        x = cache["x"][rows, steps].to(device, dtype)
        xu = cache["uncond_x"][urows, usteps].to(device, dtype)
        t = cache["timesteps"][steps].to(device)
        tu = cache["timesteps"][usteps].to(device)
        uncond = prompts.uncond.expand(b, -1, -1)
        # One UNet call for the three predictions: eps(x, c_m), eps(x, ""), eps(x_u, "").
        pred = unet(torch.cat([x, x, xu]), torch.cat([t, t, tu]),
                    torch.cat([prompts.cond[cache["prompt"][rows]], uncond, uncond])).sample.flatten(1)
        f_safe = cache["f_safe"][rows, steps].to(device).flatten(1).repeat(2, 1)
        f_unsafe = cache["f_unsafe"][rows, steps].to(device).flatten(1).repeat(2, 1)
        hinge = contrastive_hinge(pred[: 2 * b], f_safe, f_unsafe, cfg.hinge_beta, cfg.hinge_delta,
                                  backend=cfg.loss_backend)
        target = cache["uncond_eps"][urows, usteps].to(device).flatten(1)[:, None]
        reg = guidance_loss(pred[2 * b :], target, torch.ones(b, 1, device=device), backend=cfg.loss_backend)
        return hinge.view(2, b).mean(1).sum() + cfg.reg_weight * reg.mean()  # L_cm + L_uncond + reg


def _read_images(folder: Path, name: str) -> tuple[list, list | None]:
    """The images of concept ``name`` in ``folder/<name>/`` (png, jpg, jpeg, webp), sorted by file
    name, and their masks from ``folder/<name>/masks/<same stem>.png`` (white = the concept) when
    that folder exists (None otherwise)."""
    import numpy as np
    from PIL import Image

    if not folder.is_dir():
        raise FileNotFoundError(f"images folder not found: {folder}")
    sub = folder / name
    files = sorted(f for f in sub.glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) if sub.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no images of {name!r} in {sub} (expected {folder}/<concept name>/*.png)")
    images = [Image.open(f).convert("RGB") for f in files]
    if not (sub / "masks").is_dir():
        return images, None
    masks = []
    for f, im in zip(files, images):
        m = sub / "masks" / f"{f.stem}.png"
        if not m.is_file():
            raise FileNotFoundError(f"{sub / 'masks'} has no mask {m.name} for {f.name}")
        mask = Image.open(m).convert("L")
        if mask.size != im.size:
            raise ValueError(f"mask {m} is {mask.size}, its image {f.name} is {im.size}")
        masks.append((np.asarray(mask) > 127).astype(np.float32))  # H x W, 1 = the concept
    return images, masks


def _generate_images(pipe, prompts: list[str], n: int, guidance: float, steps: int, seed: int, progress: bool) -> list:
    """``n`` images per prompt from the (original) pipeline, seeded per image."""
    out = []
    for i, prompt in enumerate(tqdm(prompts, desc="generate concept images", disable=not progress)):
        gens = [torch.Generator().manual_seed(seed * 7919 + i * 1000 + j) for j in range(n)]
        shape = (n, *_latent_shape(pipe))
        latents = torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(pipe.unet.device, pipe.unet.dtype)
        with torch.no_grad():
            out.append(pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                            output_type="pil").images)
    return out


def _load_ip_adapter(pipe, path: str | None) -> None:
    if path is None:
        raise ValueError("this method needs an IP-Adapter: set ip_adapter=PATH (a .safetensors file)")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"IP-Adapter file not found: {file}")
    if file.suffix.lower() != ".safetensors":
        raise ValueError(f"IP-Adapter {file}: only .safetensors files are loaded (other formats are pickles, which "
                         "can run code); convert it")
    if getattr(pipe, "image_encoder", None) is None:
        raise ValueError("the pipeline has no image_encoder for the IP-Adapter (save one in its image_encoder/ folder)")
    try:
        pipe.load_ip_adapter(str(file.parent), subfolder="", weight_name=file.name)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"the IP-Adapter {file} does not fit this pipeline's UNet or image encoder: {err}") from err


class _ImageBranch:
    """Co-Erasing's image branch (DESIGN 2.2). x_t and the text-only frozen predictions come
    from ESD's cached trajectories; concept images (generated once by the original model, or
    read from ``images``) enter through the IP-Adapter: image encoder -> projection -> tokens
    Q, refined by the concept's text, c_img' = softmax(Q K^T / sqrt(d)) V with K = V =
    E_text(prompt). Each cached x_t is paired with one image (drawn from the seed), and the
    frozen predictions eps*(x_t, t, [c; c_img']) and u = eps*(x_t, t, [""; c_img']) are cached
    with it: a step is then one trainee forward and backward, like ESD's.
    """

    name = "co-erasing"
    part = slice(None)  # this rank's share of every drawn batch (distributed runs)

    def __init__(self, pipe, concepts: ConceptSet, cfg: FinetuneConfig, cache: dict | None):
        self.cfg, self.prompts = cfg, _Prompts(pipe, concepts, cfg.progress)
        self.concepts, self.pipe = concepts, pipe
        if cache is None:
            cache = build_trajectory_cache(pipe, self.prompts, cfg)
        need_targets = "neg_tokens" not in cache  # a resumed run's cache already holds them
        images = self._images(pipe) if need_targets else None  # generated before the IP-Adapter is in
        _load_ip_adapter(pipe, cfg.ip_adapter)
        # Tokens are projected and refined here, then fed straight into the attention processors:
        # the UNet's own projection step runs as identity until finish() puts it back.
        layers = pipe.unet.encoder_hid_proj.image_projection_layers
        self._projection = layers[0]
        layers[0] = torch.nn.Identity()
        if need_targets:
            cache.update(self._image_targets(pipe, cache, images))
        self.cache = cache

    def _images(self, pipe) -> dict[str, list]:
        """Branch name -> one (images, masks or None) per prompt item."""
        cfg, items = self.cfg, self.prompts.items
        if cfg.images is not None:
            by_concept = {c.name: _read_images(Path(cfg.images), c.name) for c in self.concepts.concepts}
            return {"neg": [by_concept[self.concepts.concepts[i].name] for i, _, _ in items]}
        generated = _generate_images(pipe, [src for _, src, _ in items], cfg.concept_images, cfg.image_guidance,
                                     cfg.sample_steps, cfg.seed, cfg.progress)
        return {"neg": [(ims, None) for ims in generated]}

    @torch.no_grad()
    def _refined_tokens(self, pipe, images: list, text: torch.Tensor, masks=None) -> torch.Tensor:
        """(N, tokens, D) text-refined image tokens of ``images`` for one prompt's text states (77, D)."""
        import numpy as np
        from PIL import Image

        if masks is not None:  # x' = m x + (1 - m) mean(x): only the concept region reaches the encoder
            filtered = []
            for im, m in zip(images, masks):
                x = np.asarray(im, np.float32)
                m = np.asarray(m, np.float32)[..., None]
                filtered.append(Image.fromarray((m * x + (1 - m) * x.mean((0, 1))).round().astype(np.uint8)))
            images = filtered
        embeds, _ = pipe.encode_image(images, pipe.unet.device, 1)
        q = self._projection(embeds.to(pipe.unet.dtype))  # N x tokens x D
        attn = torch.softmax(q @ text.T / math.sqrt(q.shape[-1]), dim=-1)  # N x tokens x 77
        return attn @ text  # N x tokens x D

    @torch.no_grad()  # targets are constants: no graph may hang on to the cache
    def _image_targets(self, pipe, cache: dict, images: dict) -> dict:
        cfg, prompts, unet = self.cfg, self.prompts, pipe.unet
        out = {}
        gen = torch.Generator().manual_seed(cfg.seed + 17)
        for branch, per_item in images.items():
            text = prompts.cond if branch == "neg" else prompts.anchor
            tokens = [self._refined_tokens(pipe, ims, text[i], masks).cpu() for i, (ims, masks) in enumerate(per_item)]
            counts = torch.tensor([len(t) for t in tokens])
            offsets = torch.cumsum(counts, 0) - counts
            item = cache["prompt"]  # per trajectory
            pick = (torch.rand(cache["x"].shape[:2], generator=gen) * counts[item][:, None]).long()  # traj x steps
            out[f"{branch}_tokens"] = torch.cat(tokens)
            out[f"{branch}_image"] = offsets[item][:, None] + pick
            e_img, u_img = (torch.empty_like(cache["x"]) for _ in range(2))
            all_tokens = out[f"{branch}_tokens"].to(unet.device, unet.dtype)
            with tqdm(total=cache["x"].shape[0], desc=f"{self.name}: {branch} image targets", disable=not cfg.progress) as bar:
                for r in range(cache["x"].shape[0]):
                    x = cache["x"][r].to(unet.device, unet.dtype)
                    t = cache["timesteps"].to(unet.device)
                    tok = all_tokens[out[f"{branch}_image"][r]]  # steps x tokens x D
                    cond = text[item[r]].expand(len(x), -1, -1)
                    uncond = prompts.uncond.expand(len(x), -1, -1)
                    both = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]),
                                added_cond_kwargs={"image_embeds": [torch.cat([tok, tok])[:, None]]}).sample
                    e_img[r], u_img[r] = (v.cpu() for v in both.chunk(2))
                    bar.update()
            out[f"{branch}_eps_cond"], out[f"{branch}_eps_uncond"] = e_img, u_img
        return out

    def _branch_batch(self, unet, branch: str, rows, steps):
        cache, prompts = self.cache, self.prompts
        device, dtype = unet.device, unet.dtype
        x = cache["x"][rows, steps].to(device, dtype)
        t = cache["timesteps"][steps].to(device)
        tok = cache[f"{branch}_tokens"][cache[f"{branch}_image"][rows, steps]].to(device, dtype)
        text = (prompts.cond if branch == "neg" else prompts.anchor)[cache["prompt"][rows]]
        pred = unet(x, t, text, added_cond_kwargs={"image_embeds": [tok[:, None]]}).sample
        frozen = torch.stack([cache[f"{branch}_eps_uncond"][rows, steps], cache[f"{branch}_eps_cond"][rows, steps]], 1)
        return pred.flatten(1), frozen.to(device).flatten(2)

    def _draw(self, gen):
        b = self.cfg.batch_size
        rows = torch.randint(0, len(self.cache["x"]), (b,), generator=gen)
        steps = torch.randint(0, self.cfg.sample_steps, (b,), generator=gen)
        return rows[self.part], steps[self.part]

    def _coeffs(self, rows, sign: float, device):
        return self.prompts.guidance_coeffs(self.cache["prompt"][rows], self.cfg.eta, device, sign)

    def loss(self, unet, gen, step: int = 0) -> torch.Tensor:
        rows, steps = self._draw(gen)
        pred, frozen = self._branch_batch(unet, "neg", rows, steps)
        return guidance_loss(pred, frozen, self._coeffs(rows, 1.0, pred.device), backend=self.cfg.loss_backend).mean()

    def finish(self) -> None:
        """Put the projection back and take the IP-Adapter out of the pipeline."""
        pipe = self.pipe
        pipe.unet.encoder_hid_proj.image_projection_layers[0] = self._projection
        encoder, extractor = pipe.image_encoder, pipe.feature_extractor
        pipe.unload_ip_adapter()
        # unload_ip_adapter also drops the image encoder: it was the pipeline's own, keep it.
        pipe.register_modules(image_encoder=encoder, feature_extractor=extractor)


class _BiErasing(_ImageBranch):
    """Bi-Erasing (DESIGN 2.2): the negative branch (concept images with the concept's text,
    pushed away: Co-Erasing's loss) and the positive branch (images of the anchor, generated
    from the anchor prompt, with the anchor's text, pulled towards: target u_p + eta (e_p - u_p)),
    L = w_n L_neg + w_p L_pos, both at the same cached x_t. ``positive_first`` trains the
    positive branch alone for the first half of the steps."""

    name = "bi-erasing"

    def __init__(self, pipe, concepts: ConceptSet, cfg: FinetuneConfig, cache: dict | None):
        missing = [c.name for c in concepts.concepts if not c.anchor]
        if missing:
            raise ValueError(f"bi-erasing needs an anchor (the safe alternative of its positive branch) for every "
                             f"concept; none for {missing[:5]} (set --anchor or the concept's anchor)")
        super().__init__(pipe, concepts, cfg, cache)

    def _images(self, pipe) -> dict[str, list]:
        cfg, items = self.cfg, self.prompts.items
        out = super()._images(pipe)
        generated = _generate_images(pipe, [tgt for _, _, tgt in items], cfg.concept_images, cfg.image_guidance,
                                     cfg.sample_steps, cfg.seed + 1, cfg.progress)
        out["pos"] = [(ims, None) for ims in generated]
        return out

    def loss(self, unet, gen, step: int = 0) -> torch.Tensor:
        cfg = self.cfg
        rows, steps = self._draw(gen)
        pos_pred, pos_frozen = self._branch_batch(unet, "pos", rows, steps)
        l_pos = guidance_loss(pos_pred, pos_frozen, self._coeffs(rows, -1.0, pos_pred.device), backend=cfg.loss_backend)
        if cfg.positive_first and step < cfg.iterations // 2:
            return cfg.positive_weight * l_pos.mean()
        neg_pred, neg_frozen = self._branch_batch(unet, "neg", rows, steps)
        l_neg = guidance_loss(neg_pred, neg_frozen, self._coeffs(rows, 1.0, neg_pred.device), backend=cfg.loss_backend)
        return cfg.negative_weight * l_neg.mean() + cfg.positive_weight * l_pos.mean()


OBJECTIVES = {"esd": _ESD, "trce": _TRCEStage2, "co-erasing": _ImageBranch, "bi-erasing": _BiErasing}
IMAGE_METHODS = ("co-erasing", "bi-erasing")


# ----------------------------------------------------------------------------- checkpoints


def _encode(obj, tensors: dict[str, torch.Tensor]):
    """A JSON-able form of nested dicts / lists / tuples / numbers / strings / tensors (an
    optimizer's state_dict, RNG states); tensors go into ``tensors`` and are named in the JSON."""
    if isinstance(obj, torch.Tensor):
        name = f"state.{len(tensors)}"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name}
    if isinstance(obj, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_encode(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint cannot hold a {type(obj).__name__}")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if not isinstance(obj, dict):
        return obj
    (kind, value), = obj.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    items = [_decode(v, tensors) for v in value]
    return tuple(items) if kind == "tuple" else items


def _save_checkpoint(folder: Path, step: int, trained: dict, opt, rng_state: dict, signature: dict) -> None:
    """Write the step's folder completely, then point ``latest`` at it, then drop older ones."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tag = f"step{step:08d}"
    tensors = {f"trained.{k}": p.detach().to("cpu", copy=True).contiguous() for k, p in trained.items()}
    state = {"format": CHECKPOINT_FORMAT, "step": step, "signature": signature, "trained": list(trained),
             "optimizer": _encode(opt.state_dict(), tensors), "rng": _encode(rng_state, tensors)}
    tmp = folder / f".{tag}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(state))
    shutil.rmtree(folder / tag, ignore_errors=True)
    os.replace(tmp, folder / tag)
    (folder / (LATEST_NAME + ".tmp")).write_text(tag)
    os.replace(folder / (LATEST_NAME + ".tmp"), folder / LATEST_NAME)
    for old in [*folder.glob("step*"), *folder.glob(".step*.tmp-*")]:  # the folder is this run's (locked)
        if old.name != tag and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def run_signature(method: str, cfg: FinetuneConfig, concepts: ConceptSet, model: str, **extra) -> dict:
    """What a checkpoint or cache must match to be used: method, settings (but progress and
    checkpoint cadence), concepts, the fingerprint of the model's weights (``model``; see
    ``engine.models.weights_fingerprint``) and ``extra``. In its JSON form, as stored."""
    from engine.export import sha256_file

    config = {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "checkpoint_every")}
    if cfg.ip_adapter is not None and Path(cfg.ip_adapter).is_file():
        extra["ip_adapter_sha256"] = sha256_file(cfg.ip_adapter)
    signature = {"method": method, "config": config, "concepts": concepts.to_dict(), "model": model, **extra}
    return json.loads(json.dumps(signature))


def restore_checkpoint(state: dict, trained: dict[str, torch.nn.Parameter], opt) -> int:
    """Load a checkpoint's trained tensors and optimizer state; returns its step."""
    with torch.no_grad():
        for k, p in trained.items():
            p.copy_(state["trained"][k].to(p.device, p.dtype))
    opt.load_state_dict(state["optimizer"])
    return state["step"]


def checkpoint_due(folder: Path | None, cfg: FinetuneConfig, done: int) -> bool:
    """Whether a checkpoint is written after ``done`` steps (every ``checkpoint_every``, and the last)."""
    return folder is not None and bool(cfg.checkpoint_every) and (done % cfg.checkpoint_every == 0
                                                                   or done == cfg.iterations)


def track_loss(losses: list[float], value: float, step: int, bar) -> None:
    """Record a step's loss (stopping on inf / nan) and show the recent mean on the progress bar."""
    losses.append(value)
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss became {value} at step {step}; lower the learning rate")
    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4g}")
    bar.update()


def _check_signature(what: str, found, signature: dict) -> None:
    """Refuse a checkpoint or cache of another run, naming what differs."""
    if found == signature:
        return
    if not isinstance(found, dict):
        raise ValueError(f"{what} carries no run signature; use another checkpoint folder or drop --resume")
    changed = []
    for key in signature:
        if key == "config" and isinstance(found.get(key), dict):
            fields = [k for k in signature[key] if found[key].get(k) != signature[key][k]]
            changed += [f"setting {k} ({found[key].get(k)!r} there, {signature[key][k]!r} now)" for k in fields]
        elif found.get(key) != signature[key]:
            changed.append({"model": "model weights", "concepts": "concepts"}.get(key, key))
    raise ValueError(f"{what} belongs to another run (different {', '.join(changed) or 'signature'}); "
                     "use another checkpoint folder or drop --resume")


def refuse_legacy(folder: Path) -> None:
    """Refuse a checkpoint folder holding an older version's pickles: unpickling can run code."""
    old = [name for name in LEGACY_NAMES if (folder / name).exists()]
    if old:
        raise ValueError(f"{folder} holds {' and '.join(old)}, a checkpoint in the old pickle format, which is never "
                         "loaded (unpickling a file can run code); delete it and start without --resume")


def _load_checkpoint(folder: Path, signature: dict) -> dict | None:
    """The last complete checkpoint in ``folder`` (tensors via safetensors, the rest JSON), after
    checking it belongs to this run; None if there is none."""
    from engine.export import read_safetensors

    refuse_legacy(folder)
    latest = folder / LATEST_NAME
    if not latest.is_file():
        return None
    where = folder / latest.read_text().strip()
    try:
        state = json.loads((where / STATE_JSON).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"the checkpoint {where} is unreadable ({err}); delete {folder} or drop --resume") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where / STATE_JSON} is not an erasure-engine checkpoint ({CHECKPOINT_FORMAT})")
    _check_signature(f"the checkpoint in {folder}", state.get("signature"), signature)
    tensors, _ = read_safetensors(where / STATE_TENSORS, "checkpoint tensors")
    state["trained"] = {k: tensors[f"trained.{k}"] for k in state["trained"]}
    state["optimizer"] = _decode(state["optimizer"], tensors)
    state["rng"] = _decode(state["rng"], tensors)
    return state


def _save_cache(folder: Path, cache: dict, signature: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CACHE_NAME}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in cache.items()}, str(tmp), metadata={"signature": json.dumps(signature)})
    os.replace(tmp, folder / CACHE_NAME)


def _load_cache(folder: Path, signature: dict) -> dict | None:
    """The targets cached by an earlier start of this run (refused if it was another run's)."""
    from engine.export import read_safetensors

    if not (folder / CACHE_NAME).is_file():
        return None
    cache, meta = read_safetensors(folder / CACHE_NAME, "target cache")
    try:
        found = json.loads(meta.get("signature", "null"))
    except ValueError:
        found = None
    _check_signature(f"the target cache {folder / CACHE_NAME}", found, signature)
    return cache


# ----------------------------------------------------------------------------- the trainer


def training_autocast(precision: str, device: torch.device):
    """bf16 autocast for the trainee's forward where it pays (weights and optimizer stay fp32)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("precision='bf16' needs a CUDA device; use 'auto' or 'fp32' on the CPU")
    if precision == "bf16" or (precision == "auto" and cuda_bf16):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class FinetuneRun:
    """What a run changed and how it went."""

    changed: dict[str, torch.Tensor]  # state-dict key -> new tensor (detached, on the UNet's device)
    losses: list[float]
    timings: dict[str, float]
    steps_run: int
    resumed_from: int


def finetune(pipe, concepts: ConceptSet, cfg: FinetuneConfig, checkpoint_dir: str | os.PathLike | None = None,
             resume: bool = False, method: str = "esd", model_fingerprint: str | None = None) -> FinetuneRun:
    """Train ``pipe.unet`` in place to erase ``concepts`` with ``method``: "esd", "co-erasing",
    "bi-erasing" (with an IP-Adapter, removed again afterwards) or "trce" (whose stage-1
    closed-form edit is applied first); see the objectives above.

    SD1.x / SD2.x and SDXL pipelines (SDXL: esd and trce; see ``sdxl_conditioning``). With
    ``checkpoint_dir`` the run checkpoints every
    ``cfg.checkpoint_every`` steps; ``resume=True`` continues from its last checkpoint.
    ``cfg.distributed == "deepspeed"``: data-parallel ZeRO training under a launcher
    (``engine.distributed``); every rank calls this function and gets the same result.
    ``model_fingerprint`` keys the checkpoints to the model (default:
    ``engine.models.weights_fingerprint(pipe)``, computed when there is a checkpoint folder).
    """
    from engine.models import pipeline_family

    if method not in OBJECTIVES:
        raise ValueError(f"unknown fine-tuning method {method!r}; available: {', '.join(OBJECTIVES)}")
    if pipeline_family(pipe) == "sdxl" and method in ("co-erasing", "bi-erasing"):
        raise NotImplementedError(f"{method} needs an SD1.x / SD2.x pipeline with its IP-Adapter; "
                                  "on SDXL use esd or trce")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to continue")
    if method != "esd" and cfg.xt_source != "cached":
        raise ValueError(f"{method} takes x_t from cached trajectories; xt_source='{cfg.xt_source}' is ESD's option")
    with sdxl_conditioning(pipe), checkpoint_lock(checkpoint_dir, cfg):
        return _train(pipe, concepts, cfg, checkpoint_dir, resume, method, model_fingerprint)


def checkpoint_lock(checkpoint_dir, cfg: FinetuneConfig):
    """One run at a time per checkpoint folder: its lock, held by the process that writes it
    (rank 0 of a distributed run; the launcher sets RANK before the process group exists)."""
    from engine.export import output_lock

    if checkpoint_dir is None or (cfg.distributed != "none" and os.environ.get("RANK", "0") != "0"):
        return contextlib.nullcontext()
    return output_lock(checkpoint_dir)


def checkpoint_signature(pipe, method: str, cfg: FinetuneConfig, concepts: ConceptSet, folder: Path | None,
                         model_fingerprint: str | None, **extra) -> dict | None:
    """The run signature of a run that checkpoints into ``folder`` (None without one)."""
    from engine.models import weights_fingerprint

    if folder is None:
        return None
    return run_signature(method, cfg, concepts, model_fingerprint or weights_fingerprint(pipe), **extra)


def _train(pipe, concepts: ConceptSet, cfg: FinetuneConfig, checkpoint_dir, resume: bool, method: str,
           model_fingerprint: str | None) -> FinetuneRun:
    deepspeed = cfg.distributed == "deepspeed"
    if deepspeed:
        from engine import distributed

        if cfg.xt_source != "cached":
            raise ValueError("distributed runs take x_t from cached trajectories (xt_source='cached')")
        device = distributed.init()
        part = distributed.shard(cfg.batch_size)
        pipe.to(device)
    main = not deepspeed or distributed.is_main()
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    signature = checkpoint_signature(pipe, method, cfg, concepts, folder, model_fingerprint,
                                     ranks=distributed.world_size() if deepspeed else 1)
    if resume:
        refuse_legacy(folder)
    state = _load_checkpoint(folder, signature) if resume and not deepspeed else None
    cache = _load_cache(folder, signature) if resume else None

    start = time.perf_counter()
    objective = OBJECTIVES[method](pipe, concepts, cfg, cache)
    if deepspeed:
        objective.part = part
    timings = {"targets": time.perf_counter() - start}
    if main and folder is not None and cfg.checkpoint_every and cache is None and objective.cache is not None:
        _save_cache(folder, objective.cache, signature)

    unet = pipe.unet
    unet.requires_grad_(False)
    # A distributed run trains a copy: ZeRO-3 partitions the parameters of the module it trains.
    trainee = copy.deepcopy(unet) if deepspeed else unet
    lora = add_lora(trainee, cfg.lora_rank, cfg.seed) if cfg.params == "lora" else None
    trained = lora_parameters(lora) if lora is not None else trainable_parameters(trainee, cfg.params)
    opt = start_training(trainee, trained, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    first = 0
    if deepspeed:
        bf16 = isinstance(training_autocast(cfg.precision, device), torch.autocast)
        trainer = distributed.DeepSpeedTrainer(trainee, trained, opt, cfg.batch_size, cfg.zero_stage, bf16)
        model, autocast = trainer.unet, contextlib.nullcontext()  # DeepSpeed casts the module itself

        def update(loss):
            trainer.step(loss)

        def save(done):
            trainer.save(folder, done, {"step": done, "generator": gen.get_state(), "signature": signature})

        client = trainer.load(folder) if resume else None
        if client is not None:
            _check_signature(f"the DeepSpeed checkpoint in {folder}", client.get("signature"), signature)
            gen.set_state(client["generator"])
            first = client["step"]
    else:
        model, autocast = trainee, training_autocast(cfg.precision, trainee.device)

        def update(loss):
            opt.zero_grad(set_to_none=True)  # every step (TRCE's released code never zeroes them)
            loss.backward()
            opt.step()

        def save(done):
            _save_checkpoint(folder, done, trained, opt, {"generator": gen.get_state()}, signature)

        if state is not None:
            first = restore_checkpoint(state, trained, opt)
            gen.set_state(state["rng"]["generator"])

    losses = []
    start = time.perf_counter()
    with tqdm(total=cfg.iterations, initial=first, desc=objective.name, disable=not (cfg.progress and main)) as bar:
        for step in range(first, cfg.iterations):
            with autocast:
                loss = objective.loss(model, gen, step)
            update(loss)
            track_loss(losses, distributed.mean_over_ranks(loss.item()) if deepspeed else loss.item(), step, bar)
            if checkpoint_due(folder, cfg, step + 1):
                save(step + 1)
    timings["train"] = time.perf_counter() - start
    if deepspeed:
        values = trainer.full_values()
        trainer.close()
        del trainer, trainee, model
    if hasattr(objective, "finish"):
        objective.finish()
    unet = pipe.unet
    unet.eval().requires_grad_(False)
    if deepspeed:
        tuned = _write_back(unet, values, lora)
    else:
        if cfg.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        tuned = merge_lora(unet, lora) if lora is not None else {k: p.detach() for k, p in trained.items()}
    changed = {**getattr(objective, "extra_changed", {}), **tuned}
    return FinetuneRun(changed=changed, losses=losses, timings=timings, steps_run=cfg.iterations - first,
                       resumed_from=first)


@torch.no_grad()
def _write_back(unet, values: dict[str, torch.Tensor], lora: dict | None) -> dict[str, torch.Tensor]:
    """Put a distributed run's gathered values into the pipeline's UNet (adapters merged as
    W + B A); returns the changed tensors by state-dict key."""
    params = dict(unet.named_parameters())
    if lora is not None:
        values = {f"{name}.weight": params[f"{name}.weight"] + (values[f"{name}.lora_B"] @ values[f"{name}.lora_A"]).to(
                  params[f"{name}.weight"]) for name in lora}
    for key, value in values.items():
        params[key].copy_(value.to(params[key]))
    return {key: params[key].detach() for key in values}
