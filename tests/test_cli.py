"""The `erasure` command line."""

import json
import subprocess
import sys

import pytest

from engine.cli import main
from engine.export import MANIFEST_NAME


def test_erase_from_a_yaml_concept_file_with_overrides(tiny_sd_dir, tmp_path, capsys):
    (tmp_path / "captions.txt").write_text("a dog on a beach\na bowl of fruit\n")
    (tmp_path / "concepts.yaml").write_text(
        'defaults: {anchor: "a person", templates: ["a photo of {}", "a portrait of {}"]}\n'
        "concepts:\n  - Arlen Corrance\n  - {name: Van Gogh, anchor: art, templates: [\"a painting by {}\"]}\n"
        "preserve: {concepts: [Calder Dunmore], captions: captions.txt}\n"
    )
    (tmp_path / "hp.yaml").write_text("ridge: 0.5\n")
    out = tmp_path / "out"
    code = main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(tmp_path / "concepts.yaml"),
                 "--method", "trce-stage1", "--out", str(out), "--config", str(tmp_path / "hp.yaml"),
                 "--set", "preserve_weight=0.01", "--quiet"])
    assert code == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["method"] == "trce-stage1"
    assert manifest["config"]["ridge"] == 0.5 and manifest["config"]["preserve_weight"] == 0.01
    assert manifest["solve"]["rows"]["caption"] > 0
    assert "wrote" in capsys.readouterr().out


def test_erase_a_plain_name_list_with_a_shared_anchor(tiny_sd_dir, tmp_path, capsys):
    """120 names in one edit move a tiny model's everyday prompts past uce-plus's limit: refused,
    exit code 2, nothing written; accepting the damage by hand runs the same edit."""
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"Person{i} Example" for i in range(120)) + "\n")
    out = tmp_path / "out"
    command = ["erase", "--model", str(tiny_sd_dir), "--concepts", str(names), "--anchor", "a person",
               "--out", str(out), "--no-pipeline", "--quiet"]
    assert main(command) == 2
    assert "nothing was written" in capsys.readouterr().err and not out.exists()
    assert main(command + ["--set", "max_prior_drift=null"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert len(manifest["solve"]["concept_residual"]) == 120
    assert manifest["solve"]["max_prior_drift"] is None and manifest["solve"]["prior_drift"] is None
    assert not (out / "model_index.json").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("concepts: []\n", "empty"),
        ("concepts: [Arlen Corrance]\ncolour: red\n", "colour"),
        ("defaults: {anchor: a person}\nconcepts: [A Person]\n", "anchor"),
        ("concepts: [{name: X Y, templates: ['a photo of']}]\n", "template"),
    ],
)
def test_bad_concept_files_give_a_clear_error(tiny_sd_dir, tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code = main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(path), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.yaml" in err and message in err
    assert not (tmp_path / "o").exists()


def test_bad_model_path_gives_a_clear_error(tmp_path, capsys):
    names = tmp_path / "n.txt"
    names.write_text("Arlen Corrance\n")
    code = main(["erase", "--model", str(tmp_path / "nowhere"), "--concepts", str(names), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


def test_bad_set_syntax(tiny_sd_dir, tmp_path, capsys):
    names = tmp_path / "n.txt"
    names.write_text("Arlen Corrance\n")
    code = main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(names), "--out", str(tmp_path / "o"), "--set", "ridge"])
    assert code == 2 and "key=value" in capsys.readouterr().err


def test_apply_writes_a_loadable_pipeline(tiny_sd_dir, tmp_path):
    names = tmp_path / "n.txt"
    names.write_text("Arlen Corrance\n")
    assert main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(names), "--anchor", "a person",
                 "--out", str(tmp_path / "e"), "--no-pipeline", "--quiet"]) == 0
    assert main(["apply", "--model", str(tiny_sd_dir), "--delta", str(tmp_path / "e" / "delta.safetensors"),
                 "--out", str(tmp_path / "applied")]) == 0
    assert (tmp_path / "applied" / "model_index.json").exists()


def test_module_entry_point_lists_methods():
    out = subprocess.run([sys.executable, "-m", "engine", "methods"], capture_output=True, text=True, check=True).stdout
    assert "uce (one pass):" in out and "trce-stage1 (one pass):" in out and '"tokens": "eot"' in out
    assert "esd (fine-tuning):" in out and "ESDConfig" in out and "Gandikota et al., ICCV 2023" in out
