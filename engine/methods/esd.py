"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

For a noisy latent ``x_t`` of concept ``c`` at timestep ``t`` the trainee is regressed onto

    target = eps*(x_t, t, "") - eta (eps*(x_t, t, c) - eps*(x_t, t, ""))

with ``eps*`` the frozen original UNet: ``engine.kernels.guidance_loss`` with frozen predictions
``[eps*(x_t,t,""), eps*(x_t,t,c)]`` and coefficients ``[1 + eta_c, -eta_c]``, where ``eta_c`` is
``eta`` times the concept's weight. Many concepts train in one run: each batch mixes concepts.

Where ``x_t`` comes from (``xt_source``):

* ``"cached"`` (fast, the default): DDIM trajectories of the frozen model, sampled once per
  concept before training (``engine.finetune.frozen.build_trajectory_cache``): a step is one
  trainee forward and backward.
* ``"on-policy"`` (the paper's): each step samples ``x_t`` with the model being trained, from
  fresh noise, stopping at a random DDIM step, then evaluates the frozen model there (a frozen
  copy of the UNet is kept): tens of extra forwards per step.

Published defaults: Adam, lr 1e-5, 1000 iterations, batch 1, eta 1, ESD-x (``params="xattn"``:
cross-attention only, for styles and objects; ``"noxattn"`` is ESD-u, for global concepts).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from engine.concepts import ConceptSet
from engine.finetune.config import TOY_TRAINING, TrainConfig, check_choices, check_numbers
from engine.finetune.frozen import (Prompts, build_trajectory_cache, cached_guidance_batch, ddim_scheduler, guided_eps,
                                    guidance_moved, on_policy_xt)
from engine.finetune.trainer import Objective
from engine.kernels import guidance_loss
from engine.methods.base import FineTuningMethod

XT_SOURCES = ("cached", "on-policy")


@dataclass(frozen=True)
class ESDConfig(TrainConfig):
    """ESD's settings (the shared ones in ``TrainConfig``)."""

    eta: float = 1.0  # negative-guidance scale; each concept's weight multiplies it
    xt_source: str = "cached"  # cached | on-policy

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, {"xt_source": XT_SOURCES})
        check_numbers(self, ("eta",))
        if self.distributed != "none" and self.xt_source != "cached":
            raise ValueError("distributed runs take x_t from cached trajectories (xt_source='cached')")


class ESDObjective(Objective):
    """ESD's negative guidance (module docstring), x_t cached or on-policy."""

    name = "esd"

    def __init__(self, pipe, concepts: ConceptSet, cfg: ESDConfig, cache: dict | None):
        self.cfg, self.prompts = cfg, Prompts(pipe, concepts, cfg.progress)
        self.frozen = None
        if cfg.xt_source == "cached":
            self.cache = cache if cache is not None else build_trajectory_cache(pipe, self.prompts, cfg)
        else:
            self.cache = None
            self.frozen = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
            self.scheduler = ddim_scheduler(pipe, cfg.sample_steps)

    def loss(self, unet, gen, step: int = 0) -> torch.Tensor:
        cfg, prompts = self.cfg, self.prompts
        device = unet.device
        if self.cache is not None:
            x, t, cond, frozen, coeffs = cached_guidance_batch(self.cache, prompts, cfg.batch_size, cfg.eta, gen,
                                                               device, unet.dtype, self.part)
        else:
            items = torch.randint(0, len(prompts.items), (cfg.batch_size,), generator=gen)
            stop = int(torch.randint(0, cfg.sample_steps, (1,), generator=gen))
            unet.eval()
            x = on_policy_xt(unet, self.scheduler, prompts.cond[items], prompts.uncond, stop, cfg.sample_guidance, gen)
            unet.train()
            t = self.scheduler.timesteps[stop].expand(cfg.batch_size)
            frozen = torch.stack(guided_eps(self.frozen, x, t, prompts.cond[items], prompts.uncond), 1)
            cond, coeffs = prompts.cond[items], prompts.guidance_coeffs(items, cfg.eta, device)
        pred = unet(x, t, cond).sample
        return guidance_loss(pred.flatten(1), frozen.flatten(2), coeffs, backend=cfg.loss_backend).mean()

    def moved(self, unet) -> float | None:
        """On cached trajectories (``guidance_moved``); on-policy runs keep none: None."""
        return guidance_moved(unet, self.cache, self.prompts, self.cfg.eta) if self.cache is not None else None


ESD = FineTuningMethod(
    name="esd",
    defaults=ESDConfig(),
    summary="ESD negative-guidance fine-tuning (Gandikota et al., ICCV 2023)",
    objective=ESDObjective,
    presets={"toy": TOY_TRAINING},
)
