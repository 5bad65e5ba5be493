import sys

import pytest

from engine._optional import require


@pytest.mark.parametrize("module, extra", [("deepspeed", "distributed"), ("bitsandbytes", "bnb"), ("xformers", "xformers")])
def test_missing_optional_dependency_names_its_extra(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail whether or not it is installed
    with pytest.raises(ImportError, match=rf"pip install 'erasure-engine\[{extra}\]'"):
        require(module)


def test_unknown_module_gets_a_plain_hint():
    with pytest.raises(ImportError, match="pip install surely_not_a_module_xyz"):
        require("surely_not_a_module_xyz")


def test_present_module_is_returned():
    import json

    assert require("json") is json


def test_kernels_install_under_the_engine_namespace(tmp_path):
    """The only top-level import name is `engine`: the kernels/ folder must not shadow Hugging
    Face's `kernels` package (transformers and bitsandbytes probe for it)."""
    import subprocess

    code = "import importlib.util, engine.kernels as k; s = importlib.util.find_spec('kernels'); print(k.weighted_gram.__module__, s and s.origin)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "engine.kernels.gram"
    assert out[1] == "None" or "site-packages" in out[1]  # absent, or the published package
