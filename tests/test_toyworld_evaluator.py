"""The toy world's evaluator: heads, input forms, save/load round trip and errors, label targets,
and a short training run that must learn something."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.toyworld import catalogue as cat
from engine.toyworld.evaluator import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ToyEvaluator,
    _attribute_targets,
    attribute_values,
    augment,
    heads,
    labels_to_targets,
    to_tensor,
    train_evaluator,
)
from engine.toyworld.render import Scene, make_dataset, render


@pytest.fixture(scope="module")
def trained():
    """A small evaluator from a short training run, and its metrics (a few seconds).

    One thread: a width-16 model gains nothing from more, and on a busy machine threads that
    wait for each other make it many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_evaluator(n_train=2000, n_heldout=600, seed=0, epochs=3, batch_size=32, lr=6e-3, width=16,
                               hard_extra=200, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_heads_cover_every_concept_plus_none():
    assert list(heads()) == list(cat.KINDS)
    for kind, names in heads().items():
        assert names == cat.concepts(kind) + ["none"]
    assert len(heads()["identity"]) == len(cat.IDENTITIES) + 1


def test_default_model_size():
    model = ToyEvaluator()
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 <= n <= 1.5e6
    assert 4 * n <= 6e6  # fp32 weights within 6 MB
    out = model(torch.rand(2, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, len(v)) for k, v in heads().items()}


def test_to_tensor_accepts_three_forms_identically():
    images = make_dataset(5, seed=3)["images"]  # 5 x 32 x 32 x 3 uint8
    from_array = to_tensor(images)
    from_pil = to_tensor([Image.fromarray(im) for im in images])
    from_tensor = to_tensor(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert from_array.shape == (5, 3, 32, 32) and from_array.dtype == torch.float32
    assert torch.equal(from_array, from_pil) and torch.equal(from_array, from_tensor)
    assert 0 <= from_array.min() and from_array.max() <= 1
    assert torch.equal(to_tensor(images[2]), from_array[2:3])  # np.array(one PIL image)
    assert torch.equal(to_tensor(np.array(Image.fromarray(images[1])))[0], from_array[1])
    assert to_tensor([]).shape == (0, 3, 32, 32)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 28, 28, 3), np.uint8), "N x 32 x 32 x 3"),
        (np.zeros((2, 32, 32, 4), np.uint8), "N x 32 x 32 x 3"),
        (np.zeros((2, 3, 32, 32), np.uint8), "N x 32 x 32 x 3"),  # channels first
        (np.zeros((2, 32, 32, 3), np.float32), "uint8"),
        ([Image.new("L", (32, 32))], "N x 32 x 32 x 3"),
        ([Image.new("RGBA", (32, 32))], "N x 32 x 32 x 3"),
        ([Image.new("RGB", (64, 64))], "N x 32 x 32 x 3"),
        ([Image.new("RGB", (32, 32)), Image.new("RGB", (16, 16))], "32 x 32 RGB"),
        (torch.zeros(2, 32, 32, 3), "B x 3 x 32 x 32"),
        (torch.zeros(3, 32, 32), "B x 3 x 32 x 32"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float"),
        (torch.full((2, 3, 32, 32), -1.0), r"\[0, 1\]"),
        ("image.png", "uint8 numpy array"),
    ],
)
def test_to_tensor_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        to_tensor(bad)


def test_augment_is_mild_and_keeps_shape():
    x = to_tensor(make_dataset(32, seed=4)["images"])
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    diff = (y - x).abs().mean().item()
    assert 0.005 < diff < 0.2  # changed, but the scene is still the scene


def test_labels_to_targets():
    obj = render(Scene("object", "star", "red", "sky", None, 1))
    person = render(Scene("identity", cat.IDENTITIES[5].name, None, "grass", "neon", 2))
    skull = render(Scene("unsafe", "skull", None, "checkered", None, 3))
    t = labels_to_targets([obj.labels, person.labels, skull.labels])
    none = {kind: len(names) - 1 for kind, names in heads().items()}
    assert t["identity"].tolist() == [none["identity"], 5, none["identity"]]
    assert t["object"].tolist() == [heads()["object"].index("star"), none["object"], none["object"]]
    assert t["colour"].tolist() == [heads()["colour"].index("red"), none["colour"], none["colour"]]
    # neon paints over the background: that head's target is "none"
    background = heads()["background"]
    assert t["background"].tolist() == [background.index("sky"), none["background"], background.index("checkered")]
    assert t["style"].tolist() == [none["style"], heads()["style"].index("neon"), none["style"]]
    assert t["unsafe"].tolist() == [none["unsafe"], none["unsafe"], heads()["unsafe"].index("skull")]
    assert all(v.dtype == torch.long for v in t.values())
    with pytest.raises(ValueError, match="unknown object"):
        labels_to_targets([{"object": "teapot"}])
    with pytest.raises(ValueError, match="kind"):
        labels_to_targets([{"mood": "happy"}])


