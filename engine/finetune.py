"""Fine-tuning erasure with negative guidance (ESD, DESIGN 2.2), on the fused loss kernel.

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
``full``.

Checkpoints: every ``checkpoint_every`` steps the trained tensors, the optimizer state, the RNG
states and the step are written atomically to ``checkpoint_dir``; ``resume=True`` continues from
the last one exactly as if the run had not stopped (the trajectory cache is rebuilt
deterministically from the seed, or read back from the checkpoint folder).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.concepts import ConceptSet
from kernels import guidance_loss

PARAM_SETS = ("xattn", "noxattn", "full")
XT_SOURCES = ("cached", "on-policy")
OPTIMIZERS = ("adam", "adamw", "adamw8bit")
CHECKPOINT_NAME = "checkpoint.pt"
CACHE_NAME = "trajectories.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of a negative-guidance fine-tuning run; ESD's published defaults."""

    params: str = "xattn"  # xattn (ESD-x) | noxattn (ESD-u) | full
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
    loss_backend: str = "auto"  # the fused loss: auto | triton | torch
    progress: bool = True

    def __post_init__(self):
        choices = {"params": PARAM_SETS, "xt_source": XT_SOURCES, "optimizer": OPTIMIZERS,
                   "loss_backend": ("auto", "triton", "torch")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config field {name!r} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("iterations", "batch_size", "sample_steps", "trajectories"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        for name in ("lr", "eta", "sample_guidance", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"config field {name!r} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ValueError("config field 'lr' must be > 0")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"config field 'checkpoint_every' must be an integer >= 0, got {self.checkpoint_every!r}")

    def replace(self, **changes) -> "FinetuneConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown fine-tuning option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Published defaults per method (ESD: Adam lr 1e-5, 1000 iterations, batch 1, eta 1; ESD-x).
FINETUNE_METHODS: dict[str, FinetuneConfig] = {"esd": FinetuneConfig()}


def trainable_parameters(unet, params: str) -> dict[str, torch.nn.Parameter]:
    """The UNet parameters a parameter set trains, by state-dict key."""
    if params not in PARAM_SETS:
        raise ValueError(f"params must be one of {PARAM_SETS}, got {params!r}")
    named = dict(unet.named_parameters())
    if params == "full":
        return named
    in_xattn = {k: ".attn2." in k for k in named}
    if not any(in_xattn.values()):
        raise ValueError("the UNet has no cross-attention (attn2) layers")
    return {k: p for k, p in named.items() if in_xattn[k] == (params == "xattn")}


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


# ----------------------------------------------------------------------------- the frozen side


class _Prompts:
    """Embeddings of every concept prompt and of the empty prompt, on the UNet's device."""

    def __init__(self, pipe, concepts: ConceptSet, progress: bool):
        from engine.models import encode_prompts

        self.items = []  # (concept index, prompt)
        for i, concept in enumerate(concepts.concepts):
            self.items += [(i, src) for _, src, _ in concept.prompt_pairs()]
        emb, _ = encode_prompts(pipe, [p for _, p in self.items] + [""], progress=progress)
        device, dtype = pipe.unet.device, pipe.unet.dtype
        self.cond = emb[:-1].to(device, dtype)
        self.uncond = emb[-1:].to(device, dtype)
        self.eta_scale = torch.tensor([concepts.concepts[i].weight for i, _ in self.items])


def _latent_shape(pipe) -> tuple[int, int, int]:
    size = pipe.unet.config.sample_size
    return pipe.unet.config.in_channels, size, size


@torch.no_grad()
def _guided_eps(unet, x, t, cond, uncond):
    """(eps(x, t, ""), eps(x, t, c)) for a batch, in one UNet call."""
    both = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond.expand(len(x), -1, -1), cond])).sample
    return both.chunk(2)


def build_trajectory_cache(pipe, prompts: _Prompts, cfg: FinetuneConfig) -> dict[str, torch.Tensor]:
    """For every prompt, ``cfg.trajectories`` DDIM trajectories of the frozen model: per step the
    latent x_t, its timestep and both frozen predictions (CPU, the UNet's dtype).

    Deterministic in ``cfg.seed``: trajectory j of prompt i starts from noise seeded by
    ``cfg.seed``, i and j, whatever the batching.
    """
    from diffusers import DDIMScheduler

    unet = pipe.unet
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.sample_steps, device=unet.device)
    shape = _latent_shape(pipe)
    n = len(prompts.items) * cfg.trajectories
    out = {
        "x": torch.empty((n, cfg.sample_steps, *shape), dtype=unet.dtype),
        "eps_uncond": torch.empty((n, cfg.sample_steps, *shape), dtype=unet.dtype),
        "eps_cond": torch.empty((n, cfg.sample_steps, *shape), dtype=unet.dtype),
        "timesteps": scheduler.timesteps.cpu().clone(),
        "prompt": torch.arange(len(prompts.items)).repeat_interleave(cfg.trajectories),
    }
    batch = 16
    with tqdm(total=n, desc="cache trajectories", disable=not cfg.progress, unit="traj") as bar:
        for lo in range(0, n, batch):
            rows = list(range(lo, min(n, lo + batch)))
            noise = [torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + r)) for r in rows]
            x = torch.stack(noise).to(unet.device, unet.dtype) * scheduler.init_noise_sigma
            cond = prompts.cond[out["prompt"][rows]]
            for s, t in enumerate(scheduler.timesteps):
                tt = t.expand(len(rows))
                eps_u, eps_c = _guided_eps(unet, x, tt, cond, prompts.uncond)
                out["x"][rows, s] = x.cpu()
                out["eps_uncond"][rows, s] = eps_u.cpu()
                out["eps_cond"][rows, s] = eps_c.cpu()
                x = scheduler.step(eps_u + cfg.sample_guidance * (eps_c - eps_u), t, x).prev_sample
            bar.update(len(rows))
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


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(folder: Path, step: int, trained: dict, opt, rng_state: dict, signature: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CHECKPOINT_NAME + ".tmp")
    torch.save({"step": step, "trained": {k: p.detach().cpu().clone() for k, p in trained.items()},
                "optimizer": opt.state_dict(), "rng": rng_state, "signature": signature}, tmp)
    os.replace(tmp, folder / CHECKPOINT_NAME)


