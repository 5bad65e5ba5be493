"""The frozen side of fine-tuning: text conditions (SDXL's pooled embedding included), DDIM
trajectories of the frozen model and the cached targets drawn from them.

``build_trajectory_cache``: DDIM trajectories of the FROZEN model (``sample_steps`` steps,
guidance ``sample_guidance``), sampled once per concept before training. Sampling with guidance
already evaluates ``eps*(x_t, t, c)`` and ``eps*(x_t, t, "")`` at every step, so each cached step
stores ``x_t`` with both frozen predictions: a training step is then one trainee forward and
backward. Deterministic in the seed: trajectory j of prompt i starts from noise seeded by the
seed, i and j, whatever the batching.
"""

from __future__ import annotations

import contextlib

import torch

from engine.concepts import ConceptSet
from engine.finetune.config import TrainConfig
from engine.progress import progress_bar

# --- SDXL: the UNet also takes each prompt's pooled text embedding and six size/crop ids. The
# trainer passes a text condition as one (N, rows, D) tensor everywhere (cached, batched, indexed
# by prompt), so for SDXL the pooled embedding rides along as one extra row after the 77 token
# rows, zero-padded to D, and a forward pre-hook on the UNet moves it into added_cond_kwargs.

def is_sdxl(pipe) -> bool:
    from engine.models import pipeline_family

    return pipeline_family(pipe) == "sdxl"


def encode_conditions(pipe, texts: list[str], progress: bool) -> torch.Tensor:
    """(N, 77, D) text conditions of ``texts`` (SDXL: (N, 78, D), the pooled embedding last; the
    empty prompt gets zeros, as the pipeline's unconditional branch, with
    ``force_zeros_for_empty_prompt``)."""
    from engine.models import MAX_LENGTH, encode_prompts, encode_sdxl_prompts

    if not is_sdxl(pipe):
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
    conditions (``encode_conditions``): the extra row becomes ``added_cond_kwargs`` with the
    native-size time ids. Nothing happens for SD1.x / SD2.x pipelines."""
    from engine.models import MAX_LENGTH

    if not is_sdxl(pipe):
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


class Prompts:
    """Embeddings of every concept prompt, of its anchor prompt and of the empty prompt, on the
    UNet's device; ``items[i]`` is (concept index, prompt, anchor prompt). SDXL's carry the pooled
    embedding as an extra row (``sdxl_conditioning``)."""

    def __init__(self, pipe, concepts: ConceptSet, progress: bool):
        self.items = []
        for i, concept in enumerate(concepts.concepts):
            self.items += [(i, src, tgt) for _, src, tgt in concept.prompt_pairs()]
        n = len(self.items)
        texts = [src for _, src, _ in self.items] + [tgt for _, _, tgt in self.items] + [""]
        emb = encode_conditions(pipe, texts, progress).to(pipe.unet.device, pipe.unet.dtype)
        self.cond, self.anchor, self.uncond = emb[:n], emb[n : 2 * n], emb[2 * n :]
        self.eta_scale = torch.tensor([concepts.concepts[i].weight for i, _, _ in self.items])

    @classmethod
    def from_conditions(cls, cond: torch.Tensor, uncond: torch.Tensor) -> "Prompts":
        """Prompts given as text conditions (e.g. with learned tokens): ``cond`` (n, 77, D) erased
        with weight 1, no anchors; ``uncond`` the empty prompt's condition."""
        prompts = cls.__new__(cls)
        prompts.cond, prompts.anchor, prompts.uncond = cond, None, uncond
        prompts.items = [(0, "", "")] * len(cond)
        prompts.eta_scale = torch.ones(len(cond))
        return prompts

    def guidance_coeffs(self, items, eta: float, device, sign: float = 1.0) -> torch.Tensor:
        """Loss coefficients [1 + s eta_c, -s eta_c] of the prompts ``items`` (eta_c: ``eta`` times
        the concept's weight); s = +1 erases (ESD's target), s = -1 preserves."""
        eta_c = eta * self.eta_scale[items]
        return torch.stack([1 + sign * eta_c, -sign * eta_c], 1).to(device)


def latent_shape(pipe) -> tuple[int, int, int]:
    size = pipe.unet.config.sample_size
    return pipe.unet.config.in_channels, size, size


def ddim_scheduler(pipe, steps: int):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=pipe.unet.device)
    return scheduler


@torch.no_grad()
def frozen_eps(unet, x, t, *conds) -> list[torch.Tensor]:
    """eps(x, t, c) for each condition (a batch, or one row broadcast), in one UNet call."""
    n = len(x)
    cond = torch.cat([c.expand(n, -1, -1) for c in conds])
    out = unet(x.repeat(len(conds), 1, 1, 1), t.repeat(len(conds)), cond).sample
    return list(out.chunk(len(conds)))


def guided_eps(unet, x, t, cond, uncond):
    """(eps(x, t, ""), eps(x, t, c)) for a batch, in one UNet call."""
    return tuple(frozen_eps(unet, x, t, uncond, cond))


