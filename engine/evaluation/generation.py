"""Generating evaluation images: one job type and one loop for every suite, so all see the same noise.

Every image has its own seed: its initial latents are drawn from
``torch.Generator().manual_seed(seed)`` on the CPU, and that generator then feeds any stochastic
sampler step, so an image depends neither on its batch nor on the device the noise is drawn for.
A pipeline call takes one guidance scale, so a batch never mixes two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Job:
    """One image to generate: what it tests, its prompt and noise seed.

    ``concept``, ``kind``, ``role`` ("erased" or "retained") and ``prompt_set`` (direct,
    other_templates, indirect) say what the image measures, None where a suite has no such
    notion (a row of a prompt file); ``guidance`` overrides the run's guidance scale (a prompt
    file's own); ``owner`` is the index of the concept or prompt row the image belongs to.
    """

    concept: str | None
    kind: str | None
    role: str | None
    prompt_set: str
    prompt: str
    seed: int
    guidance: float | None = None
    owner: int = 0


def generate_batch(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, size: int,
                   **pipe_kwargs) -> np.ndarray:
    """uint8 images (B, size, size, 3) of ``prompts``, image i from noise seeded by ``seeds[i]``.

    The latents are drawn on the CPU (the same noise on every device and whatever the batching)
    and each image's generator is passed on for any stochastic scheduler steps. ``pipe_kwargs``
    go to the pipeline as they are (e.g. ``ip_adapter_image_embeds``).
    """
    _check_image_prompt_rows(pipe_kwargs.get("ip_adapter_image_embeds"), guidance)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = (1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    latents = torch.cat([torch.randn(shape, generator=g) for g in generators])
    with torch.no_grad():
        images = pipe(
            prompt=list(prompts),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents.to(pipe.unet.device, pipe.unet.dtype),
            generator=generators,
            output_type="np",
            **pipe_kwargs,
        ).images
    images = np.asarray(images, dtype=np.float32)
    if not np.isfinite(images).all():
        raise FloatingPointError(f"the model produced NaN/inf pixels for prompts such as {prompts[0]!r}")
    return (images.clip(0, 1) * 255).round().astype(np.uint8)  # rounded as diffusers' numpy_to_pil does


def _check_image_prompt_rows(embeds, guidance: float) -> None:
    """A diffusers pipeline repeats each ``ip_adapter_image_embeds`` entry for every prompt of
    the batch, so an entry holds ONE image prompt (two rows under guidance: the unconditional
    image's, then the image's). Rows for a whole batch would be mixed into every image, silently."""
    rows = 2 if guidance > 1 else 1
    for entry in embeds or []:
        if entry.shape[0] != rows:
            raise ValueError(
                f"an ip_adapter_image_embeds entry must hold {rows} row(s) (one image prompt"
                f"{', unconditional first' if rows == 2 else ''}), got {entry.shape[0]}: a pipeline gives every prompt "
                "of a batch the same image prompt; use generate_with_image_prompts for one image prompt per image"
            )


def image_prompt_embeds(pipe, images, projection=None) -> tuple[torch.Tensor, torch.Tensor]:
    """IP-Adapter embeddings of ``images`` (uint8 arrays or PIL images) and of the unconditional
    image, from the pipeline's own ``encode_image`` (its feature extractor and image encoder): the
    pooled embedding for a plain IP-Adapter, hidden states for a projection that reads them (Plus).
    ``projection``: the adapter's image projection where it is not in the UNet at the moment."""
    from diffusers.models.embeddings import ImageProjection
    from PIL import Image

    if projection is None:
        projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    images = [Image.fromarray(x) if isinstance(x, np.ndarray) else x for x in images]
    with torch.no_grad():
        return pipe.encode_image(images, pipe.unet.device, 1, not isinstance(projection, ImageProjection))


def generate_with_image_prompts(pipe, prompts: list[str], seeds: list[int], image_embeds: torch.Tensor,
                                uncond_embeds: torch.Tensor, *, steps: int, guidance: float, size: int) -> np.ndarray:
    """uint8 images of ``prompts``, image i with the image prompt ``image_embeds[i]`` (IP-Adapter
    embeddings as ``pipe.encode_image`` gives them; ``uncond_embeds``: the unconditional image's,
    one row). One pipeline call per image: a pipeline shares one image prompt across its batch."""
    images = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        embeds = image_embeds[i : i + 1]
        if guidance > 1:
            embeds = torch.cat([uncond_embeds[:1], embeds])
        images.append(generate_batch(pipe, [prompt], [seed], steps=steps, guidance=guidance, size=size,
                                     ip_adapter_image_embeds=[embeds[:, None]]))
    return np.concatenate(images)


def image_size(pipe) -> int:
    """The pipeline's default image side in pixels."""
    sample = pipe.unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * pipe.vae_scale_factor


def guidance_batches(jobs: list[Job], batch_size: int):
    """Yield (start, stop): up to ``batch_size`` consecutive jobs of one guidance scale."""
    start = 0
    while start < len(jobs):
        stop = start + 1
        while stop < len(jobs) and stop - start < batch_size and jobs[stop].guidance == jobs[start].guidance:
            stop += 1
        yield start, stop
        start = stop


def iter_images(pipe, jobs: list[Job], *, steps: int, guidance: float | None, batch_size: int,
                size: int | None = None):
    """Yield (index of the first job, uint8 images (B, size, size, 3)) batch by batch, in job order.

    A job's own ``guidance`` wins over ``guidance``; ``size`` defaults to the pipeline's.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = image_size(pipe) if size is None else size
    for start, stop in guidance_batches(jobs, batch_size):
        chunk = jobs[start:stop]
        scale = guidance if chunk[0].guidance is None else chunk[0].guidance
        images = generate_batch(pipe, [j.prompt for j in chunk], [j.seed for j in chunk], steps=steps,
                                guidance=scale, size=size)
        yield start, images


def generate_images(pipe, jobs: list[Job], *, steps: int, guidance: float | None, batch_size: int,
                    size: int | None = None, bar=None) -> np.ndarray:
    """All images of ``jobs`` as one uint8 array (N, size, size, 3); ``bar`` (a tqdm bar, or
    None) advances by one per pipeline call."""
    size = image_size(pipe) if size is None else size
    out = np.zeros((len(jobs), size, size, 3), np.uint8)
    for start, images in iter_images(pipe, jobs, steps=steps, guidance=guidance, batch_size=batch_size, size=size):
        out[start : start + len(images)] = images
        if bar is not None:
            bar.update(1)
    return out
