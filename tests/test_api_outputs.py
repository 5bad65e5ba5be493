"""The public API and what it writes: pipeline, delta, LoRA, manifest, atomically."""

import json
from importlib import metadata

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import engine
from engine.closed_form import cross_attention_kv
from engine.export import DELTA_NAME, LORA_DIR, MANIFEST_NAME, atomic_output_dir, lora_from_delta, sha256_file
from engine.models import load_pipeline

NAMES = ["Arlen Corrance", "Bexley Holloway", "Calder Dunmore"]


@pytest.fixture(scope="module")
def saved(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "erased"
    result = engine.erase(str(tiny_sd_dir), NAMES, method="uce", anchor="a person", progress=False)
    result.save(out, export_lora=True)
    return result, out


def kv(p):
    return {k: m.weight.detach().clone() for k, m in cross_attention_kv(p.unet)}


def test_output_loads_in_diffusers_and_generates(saved):
    result, out = saved
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    for key, value in kv(pipe).items():
        assert torch.equal(value, result.delta[key])
    image = pipe("a photo of Arlen Corrance", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape[-1] == 3 and np.isfinite(image).all()


def test_delta_reproduces_the_edited_weights(saved, tiny_sd_dir):
    result, out = saved
    pipe = engine.apply_delta(str(tiny_sd_dir), out / DELTA_NAME)
    edited = kv(pipe)
    assert set(edited) == set(result.delta)
    for key in edited:
        assert torch.equal(edited[key], result.delta[key])
    original = load_pipeline(tiny_sd_dir)
    assert any(not torch.equal(kv(original)[k], edited[k]) for k in edited)


def test_lora_reproduces_the_edited_weights(saved, tiny_sd_dir):
    result, out = saved
    pipe = load_pipeline(tiny_sd_dir)
    pipe.load_lora_weights(out / LORA_DIR)
    pipe.fuse_lora()
    for key, value in kv(pipe).items():
        assert torch.allclose(value, result.delta[key], rtol=1e-4, atol=1e-5), key
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["lora"]["max_relative_residual"] < 1e-5


def test_truncated_lora_reports_its_residual(saved):
    result, _ = saved
    exact, info = lora_from_delta(result.delta, result.original)
    truncated, info1 = lora_from_delta(result.delta, result.original, rank=1)
    assert info["rank"] > 1 and info1["rank"] == 1
    assert info1["max_relative_residual"] > 1e-3 > info["max_relative_residual"]
    key = next(k for k in truncated if k.endswith("lora_A.weight"))
    assert truncated[key].shape[0] == 1


def test_manifest_records_the_run(saved, tiny_sd_dir):
    result, out = saved
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["method"] == "uce"
    assert manifest["config"]["tokens"] == "last"  # UCE's rows
    assert [c["name"] for c in manifest["concepts"]["concepts"]] == NAMES
    assert manifest["versions"]["torch"] == metadata.version("torch")
    assert {"text_encoding", "gram", "solve", "weight_update", "save"} <= set(manifest["timings"])
    assert manifest["outputs"][DELTA_NAME] == sha256_file(out / DELTA_NAME)
    assert manifest["inputs"]["model_files"]["model_index.json"] == sha256_file(tiny_sd_dir / "model_index.json")
    assert set(manifest["solve"]["concept_residual"]) == set(NAMES)


def test_interrupted_save_leaves_nothing(tiny_sd_dir, tmp_path, monkeypatch):
    result = engine.erase(str(tiny_sd_dir), NAMES[:1], anchor="a person", progress=False)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C half way through the write

    monkeypatch.setattr(result.pipeline, "save_pretrained", broken)  # the whole pipeline written
    monkeypatch.setattr(result.pipeline.unet, "save_pretrained", broken)  # the UNet written, the rest linked
    for link_unchanged in (False, True):
        with pytest.raises(KeyboardInterrupt):
            result.save(tmp_path / "out", link_unchanged=link_unchanged)
        assert list(tmp_path.iterdir()) == []


def test_nonempty_output_folder_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_output_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_non_finite_edit_is_never_written(tiny_sd_dir, tmp_path):
    result = engine.erase(str(tiny_sd_dir), NAMES[:1], anchor="a person", progress=False)
    key = next(iter(result.delta))
    result.delta[key][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        result.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_apply_delta_checks_the_model(saved, tiny_sdxl_dir):
    _, out = saved
    with pytest.raises(ValueError, match="does not exist in this model|has shape"):
        engine.apply_delta(str(tiny_sdxl_dir), out / DELTA_NAME)


def test_api_rejects_unknown_method_and_fields(tiny_sd_dir):
    with pytest.raises(ValueError, match="unknown method 'esd2'"):
        engine.erase(str(tiny_sd_dir), NAMES, method="esd2")
    with pytest.raises(ValueError, match="unknown config field"):
        engine.erase(str(tiny_sd_dir), NAMES, anchor="a person", learning_rate=1.0)


def test_sdxl_output_delta_and_lora_reproduce_the_edit(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result = engine.erase(str(tiny_sdxl_dir), NAMES[:2], method="trce-stage1", anchor="a person", progress=False)
    out = result.save(tmp_path / "xl", export_lora=True)
    loaded = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    with_lora = load_pipeline(tiny_sdxl_dir)
    with_lora.load_lora_weights(out / LORA_DIR)
    with_lora.fuse_lora()
    from_delta = engine.apply_delta(str(tiny_sdxl_dir), out / DELTA_NAME)
    loaded, with_lora, from_delta = kv(loaded), kv(with_lora), kv(from_delta)
    assert set(loaded) == set(result.delta)
    for key, value in result.delta.items():
        assert torch.equal(loaded[key], value)
        assert torch.equal(from_delta[key], value)
        assert torch.allclose(with_lora[key], value, rtol=1e-4, atol=1e-5), key