def trajectory_noise(shape, seed: int, row: int) -> torch.Tensor:
    """The starting noise of trajectory ``row``: the same whatever the batching."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + row))


def sample_trajectories(pipe, cond, uncond, steps: int, keep_steps: int, guidance: float, seed: int, desc: str,
                         progress: bool, record, n: int | None = None) -> None:
    """DDIM with guidance from seeded noise, one trajectory per row of ``cond``; calls
    ``record(rows, step, x, eps_uncond, eps_cond)`` for the first ``keep_steps`` steps.
    ``cond=None``: ``n`` unconditional trajectories, one UNet evaluation per step (eps_cond is
    then eps_uncond)."""
    unet = pipe.unet
    scheduler = ddim_scheduler(pipe, steps)
    shape = latent_shape(pipe)
    n, batch = (len(cond) if cond is not None else n), 16
    with progress_bar(total=n, desc=desc, progress=progress, unit="traj") as bar:
        for lo in range(0, n, batch):
            rows = list(range(lo, min(n, lo + batch)))
            x = torch.stack([trajectory_noise(shape, seed, r) for r in rows]).to(unet.device, unet.dtype)
            x = x * scheduler.init_noise_sigma
            for s, t in enumerate(scheduler.timesteps[:keep_steps]):
                if cond is None:
                    (eps_u,) = frozen_eps(unet, x, t.expand(len(rows)), uncond)
                    eps_c = eps_u
                else:
                    eps_u, eps_c = guided_eps(unet, x, t.expand(len(rows)), cond[rows], uncond)
                record(rows, s, x, eps_u, eps_c)
                x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
            bar.update(len(rows))


def build_trajectory_cache(pipe, prompts: Prompts, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """For every prompt, ``cfg.trajectories`` DDIM trajectories of the frozen model: per step the
    latent x_t, its timestep and both frozen predictions (CPU, the UNet's dtype).

    Deterministic in ``cfg.seed``: trajectory j of prompt i starts from noise seeded by
    ``cfg.seed``, i and j, whatever the batching.
    """
    unet = pipe.unet
    shape = latent_shape(pipe)
    prompt = torch.arange(len(prompts.items)).repeat_interleave(cfg.trajectories)
    n = len(prompt)
    out = {name: torch.empty((n, cfg.sample_steps, *shape), dtype=unet.dtype) for name in ("x", "eps_uncond", "eps_cond")}
    out["timesteps"] = ddim_scheduler(pipe, cfg.sample_steps).timesteps.cpu().clone()
    out["prompt"] = prompt

    def record(rows, s, x, eps_u, eps_c):
        out["x"][rows, s] = x.cpu()
        out["eps_uncond"][rows, s] = eps_u.cpu()
        out["eps_cond"][rows, s] = eps_c.cpu()

    sample_trajectories(pipe, prompts.cond[prompt], prompts.uncond, cfg.sample_steps, cfg.sample_steps,
                         cfg.sample_guidance, cfg.seed, "cache trajectories", cfg.progress, record)
    return out


@torch.no_grad()
def on_policy_xt(trainee, scheduler, cond, uncond, stop: int, guidance: float, gen) -> torch.Tensor:
    """Sample x_t with the model being trained: DDIM from noise, stopped after ``stop`` steps."""
    shape = (len(cond), trainee.config.in_channels, trainee.config.sample_size, trainee.config.sample_size)
    x = torch.randn(shape, generator=gen).to(cond.device, cond.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:stop]:
        eps_u, eps_c = guided_eps(trainee, x, t.expand(len(x)), cond, uncond)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x



def cached_guidance_batch(cache: dict, prompts: Prompts, batch_size: int, eta: float, gen, device, dtype,
                          part=slice(None)):
    """A batch drawn from a trajectory cache: x_t, t, the prompts' text states, the frozen
    predictions [eps*(x_t,t,""), eps*(x_t,t,c)] and the loss coefficients [1 + eta_c, -eta_c];
    ``part``: this rank's share of the drawn batch (distributed runs)."""
    steps_cached = cache["x"].shape[1]
    rows = torch.randint(0, len(cache["x"]), (batch_size,), generator=gen)[part]
    steps = torch.randint(0, steps_cached, (batch_size,), generator=gen)[part]
    x = cache["x"][rows, steps].to(device, dtype)
    t = cache["timesteps"][steps].to(device)
    frozen = torch.stack([cache["eps_uncond"][rows, steps], cache["eps_cond"][rows, steps]], 1).to(device)
    items = cache["prompt"][rows]
    return x, t, prompts.cond[items], frozen, prompts.guidance_coeffs(items, eta, device)


@torch.no_grad()
def guidance_moved(unet, cache: dict, prompts: Prompts, eta: float, samples: int = 8) -> float:
    """How far ``unet``'s eps(x_t, t, c) has moved from the frozen eps*(x_t, t, c), as a fraction
    of the distance from eps* to the negative-guidance target, on ``samples`` fixed cached x_t
    (spread over the trajectories and their steps): 0 nothing moved, 1 the target reached."""
    n, steps = cache["x"].shape[:2]
    k = min(samples, n * steps)
    rows = torch.arange(k) % n
    at = torch.linspace(0, steps - 1, k).round().long()
    device, dtype = unet.device, unet.dtype
    items = cache["prompt"][rows]
    frozen = torch.stack([cache["eps_uncond"][rows, at], cache["eps_cond"][rows, at]], 1).to(device).float().flatten(2)
    target = (prompts.guidance_coeffs(items, eta, device).float()[:, :, None] * frozen).sum(1)
    pred = unet(cache["x"][rows, at].to(device, dtype), cache["timesteps"][at].to(device),
                prompts.cond[items].to(device, dtype)).sample.float().flatten(1)
    wanted = (target - frozen[:, 1]).norm(dim=1).sum()
    return float((pred - frozen[:, 1]).norm(dim=1).sum() / wanted.clamp_min(1e-12))
