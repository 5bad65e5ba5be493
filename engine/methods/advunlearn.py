"""AdvUnlearn: Defensive Unlearning with Adversarial Training for Robust Concept Erasure in
Diffusion Models (Zhang et al., NeurIPS 2024, arXiv 2405.15234), from the official code
(github.com/OPTML-Group/AdvUnlearn @9d23124: train-scripts/AdvUnlearn.py, utils/attack_util.py,
utils/get_loss.py, utils/util.py, utils/prompt_dataset.py; "l." below are its lines).

A bi-level loop. Every ``attack_every`` steps a concept prompt c is drawn (AdvUnlearn.py l.74-88)
and, from step ``warmup_iterations`` on, the LOWER level attacks the current model: k adversarial
token vectors v in c (``advunlearn_attack.soft_prompt_attack``; ``attack_steps`` Adam steps at
``attack_lr``, "pgd" or "fast_at", l.91-107). The UPPER level then takes one optimizer step on

    L = || eps_theta(x_t, t, E_phi([v; c])) - (eps*(x_t,t,"") - eta (eps*(x_t,t,c) - eps*(x_t,t,""))) ||^2
        + retain_weight * mean_r || eps_theta(x_r, t, E_phi(r)) - eps*(x_r, t, E*(r)) ||^2

(get_loss.py l.270-366, get_train_loss_retain with retain_train "reg": ESD's erasure loss on the
adversarial prompt, during the warmup on c itself (AdvUnlearn.py l.143-152); plus the utility-
retaining regulariser on ``retain_batch`` retain prompts r; mean squared errors). x_t is a latent of c after a random
number of the ``sample_steps`` DDIM steps (guidance ``sample_guidance``) and t its timestep; x_r
is sampled from r to the same step. eps* and E* are the original UNet and text encoder.

What is trained (``module``): "text_encoder", the paper's choice: E_phi, whose encoder layers
``text_encoder_layers`` (all: "text_encoder_full"), part ``text_encoder_part`` and final layer
norm (util.py l.36-413) change; the UNet is the original one throughout, so the saved pipeline's
text encoder is the trained one (``component``: the delta and the written component are the
text encoder's). "unet": eps_theta's parameter set ``params`` (as ESD's), E_phi the original.

Defaults: the README's commands (l.99, l.104: --attack_init random --attack_step 30
--retain_train reg --dataset_retain coco_object --train_method text_encoder_full
--retain_loss_w 0.3; its fast-AT command adds --attack_method fast_at), else the argparse defaults
(AdvUnlearn.py l.226-261): Adam lr 1e-5, 1000 iterations, one concept latent per step, eta 1,
guidance 3, 50 DDIM steps, retain batch 5, attack "pgd", 30 attack steps, attack lr 1e-3, k = 1
token, "prefix_k", a new prompt and attack every step, 200 warmup steps.

Deviations from the official code:
* Retain prompts: the concept file's preserved captions and concepts, then the engine's generic
  captions (engine/data/generic_captions.txt) less those naming an erased concept, in place of
  the 243 filtered COCO object prompts (data/prompts/train/coco_object_retain.csv).
* x_t of c comes from the engine's cached DDIM trajectories of the original model
  (``trajectories`` per prompt, as ESD's "cached"); x_t is after ``stop`` DDIM steps and t its
  DDIM timestep (official: fresh noise per step, t drawn in the DDIM interval). For the text-
  encoder variant the sampler is the original model either way (the UNet is never trained);
  for the UNet variant the official samples with the model being trained (on-policy). Retain
  latents x_r are sampled each step from fresh noise by the original UNet, as the official.
* The attack's gradient is zeroed every step (attack_util.py never zeroes it, so it accumulates
  over the steps); the vectors after the last step are used (official: those of its last
  forward, one update earlier); the placement uses the prompt's real tokens (official: its word
  count, l.144, which drops the last tokens of a prompt with more tokens than words); "latest"
  starts from the previous vectors wherever they were placed; the attack draws x_t at random
  steps of the cached trajectories. Only "word_embd" attacks (not "condition_embd"); placements
  prefix_k, suffix_k and replace_k; attack methods pgd and fast_at (multi_pgd, free_at raise in
  the official too).
* Layer subsets are the layers named: util.py's name.startswith("encoder.layers.1") also takes
  layers 10 and 11. Concept prompts: every template of every concept (official: the words of
  --prompt split at --seperator). No retain_train "iter" variant.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attacks.common import encode_with_tokens
from engine.concepts import ConceptSet
from engine.finetune.config import TOY_TRAINING, TrainConfig, check_choices, check_numbers, check_positive_ints
from engine.finetune.frozen import (Prompts, build_trajectory_cache, ddim_scheduler, encode_conditions, frozen_eps,
                                    guidance_moved, on_policy_xt)
from engine.finetune.params import trainable_parameters
from engine.finetune.trainer import Objective
from engine.kernels import guidance_loss
from engine.methods.advunlearn_attack import (ATTACK_TYPES, TEXT_ENCODER_PARTS, AdversarialPrompts, layer_indices,
                                              retain_indices, retain_prompts, soft_prompt_attack,
                                              text_encoder_parameters)
from engine.methods.base import FineTuningMethod

MODULES = ("text_encoder", "unet")
ATTACK_METHODS = ("pgd", "fast_at")
ATTACK_INITS = ("random", "latest")


@dataclass(frozen=True)
class AdvUnlearnConfig(TrainConfig):
    """AdvUnlearn's settings (module docstring; the shared ones in ``TrainConfig``)."""

    module: str = "text_encoder"  # text_encoder (the paper's) | unet (``params`` picks its set)
    text_encoder_layers: str | int = "all"  # "all" or encoder layer indices: 0, "0,1,2"
    text_encoder_part: str = "all"  # all | ffn | attn (official --component)
    final_layer_norm: bool = False  # also train it with a subset of layers or parts (official --norm_layer)
    eta: float = 1.0  # negative guidance of the erasure loss (--negative_guidance)
    retain_weight: float = 0.3  # weight of the utility-retaining regulariser (--retain_loss_w)
    retain_batch: int = 5  # retain prompts per step (--retain_batch)
    attack_method: str = "pgd"  # pgd | fast_at (sign of the gradient)
    attack_steps: int = 30  # Adam steps of each attack (--attack_step)
    attack_lr: float = 1e-3
    adv_tokens: int = 1  # k (--adv_prompt_num)
    attack_type: str = "prefix_k"  # prefix_k | suffix_k | replace_k (where the k tokens go)
    attack_init: str = "random"  # random | latest (the previous attack's vectors)
    attack_every: int = 1  # steps between new prompts and attacks (--adv_prompt_update_step)
    warmup_iterations: int = 200  # steps on the plain prompt before the first attack (--warmup_iter)

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, {"module": MODULES, "text_encoder_part": TEXT_ENCODER_PARTS,
                             "attack_method": ATTACK_METHODS, "attack_type": ATTACK_TYPES, "attack_init": ATTACK_INITS})
        check_positive_ints(self, ("retain_batch", "attack_steps", "adv_tokens", "attack_every"))
        check_numbers(self, ("eta", "retain_weight", "attack_lr"), positive=("attack_lr",))
        layer_indices(self.text_encoder_layers)
        if not isinstance(self.final_layer_norm, bool):
            raise ValueError(f"config field 'final_layer_norm' must be true or false, got {self.final_layer_norm!r}")
        warmup = self.warmup_iterations
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"config field 'warmup_iterations' must be an integer >= 0, got {warmup!r}")
        if self.distributed != "none":
            raise ValueError("advunlearn trains in one process (distributed='none'): its attack needs the whole model")
        if self.module == "text_encoder" and (self.params == "lora" or self.gradient_checkpointing):
            raise ValueError("params='lora' and gradient_checkpointing apply to the UNet variant (module='unet')")


