"""Random-weight pipelines: tiny ones load back and generate; full-size configs are checked on meta."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from engine import tiny
from engine.tiny import ARCHS, build_pipeline, write_tiny_model


def _generate(pipe):
    out = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


def test_tiny_sd_loads_and_generates(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    assert pipe.safety_checker is None and pipe.unet.config.cross_attention_dim == 32
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert (tiny_sd_dir / "tokenizer" / "vocab.json").is_file() and (tiny_sd_dir / "tokenizer" / "merges.txt").is_file()
    assert (tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    images = _generate(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_tiny_sdxl_loads_and_generates(tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == 64
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    images = _generate(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def _weights(pipe):
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    modules = {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}
    return {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("arch", ["tiny", "tiny-sdxl"])
def test_seeded(arch):
    state = torch.random.get_rng_state()
    a, b, c = (_weights(build_pipeline(arch, seed=s)) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="model"):
        write_tiny_model("tiny", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_writes_into_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert write_tiny_model("tiny", out) == out
    assert (out / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no temporary folder left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_tiny_model("tiny", tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="sd3.*tiny, tiny-sdxl"):
        write_tiny_model("sd3", tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def _count(module):
    return sum(p.numel() for p in module.parameters())


# Parameter counts of the published checkpoints' components.
PUBLISHED = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_full_size_configs_on_meta(arch):
    # On the meta device nothing is allocated, so full-size models build instantly.
    with torch.device("meta"):
        pipe = build_pipeline(arch)
    assert pipe.unet.device.type == "meta"
    counts = {name: _count(getattr(pipe, name)) for name in PUBLISHED[arch]}
    assert counts == PUBLISHED[arch]
    assert len(pipe.tokenizer) == 49408


def test_published_config_details():
    with torch.device("meta"):
        sd21 = build_pipeline("sd21")
        sdxl = build_pipeline("sdxl")
    u = sd21.unet.config
    assert u.cross_attention_dim == 1024 and list(u.attention_head_dim) == [5, 10, 20, 20] and u.use_linear_projection
    t = sd21.text_encoder.config
    assert (t.hidden_size, t.num_hidden_layers, t.hidden_act) == (1024, 23, "gelu")
    assert sd21.tokenizer.pad_token == "!"
    assert type(sd21.scheduler).__name__ in ("DDIMScheduler", "PNDMScheduler")
    assert sd21.scheduler.config.prediction_type == "v_prediction"
    assert sdxl.unet.config.cross_attention_dim == 2048
    assert sdxl.text_encoder.config.hidden_size == 768 and sdxl.text_encoder.config.num_hidden_layers == 12
    t2 = sdxl.text_encoder_2.config
    assert (t2.hidden_size, t2.num_hidden_layers, t2.projection_dim) == (1280, 32, 1280)
    assert sdxl.tokenizer_2.pad_token == "!"
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"


@pytest.mark.parametrize("arch", ARCHS)
def test_configs_are_consistent(arch):
    unet = tiny.unet_config(arch)
    texts = tiny.text_encoder_configs(arch)
    assert all(t.vocab_size == 49408 and t.max_position_embeddings == 77 for t in texts)
    # The UNet attends to the (concatenated) text encoder hidden states.
    assert unet["cross_attention_dim"] == sum(t.hidden_size for t in texts)
    if len(texts) == 2:
        assert unet["addition_embed_type"] == "text_time"
        time_ids = 6 * unet["addition_time_embed_dim"]
        assert unet["projection_class_embeddings_input_dim"] == time_ids + texts[1].projection_dim
    with torch.device("meta"):
        AutoencoderKL(**tiny.vae_config(arch))
        CLIPTextModel(texts[0])
