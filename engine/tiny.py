"""Random-weight Stable Diffusion pipelines of real architectures, built offline.

"sd15", "sd21" and "sdxl" use the published configs of those checkpoints (written out below, so no
hub access is needed); "tiny" and "tiny-sdxl" are scaled-down pipelines of the same structure
(SD1-style and SDXL-style) for tests and the demo. Every pipeline carries the genuine CLIP
tokenizer(s), so prompts tokenize exactly as with the real models; only the weights are random.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from engine.tokenizer import EOS, VOCAB_SIZE, check_tokenizer, build_clip_tokenizer, write_vocab_files

ARCHS = ("tiny", "tiny-sdxl", "sd15", "sd21", "sdxl")

# --------------------------------------------------------------------------- published configs

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": _SD_DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": _SD_UP,
}

# stabilityai/stable-diffusion-2-1 unet/config.json
SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids * 256 + text_encoder_2's 1280
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# The SD1/SD2/SDXL VAE (vae/config.json); they differ in sample_size and SDXL's scaling factor.
SD_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_VAE = {**SD_VAE, "sample_size": 768}
SDXL_VAE = {**SD_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}

# Fields every SD text encoder config shares (bos/eos 0/2 as the published configs have them:
# transformers then pools at argmax(input_ids), which is the end-of-text token 49407).
_TEXT_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# openai/clip-vit-large-patch14 text tower: SD1.x text_encoder and SDXL's text_encoder.
CLIP_L_TEXT = {
    **_TEXT_COMMON,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
# OpenCLIP ViT-H/14 text tower as SD2.x ships it (the last of 24 layers dropped: 23).
OPENCLIP_H_TEXT = {
    **_TEXT_COMMON,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}
# OpenCLIP ViT-bigG/14 text tower: SDXL's text_encoder_2 (CLIPTextModelWithProjection).
OPENCLIP_BIGG_TEXT = {
    **_TEXT_COMMON,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

_SCHED_COMMON = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD15_SCHEDULER = ("PNDMScheduler", dict(_SCHED_COMMON))
SD21_SCHEDULER = ("DDIMScheduler", {**_SCHED_COMMON, "prediction_type": "v_prediction"})
SDXL_SCHEDULER = (
    "EulerDiscreteScheduler",
    {
        **_SCHED_COMMON,
        "interpolation_type": "linear",
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
    },
)

# --------------------------------------------------------------------------- tiny configs

TINY_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 2,  # diffusers reads this as the number of heads for these blocks
    "norm_num_groups": 32,
}
TINY_SDXL_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,  # text_encoder (32) + text_encoder_2 (32) hidden states concatenated
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 2],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,  # 6 time ids * 8 + text_encoder_2 projection
    "norm_num_groups": 32,
}
TINY_VAE = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 32,
}
TINY_TEXT = {
    **_TEXT_COMMON,
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}
TINY_TEXT_2 = {**TINY_TEXT, "hidden_act": "gelu"}

# arch -> (family, unet, vae, text encoder(s), pad token of each tokenizer, scheduler)
SPECS = {
    "tiny": ("sd", TINY_UNET, TINY_VAE, [TINY_TEXT], [EOS], SD15_SCHEDULER),
    "tiny-sdxl": ("sdxl", TINY_SDXL_UNET, TINY_VAE, [TINY_TEXT, TINY_TEXT_2], [EOS, "!"], SDXL_SCHEDULER),
    "sd15": ("sd", SD15_UNET, SD_VAE, [CLIP_L_TEXT], [EOS], SD15_SCHEDULER),
    "sd21": ("sd", SD21_UNET, SD21_VAE, [OPENCLIP_H_TEXT], ["!"], SD21_SCHEDULER),
    "sdxl": ("sdxl", SDXL_UNET, SDXL_VAE, [CLIP_L_TEXT, OPENCLIP_BIGG_TEXT], [EOS, "!"], SDXL_SCHEDULER),
}


def _spec(arch: str):
    if arch not in SPECS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return SPECS[arch]


def unet_config(arch: str) -> dict:
    """The UNet2DConditionModel config of `arch` (a copy)."""
    return copy.deepcopy(_spec(arch)[1])


def vae_config(arch: str) -> dict:
    """The AutoencoderKL config of `arch` (a copy)."""
    return copy.deepcopy(_spec(arch)[2])


def text_encoder_configs(arch: str):
    """transformers CLIPTextConfig objects of `arch`'s text encoder(s), in pipeline order."""
    from transformers import CLIPTextConfig

    return [CLIPTextConfig(**cfg) for cfg in _spec(arch)[3]]


def build_unet(arch: str):
    """A random-weight UNet2DConditionModel of `arch` (under `with torch.device("meta")` it is free)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(arch))


def unet_example_inputs(config: dict, batch: int = 1) -> tuple[tuple, dict]:
    """Random inputs for one forward of a UNet with ``config``, on the current default device:
    ``(latents, timesteps, text states)`` and the keyword arguments SDXL's UNet also needs
    (pooled text embeddings and the six size/crop time ids)."""
    size = config["sample_size"]
    args = (torch.randn(batch, config["in_channels"], size, size), torch.full((batch,), 500),
            torch.randn(batch, 77, config["cross_attention_dim"]))
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}
    return args, kwargs


def build_pipeline(arch: str, seed: int = 0):
    """A complete random-weight diffusers pipeline of `arch`; same seed -> identical weights.

    SD archs give a StableDiffusionPipeline, SDXL archs a StableDiffusionXLPipeline, with the genuine
    CLIP tokenizer(s), no safety checker and the scheduler the real checkpoint ships.
    """
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family, _, _, _, pads, (sched_name, sched_cfg) = _spec(arch)
    text_cfgs = text_encoder_configs(arch)
    # Seed once and build in a fixed order: every module's init draws from the same generator stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(arch)
        vae = AutoencoderKL(**vae_config(arch))
        text_encoder = CLIPTextModel(text_cfgs[0])
        text_encoder_2 = CLIPTextModelWithProjection(text_cfgs[1]) if family == "sdxl" else None
    # Schedulers keep small CPU tables; build them on the CPU even inside `with torch.device("meta")`
    # (used to size the full models for free), where Euler's init would fail copying meta tensors.
    with torch.device("cpu"):
        scheduler = getattr(diffusers, sched_name).from_config(sched_cfg)
    tokenizers = [build_clip_tokenizer(pad_token=pad) for pad in pads]
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.eval()

    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,  # the invisible-watermark package is not a dependency
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizers[0],
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_model(arch: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build `arch` and save it as a diffusers folder (safetensors) at out_dir, atomically.

    The pipeline is written into a hidden temporary sibling folder that is renamed to out_dir only
    when complete, so an interrupted write leaves nothing behind; a non-empty out_dir is refused.
    Each tokenizer folder also gets vocab.json/merges.txt, as the published checkpoints have.
    """
    from engine.export import atomic_output_dir

    out = Path(out_dir)
    _spec(arch)  # fail on a bad arch before touching the disk
    # Checked here too (atomic_output_dir checks again) so a full-size build is not wasted.
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"refusing to overwrite non-empty folder {out}; remove it or choose another path")
    pipe = build_pipeline(arch, seed=seed)
    with atomic_output_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if (tmp / name).is_dir():
                write_vocab_files(tmp / name)
                check_tokenizer(getattr(pipe, name), f"{arch} {name}")
    return out
