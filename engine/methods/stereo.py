"""STEREO: A Two-Stage Framework for Adversarially Robust Concept Erasing from Text-to-Image
Diffusion Models (Srivatsan et al., CVPR 2025, arXiv 2408.16807).

Stage 1, Search Thoroughly Enough (STE), finds where the concept still lives: ``rounds`` times,
erase with ESD (the round's condition: the concept's prompts first, then the token the previous
round learned; the erasure accumulates in the model), then learn a token on the erased model by
concept inversion (``engine.attacks.inversion.learn_tokens``) on images of the concept drawn by
the ORIGINAL model. The tokens are the "blind spots" of the successive erasures.

Stage 2, Robustly Erase Once (REO), fine-tunes the original model once, regressing the trainee's
prediction for an erased condition c_e (the concept's prompt or one of the STE tokens) onto the
anchor-concept-based compositional target

    eps*(x_t,"") + eta_a (eps*(x_t,a) - eps*(x_t,"")) - eta_e mean_n (eps*(x_t,n) - eps*(x_t,""))

with eps* the original model, a an anchor prompt of the concept (one per sample) and n over the
negatives: the concept's prompt and the ``adversarial_concepts`` tokens. Erased conditions are
drawn evenly between the concept and each token, as the authors' stratified sampling.

Defaults (the authors' configuration): ESD-u (``params="noxattn"``); STE 4 rounds of 200 ESD steps
at lr 0.5e-5 (eta 1) and 3,000 inversion steps at lr 5e-3 (batch 1), initial word "object"; REO
200 steps at lr 2e-5 with all 4 tokens, compositional guidance 2 (their scale is one above the
weight: anchors get 2 - 1 = 1, negatives -2 - 1 = -3, the values below). Their adaptive projected
guidance (APG) at its default settings (eta 1, no momentum, no norm threshold) is plain guidance.

Deviations: x_t is drawn from cached DDIM trajectories of the round's model (the engine's ESD
"cached" source; the authors sample it with the model being trained); the inversion images are
``inversion_images`` images the original model draws of the concept's prompts (theirs: a folder of
the concept's images); anchors are the concepts' own anchor prompts (theirs: a per-concept JSON of
anchor prompts); tokens are plain vectors on the hooked embedding layer (``engine.attacks``), not
new tokenizer entries. REO starts from the original model (``reo_start="original"``, as the paper
describes it); ``"ste"`` continues from the STE model instead. One concept per run, as the paper.
Checkpoints are REO's: a resumed run repeats STE (deterministic in the seed), then continues REO.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from engine.attacks.common import TokenTable, encode_with_tokens, generate_prompts
from engine.attacks.inversion import InversionSettings, learn_tokens
from engine.finetune.config import TOY_TRAINING, TrainConfig, check_choices, check_numbers, check_positive_ints
from engine.finetune.frozen import Prompts, build_trajectory_cache, cached_guidance_batch, encode_conditions, frozen_eps
from engine.finetune.trainer import Objective, train
from engine.kernels import guidance_loss
from engine.methods.base import FineTuningMethod, Outcome, training_summary

REO_STARTS = ("original", "ste")


@dataclass(frozen=True)
class StereoConfig(TrainConfig):
    """STEREO's settings (module docstring). ``iterations`` and ``lr`` are REO's."""

    params: str = "noxattn"
    iterations: int = 200
    lr: float = 2e-5
    rounds: int = 4  # STE erase-then-invert rounds
    ste_iterations: int | None = None  # ESD steps per round (None: ``iterations``)
    ste_lr: float = 0.5e-5
    eta: float = 1.0  # STE's negative guidance (ESD's)
    inversion_steps: int = 3000
    inversion_lr: float = 5e-3
    inversion_batch: int = 1
    inversion_images: int = 25
    init_word: str = "object"
    image_steps: int = 50  # sampling of the inversion images
    image_guidance: float = 7.5
    adversarial_concepts: int = 4  # STE tokens erased by REO (0: all)
    anchor_guidance: float = 1.0
    erase_guidance: float = 3.0
    reo_start: str = "original"  # original | ste

    def __post_init__(self):
        super().__post_init__()
        check_choices(self, {"reo_start": REO_STARTS})
        check_positive_ints(self, ("rounds", "inversion_steps", "inversion_batch", "inversion_images", "image_steps"))
        if self.ste_iterations is not None:
            check_positive_ints(self, ("ste_iterations",))
        check_numbers(self, ("ste_lr", "eta", "inversion_lr", "image_guidance", "anchor_guidance", "erase_guidance"),
                      positive=("ste_lr", "inversion_lr"))
        if not isinstance(self.adversarial_concepts, int) or not 0 <= self.adversarial_concepts:
            raise ValueError(f"config field 'adversarial_concepts' must be an integer >= 0, got "
                             f"{self.adversarial_concepts!r}")
        if self.distributed != "none":
            raise ValueError("stereo trains in one process (distributed='none'): its inversion needs the whole model")


class _SteRound(Objective):
    """One STE erasure: ESD's negative guidance on the round's conditions (``erase``), x_t from
    cached trajectories of the model as the round starts."""

    name = "stereo-ste"
    sdxl = False
    erase: torch.Tensor  # (n, 77, D), set per round by ``_round_objective``

    def __init__(self, pipe, concepts, cfg: StereoConfig, cache):
        self.cfg = cfg
        uncond = encode_conditions(pipe, [""], False).to(pipe.unet.device, pipe.unet.dtype)
        self.prompts = Prompts.from_conditions(self.erase.to(uncond), uncond)
        self.cache = build_trajectory_cache(pipe, self.prompts, cfg)

    def loss(self, unet, gen, step: int = 0) -> torch.Tensor:
        x, t, cond, frozen, coeffs = cached_guidance_batch(self.cache, self.prompts, self.cfg.batch_size, self.cfg.eta,
                                                           gen, unet.device, unet.dtype)
        pred = unet(x, t, cond).sample
        return guidance_loss(pred.flatten(1), frozen.flatten(2), coeffs, backend=self.cfg.loss_backend).mean()


def _round_objective(erase: torch.Tensor) -> type[_SteRound]:
    return type("SteRound", (_SteRound,), {"erase": erase.detach()})


class _ReoObjective(Objective):
    """REO's compositional objective (module docstring) against the original model."""

    name = "stereo-reo"
    sdxl = False
    tokens: torch.Tensor  # (K, 77, D): the STE tokens' conditions (bare placeholders), set by ``_reo_objective``
    frozen: torch.nn.Module  # the original UNet, set by ``_reo_objective``

    def __init__(self, pipe, concepts, cfg: StereoConfig, cache):
        self.cfg = cfg
        device, dtype = pipe.unet.device, pipe.unet.dtype
        prompts = Prompts(pipe, concepts, cfg.progress)
        self.concept, self.anchors = prompts.cond, prompts.anchor  # (P, 77, D) each
        self.erase = Prompts.from_conditions(torch.cat([self.concept, self.tokens.to(device, dtype)]), prompts.uncond)
        self.cache = cache if cache is not None else build_trajectory_cache(pipe, self.erase, cfg)

    def loss(self, unet, gen, step: int = 0) -> torch.Tensor:
        cfg, n, p, k = self.cfg, self.cfg.batch_size, len(self.concept), len(self.tokens)
        # Evenly between the concept (any of its prompts) and each token: group 0 or 1..k.
        group = torch.randint(0, k + 1, (n,), generator=gen)
        template = torch.randint(0, p, (n,), generator=gen)
        row = torch.where(group == 0, template, p + group - 1)
        per_row = self.cache["x"].shape[0] // len(self.erase.items)
        traj = row * per_row + torch.randint(0, per_row, (n,), generator=gen)
        at = torch.randint(0, self.cache["x"].shape[1], (n,), generator=gen)
        x = self.cache["x"][traj, at].to(unet.device, unet.dtype)
        t = self.cache["timesteps"][at].to(unet.device)
        uncond = self.cache["eps_uncond"][traj, at].to(x)
        anchor = self.anchors[torch.randint(0, p, (n,), generator=gen)]
        negatives = [self.concept[template], *self.erase.cond[p:].split(1)]
        eps = frozen_eps(self.frozen, x, t, anchor, *negatives)
        frozen = torch.stack([uncond, *eps], 1).flatten(2)
        w_a, w_n = cfg.anchor_guidance, cfg.erase_guidance / len(negatives)
        coeffs = torch.tensor([1 - w_a + cfg.erase_guidance, w_a, *[-w_n] * len(negatives)], device=x.device)
        pred = unet(x, t, self.erase.cond[row]).sample
        return guidance_loss(pred.flatten(1), frozen, coeffs.expand(n, -1), backend=cfg.loss_backend).mean()


