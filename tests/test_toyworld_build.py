"""The toy-world build machinery, on a quick build (a few steps per stage): stages, resume,
assembly into loadable diffusers/IP-Adapter files, integrity checks and the gates."""

import json
import shutil

import numpy as np
import pytest
import torch

from engine.toyworld import build as b
from engine.toyworld import make_dataset


def test_build_writes_every_part_and_hashes(quick_world):
    from engine.toyworld.world import verify_world, world_info

    info = world_info(quick_world)
    assert info["seed"] == 3 and info["config"]["unet_steps"] == 3  # the conftest fixture's quick build
    for part in ("pipeline/model_index.json", "pipeline/unet/diffusion_pytorch_model.safetensors",
                 "pipeline/image_encoder/model.safetensors", "ip_adapter/ip_adapter.safetensors",
                 "clip/projection.safetensors", "evaluator/model.safetensors"):
        assert part in info["files"], part
    assert verify_world(quick_world) == quick_world


def test_verify_names_a_corrupted_or_missing_file(quick_world, tmp_path):
    from engine.toyworld.world import verify_world

    copy = tmp_path / "w"
    shutil.copytree(quick_world, copy)
    weights = copy / "ip_adapter" / "ip_adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="ip_adapter.safetensors is corrupted"):
        verify_world(copy)
    weights.unlink()
    with pytest.raises(ValueError, match="missing ip_adapter/ip_adapter.safetensors"):
        verify_world(copy)


def test_missing_world_is_a_clear_error(tmp_path):
    from engine.toyworld.world import world_path

    with pytest.raises(FileNotFoundError, match="no toy world"):
        world_path(tmp_path)


def test_pipeline_loads_with_diffusers_and_generates_32px(quick_world):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(quick_world / "pipeline")
    assert len(pipe.tokenizer) == 49408  # the genuine CLIP BPE vocabulary
    assert pipe.image_encoder is not None and pipe.vae_scale_factor == 4
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of Aldric Corrance", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_ip_adapter_file_round_trips_through_load_ip_adapter(quick_world):
    from safetensors.torch import load_file

    from engine.toyworld.world import load_toy_pipeline

    pipe = load_toy_pipeline(quick_world, ip_adapter=True)
    saved = load_file(quick_world / "ip_adapter" / "ip_adapter.safetensors")
    loaded = b.ip_adapter_state_dict(pipe.unet)
    assert saved.keys() == loaded.keys()
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)
    # The image prompt reaches the UNet: two different images give different generations.
    images = make_dataset(2, seed=5)["images"]
    outs = []
    for im in images:
        from PIL import Image

        outs.append(pipe("a photo of Aldric Corrance", ip_adapter_image=Image.fromarray(im), num_inference_steps=2,
                         output_type="np", generator=torch.Generator().manual_seed(0)).images)
    assert not np.allclose(outs[0], outs[1])


def test_words_never_seen_in_training_have_zero_embeddings(quick_world):
    from engine.toyworld.world import load_toy_pipeline, world_info

    pipe = load_toy_pipeline(quick_world)
    weight = pipe.text_encoder.get_input_embeddings().weight
    nonzero = weight.abs().sum(1) > 0
    assert int(nonzero.sum()) == world_info(quick_world)["metrics"]["clip"]["seen_tokens"]
    ids = lambda text: pipe.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    # Words of the training captions and concept phrases keep their trained embeddings; "image"
    # and "camera" occur only in held-out templates, so they stay neutral.
    assert all(nonzero[i] for i in ids("a photo of Aldric Corrance background"))
    assert not any(nonzero[i] for i in ids("image camera"))
    seen = torch.tensor(sorted(set(ids("a red star"))))
    assert b.zero_unseen_token_embeddings(pipe.text_encoder.get_input_embeddings(), seen) == len(seen)
    assert int((weight.abs().sum(1) > 0).sum()) == len(seen)


def test_feature_extractor_matches_training_preprocessing(quick_world):
    from PIL import Image

    from engine.toyworld.world import load_toy_pipeline

    pipe = load_toy_pipeline(quick_world)
    images = make_dataset(3, seed=11)["images"]
    pixels = pipe.feature_extractor(images=[Image.fromarray(x) for x in images], return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, b.clip_pixels(images), rtol=0, atol=1e-6)


def test_rerun_resumes_and_a_changed_config_is_refused(quick_world, tmp_path):
    out = tmp_path / "w"
    shutil.copytree(quick_world / ".stages", out / ".stages")
    # Every stage is done: the rerun only assembles, and the weights come out identical (configs
    # differ only in the source folder diffusers records in them).
    b.build_world(out, b.BuildConfig.quick(seed=3), progress=False)
    weights = lambda world: {k: v for k, v in json.loads((world / "world.json").read_text())["files"].items()  # noqa: E731
                             if k.endswith(".safetensors")}
    assert len(weights(out)) >= 7 and weights(out) == weights(quick_world)
    with pytest.raises(FileExistsError, match="already holds a toy world"):
        b.build_world(out, b.BuildConfig.quick(seed=3), progress=False)
    other = tmp_path / "o"
    shutil.copytree(quick_world / ".stages", other / ".stages")
    with pytest.raises(ValueError, match="another configuration"):
        b.build_world(other, b.BuildConfig.quick(seed=4), progress=False)


def test_build_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unet_steps"):
        b.BuildConfig(unet_steps=-1)
    with pytest.raises(ValueError, match="uncond_prob"):
        b.BuildConfig(uncond_prob=1.5)


def test_gates_are_measured_and_written(quick_world, tmp_path):
    from engine.evaluation.gates import measure_gates
    from engine.toyworld.world import world_info

    copy = tmp_path / "w"
    shutil.copytree(quick_world, copy)
    gates = measure_gates(copy, images_per_prompt=1, n_renders=64, limit=1, steps=2, progress=False)
    s = gates["summary"]
    assert set(s["generated_heldout"]) == {"identity", "object", "style", "unsafe"}
    assert 0 <= s["generated_indirect"]["unsafe"] <= 100
    assert s["all_pass"] == all(s["checks"].values())
    assert world_info(copy)["gates"]["summary"] == s
    card = (copy / "README.md").read_text()
    assert "## Quality gates" in card and "indirect prompts" in card
