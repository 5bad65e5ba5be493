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
from kernels import contrastive_hinge, guidance_loss

PARAM_SETS = ("xattn", "noxattn", "full", "selfattn-q")
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
    loss_backend: str = "auto"  # the fused losses: auto | triton | torch
    # TRCE stage 2 only
    early_steps: int = 26  # the first DDIM steps (of sample_steps) that are steered
    steer_guidance: float = 15.0  # g of the safe / unsafe targets
    hinge_beta: float = 1.0
    hinge_delta: float = 0.01
    reg_weight: float = 100.0  # the unconditional regulariser against the stage-1 model
    progress: bool = True

    def __post_init__(self):
        choices = {"params": PARAM_SETS, "xt_source": XT_SOURCES, "optimizer": OPTIMIZERS,
                   "loss_backend": ("auto", "triton", "torch")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config field {name!r} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("iterations", "batch_size", "sample_steps", "trajectories", "early_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        for name in ("lr", "eta", "sample_guidance", "weight_decay", "steer_guidance", "hinge_beta", "hinge_delta",
                     "reg_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"config field {name!r} must be a finite number >= 0, got {value!r}")
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
}


def trainable_parameters(unet, params: str) -> dict[str, torch.nn.Parameter]:
    """The UNet parameters a parameter set trains, by state-dict key."""
    if params not in PARAM_SETS:
        raise ValueError(f"params must be one of {PARAM_SETS}, got {params!r}")
    named = dict(unet.named_parameters())
    if params == "full":
        return named
    if params == "selfattn-q":  # TRCE stage 2: self-attention and the cross-attention queries
        chosen = {k: p for k, p in named.items() if ".attn1." in k or ".attn2.to_q." in k}
        if not chosen:
            raise ValueError("the UNet has no attention layers (attn1 / attn2.to_q)")
        return chosen
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
    """Embeddings of every concept prompt, of its anchor prompt and of the empty prompt, on the
    UNet's device; ``items[i]`` is (concept index, prompt, anchor prompt)."""

    def __init__(self, pipe, concepts: ConceptSet, progress: bool):
        from engine.models import encode_prompts

        self.items = []
        for i, concept in enumerate(concepts.concepts):
            self.items += [(i, src, tgt) for _, src, tgt in concept.prompt_pairs()]
        n = len(self.items)
        texts = [src for _, src, _ in self.items] + [tgt for _, _, tgt in self.items] + [""]
        emb, _ = encode_prompts(pipe, texts, progress=progress)
        emb = emb.to(pipe.unet.device, pipe.unet.dtype)
        self.cond, self.anchor, self.uncond = emb[:n], emb[n : 2 * n], emb[2 * n :]
        self.eta_scale = torch.tensor([concepts.concepts[i].weight for i, _, _ in self.items])


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
                         progress: bool, record) -> None:
    """DDIM with guidance from seeded noise, one trajectory per row of ``cond``; calls
    ``record(rows, step, x, eps_uncond, eps_cond)`` for the first ``keep_steps`` steps."""
    unet = pipe.unet
    scheduler = _ddim(pipe, steps)
    shape = _latent_shape(pipe)
    n, batch = len(cond), 16
    with tqdm(total=n, desc=desc, disable=not progress, unit="traj") as bar:
        for lo in range(0, n, batch):
            rows = list(range(lo, min(n, lo + batch)))
            x = torch.stack([_noise(shape, seed, r) for r in rows]).to(unet.device, unet.dtype)
            x = x * scheduler.init_noise_sigma
            for s, t in enumerate(scheduler.timesteps[:keep_steps]):
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

    def __init__(self, pipe, concepts: ConceptSet, cfg: FinetuneConfig, cache: dict | None):
        self.cfg, self.prompts = cfg, _Prompts(pipe, concepts, cfg.progress)
        self.frozen = None
        if cfg.xt_source == "cached":
            self.cache = cache if cache is not None else build_trajectory_cache(pipe, self.prompts, cfg)
        else:
            import copy

            self.cache = None
            self.frozen = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
            self.scheduler = _ddim(pipe, cfg.sample_steps)

    def loss(self, unet, gen) -> torch.Tensor:
        cfg, prompts, cache = self.cfg, self.prompts, self.cache
        device, dtype = unet.device, unet.dtype
        if cache is not None:
            rows = torch.randint(0, len(cache["x"]), (cfg.batch_size,), generator=gen)
            steps = torch.randint(0, cfg.sample_steps, (cfg.batch_size,), generator=gen)
            x = cache["x"][rows, steps].to(device, dtype)
            t = cache["timesteps"][steps].to(device)
            frozen = torch.stack([cache["eps_uncond"][rows, steps], cache["eps_cond"][rows, steps]], 1).to(device)
            items = cache["prompt"][rows]
        else:
            items = torch.randint(0, len(prompts.items), (cfg.batch_size,), generator=gen)
            stop = int(torch.randint(0, cfg.sample_steps, (1,), generator=gen))
            unet.eval()
            x = _on_policy_xt(unet, self.scheduler, prompts.cond[items], prompts.uncond, stop, cfg.sample_guidance, gen)
            unet.train()
            t = self.scheduler.timesteps[stop].expand(cfg.batch_size)
            frozen = torch.stack(_guided_eps(self.frozen, x, t, prompts.cond[items], prompts.uncond), 1)
        eta = cfg.eta * prompts.eta_scale[items]
        coeffs = torch.stack([1 + eta, -eta], 1).to(device)
        pred = unet(x, t, prompts.cond[items]).sample
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
        self.stage1 = closed_form_edit(pipe, concepts, METHODS["trce-stage1"].replace(progress=cfg.progress))
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
        _sample_trajectories(pipe, prompts.uncond.expand(n, -1, -1), prompts.uncond, cfg.sample_steps, cfg.early_steps,
                             1.0, cfg.seed + 1, "trce: unconditional trajectories", cfg.progress, record)
        return out

    @property
    def extra_changed(self) -> dict[str, torch.Tensor]:
        return self.stage1.changed

    def loss(self, unet, gen) -> torch.Tensor:
        cfg, cache, prompts = self.cfg, self.cache, self.prompts
        device, dtype, b = unet.device, unet.dtype, cfg.batch_size
        rows = torch.randint(0, len(cache["x"]), (b,), generator=gen)
        steps = torch.randint(0, cfg.early_steps, (b,), generator=gen)
        urows = torch.randint(0, len(cache["uncond_x"]), (b,), generator=gen)
        usteps = torch.randint(0, cfg.early_steps, (b,), generator=gen)
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


