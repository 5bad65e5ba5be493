"""The toy worlds shipped with the package: present, intact, loadable, and as good as their cards say."""

import zlib

import numpy as np
import pytest
import torch

from engine.toyworld import make_dataset
from engine.toyworld.world import (SHIPPED, SHIPPED_WORLDS, load_toy_evaluator, load_toy_pipeline, verify_world,
                                   world_info, world_path)

# The repository ships engine/toyworld/assets (v1, the default) and assets_v2: these tests fail if
# any of their files is missing or corrupted, or if a world is not as good as its card says.


@pytest.fixture(params=sorted(SHIPPED_WORLDS))
def shipped(request):
    return SHIPPED_WORLDS[request.param]


def test_shipped_world_is_present_and_intact(shipped):
    # Fails when a shipped file is missing or its bytes differ from the sha256 in world.json.
    assert verify_world(shipped) == shipped
    info = world_info(shipped)
    # Weighed as git and wheels store it: compressed (a text encoder's unseen token rows are zeros).
    stored = sum(len(zlib.compress((shipped / rel).read_bytes(), 6)) for rel in info["files"])
    assert stored <= 60_000_000, f"{shipped} stores {stored / 1e6:.1f} MB compressed (budget 60 MB)"


def test_a_shipped_world_is_named_where_no_folder_has_its_name(tmp_path, monkeypatch):
    from engine.toyworld import catalogue as cat

    monkeypatch.chdir(tmp_path)
    assert world_path("v1") == SHIPPED_WORLDS["v1"] and cat.N_IDENTITIES == 128
    assert world_path("v2") == SHIPPED == world_path() and cat.N_IDENTITIES == 432
    (tmp_path / "v2").mkdir()  # a folder of that name is what the user means
    with pytest.raises(FileNotFoundError, match="no toy world"):
        world_path("v2")


def test_shipped_gates_are_recorded_in_the_card(shipped):
    info = world_info(shipped)
    assert info["gates"] is not None, "run `erasure toyworld gates` on the shipped world"
    card = (shipped / "README.md").read_text()
    assert "## Quality gates" in card
    for kind, value in info["gates"]["summary"]["generated_heldout"].items():
        assert f"{value:.1f}%" in card, kind
    failed = [name for name, ok in info["gates"]["summary"]["checks"].items() if not ok]
    assert not failed, f"the shipped world misses these gates: {failed}"


def test_shipped_evaluator_recognises_fresh_renders(shipped):
    evaluator = load_toy_evaluator(shipped)  # selects the world's catalogue, which the renders use
    data = make_dataset(300, seed=424242, split="heldout")
    pred = evaluator.predict(data["images"])
    for kind in ("identity", "object", "style", "unsafe"):
        shown = [i for i, lbl in enumerate(data["labels"]) if kind in lbl]
        acc = np.mean([pred[kind][i] == data["labels"][i][kind] for i in shown])
        assert acc >= 0.95, (kind, acc)


def test_shipped_pipeline_and_ip_adapter_generate(shipped):
    from PIL import Image

    pipe = load_toy_pipeline(shipped, ip_adapter=True)
    assert len(pipe.tokenizer) == 49408
    image = Image.fromarray(make_dataset(1, seed=3)["images"][0])
    out = pipe("a photo of Aldric Corrance", ip_adapter_image=image, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


@pytest.mark.parametrize("kind", ["identity", "unsafe"])
def test_shipped_pipeline_draws_what_it_is_asked(kind, shipped):
    """A small, fixed sample of the gate measurement: the generated concept is recognised."""
    from engine.evaluation.generation import generate_images
    from engine.evaluation.suites.toy import build_jobs, concept_rows, predict
    from engine.toyworld import concepts

    pipe = load_toy_pipeline(shipped)
    names = concepts(kind)[:4]
    jobs = [j for j in build_jobs([(n, kind) for n in names], [], 1, seed=0) if j.prompt_set == "direct"]
    sampling = world_info(shipped)["sampling"]
    images = generate_images(pipe, jobs, steps=sampling["steps"], guidance=sampling["guidance"], batch_size=64)
    rows = concept_rows(jobs, predict(load_toy_evaluator(shipped), images))
    acc = np.mean([r["acc"]["direct"] for r in rows])
    assert acc >= 50, rows