def _reo_objective(tokens: torch.Tensor, frozen) -> type[_ReoObjective]:
    return type("ReoObjective", (_ReoObjective,), {"tokens": tokens.detach(), "frozen": frozen})


def concept_images(pipe, prompts: list[str], cfg: StereoConfig):
    """``cfg.inversion_images`` images of ``prompts`` (cycled) drawn by ``pipe``, seeds seed + i."""
    from engine.evaluation.generation import image_size

    n = cfg.inversion_images
    was = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    try:
        return generate_prompts(pipe, [prompts[i % len(prompts)] for i in range(n)], [cfg.seed + i for i in range(n)],
                                steps=cfg.image_steps, guidance=cfg.image_guidance, size=image_size(pipe))
    finally:
        pipe.set_progress_bar_config(disable=was)


def search_thoroughly_enough(pipe, concepts, cfg: StereoConfig) -> tuple[torch.Tensor, list[dict]]:
    """STE (module docstring) on ``pipe`` in place: returns the rounds' tokens as bare-placeholder
    conditions (rounds, 77, D) and one record per round."""
    prompts = [src for _, src, _ in concepts.concepts[0].prompt_pairs()]
    images = concept_images(pipe, prompts, cfg)
    inversion = InversionSettings(steps=cfg.inversion_steps, batch_size=cfg.inversion_batch, lr=cfg.inversion_lr,
                                  images=cfg.inversion_images, init_word=cfg.init_word, seed=cfg.seed)
    round_cfg = cfg.replace(iterations=cfg.ste_iterations or cfg.iterations, lr=cfg.ste_lr, checkpoint_every=0)
    erase = encode_conditions(pipe, prompts, False)
    tokens, records = [], []
    for r in range(cfg.rounds):
        start = time.perf_counter()
        run = train(pipe, concepts, round_cfg, _round_objective(erase), f"stereo round {r + 1}/{cfg.rounds}")
        vectors, losses = learn_tokens(pipe, images, inversion, progress=cfg.progress)
        table = TokenTable(pipe, vectors)
        with torch.no_grad():
            erase = encode_with_tokens(pipe, [table.phrase], table).detach()
        tokens.append(erase)
        records.append({"round": r + 1, "erasure_final_loss": training_summary(run.losses, 0, 0)["final_loss"],
                        "inversion_final_loss": sum(losses[-50:]) / len(losses[-50:]),
                        "seconds": time.perf_counter() - start})
    return torch.cat(tokens), records


