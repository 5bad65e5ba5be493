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
