"""Every input of ``erase`` / ``erase_with_adapters`` is checked before the model is loaded: a
bad concept file, setting or preset fails at once, without load_pipeline being called."""

import pytest

import engine
import engine.api as api
from engine.cli import main
from engine.concepts import ConceptFileError


@pytest.fixture
def no_loading(monkeypatch):
    calls = []

    def load_pipeline(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(api, "load_pipeline", load_pipeline)
    return calls


@pytest.fixture
def bad_concepts(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("concepts:\n  - {name: cat, weight: lots}\n")
    return path


@pytest.mark.parametrize("entry", ["erase", "erase_with_adapters"])
def test_bad_input_fails_before_the_model_loads(entry, no_loading, bad_concepts, tmp_path):
    run = getattr(engine, entry)
    kw = {"method": "esd"} if entry == "erase" else {}
    with pytest.raises((ConceptFileError, ValueError)):
        run("some/model", str(bad_concepts), **kw)
    with pytest.raises(ConceptFileError, match="not found"):
        run("some/model", str(tmp_path / "missing.yaml"), **kw)
    with pytest.raises(ValueError, match="iterations"):
        run("some/model", ["cat"], iterations=0, **kw)
    with pytest.raises(ValueError, match="lr"):
        run("some/model", ["cat"], lr="fast", **kw)
    with pytest.raises(ValueError, match="no preset 'huge'"):
        run("some/model", ["cat"], preset="huge", **kw)
    assert no_loading == []


def test_cli_bad_concept_file_fails_before_the_model_loads(no_loading, bad_concepts, tmp_path, capsys):
    code = main(["erase", "--model", "some/model", "--concepts", str(bad_concepts), "--method", "esd",
                 "--out", str(tmp_path / "out")])
    assert code == 2 and no_loading == [] and not (tmp_path / "out").exists()
    assert "bad.yaml" in capsys.readouterr().err
