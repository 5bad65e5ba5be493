"""Train the toy world from a seed: ``erasure toyworld build --out DIR``.

Stages, in order; each writes its result under ``DIR/.stages/<stage>/`` when it finishes, so a
rerun of the same command skips finished stages (an interrupted build loses only the stage it was
in), and the world folder itself is assembled atomically at the end:

1. ``data``: render the training set (``make_dataset``), kept in memory as uint8 images and captions.
2. ``clip``: a small CLIP (text tower with the genuine CLIP BPE tokenizer, 32x32 vision tower)
   trained contrastively on render/caption pairs. Pairs showing the same concepts count as
   positives (a batch often holds two images of one identity); each image is also classified
   against the text embeddings of every concept of each kind it shows, zero-shot style.
3. ``vae``: an ``AutoencoderKL`` with 4x downsampling (32x32x3 -> 8x8x4 latents), trained for
   reconstruction with SD's tiny KL weight; ``scaling_factor`` set to 1 / std of the latents.
4. ``unet``: a ``UNet2DConditionModel`` on the 8x8 latents, conditioned on the frozen text
   encoder's 77 hidden states, epsilon prediction, SD's scaled-linear schedule, min-SNR-5 loss
   weights, 10% empty captions for classifier-free guidance, EMA weights.
5. ``ip_adapter``: a standard IP-Adapter (``ImageProjection`` to 4 tokens, decoupled
   ``to_k_ip``/``to_v_ip``) trained with the UNet frozen, in the file format
   ``pipe.load_ip_adapter`` reads.
6. ``evaluator``: the render-trained classifier (``engine.toyworld.evaluator``).

Then ``world.json`` (settings, versions, the sha256 of every file) and the model card are written.
The quality gates are measured afterwards by ``engine.evaluation.gates`` with the toy suite.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.toyworld import render as rnd
from engine.toyworld.catalogue import V1_IDENTITIES
from engine.toyworld.world import IP_ADAPTER_WEIGHTS

# ----------------------------------------------------------------------------- configurations

TOY_TEXT = {  # CLIP text tower: genuine 49,408-token vocabulary (19 MB of the world at width 96)
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_size": 96,
    "intermediate_size": 384,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "hidden_act": "quick_gelu",
    "projection_dim": 128,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "layer_norm_eps": 1e-5,
}
TOY_VISION = {  # CLIP vision tower for 32x32 images: 4x4 patches of 8x8 pixels
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "hidden_act": "quick_gelu",
    "projection_dim": 128,
    "layer_norm_eps": 1e-5,
}
TOY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 32,
}


def text_config(width: int) -> dict:
    """The text tower at ``width``: ``TOY_TEXT`` at 96; wider towers keep its 4 layers and
    64-wide heads, with a 2x MLP (SD1.5's width, 768, gives the closed-form edits its geometry)."""
    if width == TOY_TEXT["hidden_size"]:
        return dict(TOY_TEXT)
    if width % 64:
        raise ValueError(f"text width must be 96 or a multiple of 64, got {width}")
    return {**TOY_TEXT, "hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": width // 64}


def unet_config(cross_attention_dim: int) -> dict:
    """``TOY_UNET`` reading text states of width ``cross_attention_dim``."""
    return {**TOY_UNET, "cross_attention_dim": cross_attention_dim}


TOY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": TOY_TEXT["hidden_size"],
    "attention_head_dim": 4,  # diffusers reads this as the number of heads for these blocks
    "norm_num_groups": 32,
}
# SD1's noise schedule; DDIM for sampling (what ESD and the evaluation use).
TOY_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IP_TOKENS = 4  # the standard IP-Adapter's number of image tokens
IP_PLUS_HIDDEN = 128  # IP-Adapter Plus resampler width (2 heads of 64, the head size diffusers' loader assumes)
IP_ALIGN_BATCH = 128
IP_ALIGN_CE = 0.1  # weight of the name-retrieval term of the alignment
IP_ALIGN_TAU = 0.05  # its temperature, relative to the mean squared distance between two names' states


@dataclass
class BuildConfig:
    """Sizes and step counts of a build. The defaults fit in 90 minutes on 2 CPU cores."""

    seed: int = 0
    n_images: int = 80_000
    evaluator_train: int = 60_000
    clip_steps: int = 1000
    clip_batch: int = 128
    clip_lr: float = 5e-4
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_ema: float = 0.999
    text_layers: int = 2  # last text-tower layers trained with the UNet
    text_lr_scale: float = 0.3  # their learning rate, relative to the UNet's
    uncond_prob: float = 0.1
    ip_steps: int = 400
    ip_batch: int = 64
    ip_lr: float = 1e-3
    ip_queries: int = 0  # image tokens of an IP-Adapter Plus projection (0: the plain 4-token IP-Adapter)
    ip_align_steps: int = 0  # Plus only: steps aligning image tokens with text states before diffusion training
    sampling_steps: int = 25
    guidance: float = 5.0
    identities: int = V1_IDENTITIES  # catalogue identities the world learns (catalogue.set_identity_count)
    text_width: int = 96  # the text tower's hidden size, read by the UNet's cross-attention
    generic_captions: float = 0.0  # share of captions naming the subject generically ("a person")
    checkpoint_every: int = 500  # CLIP and UNet steps between resumable checkpoints (0: none)
    clip_phrases: int = 0  # concept phrases per kind per CLIP step beyond the batch's own (0: all)
    store_fp16: bool = False  # write the pipeline and IP-Adapter weights in fp16 (loaded back as fp32)
    clip_looks: float = 0.0  # weight of the CLIP term reading a named identity's look from its [EoT] state

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name in ("seed",):
                continue
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"BuildConfig.{name} must be a non-negative number, got {value!r}")
        if not 0 <= self.uncond_prob < 1 or not 0 < self.unet_ema < 1:
            raise ValueError("BuildConfig: uncond_prob must be in [0, 1) and unet_ema in (0, 1)")
        if self.generic_captions > 1:
            raise ValueError(f"BuildConfig.generic_captions must be in [0, 1], got {self.generic_captions}")
        text_config(self.text_width)  # refuses a width the tower cannot have

    @classmethod
    def quick(cls, seed: int = 0, world: str = "v1") -> "BuildConfig":
        """A build of a few steps per stage, to test the machinery (the models learn little)."""
        return cls(**{**WORLDS[world], "seed": seed, "n_images": 512, "evaluator_train": 512, "clip_steps": 3,
                      "clip_batch": 32, "vae_steps": 3, "vae_batch": 16, "unet_steps": 3, "unet_batch": 16,
                      "ip_steps": 3, "ip_batch": 16, "ip_align_steps": min(3, WORLDS[world].get("ip_align_steps", 0)),
                      "sampling_steps": 4})

    @classmethod
    def for_world(cls, world: str, seed: int = 0) -> "BuildConfig":
        """The full build of a world in ``WORLDS``."""
        if world not in WORLDS:
            raise ValueError(f"unknown world {world!r}; worlds: {', '.join(WORLDS)}")
        return cls(**{**WORLDS[world], "seed": seed})


