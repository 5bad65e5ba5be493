"""Bi-Erasing: "A Bidirectional Framework for Concept Removal in Diffusion Models" (Chen, Li and
Wang, arXiv 2025); DESIGN 2.2.

Co-Erasing's negative branch (concept images with the concept's text, pushed away) and a
positive branch (images of the anchor with the anchor's text, pulled towards), weighted
w_n = 0.6 and w_p = 0.4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.concepts import ConceptSet
from engine.finetune.config import TOY_TRAINING, check_numbers
from engine.finetune.images import generate_images
from engine.kernels import guidance_loss
from engine.methods.co_erasing import CoErasingConfig, CoErasingObjective, ImageBranchMethod


@dataclass(frozen=True)
class BiErasingConfig(CoErasingConfig):
    """Bi-Erasing's settings: Co-Erasing's and the two branches' weights."""

    negative_weight: float = 0.6  # w_n
    positive_weight: float = 0.4  # w_p
    positive_first: bool = False  # the first half of the steps trains the positive branch only

    def __post_init__(self):
        super().__post_init__()
        check_numbers(self, ("negative_weight", "positive_weight"))


class BiErasingObjective(CoErasingObjective):
    """Bi-Erasing (DESIGN 2.2): the negative branch (concept images with the concept's text,
    pushed away: Co-Erasing's loss) and the positive branch (images of the anchor, generated
    from the anchor prompt, with the anchor's text, pulled towards: target u_p + eta (e_p - u_p)),
    L = w_n L_neg + w_p L_pos, both at the same cached x_t. ``positive_first`` trains the
    positive branch alone for the first half of the steps."""

    name = "bi-erasing"

    def __init__(self, pipe, concepts: ConceptSet, cfg: BiErasingConfig, cache: dict | None):
        missing = [c.name for c in concepts.concepts if not c.anchor]
        if missing:
            raise ValueError(f"bi-erasing needs an anchor (the safe alternative of its positive branch) for every "
                             f"concept; none for {missing[:5]} (set --anchor or the concept's anchor)")
        super().__init__(pipe, concepts, cfg, cache)

    def _images(self, pipe) -> dict[str, list]:
        cfg, items = self.cfg, self.prompts.items
        out = super()._images(pipe)
        generated = generate_images(pipe, [tgt for _, _, tgt in items], cfg.concept_images, cfg.image_guidance,
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


BI_ERASING = ImageBranchMethod(
    name="bi-erasing",
    defaults=BiErasingConfig(),
    summary="Bi-Erasing: negative and positive image branches through an IP-Adapter (Chen et al., 2025)",
    objective=BiErasingObjective,
    presets={"toy": {**TOY_TRAINING, "params": "xattn", "lr": 3e-4, "concept_images": 8}},  # as co-erasing's
)
