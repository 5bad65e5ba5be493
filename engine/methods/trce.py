"""TRCE: Towards Reliable Malicious Concept Erasure (Chen et al., 2025).

* ``trce-stage1``: the closed-form cross-attention edit of the first [EoT] row only, weight 1,
  a tiny preservation weight (1e-6 per outer product) on the shared solve; deviations from the
  released code are listed in the README.
* ``trce``: the stage-1 edit, then stage 2's contrastive steering of the early denoising steps
  (``TRCEObjective``). Published stage-2 defaults: AdamW lr 1e-6 on self-attention and
  ``attn2.to_q``, the first 26 of 50 DDIM steps, g 15, delta 0.01, regulariser weight 100; the
  malicious-prompt trajectories are sampled with SD's usual guidance 7.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.closed_form import ClosedFormConfig, closed_form_edit, cross_attention_kv
from engine.concepts import ConceptSet
from engine.finetune.config import TOY_TRAINING, TrainConfig, check_numbers, check_positive_ints
from engine.finetune.frozen import Prompts, ddim_scheduler, frozen_eps, latent_shape, sample_trajectories
from engine.finetune.trainer import Objective
from engine.kernels import contrastive_hinge, guidance_loss
from engine.methods.base import ClosedFormMethod, FineTuningMethod

TRCE_STAGE1 = ClosedFormMethod(
    name="trce-stage1",
    defaults=ClosedFormConfig(tokens="eot", erase_weight=1.0, preserve_weight=1e-6, ridge=0.1),
    summary="TRCE stage 1: closed-form edit of the [EoT] row (Chen et al., 2025)",
)


@dataclass(frozen=True)
class TRCEConfig(TrainConfig):
    """TRCE stage 2's settings (the shared ones in ``TrainConfig``, with TRCE's defaults)."""

    params: str = "selfattn-q"
    optimizer: str = "adamw"
    lr: float = 1e-6
    sample_guidance: float = 7.5
    stage1_preserve_weight: float | None = 1e-6  # stage 1's lam (published 1e-6); None: UCE's max(0.1, 1/n)
    early_steps: int = 26  # the first DDIM steps (of sample_steps) that are steered
    steer_guidance: float = 15.0  # g of the safe / unsafe targets
    hinge_beta: float = 1.0
    hinge_delta: float = 0.01
    reg_weight: float = 100.0  # the unconditional regulariser against the stage-1 model

    def __post_init__(self):
        super().__post_init__()
        check_positive_ints(self, ("early_steps",))
        check_numbers(self, ("steer_guidance", "hinge_beta", "hinge_delta", "reg_weight"),
                      nullable=("stage1_preserve_weight",), positive=("hinge_beta",))


class TRCEObjective(Objective):
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

    def __init__(self, pipe, concepts: ConceptSet, cfg: TRCEConfig, cache: dict | None):
        if cfg.early_steps > cfg.sample_steps:
            raise ValueError(f"early_steps ({cfg.early_steps}) cannot exceed sample_steps ({cfg.sample_steps})")
        missing = [c.name for c in concepts.concepts if not c.anchor]
        if missing:
            raise ValueError(f"trce needs a safe anchor prompt for every concept (its c_s); none for {missing[:5]} "
                             "(set --anchor or the concept's anchor)")
        self.cfg, self.prompts = cfg, Prompts(pipe, concepts, cfg.progress)
        self.cache = cache if cache is not None else self._malicious_targets(pipe)
        stage1 = TRCE_STAGE1.defaults.replace(preserve_weight=cfg.stage1_preserve_weight, progress=cfg.progress)
        self.stage1 = closed_form_edit(pipe, concepts, stage1)
        if "uncond_x" not in self.cache:
            self.cache.update(self._uncond_targets(pipe))

    def _malicious_targets(self, pipe) -> dict:
        cfg, prompts, unet = self.cfg, self.prompts, pipe.unet
        prompt = torch.arange(len(prompts.items)).repeat_interleave(cfg.trajectories)
        shape = (len(prompt), cfg.early_steps, *latent_shape(pipe))
        out = {k: torch.empty(shape, dtype=unet.dtype) for k in ("x", "f_safe", "f_unsafe")}
        out["prompt"] = prompt
        out["timesteps"] = ddim_scheduler(pipe, cfg.sample_steps).timesteps[: cfg.early_steps].cpu().clone()
        g = cfg.steer_guidance

        def record(rows, s, x, eps_u, eps_m):
            (eps_s,) = frozen_eps(unet, x, out["timesteps"][s].to(x.device).expand(len(rows)), prompts.anchor[prompt[rows]])
            out["x"][rows, s] = x.cpu()
            out["f_safe"][rows, s] = (eps_s + g * (eps_s - eps_u)).cpu()
            out["f_unsafe"][rows, s] = (eps_m + g * (eps_m - eps_u)).cpu()

        sample_trajectories(pipe, prompts.cond[prompt], prompts.uncond, cfg.sample_steps, cfg.early_steps,
                             cfg.sample_guidance, cfg.seed, "trce: malicious trajectories", cfg.progress, record)
        return out

    def _uncond_targets(self, pipe) -> dict:
        cfg, prompts = self.cfg, self.prompts
        n = len(prompts.items) * cfg.trajectories
        shape = (n, cfg.early_steps, *latent_shape(pipe))
        out = {"uncond_x": torch.empty(shape, dtype=pipe.unet.dtype), "uncond_eps": torch.empty(shape, dtype=pipe.unet.dtype)}

        def record(rows, s, x, eps_u, _):
            out["uncond_x"][rows, s] = x.cpu()
            out["uncond_eps"][rows, s] = eps_u.cpu()

        # Seeds after the malicious trajectories' (seed + 1): other starting noise.
        sample_trajectories(pipe, None, prompts.uncond, cfg.sample_steps, cfg.early_steps, 1.0, cfg.seed + 1,
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


class _TRCEMethod(FineTuningMethod):
    def touched(self, unet, cfg) -> set[str]:
        # Stage 1 edits the cross-attention K/V before stage 2 trains its own set.
        return super().touched(unet, cfg) | {key for key, _ in cross_attention_kv(unet)}


TRCE = _TRCEMethod(
    name="trce",
    defaults=TRCEConfig(),
    summary="TRCE: stage-1 closed-form edit, then stage-2 contrastive fine-tuning (Chen et al., 2025)",
    objective=TRCEObjective,
    # A smaller step, 13 of the 25 steps steered, and stage 1 with UCE's preservation weight: the
    # published 1e-6 suits SD's wide text space; the toy's 128 identities lie close together and
    # the published stage-1 edit alone erases their neighbours too.
    presets={"toy": {**TOY_TRAINING, "lr": 1e-5, "early_steps": 13, "stage1_preserve_weight": None}},
)