OBJECTIVES = {"esd": _ESD, "trce": _TRCEStage2}


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


def _save_cache(folder: Path, cache: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CACHE_NAME + ".tmp")
    torch.save(cache, tmp)
    os.replace(tmp, folder / CACHE_NAME)


# ----------------------------------------------------------------------------- the trainer


@dataclass
class FinetuneRun:
    """What a run changed and how it went."""

    changed: dict[str, torch.Tensor]  # state-dict key -> new tensor (detached, on the UNet's device)
    losses: list[float]
    timings: dict[str, float]
    steps_run: int
    resumed_from: int


def finetune(pipe, concepts: ConceptSet, cfg: FinetuneConfig, checkpoint_dir: str | os.PathLike | None = None,
             resume: bool = False, method: str = "esd") -> FinetuneRun:
    """Train ``pipe.unet`` in place to erase ``concepts`` with ``method`` ("esd" or "trce", whose
    stage-1 closed-form edit is applied first; see the objectives above).

    SD1.x / SD2.x pipelines. With ``checkpoint_dir`` the run checkpoints every
    ``cfg.checkpoint_every`` steps; ``resume=True`` continues from its last checkpoint.
    """
    from engine.models import pipeline_family

    if method not in OBJECTIVES:
        raise ValueError(f"unknown fine-tuning method {method!r}; available: {', '.join(OBJECTIVES)}")
    if pipeline_family(pipe) == "sdxl":
        raise NotImplementedError("fine-tuning methods support SD1.x / SD2.x pipelines; SDXL is closed-form only for now")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to continue")
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    signature = {"method": method,
                 "config": {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "checkpoint_every")},
                 "concepts": concepts.to_dict()}
    state = _load_checkpoint(folder, signature) if resume else None
    cache = None
    if state is not None and (folder / CACHE_NAME).is_file():
        cache = torch.load(folder / CACHE_NAME, map_location="cpu", weights_only=True)

    start = time.perf_counter()
    objective = OBJECTIVES[method](pipe, concepts, cfg, cache)
    timings = {"targets": time.perf_counter() - start}
    if folder is not None and cfg.checkpoint_every and cache is None and objective.cache is not None:
        _save_cache(folder, objective.cache)

    unet = pipe.unet
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

    losses = []
    start = time.perf_counter()
    with tqdm(total=cfg.iterations, initial=first, desc=objective.name, disable=not cfg.progress) as bar:
        for step in range(first, cfg.iterations):
            loss = objective.loss(unet, gen)
            opt.zero_grad(set_to_none=True)  # every step (TRCE's released code never zeroes them)
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
    changed = {**getattr(objective, "extra_changed", {}), **{k: p.detach() for k, p in trained.items()}}
    return FinetuneRun(changed=changed, losses=losses, timings=timings, steps_run=cfg.iterations - first,
                       resumed_from=first)
