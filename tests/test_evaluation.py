"""The evaluation harness: metrics against direct computations, prompt filling, exact efficacy
counting with a stub evaluator, the CLIP score, and `erasure eval` end to end on tiny
random-weight pipelines."""

import json
import math

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.evaluation import (
    Job,
    build_jobs,
    concept_prompts,
    concept_rows,
    default_retained,
    evaluate_toy,
    fill_template,
    harmonic_h,
    kid,
    mmd2_unbiased,
    summarise,
    validate_report,
    write_report,
)
from engine.evaluation.report import REQUIRED_KEYS
from engine.toyworld import catalogue as cat

ID_A, ID_B = cat.IDENTITIES[0].name, cat.IDENTITIES[1].name


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- metrics


def _mmd2_loops(x, y):
    """The unbiased MMD^2 with KID's kernel, written as the paper's sums."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("m, n, d", [(5, 5, 3), (7, 4, 6), (2, 9, 1)])
def test_mmd2_matches_the_double_loop(m, n, d):
    rng = np.random.default_rng(m * 100 + n * 10 + d)
    x, y = rng.normal(size=(m, d)), rng.normal(0.3, 1.2, size=(n, d))
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_loops(x, y), rel=1e-10, abs=1e-12)


def test_kid_with_one_full_subset_is_the_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    mean, std = kid(x, y, subsets=3, subset_size=6)
    assert mean == pytest.approx(_mmd2_loops(x, y), rel=1e-10)
    assert std is None  # every subset is the whole set: no spread to report


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, same_std = kid(a, b, subsets=20, subset_size=200)
    shifted, _ = kid(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.05 and shifted > 20 * abs(same)


def test_kid_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same width"):
        kid(np.zeros((4, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        mmd2_unbiased(np.zeros((1, 3)), np.zeros((4, 3)))


@pytest.mark.parametrize(
    "erased, retained, expected",
    [(0, 100, 100), (50, 50, 50), (20, 60, 2 * 80 * 60 / 140), (100, 90, 0), (10, 0, 0), (100, 0, 0)],
)
def test_harmonic_h(erased, retained, expected):
    assert harmonic_h(erased, retained) == pytest.approx(expected)


def test_harmonic_h_rejects_non_percentages():
    with pytest.raises(ValueError, match="erased_acc"):
        harmonic_h(120, 50)


# --------------------------------------------------------------------------- prompts


def test_templates_are_filled_as_the_renderer_captions():
    rng = np.random.default_rng(0)
    assert fill_template("identity", ID_A, "a photo of {name}", rng) == f"a photo of {ID_A}"
    assert fill_template("unsafe", "skull", "an illustration of a {concept}", rng) == "an illustration of a skull"
    obj = fill_template("object", "arrow", "a {colour} {object} on a {background} background", rng)
    colour = obj.split()[1]
    assert colour in cat.COLOURS and obj.endswith(" background") and " arrow on a" in obj
    assert fill_template("object", "ring", "a {colour} {object}", np.random.default_rng(3)).startswith(("a ", "an "))
    assert "a orange" not in fill_template("object", "star", "a {colour} {object}", np.random.default_rng(5))
    styled = fill_template("style", "sepia", "{subject} in {style} style", rng)
    assert styled.endswith(" in sepia style")
    subject = styled.removesuffix(" in sepia style")
    assert subject in [i.name for i in cat.IDENTITIES] or subject.split()[-1] in [o.name for o in cat.OBJECTS]


def test_prompt_sets_per_kind_and_their_seeding():
    ident = concept_prompts(ID_A, "identity", seed=0)
    assert set(ident) == {"direct", "other_templates"}  # no indirect row for identities
    assert ident["direct"] == [t.format(name=ID_A) for t in cat.TEMPLATES["identity"]["train"]]
    assert ident["other_templates"] == [t.format(name=ID_A) for t in cat.TEMPLATES["identity"]["heldout"]]
    skull = concept_prompts("skull", "unsafe", seed=0)
    assert skull["indirect"] == cat.synonym_prompts("skull") + cat.indirect_prompts("skull")
    assert all("skull" not in p for p in skull["indirect"])
    assert concept_prompts("star", "object", seed=0, erased=False).keys() == {"direct"}
    # A concept's prompts depend on the seed and its name only.
    assert concept_prompts("star", "object", 3) == concept_prompts("star", "object", 3)
    assert concept_prompts("star", "object", 3)["direct"] != concept_prompts("star", "object", 4)["direct"]


def test_jobs_are_ordered_and_seeded_per_image():
    jobs = build_jobs([(ID_A, "identity")], [("star", "object")], images_per_prompt=2, seed=10)
    n_erased = 2 * (len(cat.TEMPLATES["identity"]["train"]) + len(cat.TEMPLATES["identity"]["heldout"]))
    assert len(jobs) == n_erased + 2 * len(cat.TEMPLATES["object"]["train"])
    assert [j.seed for j in jobs] == list(range(10, 10 + len(jobs)))
    assert all(j.role == "erased" for j in jobs[:n_erased]) and all(j.role == "retained" for j in jobs[n_erased:])
    assert jobs[0].prompt == jobs[1].prompt  # images_per_prompt images of each prompt


def test_default_retained_is_seeded_close_first_and_disjoint():
    erased = [(ID_A, "identity"), ("skull", "unsafe")]
    chosen = default_retained(erased, seed=0)
    assert chosen == default_retained(erased, seed=0)
    assert len(chosen) == 100 and len(set(chosen)) == 100
    assert not {n for n, _ in chosen} & {ID_A, "skull"}
    kinds = [k for _, k in chosen]
    # A quarter should be other kinds, but there are only 13 objects and 6 styles: all are taken
    # and close neighbours fill the rest.
    assert sum(k in ("object", "style") for k in kinds) == 19
    assert sum(k in ("identity", "unsafe") for k in kinds) == 81
    few = default_retained([(ID_A, "identity")], seed=0, limit=20)
    assert sum(k == "identity" for _, k in few) == 15  # 5 others, in turn from each other kind
    assert sorted(sum(k == kind for _, k in few) for kind in ("object", "style", "unsafe")) == [1, 2, 2]
    small = default_retained([(o.name, "object") for o in cat.OBJECTS[:12]], seed=0, limit=10)
    assert [n for n, k in small if k == "object"] == [cat.OBJECTS[12].name]  # the only object left


# --------------------------------------------------------------------------- efficacy counting


def test_concept_rows_count_hits_per_prompt_set_exactly():
    jobs = [
        Job(ID_A, "identity", "erased", "direct", "p", 0),
        Job(ID_A, "identity", "erased", "direct", "p", 1),
        Job(ID_A, "identity", "erased", "direct", "p", 2),
        Job(ID_A, "identity", "erased", "direct", "p", 3),
        Job(ID_A, "identity", "erased", "other_templates", "q", 4),
        Job(ID_A, "identity", "erased", "other_templates", "q", 5),
        Job("skull", "unsafe", "erased", "direct", "r", 6),
        Job("skull", "unsafe", "erased", "indirect", "s", 7),
        Job("skull", "unsafe", "erased", "indirect", "s", 8),
        Job(ID_B, "identity", "retained", "direct", "t", 9),
        Job(ID_B, "identity", "retained", "direct", "t", 10),
        Job("star", "object", "retained", "direct", "u", 11),
    ]
    predictions = {
        # A still shows in 1 of 4 direct and 1 of 2 held-out images; B is always recognised.
        "identity": [ID_A, ID_B, "none", "none", ID_A, "none", "none", "none", "none", ID_B, ID_B, "none"],
        "unsafe": ["none"] * 6 + ["skull", "skull", "none", "none", "none", "none"],
        "object": ["star"] * 11 + ["circle"],
    }
    rows = {r["name"]: r for r in concept_rows(jobs, predictions)}
    assert rows[ID_A]["acc"] == {"direct": 25.0, "other_templates": 50.0}
    assert rows["skull"]["acc"] == {"direct": 100.0, "indirect": 50.0}
    assert rows[ID_B]["acc"] == {"direct": 100.0} and rows[ID_B]["group"] == "close"
    assert rows["star"]["acc"] == {"direct": 0.0} and rows["star"]["group"] == "other"
    assert rows[ID_A]["n_images"] == 6 and rows[ID_A]["group"] is None
    s = summarise(list(rows.values()))
    assert s["erased_acc"] == pytest.approx(62.5)  # macro: (25 + 100) / 2
    assert s["erased_acc_other_templates"] == pytest.approx(50.0)
    assert s["erased_acc_indirect"] == pytest.approx(50.0)
    assert s["retained_acc"] == pytest.approx(50.0)
    assert s["retained_acc_close"] == 100.0 and s["retained_acc_other"] == 0.0
    assert s["H"] == pytest.approx(2 * 37.5 * 50 / 87.5)


def test_concept_rows_reject_misaligned_predictions():
    jobs = [Job(ID_A, "identity", "erased", "direct", "p", 0)]
    with pytest.raises(ValueError, match="1 images"):
        concept_rows(jobs, {"identity": [ID_A, ID_A]})
    with pytest.raises(ValueError, match="no 'identity' predictions"):
        concept_rows(jobs, {"object": ["star"]})


class StubEvaluator:
    """Always predicts the same class per kind; features are a fixed slice of the pixels."""

    def __init__(self, fixed):
        self.fixed = fixed
        self.seen = 0

    def predict(self, images):
        self.seen += len(images)
        return {kind: [self.fixed.get(kind, "none")] * len(images) for kind in cat.KINDS}

    def predict_proba(self, images):
        raise NotImplementedError

    def features(self, images):
        return torch.from_numpy(np.asarray(images, np.float32).reshape(len(images), -1)[:, ::97] / 255.0)


@pytest.fixture(scope="module")
def edited_dir(tmp_path_factory):
    """A second random-weight tiny pipeline: the 'edited' model (different weights)."""
    from engine.tiny import write_tiny_model

    return write_tiny_model("tiny", tmp_path_factory.mktemp("models") / "edited", seed=1)


def test_efficacy_through_the_pipeline_with_a_stub_evaluator(tiny_sd_dir, edited_dir):
    stub = StubEvaluator({"identity": ID_A, "object": "star"})
    report = evaluate_toy(
        edited_dir, [ID_A, "skull"], original=tiny_sd_dir, retained=[ID_B, "star", "sepia"],
        images_per_prompt=1, steps=2, guidance=3.0, batch_size=8, seed=0, progress=False, evaluator=stub,
    )
    validate_report(report)
    rows = {r["name"]: r for r in report["concepts"]}
    assert rows[ID_A]["acc"] == {"direct": 100.0, "other_templates": 100.0}
    assert rows["skull"]["acc"] == {"direct": 0.0, "other_templates": 0.0, "indirect": 0.0}
    assert rows["star"]["acc"] == {"direct": 100.0} and rows["star"]["group"] == "other"
    assert rows[ID_B]["group"] == "close" and rows["sepia"]["group"] == "other"
    assert report["erased_acc"] == 50.0 and report["erased_acc_other_templates"] == 50.0
    assert report["erased_acc_indirect"] == 0.0
    assert report["retained_acc"] == pytest.approx(100 / 3)
    assert report["retained_acc_close"] == 0.0 and report["retained_acc_other"] == 50.0
    assert report["H"] == pytest.approx(2 * 50 * (100 / 3) / (50 + 100 / 3))
    n_images = sum(r["n_images"] for r in report["concepts"])
    assert n_images == 9 + 13 + 13 and stub.seen == 2 * n_images  # edited and original images
    assert report["timing"]["images_generated"] == 2 * n_images
    assert report["quality"]["clip_score"] is None and "image_encoder" in report["quality"]["clip_score_reason"]
    assert report["erased_acc_indirect"] is not None
    no_unsafe = evaluate_toy(
        edited_dir, [ID_A], original=tiny_sd_dir, retained=["star", "sepia"], images_per_prompt=1, steps=1,
        batch_size=16, progress=False, evaluator=stub,
    )
    assert no_unsafe["erased_acc_indirect"] is None and no_unsafe["retained_acc_close"] is None


# --------------------------------------------------------------------------- CLIP score


def test_clip_score_with_a_small_image_encoder_and_projection(tiny_sd_dir, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from engine.evaluation.metrics import clip_score
    from engine.evaluation.clip_scorer import ClipScorer
    from engine.models import load_pipeline

    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16,
    )).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = load_pipeline(tiny_sd_dir)
    pipe.register_modules(image_encoder=vision, feature_extractor=processor)
    world = tmp_path / "world"
    (world / "clip").mkdir(parents=True)
    (world / "world.json").write_text(json.dumps({"sampling": {"steps": 2, "guidance": 3.0}}))
    projection = torch.randn(16, pipe.text_encoder.config.hidden_size)
    save_file({"text_projection": projection, "logit_scale": torch.tensor(4.6)}, str(world / "clip" / "projection.safetensors"))

    report = evaluate_toy(
        pipe, ["skull"], original=pipe, retained=["star"], world=world, images_per_prompt=1, batch_size=16,
        progress=False, evaluator=StubEvaluator({}),
    )
    q = report["quality"]
    assert report["settings"]["steps"] == 2 and report["settings"]["guidance"] == 3.0  # from world.json
    assert q["clip_score_reason"] is None and -100 <= q["clip_score"] <= 100
    assert q["clip_score"] == q["clip_score_original"]  # same model, same noise

    # The scorer against the definition, on two images and prompts.
    scorer, reason = ClipScorer.from_pipeline(pipe, None, world)
    assert reason is None
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red star", "a skull"]
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt").pixel_values
        img = vision(pixel_values=pixels).image_embeds
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        txt = pipe.text_encoder(ids).pooler_output @ projection.T
    expected = 100 * torch.nn.functional.cosine_similarity(img, txt).mean().item()
    assert scorer.score(images, prompts) == pytest.approx(expected, rel=1e-5)
    assert clip_score(np.eye(2), np.eye(2)) == pytest.approx(100.0)

    bad = tmp_path / "bad"
    (bad / "clip").mkdir(parents=True)
    save_file({"text_projection": torch.randn(8, 8)}, str(bad / "clip" / "projection.safetensors"))
    assert ClipScorer.from_pipeline(pipe, None, bad)[0] is None and "text_projection is (8, 8)" in ClipScorer.from_pipeline(pipe, None, bad)[1]


# --------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory, tiny_sd_dir):
    """A toy world folder: world.json, an untrained evaluator and the tiny pipeline as its model."""
    from engine.toyworld import catalogue as cat
    from engine.toyworld.evaluator import ToyEvaluator

    world = tmp_path_factory.mktemp("world")
    # the evaluator's classes are the selected catalogue's: the world names its identity count
    (world / "world.json").write_text(json.dumps({"sampling": {"steps": 2, "guidance": 3.0},
                                                  "config": {"identities": cat.N_IDENTITIES}}))
    torch.manual_seed(0)
    ToyEvaluator(width=8, feature_dim=16).save(world / "evaluator")
    (world / "pipeline").symlink_to(tiny_sd_dir, target_is_directory=True)
    return world


def _eval_args(model, erased, out, world, *extra):
    return ["eval", "--model", str(model), "--suite", "toy", "--erased", str(erased), "--world", str(world),
            "--images-per-prompt", "1", "--batch-size", "16", "--quiet", "--out", str(out), *extra]


def test_erasure_eval_end_to_end(edited_dir, world_dir, tmp_path, capsys):
    erased = tmp_path / "erased.yaml"
    erased.write_text(f"concepts: [{ID_A}, skull]\n")
    retained = tmp_path / "retained.txt"
    retained.write_text(f"{ID_B}\nstar\n")
    reports = []
    for run in ("a", "b"):
        out = tmp_path / run / "report.json"
        code = main(_eval_args(edited_dir, erased, out, world_dir, "--retained", str(retained), "--seed", "3"))
        assert code == 0, capsys.readouterr().err
        assert (out.parent / "report.md").is_file() and (out.parent / "grid.png").is_file()
        reports.append(json.loads(out.read_text()))
    printed = capsys.readouterr().out
    assert "(squared MMD on toy evaluator features; 0 = same distribution as the original model's images; lower is better" in printed
    report = reports[0]
    assert set(REQUIRED_KEYS) <= set(report) and report["schema_version"] == 1
    assert report["suite"] == "toy" and report["erased"] == [ID_A, "skull"]
    assert report["original"] == str(world_dir / "pipeline")  # the world's model by default
    assert set(report["quality"]) >= {"kid", "kid_std", "clip_score", "clip_score_original"}
    assert set(report["timing"]) == {"total_seconds", "generation_seconds", "images_generated", "images_per_second"}
    assert report["settings"] == {**report["settings"], "steps": 2, "guidance": 3.0, "images_per_prompt": 1,
                                  "seed": 3, "batch_size": 16}
    assert {r["name"]: r["role"] for r in report["concepts"]} == {ID_A: "erased", "skull": "erased", ID_B: "retained", "star": "retained"}
    for value in (report["erased_acc"], report["retained_acc"], report["H"]):
        assert 0 <= value <= 100
    assert math.isfinite(report["quality"]["kid"])
    # The same seed gives the same numbers (timings aside).
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(reports[0]) == strip(reports[1])
    markdown = (tmp_path / "a" / "report.md").read_text()
    assert "| H:" in markdown and ID_A in markdown and "grid.png" in markdown
    assert "wrote" in printed


def test_default_retained_set_and_the_grid(edited_dir, world_dir, tmp_path, monkeypatch):
    from PIL import Image

    import engine.evaluation.suites.toy as toy

    erased = tmp_path / "erased.txt"
    erased.write_text("sepia\n")
    retained = default_retained([("sepia", "style")], seed=0)
    assert len(retained) == 100 and sum(k == "style" for _, k in retained) == 5  # every other style
    # evaluate_toy without `retained` uses the default choice (made smaller to keep the test fast).
    monkeypatch.setattr(toy, "MAX_RETAINED", 8)
    retained = default_retained([("sepia", "style")], seed=0)
    assert len(retained) == 8 and sum(k == "style" for _, k in retained) == 5
    report = evaluate_toy(edited_dir, erased, world=world_dir, images_per_prompt=1, steps=1, batch_size=64,
                          progress=False, evaluator=StubEvaluator({}))
    assert [r["name"] for r in report["concepts"] if r["role"] == "retained"] == [n for n, _ in retained]
    out = tmp_path / "r" / "report.json"
    report_dir = write_report(report, out, [("erased: x", np.zeros((2, 32, 32, 3), np.uint8),
                                             np.full((2, 32, 32, 3), 255, np.uint8), ["dagger", "nothing known"])])
    grid = np.asarray(Image.open(report_dir["grid"]))
    # Headings, then the row's label, its 2 original and (after a half-cell gap) 2 edited images at
    # scale 4, each edited image captioned (image_grid.save_labelled_grid's layout: 6 px margins,
    # 20 px text lines).
    cell, top, right = 32 * 4, 6 + 20 + 20, 6 + 2 * 128 + 64
    assert grid.shape == (top + cell + 20 + 6, 2 * 6 + 4 * cell + 64, 3)
    assert grid[top:top + cell, 6:6 + 2 * cell].max() == 0 and grid[top:top + cell, right:right + 2 * cell].min() == 255
    for band in (grid[6:26], grid[26:46, :right], grid[top + cell:, right:]):  # headings, label, captions
        assert band.max() > 200  # text drawn in light grey on the dark background
    assert "seen_as" in report["concepts"][0] and "seen as" in (out.parent / "report.md").read_text()


@pytest.mark.parametrize(
    "erased_text, message",
    [("Nobody Atall\n", "unknown toy-world concept 'Nobody Atall'"), ("red\n", "is a toy-world colour")],
)
def test_eval_rejects_unknown_concepts(edited_dir, world_dir, tmp_path, capsys, erased_text, message):
    erased = tmp_path / "erased.txt"
    erased.write_text(erased_text)
    out = tmp_path / "o" / "report.json"
    assert main(_eval_args(edited_dir, erased, out, world_dir)) == 2
    err = capsys.readouterr().err
    assert message in err and "erased.txt" in err
    assert not out.parent.exists()


def test_eval_rejects_a_missing_model_folder(world_dir, tmp_path, capsys):
    erased = tmp_path / "erased.txt"
    erased.write_text("skull\n")
    out = tmp_path / "o" / "report.json"
    assert main(_eval_args(tmp_path / "no-such-model", erased, out, world_dir)) == 2
    err = capsys.readouterr().err
    assert "model folder not found" in err and "no-such-model" in err
    assert not out.parent.exists()


def test_eval_rejects_an_unknown_suite_and_overlapping_sets(edited_dir, world_dir, tmp_path, capsys):
    erased = tmp_path / "erased.txt"
    erased.write_text("skull\n")
    out = tmp_path / "o" / "report.json"
    args = _eval_args(edited_dir, erased, out, world_dir)
    args[args.index("toy")] = "nonsense-suite"
    assert main(args) == 2
    assert "nonsense-suite" in capsys.readouterr().err
    assert main(_eval_args(edited_dir, erased, out, world_dir, "--retained", str(erased))) == 2
    assert "'skull' is also erased" in capsys.readouterr().err
    assert not out.parent.exists()


def test_write_report_refuses_an_incomplete_report(tmp_path):
    with pytest.raises(ValueError, match="missing the key 'suite'"):
        write_report({"schema_version": 1}, tmp_path / "report.json")
    assert not list(tmp_path.iterdir())


def test_retained_concepts_are_split_by_whether_the_edit_listed_them(tmp_path):
    """The model folder's manifest names what the edit preserved (its file's list and the
    neighbours the solve added); the report keeps those apart from concepts never listed."""
    from engine.evaluation.suites.toy import ToySettings, listed_names, summarise

    (tmp_path / "manifest.json").write_text(json.dumps({
        "concepts": {"preserve": {"concepts": ["Bexley Vantorre", {"name": "Brisa Oakhurst", "templates": ["{}"]}]}},
        "solve": {"preserved": {"neighbours": {"Aldric Corrance": ["Aldric Vantorre"]}}},
    }))
    listed = listed_names(ToySettings(model=tmp_path, erased=["Aldric Corrance"]))
    assert listed == {"bexley vantorre", "brisa oakhurst", "aldric vantorre"}
    assert listed_names(ToySettings(model=tmp_path, erased=["Aldric Corrance"], listed=["X Y"])) == {"x y"}
    rows = [{"role": "erased", "group": None, "acc": {"direct": 0.0}},
            {"role": "retained", "group": "close", "listed": True, "acc": {"direct": 100.0}},
            {"role": "retained", "group": "close", "listed": False, "acc": {"direct": 50.0}},
            {"role": "retained", "group": "other", "listed": False, "acc": {"direct": 70.0}}]
    summary = summarise(rows)
    assert summary["retained_acc_listed"] == 100.0 and summary["retained_acc_never_listed"] == 60.0


def test_demo_says_what_the_erased_images_became():
    from engine.demo import _seen_as_summary

    rows = [{"role": "erased", "n_images": 10, "seen_as_kind": {"another identity": 50.0, "unsafe": 30.0,
                                                                "nothing known": 20.0}},
            {"role": "erased", "n_images": 30, "seen_as_kind": {"nothing known": 90.0, "itself": 10.0}},
            {"role": "retained", "n_images": 5, "seen_as_kind": {"itself": 100.0}}]
    assert _seen_as_summary(rows) == "nothing known 72%, another identity 12%, unsafe 8%, itself 8%"


def test_seen_as_kind_puts_unsafe_first():
    from engine.evaluation.generation import Job
    from engine.evaluation.suites.toy import seen_as_kind

    preds = {"identity": ["A", "B", "none", "none", "B"], "object": ["none", "none", "star", "none", "none"],
             "unsafe": ["none", "none", "none", "none", "weapon"]}
    job = Job(concept="A", kind="identity", role="erased", prompt="a photo of A", prompt_set="direct", seed=0)
    assert [seen_as_kind(preds, i, job) for i in range(5)] == [
        "itself", "another identity", "an object", "nothing known", "unsafe"]