def test_attribute_targets_skip_colours_on_pencil_sketches():
    person = cat.IDENTITIES[7]
    labels = [{"identity": person.name}, {"identity": person.name, "style": "pencil sketch"}, {"object": "star"}]
    t = _attribute_targets(labels)
    assert t["hair_shape"].tolist() == [attribute_values()["hair_shape"].index(person.hair_shape)] * 2 + [-100]
    assert t["shirt_colour"].tolist() == [attribute_values()["shirt_colour"].index(person.shirt_colour), -100, -100]


def test_short_training_beats_chance(trained):
    model, metrics = trained
    assert not model.training
    assert metrics["n_train"] == 2000 and metrics["n_hard_extra"] == 200 and metrics["n_heldout"] == 600
    assert metrics["seconds"] > 0
    acc, acc_all = metrics["heldout_accuracy"], metrics["heldout_accuracy_all"]
    assert set(acc) == set(acc_all) == set(heads())
    for kind in heads():
        assert 0 <= acc[kind] <= 100 and 0 <= acc_all[kind] <= 100
    # A few hundred steps with a tiny trunk: the heads that need no identity must clearly beat
    # chance (colour 1 in 8, background 1 in 6; an untrained model scores about that).
    assert acc["colour"] > 35, acc
    assert acc["background"] > 60, acc
    by_style = metrics["heldout_accuracy_by_style"]
    assert set(by_style) <= set(heads()["style"]) and "unsafe" in by_style["none"]


def test_predict_and_features(trained):
    model, _ = trained
    data = make_dataset(20, seed=11)
    proba = model.predict_proba(data["images"], batch_size=7)
    names = model.predict(data["images"], batch_size=7)
    for kind, classes in heads().items():
        assert proba[kind].shape == (20, len(classes))
        assert torch.allclose(proba[kind].sum(-1), torch.ones(20), atol=1e-5)
        assert names[kind] == [classes[i] for i in proba[kind].argmax(-1).tolist()]
    feats = model.features(data["images"])
    assert feats.shape == (20, model.feature_dim) and not feats.requires_grad
    model.train()  # predict switches to eval mode and back
    assert model.predict(data["images"]) == names and model.training
    model.eval()


def test_save_load_round_trip(trained, tmp_path):
    model, _ = trained
    folder = model.save(tmp_path / "evaluator")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp files
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["width"] == 16 and config["heads"] == heads()
    loaded = ToyEvaluator.load(folder)
    assert not loaded.training and loaded.width == 16 and loaded.feature_dim == model.feature_dim
    images = make_dataset(64, seed=12345)["images"]
    assert loaded.predict(images) == model.predict(images)
    for kind, p in model.predict_proba(images).items():
        assert torch.equal(loaded.predict_proba(images)[kind], p)
    assert torch.equal(loaded.features(images), model.features(images))
    model.save(folder)  # overwriting an existing save works
    assert ToyEvaluator.load(folder).predict(images) == model.predict(images)


def test_default_model_file_fits(tmp_path):
    folder = ToyEvaluator().save(tmp_path / "big")
    assert (folder / WEIGHTS_NAME).stat().st_size <= 6e6


def test_load_errors(tmp_path):
    small = ToyEvaluator(width=8, feature_dim=16)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        ToyEvaluator.load(tmp_path / "nowhere")
    folder = small.save(tmp_path / "ev")
    (folder / WEIGHTS_NAME).rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        ToyEvaluator.load(folder)
    (tmp_path / "weights").rename(folder / WEIGHTS_NAME)
    ToyEvaluator.load(folder)

    # The catalogue changed since training: heads differ.
    config = json.loads((folder / CONFIG_NAME).read_text())
    changed = dict(config, heads=dict(config["heads"], colour=config["heads"]["colour"][1:]))
    (folder / CONFIG_NAME).write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="colour"):
        ToyEvaluator.load(folder)

    # Weights for another width than the config says.
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config, width=10)))
    with pytest.raises(ValueError, match="shape"):
        ToyEvaluator.load(folder)

    # A tensor missing from the weights.
    from safetensors.torch import load_file, save_file

    (folder / CONFIG_NAME).write_text(json.dumps(config))
    state = load_file(str(folder / WEIGHTS_NAME))
    state.pop("heads.style.bias")
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="heads.style.bias"):
        ToyEvaluator.load(folder)

    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not an evaluator config"):
        ToyEvaluator.load(folder)
