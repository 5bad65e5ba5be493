"""Loading local checkpoints offline, text-encoder fingerprints and prompt encoding."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from engine.models import (
    encode_prompts,
    first_eot_positions,
    load_pipeline,
    pipeline_family,
    text_encoder_fingerprint,
)
from helpers import sd_pipeline_to_original

PROMPTS = ["a photo of a cat", "a", "", "an oil painting of a lighthouse at dusk, trending on artstation", "dog"]


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_pipeline(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def original_state(sd):
    """The tiny SD model's weights under original (LDM) key names, as a single-file checkpoint has them."""
    return sd_pipeline_to_original(sd)


def _assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


# --------------------------------------------------------------------------- folders


def test_load_folders(sd, sdxl):
    assert isinstance(sd, StableDiffusionPipeline) and sd.safety_checker is None
    assert isinstance(sdxl, StableDiffusionXLPipeline)
    assert pipeline_family(sd) == "sd" and pipeline_family(sdxl) == "sdxl"
    assert sd.unet.dtype == torch.float32 and sd.unet.device.type == "cpu"


def test_load_with_dtype(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir, torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*nowhere"):
        load_pipeline(tmp_path / "nowhere")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path)


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline"):
        load_pipeline(tmp_path)


def test_broken_tokenizer_is_caught(tiny_sd_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, copy)
    # A tokenizer folder with only special tokens, as a failed conversion would leave it.
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (copy / "tokenizer" / name).unlink()
    (copy / "tokenizer" / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (copy / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="tokenizer.*49408"):
        load_pipeline(copy)


# --------------------------------------------------------------------------- single files


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="model.onnx"):
        load_pipeline(path)


def test_single_file_needs_config(tmp_path, original_state):
    path = tmp_path / "model.safetensors"
    save_file(original_state, path)
    with pytest.raises(ValueError, match="config="):
        load_pipeline(path)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(path, config=tmp_path)


def test_single_safetensors_equals_folder(tmp_path, tiny_sd_dir, sd, original_state):
    path = tmp_path / "tiny.safetensors"
    save_file(original_state, path)
    pipe = load_pipeline(path, config=tiny_sd_dir)
    assert isinstance(pipe, StableDiffusionPipeline)
    _assert_same_weights(pipe, sd)
    assert text_encoder_fingerprint(pipe) == text_encoder_fingerprint(sd)


def test_pickle_refused_without_flag(tmp_path, tiny_sd_dir):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_pipeline(path, config=tiny_sd_dir)


