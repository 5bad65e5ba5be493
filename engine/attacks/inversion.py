"""Concept inversion: learn token embeddings that make a model draw a concept again.

Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image Generative Models"
(ICLR 2024) showed that textual inversion (Gal et al., 2023) on an erased model recovers the
concept for seven erasure methods: the erasure cut the path from the concept's words, not the
knowledge. Their recipe (the diffusers textual-inversion script as they ran it,
``train.sh`` in their repository): one new token initialised from a class word ("person" for
people), 25 images of the concept, AdamW on that token's embedding only, learning rate 5e-3
scaled by the batch (4 images x 4 accumulation steps = 0.08), constant schedule, uniform
timesteps, 5,000 steps, prompts from a list of neutral templates ("a photo of {token}").
``InversionSettings()`` is that recipe (the 16 images of a step in one batch); budgets are
arguments, and the toy world's tables record the smaller ones they use.

The loss is the denoising loss of the ATTACKED model (text encoder and UNet frozen) on the
concept images: the learned vectors are what that model needs to reproduce the concept. The
vectors are saved in the diffusers textual-inversion format (``{token: (D,) tensor}`` in
safetensors), so ``pipe.load_textual_inversion`` reads them and the transfer attack replays
vectors learned on the original model on an edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.attacks.common import TokenTable, denoising_loss, encode_with_tokens, image_latents
from engine.progress import progress_bar
from engine.settings import Settings

# Neutral carriers for the learned token (the same list trains and generates).
TEMPLATES = ("{}", "a photo of {}", "a picture of {}", "an image of {}", "a close-up of {}", "a rendering of {}")
INIT_WORDS = {"identity": "person", "object": "object", "style": "art", "unsafe": "object"}


@dataclass(frozen=True)
class InversionSettings(Settings):
    """Concept inversion's budget and recipe (defaults: Pham et al.'s, see the module docstring)."""

    tokens: int = 1
    steps: int = 5000
    batch_size: int = 16
    lr: float = 0.08
    weight_decay: float = 0.01
    init_word: str | None = None  # default: INIT_WORDS by the concept's kind
    images: int = 25  # concept images to learn from
    seed: int = 0

    def __post_init__(self):
        for name in ("tokens", "steps", "batch_size", "images"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"inversion {name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"inversion lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


def initial_vectors(pipe, word: str, k: int) -> torch.Tensor:
    """(k, D): the embedding of ``word``'s first token, k times. A word the model never learned
    (an all-zero row, as the toy world keeps unseen tokens) falls back to the mean of the rows
    the model did learn."""
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float().cpu()
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"inversion init_word {word!r} gives no token")
    row = table[ids[0]]
    if not row.abs().sum() > 0:
        learned = table[table.abs().sum(dim=1) > 0]
        row = learned.mean(dim=0)
    return row.repeat(k, 1).clone()


def learn_tokens(pipe, images: np.ndarray, settings: InversionSettings, kind: str | None = None,
                 progress: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Learn ``settings.tokens`` vectors on ``images`` (uint8 N x H x W x 3) with ``pipe`` frozen;
    returns the (k, D) float32 vectors and the loss of every step."""
    if len(images) == 0:
        raise ValueError("concept inversion needs at least one image of the concept")
    word = settings.init_word or INIT_WORDS.get(kind, "object")
    vectors = torch.nn.Parameter(initial_vectors(pipe, word, settings.tokens))
    table = TokenTable(pipe, vectors)
    latents = image_latents(pipe, images)
    opt = torch.optim.AdamW([vectors], lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed)
    frozen = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses = []
    try:
        bar = progress_bar(range(settings.steps), progress=progress, desc="concept inversion")
        for _ in bar:
            pick = torch.randint(len(latents), (settings.batch_size,), generator=gen)
            which = torch.randint(len(TEMPLATES), (settings.batch_size,), generator=gen).tolist()
            prompts = [TEMPLATES[w].format(table.phrase) for w in which]
            t = torch.randint(pipe.scheduler.config.num_train_timesteps, (settings.batch_size,), generator=gen)
            noise = torch.randn(latents[pick].shape, generator=gen)
            device = pipe.unet.device
            loss = denoising_loss(pipe, latents[pick].to(device), encode_with_tokens(pipe, prompts, table),
                                  t.to(device), noise.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return vectors.detach().clone(), losses


def attack_prompts(table: TokenTable, n: int) -> list[str]:
    """``n`` generation prompts carrying the learned tokens, cycling through the templates."""
    return [TEMPLATES[i % len(TEMPLATES)].format(table.phrase) for i in range(n)]


def save_tokens(path: str | Path, vectors: torch.Tensor) -> Path:
    """The vectors in the diffusers textual-inversion format: {"<attack-i>": (D,) tensor}."""
    from safetensors.torch import save_file

    from engine.attacks.common import PLACEHOLDER

    path = Path(path)
    save_file({PLACEHOLDER.format(i): v.contiguous().float() for i, v in enumerate(vectors)}, str(path))
    return path


def load_tokens(path: str | Path, width: int) -> torch.Tensor:
    """(k, D) vectors from a file ``save_tokens`` wrote (or any diffusers textual-inversion
    safetensors of ``width``-wide vectors), in token order; never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: learned tokens are read from .safetensors only (pickles are refused)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    rows = []
    for name in sorted(tensors):
        v = tensors[name]
        v = v.reshape(-1, v.shape[-1]) if v.dim() else v
        if v.dim() != 2 or v.shape[-1] != width or not torch.isfinite(v).all():
            raise ValueError(f"{path}: token {name!r} is {tuple(tensors[name].shape)}, expected finite ({width},) vectors")
        rows.append(v.float())
    if not rows:
        raise ValueError(f"{path}: holds no token vectors")
    return torch.cat(rows)