class AdvUnlearnObjective(Objective):
    """AdvUnlearn's bi-level step (module docstring): the attack when due, then the upper loss."""

    name = "advunlearn"
    sdxl = False  # one CLIP text encoder (the attack's placeholders go through it)

    def __init__(self, pipe, concepts: ConceptSet, cfg: AdvUnlearnConfig, cache: dict | None):
        self.pipe, self.cfg, self.component = pipe, cfg, cfg.module
        pipe.text_encoder.requires_grad_(False)  # the trainer enables the trained ones
        self.prompts = Prompts(pipe, concepts, cfg.progress)  # E*(c), E*("")
        texts = [src for _, src, _ in self.prompts.items]
        self.adversarial = AdversarialPrompts(pipe, texts, cfg.adv_tokens, cfg.attack_type)
        self.retain = retain_prompts(concepts)
        self.retain_cond = encode_conditions(pipe, self.retain, cfg.progress).to(pipe.unet.device, pipe.unet.dtype)
        self.cache = cache if cache is not None else build_trajectory_cache(pipe, self.prompts, cfg)
        # eps* for the retain latents: the pipeline's UNet stays the original unless it is trained.
        self.frozen = copy.deepcopy(pipe.unet).eval().requires_grad_(False) if cfg.module == "unet" else pipe.unet
        self.scheduler = ddim_scheduler(pipe, cfg.sample_steps)
        self.item, self.vectors = 0, None  # the current concept prompt and adversarial vectors
        self.attack_losses: list[float] = []  # the last attack's, step by step

    def trainable(self, module, cfg: AdvUnlearnConfig) -> dict[str, torch.nn.Parameter]:
        if cfg.module == "unet":
            return trainable_parameters(module, cfg.params)
        return text_encoder_parameters(module, cfg.text_encoder_layers, cfg.text_encoder_part, cfg.final_layer_norm)

    def draw(self, item: int, n: int, gen, stop: int | None = None):
        """``n`` cached latents of concept prompt ``item`` after ``stop`` DDIM steps (drawn when
        None): (x_t, t, frozen [eps*(x_t,t,""), eps*(x_t,t,c)])."""
        cache, device, dtype = self.cache, self.pipe.unet.device, self.pipe.unet.dtype
        per_prompt = cache["x"].shape[0] // len(self.prompts.items)
        rows = item * per_prompt + torch.randint(0, per_prompt, (n,), generator=gen)
        if stop is None:
            stop = int(torch.randint(0, cache["x"].shape[1], (1,), generator=gen))
        x = cache["x"][rows, stop].to(device, dtype)
        t = cache["timesteps"][stop].expand(n).to(device)
        frozen = torch.stack([cache["eps_uncond"][rows, stop], cache["eps_cond"][rows, stop]], 1).to(device)
        return x, t, frozen

    def attack(self, unet, gen) -> None:
        """The lower level against the current model; its vectors replace the previous ones."""
        init = self.vectors if self.cfg.attack_init == "latest" else None
        self.vectors, self.attack_losses = soft_prompt_attack(self.pipe, unet, self.adversarial, self.item, self.draw,
                                                              self.cfg, gen, init)

    def condition(self, item: int) -> torch.Tensor:
        """E_phi of concept prompt ``item``, with the adversarial vectors once there are some (1, 77, D)."""
        grad = torch.enable_grad() if self.component == "text_encoder" else torch.no_grad()
        with grad:
            if self.vectors is None:
                return encode_with_tokens(self.pipe, [self.prompts.items[item][1]])
            return self.adversarial.encode(self.pipe, item, self.vectors)

    def retain_loss(self, unet, step: int, stop: int, gen) -> torch.Tensor:
        """mean || eps_theta(x_r, t, E_phi(r)) - eps*(x_r, t, E*(r)) ||^2 over the step's retain prompts."""
        cfg = self.cfg
        rows = retain_indices(len(self.retain), cfg.retain_batch, step, cfg.seed)
        cond = self.retain_cond[rows]
        x = on_policy_xt(self.frozen, self.scheduler, cond, self.prompts.uncond, stop, cfg.sample_guidance, gen)
        t = self.scheduler.timesteps[stop].expand(len(rows))
        (target,) = frozen_eps(self.frozen, x, t, cond)
        if self.component == "text_encoder":
            cond = encode_with_tokens(self.pipe, [self.retain[int(i)] for i in rows]).to(unet.dtype)
        return F.mse_loss(unet(x, t, cond).sample.float(), target.float())

    def loss(self, trainee, gen, step: int = 0) -> torch.Tensor:
        cfg = self.cfg
        unet = trainee if self.component == "unet" else self.pipe.unet
        if step % cfg.attack_every == 0:  # a new concept prompt, attacked once past the warmup
            self.item = int(torch.randint(0, len(self.prompts.items), (1,), generator=gen))
            if step >= cfg.warmup_iterations:
                self.attack(unet, gen)
        stop = int(torch.randint(0, cfg.sample_steps, (1,), generator=gen))  # one step for c and the retain set
        x, t, frozen = self.draw(self.item, cfg.batch_size, gen, stop)
        cond = self.condition(self.item).to(unet.dtype).expand(len(x), -1, -1)
        coeffs = self.prompts.guidance_coeffs(torch.full((len(x),), self.item), cfg.eta, x.device)
        pred = unet(x, t, cond).sample
        loss = guidance_loss(pred.flatten(1), frozen.flatten(2), coeffs, backend=cfg.loss_backend).mean()
        if cfg.retain_weight:
            loss = loss + cfg.retain_weight * self.retain_loss(unet, step, stop, gen)
        return loss

    def state(self) -> dict:
        return {"item": self.item, "vectors": self.vectors}

    def load_state(self, state: dict) -> None:
        self.item, self.vectors = state.get("item", 0), state.get("vectors")
        if self.vectors is not None:
            self.vectors = self.vectors.to(self.pipe.text_encoder.device)

    @torch.no_grad()
    def moved(self, unet) -> float | None:
        """``guidance_moved`` on the cached latents, the concept prompts encoded by the trained text
        encoder (the text-encoder variant) or by the original one (the UNet variant)."""
        prompts = self.prompts
        if self.component == "text_encoder":
            texts = [src for _, src, _ in prompts.items]
            prompts = copy.copy(prompts)
            prompts.cond = torch.cat([encode_with_tokens(self.pipe, texts[i : i + 64])
                                      for i in range(0, len(texts), 64)]).to(self.prompts.cond)
        return guidance_moved(self.pipe.unet, self.cache, prompts, self.cfg.eta)


