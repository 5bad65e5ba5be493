"""Generating evaluation images: one function for every suite, so all see the same noise."""

from __future__ import annotations

import numpy as np
import torch


def generate_batch(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, size: int) -> np.ndarray:
    """uint8 images (B, size, size, 3) of ``prompts``, image i from noise seeded by ``seeds[i]``.

    The latents are drawn on the CPU (the same noise on every device and whatever the batching)
    and each image's generator is passed on for any stochastic scheduler steps.
    """
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
        ).images
    images = np.asarray(images, dtype=np.float32)
    if not np.isfinite(images).all():
        raise FloatingPointError(f"the model produced NaN/inf pixels for prompts such as {prompts[0]!r}")
    return (images.clip(0, 1) * 255).round().astype(np.uint8)  # rounded as diffusers' numpy_to_pil does