def _load_checkpoint(folder: Path, signature: dict) -> dict | None:
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["signature"] != signature:
        changed = sorted(k for k in signature if state["signature"].get(k) != signature[k])
        raise ValueError(f"the checkpoint in {folder} belongs to another run (different {', '.join(changed)}); "
                         "use another checkpoint folder or drop --resume")
    return state


# ----------------------------------------------------------------------------- the trainer


@dataclass
class FinetuneRun:
    """What a run changed and how it went."""

    changed: dict[str, torch.Tensor]  # state-dict key -> trained tensor (detached, on the UNet's device)
    losses: list[float]
    timings: dict[str, float]
    steps_run: int
    resumed_from: int


def finetune(pipe, concepts: ConceptSet, cfg: FinetuneConfig, checkpoint_dir: str | os.PathLike | None = None,
             resume: bool = False) -> FinetuneRun:
    """Train ``pipe.unet`` in place to erase ``concepts`` with negative guidance (ESD).

    SD1.x / SD2.x pipelines. With ``checkpoint_dir`` the run checkpoints every
    ``cfg.checkpoint_every`` steps; ``resume=True`` continues from its last checkpoint.
    """
    from diffusers import DDIMScheduler

    from engine.models import pipeline_family

    if pipeline_family(pipe) == "sdxl":
        raise NotImplementedError("fine-tuning methods support SD1.x / SD2.x pipelines; SDXL is closed-form only for now")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to continue")
    timings = {}
    start = time.perf_counter()
    unet = pipe.unet
    prompts = _Prompts(pipe, concepts, cfg.progress)
    timings["encode"] = time.perf_counter() - start

    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    signature = {"config": {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "checkpoint_every")},
                 "concepts": concepts.to_dict()}
    state = _load_checkpoint(folder, signature) if resume else None

    start = time.perf_counter()
    cache = frozen = None
    if cfg.xt_source == "cached":
        cache_file = folder / CACHE_NAME if folder is not None else None
        if cache_file is not None and cache_file.is_file() and state is not None:
            cache = torch.load(cache_file, map_location="cpu", weights_only=True)
        else:
            cache = build_trajectory_cache(pipe, prompts, cfg)
            if cache_file is not None and cfg.checkpoint_every:
                folder.mkdir(parents=True, exist_ok=True)
                torch.save(cache, cache_file.with_suffix(".tmp"))
                os.replace(cache_file.with_suffix(".tmp"), cache_file)
    else:
        import copy

        frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    timings["targets"] = time.perf_counter() - start

    unet.requires_grad_(False)
    trained = trainable_parameters(unet, cfg.params)
    for p in trained.values():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = make_optimizer(cfg.optimizer, trained.values(), cfg.lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    first = 0
    if state is not None:
        with torch.no_grad():
            for k, p in trained.items():
                p.copy_(state["trained"][k].to(p.device, p.dtype))
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"]["generator"])
        first = state["step"]
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.sample_steps, device=unet.device)

    losses = []
    start = time.perf_counter()
    device, dtype = unet.device, unet.dtype
    with tqdm(total=cfg.iterations, initial=first, desc=f"esd ({cfg.xt_source})", disable=not cfg.progress) as bar:
        for step in range(first, cfg.iterations):
            if cache is not None:
                rows = torch.randint(0, len(cache["x"]), (cfg.batch_size,), generator=gen)
                steps = torch.randint(0, cfg.sample_steps, (cfg.batch_size,), generator=gen)
                x = cache["x"][rows, steps].to(device, dtype)
                t = cache["timesteps"][steps].to(device)
                frozen_eps = torch.stack([cache["eps_uncond"][rows, steps], cache["eps_cond"][rows, steps]], 1)
                items = cache["prompt"][rows]
            else:
                items = torch.randint(0, len(prompts.items), (cfg.batch_size,), generator=gen)
                stop = int(torch.randint(0, cfg.sample_steps, (1,), generator=gen))
                unet.eval()
                x = _on_policy_xt(unet, scheduler, prompts.cond[items], prompts.uncond, stop, cfg.sample_guidance, gen)
                unet.train()
                t = scheduler.timesteps[stop].expand(cfg.batch_size)
                frozen_eps = torch.stack(_guided_eps(frozen, x, t, prompts.cond[items], prompts.uncond), 1)
            eta = cfg.eta * prompts.eta_scale[items]
            coeffs = torch.stack([1 + eta, -eta], 1).to(device)
            pred = unet(x, t, prompts.cond[items]).sample
            per_sample = guidance_loss(pred.flatten(1), frozen_eps.to(device).flatten(2), coeffs,
                                       backend=cfg.loss_backend)
            loss = per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"the loss became {losses[-1]} at step {step}; lower the learning rate")
            done = step + 1
            if folder is not None and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.iterations):
                _save_checkpoint(folder, done, trained, opt, {"generator": gen.get_state()}, signature)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4g}")
            bar.update()
    timings["train"] = time.perf_counter() - start
    unet.eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    return FinetuneRun(
        changed={k: p.detach() for k, p in trained.items()},
        losses=losses,
        timings=timings,
        steps_run=cfg.iterations - first,
        resumed_from=first,
    )