@dataclass(frozen=True)
class StereoMethod(FineTuningMethod):
    """STE then REO (module docstring) on the shared trainer."""

    def run(self, pipe, concepts, cfg, *, checkpoint_dir=None, resume=False, model_fingerprint=None) -> Outcome:
        self.check_settings(cfg)
        if len(concepts.concepts) != 1:
            raise ValueError(f"stereo erases one concept per run (as the paper); got {len(concepts.concepts)}")
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise NotImplementedError("stereo needs an SD1.x / SD2.x pipeline (one text encoder); SDXL is not supported")
        frozen = copy.deepcopy(pipe.unet).eval().requires_grad_(False)  # eps* of REO's targets
        start = time.perf_counter()
        tokens, rounds = search_thoroughly_enough(pipe, concepts, cfg)
        ste_seconds = time.perf_counter() - start
        if cfg.reo_start == "original":
            original = frozen.state_dict()
            pipe.unet.load_state_dict({k: original[k] for k in self.touched(pipe.unet, cfg)}, strict=False)
        kept = tokens if cfg.adversarial_concepts == 0 else tokens[: cfg.adversarial_concepts]
        run = train(pipe, concepts, cfg, _reo_objective(kept, frozen), self.name, checkpoint_dir=checkpoint_dir,
                    resume=resume, model_fingerprint=model_fingerprint)
        training = training_summary(run.losses, run.steps_run, run.resumed_from,
                                    parameters_trained=sum(v.numel() for v in run.changed.values()))
        stereo = {"ste_rounds": rounds, "ste_seconds": ste_seconds, "adversarial_concepts": len(kept),
                  "reo_start": cfg.reo_start}
        return Outcome(changed=run.changed, timings={"ste": ste_seconds, **run.timings},
                       manifest={"seed": cfg.seed, "training": training, "stereo": stereo})


STEREO = StereoMethod(
    name="stereo",
    defaults=StereoConfig(),
    summary="STEREO: search adversarial tokens by erase-then-invert rounds, then erase them and the concept "
            "once with an anchor-based compositional objective (Srivatsan et al., CVPR 2025)",
    objective=_ReoObjective,
    # toy: the engine's toy training for REO; STE rounds of 150 ESD steps at the same lr and inversions
    # with the toy attack budget (300 steps, batch 16, lr 0.08); images sampled as the world samples.
    presets={"toy": {**TOY_TRAINING, "ste_iterations": 150, "ste_lr": 1e-4, "inversion_steps": 300,
                     "inversion_batch": 16, "inversion_lr": 0.08, "image_steps": 25, "image_guidance": 5.0}},
)