@dataclass(frozen=True)
class AdvUnlearnMethod(FineTuningMethod):
    """AdvUnlearn on the shared trainer; what it changes is the text encoder or the UNet (``module``)."""

    def component(self, cfg) -> str:
        return cfg.module

    def touched(self, unet, cfg) -> set[str]:
        if cfg.module == "unet":
            return super().touched(unet, cfg)
        return set(text_encoder_parameters(unet, cfg.text_encoder_layers, cfg.text_encoder_part, cfg.final_layer_norm))

    def train(self, pipe, concepts, cfg, **kwargs):
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise NotImplementedError("advunlearn needs an SD1.x / SD2.x pipeline (one text encoder); SDXL is not "
                                      "supported")
        return super().train(pipe, concepts, cfg, **kwargs)


ADVUNLEARN = AdvUnlearnMethod(
    name="advunlearn",
    defaults=AdvUnlearnConfig(),
    summary="AdvUnlearn: adversarial training of the text encoder against soft-prompt attacks, with a "
            "utility-retaining regulariser (Zhang et al., NeurIPS 2024)",
    objective=AdvUnlearnObjective,
    # toy: the engine's toy training (batch 4, lr 1e-4, 25-step trajectories, 300 steps), the first 50
    # steps warming up, 10-step attacks; measured by benchmarks/toy_attacks.py.
    presets={"toy": {**TOY_TRAINING, "warmup_iterations": 50, "attack_steps": 10}},
)
