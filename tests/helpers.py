"""Test-only helpers: turn a diffusers SD1-style pipeline into an original (LDM/CompVis) checkpoint.

diffusers' from_single_file only reads original key names, so to test single-file loading offline we
write the tiny model in that layout. This is the inverse of diffusers' convert_ldm_unet_checkpoint /
convert_ldm_vae_checkpoint / convert_ldm_clip_checkpoint (as in diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py), generalised to any number of blocks and
layers per block. SD1 layout only (UNet with a CLIP text encoder); not SD2's OpenCLIP or SDXL.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = [  # (diffusers, original) inside a resnet
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def _unet_prefix_map(config) -> dict[str, str]:
    """diffusers module prefix -> original prefix, for the UNet blocks of `config`."""
    n = len(config["block_out_channels"])
    per = config["layers_per_block"]
    out = dict(_UNET_TOP)
    for i in range(n):
        for j in range(per):
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(per + 1) * i + j + 1}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(per + 1) * i + j + 1}.1."
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(per + 1) * (i + 1)}.0.op."
        for j in range(per + 1):
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(per + 1) * i + j}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(per + 1) * i + j}.1."
        if i < n - 1:
            # The upsampler follows the last resnet and, in a cross-attention up block, its attention.
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            out[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(per + 1) * i + per}.{slot}."
    out["mid_block.resnets.0."] = "middle_block.0."
    out["mid_block.attentions.0."] = "middle_block.1."
    out["mid_block.resnets.1."] = "middle_block.2."
    return out


def _rename(key: str, prefix_map: dict[str, str], keep_unmatched: bool = False) -> str:
    for src, dst in prefix_map.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    if keep_unmatched:
        return key
    raise KeyError(f"no original name for {key}")


def unet_to_original(state: dict, config) -> dict:
    prefix_map = _unet_prefix_map(config)
    out = {}
    for key, value in state.items():
        new = _rename(key, prefix_map)
        if ".resnets." in key:
            for hf, sd in _UNET_RESNET:
                new = new.replace(f".{hf}.", f".{sd}.")
        out[UNET_PREFIX + new] = value
    return out


def _vae_prefix_map(config) -> dict[str, str]:
    n = len(config["block_out_channels"])
    per = config["layers_per_block"]
    out = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for part in ("encoder", "decoder"):
        out[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        out[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        out[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(n):
        for j in range(per):
            out[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        if i < n - 1:
            out[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            out[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
        for j in range(per + 1):
            # The original decoder numbers its up blocks from the lowest resolution backwards.
            out[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
    return out


_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def vae_to_original(state: dict, config) -> dict:
    prefix_map = _vae_prefix_map(config)
    out = {}
    for key, value in state.items():
        # conv_in/conv_out/quant_conv/post_quant_conv keep their names.
        new = _rename(key, prefix_map, keep_unmatched=True)
        if ".resnets." in key:
            new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".attentions." in key:
            for hf, sd in _VAE_ATTN:
                new = new.replace(f".{hf}", f".{sd}")
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                value = value[:, :, None, None]  # the original uses 1x1 convolutions
        out[VAE_PREFIX + new] = value
    return out


def clip_to_original(state: dict) -> dict:
    # transformers >= 5.6 flattens CLIPTextModel (no "text_model." prefix); the original keeps it.
    return {CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def sd_pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """An original-format state dict of an SD1-style diffusers pipeline (contiguous clones)."""
    out = {}
    out.update(unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    out.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    out.update(clip_to_original(pipe.text_encoder.state_dict()))
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