# The worlds `erasure toyworld build --world` knows; fields not named keep BuildConfig's defaults.
# v2: SD1.5's text width, 432 identities (hundreds to erase, hundreds never listed) and generic
# captions, so anchors such as "a person" draw their class.
WORLDS: dict[str, dict] = {
    "v1": {},
    "v2": {"identities": 432, "text_width": 768, "text_layers": 0, "generic_captions": 0.1, "n_images": 120_000,
           "unet_steps": 5000, "clip_phrases": 32, "ip_queries": 16, "ip_align_steps": 1500, "ip_steps": 1600,
           "store_fp16": True, "clip_looks": 1.0, "evaluator_train": 90_000},
}


def _bar(total, desc, progress):
    from engine.progress import progress_bar

    return progress_bar(total=total, desc=desc, progress=progress, dynamic_ncols=True)


def _train_step(opt, loss, bar, losses: list, value: float | None = None, name: str = "loss", window: int = 100,
                clip=None) -> None:
    """One optimizer step on ``loss`` (gradient norm clipped to 1 over the tensors ``clip``), then
    ``value`` (default: the loss) recorded and its recent mean shown on the progress bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    losses.append(loss.item() if value is None else value)
    bar.set_postfix({name: f"{np.mean(losses[-window:]):.4g}"})
    bar.update()


def _lr_at(step, total, peak, warmup=100):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x 32 x 32 x 3 -> float N x 3 x 32 x 32 in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def clip_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """What the world's ``CLIPImageProcessor`` gives for 32x32 uint8 images (no resize, no crop):
    N x 3 x 32 x 32, scaled to [0, 1] and normalised with CLIP's mean and std."""
    x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _tokenize(tokenizer, captions, pad_to_max: bool):
    out = tokenizer(
        list(captions), padding="max_length" if pad_to_max else True,
        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
    )
    return out.input_ids


# ----------------------------------------------------------------------------- stages


def stage_data(cfg: BuildConfig, progress: bool) -> dict:
    """Render the shared training set."""
    data = rnd.make_dataset(cfg.n_images, seed=cfg.seed, generic_captions=cfg.generic_captions)
    label_keys = [json.dumps(lbl, sort_keys=True) for lbl in data["labels"]]
    return {"images": data["images"], "captions": data["captions"], "labels": data["labels"],
            "label_keys": label_keys}


def stage_evaluator(cfg: BuildConfig, out: Path, progress: bool) -> dict:
    from engine.toyworld.evaluator import train_evaluator

    kwargs = {"n_train": cfg.evaluator_train, "seed": cfg.seed, "progress": progress}
    if cfg.evaluator_train < 5000:  # the quick build: a token run
        kwargs.update(n_heldout=256, epochs=1)
    model, metrics = train_evaluator(**kwargs)
    model.save(out)
    return metrics


