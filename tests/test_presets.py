"""Method presets: named setting overrides (``--preset toy``), their order under --config and
--set, the manifest's record, and the toy benchmark taking its settings from them."""

import json

import pytest

import engine
from engine.api import method_config
from engine.cli import main
from engine.finetune.config import TOY_TRAINING
from engine.methods import available_methods, get_method

QUICK = ["--set", "iterations=2", "--set", "sample_steps=2", "--set", "trajectories=1", "--set", "batch_size=1",
         "--set", "progress=false"]


def test_every_fine_tuning_method_has_a_toy_preset_its_settings_accept():
    for name, method in available_methods().items():
        if not method.trains:
            continue
        toy = method.preset("toy")
        assert toy["iterations"] == 300 and toy["lr"] >= TOY_TRAINING["lr"] / 10
        cfg = method.defaults.replace(**toy)
        assert all(getattr(cfg, key) == value for key, value in toy.items()), name


def test_preset_order_defaults_preset_config_overrides():
    cfg = method_config("esd", {"lr": 2e-4, "batch_size": 2}, "toy", batch_size=3)
    assert cfg.iterations == 300 and cfg.sample_steps == 25  # the preset's
    assert cfg.lr == 2e-4 and cfg.batch_size == 3  # config over the preset, overrides over config
    assert cfg.eta == get_method("esd").defaults.eta  # the defaults where neither says
    assert method_config("esd").iterations == 1000  # no preset: the published defaults


def test_unknown_preset_is_refused_naming_the_available_ones(tiny_sd_dir):
    with pytest.raises(ValueError, match="no preset 'big'; its presets: toy"):
        engine.erase(str(tiny_sd_dir), ["cat"], method="esd", preset="big")
    with pytest.raises(ValueError, match="no preset 'toy'; its presets: none"):
        method_config("uce", preset="toy")


def test_cli_preset_is_applied_under_set_and_recorded(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "c.txt").write_text("cat\n")
    assert main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(tmp_path / "c.txt"), "--method", "esd",
                 "--preset", "toy", *QUICK, "--no-pipeline", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"] == "toy"
    assert manifest["config"]["lr"] == TOY_TRAINING["lr"] and manifest["config"]["iterations"] == 2
    assert main(["methods"]) == 0
    assert "preset toy (--preset toy)" in capsys.readouterr().out
    assert main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(tmp_path / "c.txt"), "--method", "esd",
                 "--preset", "huge", "--out", str(tmp_path / "bad")]) == 2
    assert "its presets: toy" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_toy_benchmark_settings_are_the_presets_and_reproduce_the_recorded_runs():
    from benchmarks._common import RESULTS
    from benchmarks.toy_methods import method_settings

    rows = json.loads((RESULTS / "toy_methods.json").read_text())["results"]
    for row in rows:
        fields = set(get_method(row["method"]).defaults.to_dict())
        recorded = {k: v for k, v in row["settings"].items() if k in fields}  # what reached the method
        assert method_settings(row["method"], row["scenario"]) == recorded, (row["method"], row["scenario"])
    assert method_settings("esd", "identity") == {**get_method("esd").preset("toy"), "checkpoint_every": 0}
