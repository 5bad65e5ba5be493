"""Result.save from a local diffusers folder writes only the UNet and hard-links every other
file from the source; the folder loads with load_pipeline to the same weights, and the
manifest's sha256 of the outputs is right."""

import json
import os

import pytest
import torch

import engine
from engine.export import MANIFEST_NAME, sha256_tree
from engine.models import load_pipeline


@pytest.fixture(scope="module")
def result(tiny_sd_dir):
    return engine.erase(str(tiny_sd_dir), ["Van Gogh"], anchor="a painting", progress=False)


def _state(pipe):
    return {f"{name}.{key}": value for name in ("unet", "text_encoder", "vae")
            for key, value in getattr(pipe, name).state_dict().items()}


def _files(root):
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_only_the_unet_is_written_the_rest_linked(result, tiny_sd_dir, tmp_path):
    out = result.save(tmp_path / "out", export_lora=False)
    source, saved = _files(tiny_sd_dir), _files(out)
    for rel, path in source.items():
        if not rel.startswith("unet/"):
            assert os.path.samefile(path, saved[rel]), rel  # the same file, not a copy
    unet_files = [rel for rel in saved if rel.startswith("unet/")]
    assert unet_files and not any(os.path.samefile(saved[rel], source[rel]) for rel in unet_files if rel in source)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["pipeline_files"]["written"] == ["unet"] and manifest["pipeline_files"]["linked"] == sum(
        not rel.startswith("unet/") for rel in source)
    assert manifest["outputs"] == {k: v for k, v in sha256_tree(out, progress=False).items() if k != MANIFEST_NAME}

    loaded, edited = _state(load_pipeline(out)), _state(result.pipeline)
    assert loaded.keys() == edited.keys()
    assert all(torch.equal(loaded[k], edited[k]) for k in edited)
    original = _state(load_pipeline(tiny_sd_dir))
    assert any(not torch.equal(original[k], edited[k]) for k in edited if k.startswith("unet."))  # the edit is saved


def test_whole_pipeline_written_without_links_or_a_source_folder(result, tiny_sd_dir, tmp_path):
    out = result.save(tmp_path / "copy", link_unchanged=False)
    source, saved = _files(tiny_sd_dir), _files(out)
    assert not any(os.path.samefile(p, saved[rel]) for rel, p in source.items() if rel in saved)
    assert json.loads((out / MANIFEST_NAME).read_text())["pipeline_files"] == {"written": "all"}
    loaded, edited = _state(load_pipeline(out)), _state(result.pipeline)
    assert all(torch.equal(loaded[k], edited[k]) for k in edited)


def test_cli_links_by_default_and_copies_with_copy_pipeline(tiny_sd_dir, tmp_path):
    from engine.cli import main

    (tmp_path / "c.txt").write_text("Van Gogh\n")
    for name, extra, written in [("linked", [], ["unet"]), ("copied", ["--copy-pipeline"], "all")]:
        assert main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(tmp_path / "c.txt"), "--anchor",
                     "a painting", "--quiet", "--out", str(tmp_path / name), *extra]) == 0
        manifest = json.loads((tmp_path / name / MANIFEST_NAME).read_text())
        assert manifest["pipeline_files"]["written"] == written
        assert os.path.samefile(tiny_sd_dir / "model_index.json", tmp_path / name / "model_index.json") == (not extra)


def test_only_the_pipelines_own_files_are_taken_from_the_source(tiny_sd_dir, tmp_path):
    """Files in the model folder that are not part of the pipeline (notes, an earlier output) stay out."""
    import shutil

    source = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, source)
    (source / "notes.txt").write_text("not a component")
    (source / "old_output").mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(source / "old_output" / "weights.safetensors"))
    out = engine.erase(str(source), ["Van Gogh"], anchor="a painting", progress=False).save(tmp_path / "out")
    saved = _files(out)
    assert "notes.txt" not in saved and not any(rel.startswith("old_output") for rel in saved)
    assert "model_index.json" in saved and any(rel.startswith("text_encoder/") for rel in saved)
    load_pipeline(out)