def _clip_loss(logits: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
    """Symmetric contrastive loss; rows with the same label key are all positives."""
    same = torch.from_numpy(keys[:, None] == keys[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean())


def concept_phrase(kind: str, name: str) -> str:
    """How captions name a concept on its own ("a star", "sepia style", ...)."""
    return {"identity": "{}", "object": "a {}", "colour": "{}", "background": "a {} background",
            "style": "{} style", "unsafe": "a {}"}[kind].format(name)


def _concept_targets(labels: list[dict]) -> dict[str, torch.Tensor]:
    """Per kind, each image's concept index in ``catalogue.concepts(kind)`` (-100: not shown)."""
    from engine.toyworld import catalogue as cat

    out = {}
    for kind in cat.KINDS:
        index = {name: i for i, name in enumerate(cat.concepts(kind))}
        out[kind] = torch.tensor([index.get(lbl.get(kind), -100) for lbl in labels])
    return out


# Over 60 lines: one training loop, its two losses and its resumable state, read top to bottom.
def stage_clip(cfg: BuildConfig, data: dict, out: Path, progress: bool, checkpoint: Path | None = None) -> dict:
    """Contrastive CLIP; saves the full ``CLIPModel`` (split into pipeline parts at assembly).

    Besides the caption/image contrastive loss, each image is classified against the text
    embeddings of every concept of each kind it shows ("a star", "a moon", ...; cross-entropy,
    as zero-shot CLIP classifies). Captions alone rarely need the object's shape to tell a batch
    apart (colour and background usually suffice), so without this term the text tower learns
    colours and names but not shapes, and the UNet conditioned on it cannot draw them. With
    ``clip_looks``, a named identity's look is also read from its caption's [EoT] state
    (``_look_loss``).

    ``checkpoint``: a folder for the resumable training state, saved every ``checkpoint_every``
    steps and continued from when present (as in ``stage_unet``).
    """
    from engine.toyworld import catalogue as cat
    from transformers import CLIPConfig, CLIPModel

    from engine.tokenizer import build_clip_tokenizer

    torch.manual_seed(cfg.seed + 1)
    tokenizer = build_clip_tokenizer()
    model = CLIPModel(CLIPConfig(text_config=text_config(cfg.text_width), vision_config=TOY_VISION, projection_dim=128))
    phrases = [concept_phrase(kind, name) for kind in cat.KINDS for name in cat.concepts(kind)]
    phrase_ids = _tokenize(tokenizer, phrases, pad_to_max=False)
    seen_ids = seen_token_ids(tokenizer, data["captions"], phrase_ids)
    seen = zero_unseen_token_embeddings(model.text_model.embeddings.token_embedding, seen_ids)
    params = list(model.parameters())
    if cfg.clip_looks:
        look_head = torch.nn.Linear(model.config.text_config.hidden_size, sum(_look_sizes()))
        look_targets = _look_targets(data["captions"], data["labels"])
        params += list(look_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.clip_lr, weight_decay=0.05)
    rng = np.random.default_rng(cfg.seed + 2)
    n = len(data["captions"])
    keys = np.array(data["label_keys"])
    targets = _concept_targets(data["labels"])
    spans, start = {}, 0
    for kind in cat.KINDS:
        spans[kind] = slice(start, start + len(cat.concepts(kind)))
        start = spans[kind].stop
    model.train()
    losses, first = [], 0
    if checkpoint is not None and (checkpoint / _CHECKPOINT_STATE).is_file():
        first = _load_training_state(checkpoint, params, None, opt, rng, None, losses, [])
    with _bar(cfg.clip_steps, "clip", progress) as bar:
        bar.update(first)
        for step in range(first, cfg.clip_steps):
            idx = rng.choice(n, size=min(cfg.clip_batch, n), replace=False)
            ids = _tokenize(tokenizer, [data["captions"][i] for i in idx], pad_to_max=False)
            pixels = clip_pixels(data["images"][idx])
            _set_lr(opt, _lr_at(step, cfg.clip_steps, cfg.clip_lr))
            outputs = model(input_ids=ids, pixel_values=pixels)
            # logits_per_image: B x B, scaled by the learned temperature
            loss = _clip_loss(outputs.logits_per_image, keys[idx])
            if cfg.clip_looks:
                eot = (ids == tokenizer.eos_token_id).int().argmax(-1)  # the first [EoT] of each caption
                eot_states = outputs.text_model_output.last_hidden_state[torch.arange(len(ids)), eot]
                loss = loss + cfg.clip_looks * _look_loss(look_head, eot_states, look_targets[idx])
            image_embeds = outputs.image_embeds  # already normalised
            idx_t = torch.from_numpy(idx)
            rows, kind_targets = _phrase_rows(spans, {k: targets[k][idx_t] for k in cat.KINDS}, cfg.clip_phrases, rng)
            phrase_embeds = F.normalize(model.get_text_features(input_ids=phrase_ids[rows]).pooler_output, dim=-1)
            scale = model.logit_scale.exp()
            start = 0
            for kind in cat.KINDS:
                count = len(kind_targets[kind][1])
                kind_logits = scale * image_embeds @ phrase_embeds[start : start + count].t()
                start += count
                kind_target = kind_targets[kind][0]
                if (kind_target >= 0).any():
                    loss = loss + F.cross_entropy(kind_logits, kind_target, ignore_index=-100) / len(cat.KINDS)
            _train_step(opt, loss, bar, losses, window=50)
            done = step + 1
            if checkpoint is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.clip_steps:
                _save_training_state(checkpoint, done, params, None, opt, rng, None, losses, [])
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return {"final_loss": float(np.mean(losses[-100:])), "seen_tokens": seen}


def _look_sizes() -> list[int]:
    from engine.toyworld import catalogue as cat

    return [len(cat.attribute_values(a)) for a in cat.IDENTITY_ATTRIBUTES]


def _look_targets(captions: list[str], labels: list[dict]) -> torch.Tensor:
    """n x attributes: each image's identity attribute indices where its caption names the
    identity (-100 elsewhere: other kinds, and generic captions such as "a person")."""
    from engine.toyworld import catalogue as cat

    out = torch.full((len(captions), len(cat.IDENTITY_ATTRIBUTES)), -100, dtype=torch.long)
    for i, (caption, label) in enumerate(zip(captions, labels)):
        name = label.get("identity")
        if name is not None and name in caption:
            person = cat.identity(name)
            out[i] = torch.tensor([cat.attribute_values(a).index(getattr(person, a)) for a in cat.IDENTITY_ATTRIBUTES])
    return out


def _look_loss(head: torch.nn.Linear, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each identity attribute read linearly from the [EoT] ``states``.

    Contrastive training separates the names but may keep what tells them apart in directions
    of small variance, which the UNet's cross-attention then learns to read only slowly (a frozen
    768-wide tower left it drawing the wrong hair and accessories). Reading the look linearly
    from the state puts it in directions of its own."""
    named = targets[:, 0] >= 0
    if not named.any():
        return states.sum() * 0.0
    logits = head(states[named]).split(_look_sizes(), dim=1)
    return sum(F.cross_entropy(lg, targets[named, j]) for j, lg in enumerate(logits)) / len(logits)


def _phrase_rows(spans: dict, targets: dict, per_kind: int, rng) -> tuple[torch.Tensor, dict]:
    """Which concept phrases one CLIP step classifies against, per kind: all of them
    (``per_kind`` 0), or the batch's own concepts plus ``per_kind`` random others (a wide text
    tower spends most of a step on 400+ identity phrases otherwise). Returns the phrase rows and,
    per kind, the batch's targets re-indexed into the kept phrases and the kept concept indices."""
    rows, out = [], {}
    for kind, span in spans.items():
        target = targets[kind]
        count = span.stop - span.start
        if per_kind and count > per_kind:
            own = torch.unique(target[target >= 0]).numpy()
            others = np.setdiff1d(np.arange(count), own)
            keep = np.concatenate([own, rng.choice(others, size=min(per_kind, len(others)), replace=False)])
        else:
            keep = np.arange(count)
        position = torch.full((count,), -100, dtype=torch.long)
        position[torch.from_numpy(keep)] = torch.arange(len(keep))
        out[kind] = (torch.where(target >= 0, position[target.clamp(min=0)], target), keep)
        rows.append(torch.from_numpy(keep) + span.start)
    return torch.cat(rows), out


def seen_token_ids(tokenizer, captions: list[str], phrase_ids: torch.Tensor) -> torch.Tensor:
    """Every token id any stage feeds the text tower: the training captions (padded, so BOS, EOS
    and the pad token are in; the empty caption is too) and the concept phrases."""
    caption_ids = _tokenize(tokenizer, sorted(set(captions) | {""}), pad_to_max=True)
    return torch.unique(torch.cat([caption_ids.flatten(), phrase_ids.flatten()]))


def zero_unseen_token_embeddings(embedding: torch.nn.Embedding, seen: torch.Tensor) -> int:
    """Zero the token ``embedding`` of every token outside ``seen``; returns how many are seen.

    A token no training caption contains gets no gradient and would keep its random initial
    embedding for good; an unfamiliar word in a prompt ("an image of ...") then pushes every
    later token (causal attention) in an arbitrary direction and the UNet draws the wrong thing.
    At zero such a word stays neutral (AdamW's decay and zero gradients keep it there), so a
    prompt reads as its familiar words. Seen tokens are untouched: training is otherwise the same.
    """
    weight = embedding.weight
    unseen = torch.ones(weight.shape[0], dtype=torch.bool)
    unseen[seen] = False
    with torch.no_grad():
        weight[unseen] = 0.0
    return int(weight.shape[0] - unseen.sum())


def stage_vae(cfg: BuildConfig, data: dict, out: Path, progress: bool) -> dict:
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed + 3)
    vae = AutoencoderKL(**TOY_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed + 4)
    n = len(data["images"])
    vae.train()
    losses = []
    with _bar(cfg.vae_steps, "vae", progress) as bar:
        for step in range(cfg.vae_steps):
            x = images_to_tensor(data["images"][rng.choice(n, size=min(cfg.vae_batch, n), replace=False)])
            _set_lr(opt, _lr_at(step, cfg.vae_steps, cfg.vae_lr))
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            # L1 keeps small, sharp features (eyes, stripes); SD's KL weight keeps latents tame.
            rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
            loss = rec + 1e-6 * posterior.kl().mean()
            _train_step(opt, loss, bar, losses, value=rec.item(), name="rec", window=50)
    vae.eval()
    # scaling_factor: unit variance latents, as SD's 0.18215 does for its VAE.
    with torch.no_grad():
        sample = images_to_tensor(data["images"][: min(2048, n)])
        std = torch.cat([vae.encode(b).latent_dist.mean for b in sample.split(256)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out, safe_serialization=True)
    return {"final_reconstruction_loss": float(np.mean(losses[-100:])), "scaling_factor": 1.0 / std}


def _encode_latents(vae, images: np.ndarray, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (sampled anew each step, as SD training does)."""
    means, stds = [], []
    with torch.no_grad(), _bar(len(images), "encode latents", progress) as bar:
        for start in range(0, len(images), 512):
            dist = vae.encode(images_to_tensor(images[start : start + 512])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            bar.update(min(512, len(images) - start))
    return torch.cat(means), torch.cat(stds)


class _TextCache:
    """The frozen text encoder's 77 hidden states per caption, computed once per caption."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer, self.cache = text_encoder, tokenizer, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            ids = _tokenize(self.tokenizer, missing, pad_to_max=True)
            states = self.text_encoder(ids)[0]  # M x 77 x D
            for c, s in zip(missing, states.to(torch.float16)):  # fp16 halves the cache
                self.cache[c] = s
        return torch.stack([self.cache[c] for c in captions]).float()


def _text_encoder_from_clip(clip_dir: Path):
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(clip_dir, use_safetensors=True)
    text = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattens CLIPTextModel (no .text_model); its keys are CLIPModel.text_model's.
    text.load_state_dict(clip.text_model.state_dict())
    return text.eval(), clip


def _noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in TOY_SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")})


def _diffusion_batch(latent_mean, latent_std, scaling, idx, scheduler, gen):
    """Noisy latents, noise and timesteps for one batch of training images."""
    z = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling
    noise = torch.randn(z.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
    return scheduler.add_noise(z, noise, t), noise, t


def min_snr_weight(scheduler, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction, min(SNR, gamma) / SNR: the many
    nearly noise-free timesteps stop dominating the gradient, which speeds training up
    several-fold (Hang et al., 2023)."""
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def _token_ids(tokenizer, cache: dict, captions: list[str]) -> torch.Tensor:
    missing = sorted({c for c in captions if c not in cache})
    if missing:
        cache.update(zip(missing, _tokenize(tokenizer, missing, pad_to_max=True)))
    return torch.stack([cache[c] for c in captions])


# Over 60 lines: one training loop and the state its steps share.
def stage_unet(cfg: BuildConfig, data: dict, clip_dir: Path, vae_dir: Path, out: Path, progress: bool,
               checkpoint: Path | None = None) -> dict:
    """The UNet, trained together with the text tower's last ``text_layers`` layers (and final
    layer norm and projection): the contrastive CLIP names every identity apart, but its
    per-token states are not what a generator needs, and a frozen tower left the UNet mixing
    identities up. A contrastive term on the batch (frozen vision tower) keeps text and images
    aligned for the CLIP score and the IP-Adapter. With ``text_layers=0`` the tower stays frozen
    and each caption's states are computed once (a wide tower costs more than the UNet).
    Saves the UNet (EMA) in ``out`` and, if text layers were tuned, the CLIP (EMA text layers) in ``out/clip``.

    ``checkpoint``: a folder where the training state is saved every ``checkpoint_every`` steps
    and resumed from, so a killed build loses at most that many steps.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from engine.tokenizer import build_clip_tokenizer

    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_dir, use_safetensors=True)
    clip.requires_grad_(False)
    text_encoder = clip.text_model  # trained in place, so clip.save_pretrained keeps the changes
    vision = _vision_encoder_from_clip(clip).requires_grad_(False)
    tokenizer, token_cache = build_clip_tokenizer(), {}
    if cfg.text_layers:
        layers = text_encoder.encoder.layers
        tuned = [text_encoder.final_layer_norm, clip.text_projection, *layers[len(layers) - cfg.text_layers :]]
        for module in tuned:
            module.requires_grad_(True)
        text_params = [p for m in tuned for p in m.parameters()]
    else:
        text_params, frozen_states = [], _TextCache(text_encoder.eval(), tokenizer)
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval()
    latent_mean, latent_std = _encode_latents(vae, data["images"], progress)
    scaling = vae.config.scaling_factor
    keys = np.array(data["label_keys"])
    scheduler = _noise_scheduler()
    torch.manual_seed(cfg.seed + 5)
    unet = UNet2DConditionModel(**unet_config(cfg.text_width))
    trained = list(unet.parameters()) + text_params
    ema = [p.detach().clone() for p in trained]
    groups = [{"params": list(unet.parameters()), "lr_scale": 1.0}]
    if text_params:
        groups.append({"params": text_params, "lr_scale": cfg.text_lr_scale})
    opt = torch.optim.AdamW(groups, lr=cfg.unet_lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed + 6)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    n = len(data["captions"])
    losses, clip_losses, first = [], [], 0
    if checkpoint is not None and (checkpoint / _CHECKPOINT_STATE).is_file():
        first = _load_training_state(checkpoint, trained, ema, opt, rng, gen, losses, clip_losses)
    unet.train()
    with _bar(cfg.unet_steps, "unet", progress) as bar:
        bar.update(first)
        for step in range(first, cfg.unet_steps):
            idx = torch.from_numpy(rng.choice(n, size=min(cfg.unet_batch, n), replace=False))
            keep = rng.random(len(idx)) >= cfg.uncond_prob
            captions = [data["captions"][i] if k else "" for i, k in zip(idx.tolist(), keep)]
            noisy, noise, t = _diffusion_batch(latent_mean, latent_std, scaling, idx, scheduler, gen)
            if text_params:
                text_out = text_encoder(_token_ids(tokenizer, token_cache, captions))
                states = text_out.last_hidden_state
            else:
                states = frozen_states(captions)
            lr = _lr_at(step, cfg.unet_steps, cfg.unet_lr, warmup=200)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            per_sample = (unet(noisy, t, states).sample - noise).pow(2).mean((1, 2, 3))
            loss = (min_snr_weight(scheduler, t) * per_sample).mean()
            rows = np.flatnonzero(keep)[: cfg.clip_batch // 4]
            if text_params and len(rows) > 1:
                with torch.no_grad():
                    image_embeds = vision(pixel_values=clip_pixels(data["images"][idx[rows].numpy()])).image_embeds
                text_embeds = clip.text_projection(text_out.pooler_output[torch.from_numpy(rows)])
                logits = clip.logit_scale.exp().detach() * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()
                clip_term = _clip_loss(logits, keys[idx[rows].numpy()])
                loss = loss + 0.1 * clip_term
                clip_losses.append(clip_term.item())
            _train_step(opt, loss, bar, losses, clip=trained)
            # EMA warms up (short runs would otherwise keep mostly the random init).
            decay = min(cfg.unet_ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema, trained):
                    p_ema.lerp_(p, 1 - decay)
            done = step + 1
            if checkpoint is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.unet_steps:
                _save_training_state(checkpoint, done, trained, ema, opt, rng, gen, losses, clip_losses)
    with torch.no_grad():
        for p_ema, p in zip(ema, trained):
            p.copy_(p_ema)
    unet.eval().save_pretrained(out, safe_serialization=True)
    if cfg.text_layers:  # the CLIP with the tuned text layers (text_encoder shares its modules with clip.text_model)
        clip.save_pretrained(out / "clip", safe_serialization=True)
    return {"final_loss": float(np.mean(losses[-200:])), "final_clip_loss": float(np.mean(clip_losses[-200:] or [0.0])),
            "text_layers_tuned": cfg.text_layers, "resumed_at_step": first}


_CHECKPOINT_STATE = "state.json"
_CHECKPOINT_TENSORS = "tensors.safetensors"


def _save_training_state(folder: Path, step: int, params: list, ema: list | None, opt, rng, gen, losses,
                         clip_losses) -> None:
    """Parameters, EMA (if any), AdamW moments, random states (``gen`` may be None) and loss
    history after ``step`` steps, in safetensors and JSON (nothing pickled); written to a
    temporary folder, then swapped in."""
    from safetensors.torch import save_file

    tensors = {}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach()
        if ema is not None:
            tensors[f"ema.{i}"] = ema[i]
        for name, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / _CHECKPOINT_TENSORS))
    state = {"step": step, "numpy_rng": rng.bit_generator.state,
             "torch_rng": gen.get_state().tolist() if gen is not None else None,
             "losses": losses, "clip_losses": clip_losses}
    (tmp / _CHECKPOINT_STATE).write_text(json.dumps(state))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _load_training_state(folder: Path, params: list, ema: list | None, opt, rng, gen, losses, clip_losses) -> int:
    """Restore what ``_save_training_state`` wrote; returns the step to continue from."""
    from safetensors.torch import load_file

    state = json.loads((folder / _CHECKPOINT_STATE).read_text())
    tensors = load_file(str(folder / _CHECKPOINT_TENSORS))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
            if ema is not None:
                ema[i].copy_(tensors[f"ema.{i}"])
            moments = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if moments:
                opt.state[p] = moments
    rng.bit_generator.state = state["numpy_rng"]
    if gen is not None:
        gen.set_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    losses[:], clip_losses[:] = state["losses"], state["clip_losses"]
    return int(state["step"])


def _vision_encoder_from_clip(clip):
    from transformers import CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection(clip.config.vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return vision.eval()


def ip_adapter_state_dict(unet) -> dict[str, torch.Tensor]:
    """A UNet's loaded IP-Adapter in ``load_ip_adapter``'s file layout: ``image_proj.*`` (the plain
    projection's, or an IP-Adapter Plus resampler's in the released Plus files' key names) and
    ``ip_adapter.<k>.to_{k,v}_ip.weight``, k = 1, 3, 5, ... over cross-attention processors in
    ``unet.attn_processors`` order (the numbering diffusers' loader expects)."""
    from diffusers.models.embeddings import ImageProjection

    proj = unet.encoder_hid_proj.image_projection_layers[0]
    if isinstance(proj, ImageProjection):
        image_proj = {
            "proj.weight": proj.image_embeds.weight,
            "proj.bias": proj.image_embeds.bias,
            "norm.weight": proj.norm.weight,
            "norm.bias": proj.norm.bias,
        }
    else:
        image_proj = plus_projection_file_layout(proj.state_dict())
    out = {f"image_proj.{k}": v for k, v in image_proj.items()}
    key_id = 1
    for name, processor in unet.attn_processors.items():
        if not hasattr(processor, "to_k_ip"):  # self-attention, or attention inside the projection
            continue
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = processor.to_v_ip[0].weight
        key_id += 2
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def plus_projection_file_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``IPAdapterPlusImageProjection`` state dict under the released IP-Adapter Plus files'
    names (the inverse of the renaming diffusers' loader applies): per layer ``i``, attention
    ``layers.i.0.{norm1,norm2,to_q,to_kv,to_out}`` (keys and values stacked in ``to_kv``) and
    feed-forward ``layers.i.1.{0,1,3}``."""
    renames = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out",
               "ff.0": "1.0", "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}
    out = {}
    for key, value in state.items():
        if not key.startswith("layers."):
            out[key] = value
            continue
        _, layer, rest = key.split(".", 2)
        if rest.startswith("attn.to_k."):
            out[f"layers.{layer}.0.to_kv.weight"] = torch.cat([value, state[f"layers.{layer}.attn.to_v.weight"]])
            continue
        if rest.startswith("attn.to_v."):
            continue
        module, param = rest.rsplit(".", 1)
        out[f"layers.{layer}.{renames[module]}.{param}"] = value
    return out


def _initial_ip_adapter(unet, image_proj: dict) -> dict:
    """IP-Adapter start: the given image projection (file layout); to_k_ip/to_v_ip copied from
    to_k/to_v (as IP-Adapter's training initialises them)."""
    ip = {}
    key_id = 1
    for name, module in unet.attn_processors.items():
        # Self-attention takes no image tokens; a loaded Plus projection's own attention is no UNet layer.
        if name.endswith("attn1.processor") or name.startswith("encoder_hid_proj."):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        ip[f"{key_id}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        ip[f"{key_id}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip}


def _plain_image_projection(cross: int, image_dim: int, seed: int) -> dict:
    """A random plain IP-Adapter projection (pooled image embedding -> 4 tokens), file layout."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "proj.weight": torch.randn(IP_TOKENS * cross, image_dim, generator=gen) / math.sqrt(image_dim),
        "proj.bias": torch.zeros(IP_TOKENS * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }


def plus_image_projection(image_width: int, cross: int, queries: int, seed: int):
    """A random IP-Adapter Plus projection (a resampler of ``queries`` learned tokens over the image
    encoder's penultimate hidden states) in the shape diffusers' loader rebuilds from a file."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    torch.manual_seed(seed)
    return IPAdapterPlusImageProjection(embed_dims=image_width, output_dims=cross, hidden_dims=IP_PLUS_HIDDEN,
                                        heads=IP_PLUS_HIDDEN // 64, num_queries=queries)


def image_phrase(label: dict) -> str:
    """The words naming what a training image shows, without a template: the subject and its style
    if it has one ("Ann Lee", "a red star in sepia style"); the background is left out."""
    if "identity" in label:
        subject = label["identity"]
    elif "object" in label:
        subject = concept_phrase("object", f"{label['colour']} {label['object']}" if "colour" in label else label["object"])
    else:
        subject = concept_phrase("unsafe", label["unsafe"])
    if "style" in label:
        subject = f"{subject} in {label['style']} style"
    from engine.toyworld.catalogue import with_article

    return with_article(subject)


def _image_hidden_states(vision, images: np.ndarray) -> torch.Tensor:
    """The image encoder's penultimate hidden states, as ``pipe.encode_image`` gives a Plus adapter."""
    with torch.no_grad():
        return torch.cat([vision(pixel_values=clip_pixels(images[s : s + 512]), output_hidden_states=True).hidden_states[-2]
                          for s in range(0, len(images), 512)])


def align_ip_projection(proj, hidden: torch.Tensor, zero_hidden: torch.Tensor, labels: list[dict], texts,
                        steps: int, seed: int, progress: bool) -> dict:
    """Train a Plus projection so an image's tokens read as text: MSE to the text encoder's states of
    ``image_phrase`` (its first ``num_queries`` positions), the unconditional (zero) image to the
    empty prompt's; and, for a portrait, cross-entropy over every identity by negative distance to
    its name's states (temperature ``IP_ALIGN_TAU`` times the mean distance between two names), so
    the tokens pick out the person rather than an average face. The UNet's own to_k/to_v then read
    the tokens as they read the name, which the diffusion phase refines. ``hidden``: N x 17 x C,
    one image per label; ``zero_hidden``: the unconditional image's. The last 512 portraits are
    held out for the returned retrieval accuracy."""
    from engine.toyworld import catalogue as cat

    queries = proj.latents.shape[1]
    phrases = [image_phrase(label) for label in labels]
    distinct = sorted(set(phrases))
    states = torch.cat([texts(distinct[s : s + 256])[:, :queries] for s in range(0, len(distinct), 256)])
    row_of = {p: i for i, p in enumerate(distinct)}
    phrase_row = torch.tensor([row_of[p] for p in phrases])
    names = cat.concepts("identity")
    name_states = texts(names)[:, :queries]
    name_row = {n: i for i, n in enumerate(names)}
    identity = torch.tensor([name_row[l["identity"]] if "identity" in l and "style" not in l else -100 for l in labels])
    portraits = torch.nonzero(identity >= 0).flatten()
    held_out = portraits[-512:] if len(portraits) > 1024 else portraits[:0]
    train = torch.from_numpy(np.setdiff1d(np.arange(len(labels)), held_out.numpy()))
    empty = texts([""])[:, :queries]
    flat_names = name_states.flatten(1)

    def distance(tokens):  # B x identities: mean squared distance to each name's states
        flat = tokens.flatten(1)  # |a - b|^2 by matrix product: no B x identities x D tensor
        return (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ flat_names.T + flat_names.pow(2).sum(1)) / flat.shape[1]

    tau = IP_ALIGN_TAU * float(distance(name_states).clamp(min=0).sum()) / max(1, len(names) * (len(names) - 1))

    opt = torch.optim.AdamW(proj.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    proj.train()
    with _bar(steps, "ip-adapter: align", progress) as bar:
        for step in range(steps):
            idx = train[torch.randint(0, len(train), (IP_ALIGN_BATCH,), generator=gen)]
            tokens = proj(torch.cat([hidden[idx], zero_hidden]))
            loss = F.mse_loss(tokens, torch.cat([states[phrase_row[idx]], empty]))
            rows = identity[idx] >= 0
            if rows.any():
                logits = -distance(tokens[:-1][rows]) / tau
                loss = loss + IP_ALIGN_CE * F.cross_entropy(logits, identity[idx][rows])
            _set_lr(opt, _lr_at(step, steps, 1e-3))
            _train_step(opt, loss, bar, losses)
    proj.eval()
    with torch.no_grad():
        hits = [(distance(proj(hidden[held_out[s : s + 256]])).argmin(1) == identity[held_out[s : s + 256]]).float()
                for s in range(0, len(held_out), 256)]
    return {"align_final_loss": float(np.mean(losses[-100:])) if losses else None,
            "align_heldout_name_retrieval": float(torch.cat(hits).mean()) if hits else None}


def ip_condition_drops(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``n`` IP-Adapter training samples lose their caption and which their image.

    As IP-Adapter trains, 5% lose both (the unconditional prediction that classifier-free
    guidance subtracts, with an empty prompt and a zero image) and 5% the image; 65% lose the
    caption, far more than IP-Adapter's 5%, so the image alone carries the concept (Co-Erasing's
    image branch, the image-only gate); 25% keep both.
    """
    u = rng.random(n)
    drop_text = (u < 0.05) | (u >= 0.10) & (u < 0.75)
    drop_image = u < 0.10
    return drop_text, drop_image


def stage_ip_adapter(cfg: BuildConfig, data: dict, clip_dir: Path, vae_dir: Path, unet_dir: Path, out: Path,
                     progress: bool) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    from engine.tokenizer import build_clip_tokenizer

    text_encoder, clip = _text_encoder_from_clip(clip_dir)
    vision = _vision_encoder_from_clip(clip)
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval()
    unet = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True).eval()
    metrics = train_ip_adapter(cfg, data, text_encoder, build_clip_tokenizer(), vision, vae, unet, progress)
    out.mkdir(parents=True, exist_ok=True)
    save_file(ip_adapter_state_dict(unet), str(out / IP_ADAPTER_WEIGHTS))
    return metrics


def train_ip_adapter(cfg: BuildConfig, data: dict, text_encoder, tokenizer, vision, vae, unet, progress: bool) -> dict:
    """Give ``unet`` a trained IP-Adapter (diffusers' loaded form); returns the metrics.

    Plain (``cfg.ip_queries`` 0): a 4-token projection of the pooled image embedding. Plus: a
    resampler of ``ip_queries`` tokens over the encoder's hidden states, first aligned with the text
    states of what the image shows (``align_ip_projection``, ``ip_align_steps``). Then both train
    with IP-Adapter's diffusion objective (``ip_steps``; projection and to_k_ip/to_v_ip, the UNet
    frozen) on images whose caption or image is dropped as ``ip_condition_drops`` says.
    """
    n_images = min(len(data["images"]), 40_000)
    images = data["images"][:n_images]
    texts = _TextCache(text_encoder, tokenizer)
    cross = unet.config.cross_attention_dim
    metrics = {"train_images": n_images, "kind": "plus" if cfg.ip_queries else "plain"}
    if cfg.ip_queries:
        image_embeds = _image_hidden_states(vision, images)  # N x 17 x C
        zero = _unconditional_hidden_states(vision)
        proj = plus_image_projection(image_embeds.shape[-1], cross, cfg.ip_queries, cfg.seed + 8)
        metrics.update(align_ip_projection(proj, image_embeds, zero, data["labels"][:n_images], texts,
                                           cfg.ip_align_steps, cfg.seed + 11, progress))
        image_proj = plus_projection_file_layout(proj.state_dict())
    else:
        with torch.no_grad():
            image_embeds = torch.cat([vision(pixel_values=clip_pixels(images[s : s + 512])).image_embeds
                                      for s in range(0, n_images, 512)])  # N x P
        zero = torch.zeros_like(image_embeds[:1])
        image_proj = _plain_image_projection(cross, vision.config.projection_dim, cfg.seed + 8)
    unet.requires_grad_(False)
    unet._load_ip_adapter_weights([_initial_ip_adapter(unet, image_proj)], low_cpu_mem_usage=False)
    trainable = [p for n, p in unet.named_parameters() if "encoder_hid_proj" in n or "_ip." in n]
    for p in trainable:
        p.requires_grad_(True)
    latent_mean, latent_std = _encode_latents(vae, images, progress)
    scaling = vae.config.scaling_factor
    scheduler = _noise_scheduler()
    opt = torch.optim.AdamW(trainable, lr=cfg.ip_lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed + 9)
    gen = torch.Generator().manual_seed(cfg.seed + 10)
    losses = []
    with _bar(cfg.ip_steps, "ip-adapter", progress) as bar:
        for step in range(cfg.ip_steps):
            idx = torch.from_numpy(rng.choice(n_images, size=min(cfg.ip_batch, n_images), replace=False))
            drop_text, drop_image = ip_condition_drops(rng, len(idx))
            captions = ["" if d else data["captions"][i] for i, d in zip(idx.tolist(), drop_text)]
            dropped = torch.from_numpy(drop_image).view(-1, *[1] * (image_embeds.dim() - 1))
            embeds = torch.where(dropped, zero, image_embeds[idx])  # the unconditional image where dropped
            noisy, noise, t = _diffusion_batch(latent_mean, latent_std, scaling, idx, scheduler, gen)
            _set_lr(opt, _lr_at(step, cfg.ip_steps, cfg.ip_lr))
            pred = unet(noisy, t, texts(captions), added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
            loss = F.mse_loss(pred, noise)
            _train_step(opt, loss, bar, losses)
    unet.requires_grad_(False)
    metrics["final_loss"] = float(np.mean(losses[-200:])) if losses else None
    return metrics


def _unconditional_hidden_states(vision) -> torch.Tensor:
    """What ``pipe.encode_image`` gives a Plus adapter for no image: the encoder's penultimate
    hidden states of all-zero (normalised) pixels."""
    size = vision.config.image_size
    with torch.no_grad():
        return vision(pixel_values=torch.zeros(1, 3, size, size), output_hidden_states=True).hidden_states[-2]


# ----------------------------------------------------------------------------- assembly


def assemble_pipeline(clip_dir: Path, vae_dir: Path, unet_dir: Path):
    """The world's ``StableDiffusionPipeline`` from the trained parts (with its image encoder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor

    from engine.tokenizer import build_clip_tokenizer

    text_encoder, clip = _text_encoder_from_clip(clip_dir)
    size = TOY_VISION["image_size"]
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval(),
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True).eval(),
        scheduler=DDIMScheduler(**TOY_SCHEDULER),
        safety_checker=None,
        feature_extractor=feature_extractor,
        image_encoder=_vision_encoder_from_clip(clip),
        requires_safety_checker=False,
    )
    projection = {"text_projection": clip.text_projection.weight.detach().clone(),
                  "logit_scale": clip.logit_scale.detach().clone().reshape(1)}
    return pipe, projection


def _stage_dir(out: Path, name: str) -> Path:
    return out / ".stages" / name


def _run_stage(out: Path, name: str, fn, progress: bool) -> dict:
    """Run ``fn(tmp_dir) -> metrics`` unless the stage already finished; atomic per stage."""
    done = _stage_dir(out, name)
    if (done / "stage.json").is_file():
        if progress:
            print(f"toyworld build: stage {name} already done, reusing {done}")
        return json.loads((done / "stage.json").read_text())["metrics"]
    tmp = done.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    metrics = fn(tmp)
    seconds = time.perf_counter() - start
    (tmp / "stage.json").write_text(json.dumps({"metrics": metrics, "seconds": seconds}, indent=2))
    shutil.rmtree(done, ignore_errors=True)
    os.replace(tmp, done)
    if progress:
        print(f"toyworld build: stage {name} done in {seconds:.0f} s: {json.dumps(metrics)}")
    return metrics


def build_world(out_dir: str | os.PathLike, config: BuildConfig | None = None, progress: bool = True) -> Path:
    """Train every part of the toy world and write it to ``out_dir`` (see the module docstring).

    Rerunning with the same ``out_dir`` and config resumes after the last finished stage; a
    different config is refused (remove ``out_dir/.stages`` to start over).
    """
    from engine.export import output_lock

    from engine.toyworld import catalogue as cat

    before = cat.N_IDENTITIES
    try:
        with output_lock(out_dir):  # one build at a time per folder: stages are written in place
            return _build_world(Path(out_dir), config or BuildConfig(), progress)
    finally:
        cat.set_identity_count(before)  # the caller's catalogue, as it was


# Over 60 lines: the stages in order, then one atomic write of the world.
def _build_world(out: Path, cfg: BuildConfig, progress: bool) -> Path:
    from engine.export import package_versions, sha256_tree, write_json

    if (out / "world.json").exists():
        raise FileExistsError(f"{out} already holds a toy world; choose another folder or remove it")
    stages = out / ".stages"
    stages.mkdir(parents=True, exist_ok=True)
    cfg_file = stages / "config.json"
    if cfg_file.is_file() and json.loads(cfg_file.read_text()) != asdict(cfg):
        raise ValueError(f"{stages} was started with another configuration ({cfg_file}); remove it to start over")
    cfg_file.write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    from engine.toyworld import catalogue as cat

    cat.set_identity_count(cfg.identities)

    if progress:
        print(f"toyworld build: rendering {cfg.n_images} training images")
    data = stage_data(cfg, progress)
    metrics = {"data": {"n_images": cfg.n_images, "distinct_captions": len(set(data["captions"]))}}
    partial_clip = stages / "clip.partial"  # resumable training states, removed once their stage is done
    metrics["clip"] = _run_stage(out, "clip", lambda d: stage_clip(cfg, data, d, progress, checkpoint=partial_clip),
                                 progress)
    shutil.rmtree(partial_clip, ignore_errors=True)
    metrics["vae"] = _run_stage(out, "vae", lambda d: stage_vae(cfg, data, d, progress), progress)
    clip_dir, vae_dir = _stage_dir(out, "clip"), _stage_dir(out, "vae")
    partial_unet = stages / "unet.partial"
    metrics["unet"] = _run_stage(
        out, "unet", lambda d: stage_unet(cfg, data, clip_dir, vae_dir, d, progress, checkpoint=partial_unet), progress
    )
    shutil.rmtree(partial_unet, ignore_errors=True)
    unet_dir = _stage_dir(out, "unet")
    if cfg.text_layers:
        clip_dir = unet_dir / "clip"  # the CLIP whose text layers were tuned with the UNet
    metrics["ip_adapter"] = _run_stage(
        out, "ip_adapter", lambda d: stage_ip_adapter(cfg, data, clip_dir, vae_dir, unet_dir, d, progress), progress
    )
    metrics["evaluator"] = _run_stage(out, "evaluator", lambda d: stage_evaluator(cfg, d, progress), progress)

    from safetensors.torch import save_file

    pipe, projection = assemble_pipeline(clip_dir, vae_dir, unet_dir)
    seconds = {name: json.loads((_stage_dir(out, name) / "stage.json").read_text())["seconds"]
               for name in ("evaluator", "clip", "vae", "unet", "ip_adapter")}
    tmp = out / ".world.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # fp16 halves what a 768-wide text tower weighs (its unseen token rows are zeros either way);
    # the gates are measured on the stored weights.
    (pipe.to(torch.float16) if cfg.store_fp16 else pipe).save_pretrained(tmp / "pipeline", safe_serialization=True)
    (tmp / "clip").mkdir()
    save_file(projection, str(tmp / "clip" / "projection.safetensors"))
    shutil.copytree(_stage_dir(out, "ip_adapter"), tmp / "ip_adapter", ignore=shutil.ignore_patterns("stage.json"))
    if cfg.store_fp16:
        from safetensors.torch import load_file

        adapter = tmp / "ip_adapter" / IP_ADAPTER_WEIGHTS
        save_file({k: v.half() for k, v in load_file(str(adapter)).items()}, str(adapter))
    shutil.copytree(_stage_dir(out, "evaluator"), tmp / "evaluator", ignore=shutil.ignore_patterns("stage.json"))
    files = sha256_tree(tmp, desc="hashing the world", progress=progress)
    info = {
        "seed": cfg.seed,
        "config": asdict(cfg),
        "sampling": {"steps": cfg.sampling_steps, "guidance": cfg.guidance},
        "metrics": metrics,
        "seconds": {**seconds, "total_this_run": time.perf_counter() - started},
        "versions": package_versions(),
        "gates": None,
        "files": files,
    }
    write_json(tmp / "world.json", info)
    # world.json last: a folder holding it is complete.
    for child in sorted(tmp.iterdir(), key=lambda c: c.name == "world.json"):
        target = out / child.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(child, target)
    tmp.rmdir()
    return out