def test_pickle_with_flag_equals_folder(tmp_path, tiny_sd_dir, sd, original_state):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_state, "global_step": 7}, path)
    pipe = load_pipeline(path, config=tiny_sd_dir, allow_pickle=True)
    _assert_same_weights(pipe, sd)


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to rebuild it."""


def test_pickle_with_objects_is_still_refused(tmp_path, tiny_sd_dir):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_pipeline(path, config=tiny_sd_dir, allow_pickle=True)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_text_encoders_only(tiny_sd_dir, sd, sdxl):
    pipe = load_pipeline(tiny_sd_dir)
    before = text_encoder_fingerprint(pipe)
    assert before == text_encoder_fingerprint(sd)
    assert before != text_encoder_fingerprint(sdxl)
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1.0)
        assert text_encoder_fingerprint(pipe) == before
        next(pipe.text_encoder.parameters()).view(-1)[0] += 1e-3
        assert text_encoder_fingerprint(pipe) != before


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_encode_prompts_matches_pipeline(family, sd, sdxl):
    pipe = sd if family == "sd" else sdxl
    emb, ids = encode_prompts(pipe, PROMPTS, batch_size=2, progress=True)
    dim = 32 if family == "sd" else 64
    assert emb.shape == (len(PROMPTS), 77, dim) and emb.dtype == torch.float32
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == torch.int64
    expected_ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, expected_ids)
    with torch.no_grad():
        if family == "sd":
            ref = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
            direct = pipe.text_encoder(ids).last_hidden_state
        else:
            ref = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)[0]
            ids_2 = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
            h1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            h2 = pipe.text_encoder_2(ids_2, output_hidden_states=True).hidden_states[-2]
            direct = torch.cat([h1, h2], dim=-1)
    torch.testing.assert_close(emb, ref.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(emb, direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_embeddings_are_what_the_unet_receives(family, sd, sdxl):
    pipe = sd if family == "sd" else sdxl
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        # guidance_scale 1 turns classifier-free guidance off: the UNet sees the prompt's rows only.
        pipe(PROMPTS[0], num_inference_steps=1, height=32, width=32, guidance_scale=1.0, output_type="latent")
    finally:
        hook.remove()
    emb, _ = encode_prompts(pipe, [PROMPTS[0]])
    assert len(seen) == 1
    torch.testing.assert_close(seen[0].float(), emb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_shorter_encoding_keeps_every_row_through_end_of_text(family, sd, sdxl):
    pipe = sd if family == "sd" else sdxl
    full, ids = encode_prompts(pipe, PROMPTS)
    eot = first_eot_positions(ids, pipe.tokenizer.eos_token_id)
    longest = int(eot.max()) + 1
    short, short_ids = encode_prompts(pipe, PROMPTS, batch_size=2, min_positions=1)
    assert short.shape[1] == longest < 77 and torch.equal(short_ids, ids[:, :longest])
    for i, e in enumerate(eot.tolist()):  # causal encoders: padding after a row never reaches it
        torch.testing.assert_close(short[i, : e + 1], full[i, : e + 1], rtol=1e-5, atol=1e-5)
    # Asking for more positions than the longest prompt needs gives them (padding included).
    wider, _ = encode_prompts(pipe, PROMPTS, min_positions=longest + 5)
    assert wider.shape[1] == longest + 5
    torch.testing.assert_close(wider, full[:, : longest + 5], rtol=1e-5, atol=1e-5)
    assert pipe.tokenizer.model_max_length == 77  # the pipeline's own padding is back
    with pytest.raises(ValueError, match="min_positions"):
        encode_prompts(pipe, PROMPTS, min_positions=0)


def test_first_eot_positions(sd, sdxl):
    prompts = ["a", "a photo of a cat", "", "a photo of a cat riding a bicycle"]
    for pipe in (sd, sdxl):
        _, ids = encode_prompts(pipe, prompts)
        eot = pipe.tokenizer.eos_token_id
        assert first_eot_positions(ids, eot).tolist() == [2, 6, 1, 9]
    # SDXL's second tokenizer pads with "!" (id 0), so its rows hold exactly one end-of-text.
    ids_2 = sdxl.tokenizer_2(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert first_eot_positions(ids_2, 49407).tolist() == [2, 6, 1, 9]


def test_first_eot_positions_needs_an_eot():
    ids = torch.tensor([[49406, 320, 49407, 49407], [49406, 320, 320, 320]])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        first_eot_positions(ids, 49407)


def test_too_long_prompt_raises(sd):
    long_prompt = "a photo of " + "very " * 80 + "big cat"
    with pytest.raises(ValueError, match="very very"):
        encode_prompts(sd, ["fine", long_prompt])
    # 75 words + BOS + EOT is exactly 77 tokens: still fine.
    emb, ids = encode_prompts(sd, ["cat " * 75])
    assert first_eot_positions(ids, 49407).tolist() == [76]


def test_prompts_must_be_a_list(sd):
    with pytest.raises(TypeError):
        encode_prompts(sd, "a photo of a cat")
    emb, ids = encode_prompts(sd, [])
    assert emb.shape == (0, 77, 32) and ids.shape == (0, 77)


def test_helper_writes_the_published_sd1_layout():
    # The test helper's key names must be those of real SD1 checkpoints, or the single-file tests
    # would only prove that it inverts itself: check them on a full-size SD1.5 built on meta.
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from engine.tiny import build_pipeline

    with torch.device("meta"):
        state = sd_pipeline_to_original(build_pipeline("sd15"))
    assert infer_diffusers_model_type(state) == "v1"
    counts = {p: sum(k.startswith(p) for k in state) for p in ("model.diffusion_model.", "first_stage_model.")}
    assert counts == {"model.diffusion_model.": 686, "first_stage_model.": 248}  # as in v1-5-pruned-emaonly
    for key in (
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in state, key
