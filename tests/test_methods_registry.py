"""engine.methods: the registry, third-party methods through register_method and through the
``erasure_engine.methods`` entry-point group (a plug-in package in tests/plugins, installed into a
temporary site folder), run end to end through the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine.methods import ENTRY_POINT_GROUP, FineTuningMethod, available_methods, get_method, register_method

PLUGINS = Path(__file__).resolve().parent / "plugins"
ROOT = Path(__file__).resolve().parent.parent


def test_builtin_methods_declare_what_they_are():
    methods = available_methods()
    assert {"uce", "uce-plus", "trce-stage1", "esd", "co-erasing", "bi-erasing", "trce"} <= set(methods)
    for name, method in methods.items():
        assert method.name == name and method.summary
        assert method.defaults.replace().to_dict() == method.defaults.to_dict()
        assert method.trains == isinstance(method, FineTuningMethod)
    with pytest.raises(ValueError, match="unknown method 'nope'; available: .*uce"):
        get_method("nope")


def test_register_method_refuses_clashes_and_bad_names(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    from kv_scale_method import KV_SCALE, KVScale, KVScaleConfig

    import engine.methods as registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_method(KV_SCALE)
    assert get_method("kv-scale") is KV_SCALE
    other = KVScale(name="kv-scale", defaults=KVScaleConfig(factor=2.0), summary="another")
    with pytest.raises(ValueError, match="already registered"):
        register_method(other)
    assert register_method(other, replace=True) is get_method("kv-scale")
    with pytest.raises(ValueError, match="one word"):
        register_method(KVScale(name="two words", defaults=KVScaleConfig(), summary=""))
    with pytest.raises(TypeError, match="engine.methods.Method"):
        register_method("uce")
    with pytest.raises(TypeError, match="replace"):
        register_method(KVScale(name="no-settings", defaults={"factor": 1.0}, summary=""))
    with pytest.raises(ValueError, match="needs its objective"):
        FineTuningMethod(name="half", defaults=KVScaleConfig(), summary="")


def _install_plugin(site: Path, entries: dict[str, str]) -> dict:
    """A plug-in distribution in ``site``: its module and a dist-info declaring ``entries``."""
    (site / "kv_scale_method.py").write_text((PLUGINS / "kv_scale_method.py").read_text())
    info = site / "kv_scale_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kv-scale-plugin\nVersion: 0.1\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{name} = {value}" for name, value in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "HF_HUB_OFFLINE": "1"}


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_an_entry_point_method_runs_through_the_cli(tiny_sd_dir, tmp_path):
    env = _install_plugin(tmp_path, {"kv-scale": "kv_scale_method:KV_SCALE",
                                     "broken": "kv_scale_method:make_broken"})
    listed = _cli(env, "methods")
    assert listed.returncode == 0, listed.stderr
    assert "kv-scale (one pass): scales the cross-attention keys" in listed.stdout and '"factor": 0.5' in listed.stdout
    assert "method entry point 'broken'" in listed.stderr and "broken on purpose" in listed.stderr
    assert "uce (one pass)" in listed.stdout  # a broken plug-in does not take the built-in methods down

    names = tmp_path / "names.txt"
    names.write_text("Van Gogh\n")
    out = tmp_path / "out"
    run = _cli(env, "erase", "--model", str(tiny_sd_dir), "--concepts", str(names), "--method", "kv-scale",
               "--set", "factor=0.25", "--out", str(out), "--no-pipeline", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "erased 1 concept(s) with kv-scale:" in run.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "kv-scale" and manifest["kv_scale"]["factor"] == 0.25
    from engine.models import load_pipeline

    original = dict(load_pipeline(tiny_sd_dir).unet.named_parameters())
    edited = dict(engine.apply_delta(str(tiny_sd_dir), out / "delta.safetensors").unet.named_parameters())
    keys = [k for k in original if k.endswith("attn2.to_k.weight")]
    assert keys and manifest["kv_scale"]["layers"] == len(keys)
    for key, value in original.items():  # the delta carries exactly the plug-in's edit
        expected = value * 0.25 if key in keys else value
        torch.testing.assert_close(edited[key], expected, rtol=1e-6, atol=1e-7)

    bad = _cli(env, "erase", "--model", str(tiny_sd_dir), "--concepts", str(names), "--method", "kv-scale",
               "--set", "factor=-1", "--out", str(tmp_path / "bad"), "--quiet")
    assert bad.returncode == 2 and "factor" in bad.stderr and not (tmp_path / "bad").exists()


def test_public_api_exposes_the_registry():
    assert engine.get_method("uce") is get_method("uce")
    assert "register_method" in engine.__all__ and "available_methods" in engine.__all__
