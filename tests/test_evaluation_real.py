"""Prompt-file readers and the real-model evaluation suites (nudity, clip, fid) on the tiny model."""

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.evaluation import cli as eval_cli
from engine.evaluation.generation import Job, generate_images, guidance_batches
from engine.evaluation.metrics import frechet_distance, gaussian_stats, harmonic_h
from engine.evaluation.prompts import (
    PromptFileError,
    PromptRow,
    load_prompt_csv,
    load_prompt_file,
    read_prompt_file,
)
from engine.evaluation.report import write_report
from engine.evaluation.suites import base, nudity
from engine.evaluation.suites.base import SuiteRun, prompt_jobs

DATA = Path(__file__).parent / "data" / "eval"


pytestmark = pytest.mark.usefixtures("one_thread")


def make_args(**options):
    """The options of `erasure eval`, parsed as the command parses them.

    Keyword arguments become command-line options: clip_model="x" -> --clip-model x.
    """
    p = argparse.ArgumentParser()
    eval_cli.add_eval_args(p)
    argv = ["--quiet", "--steps", "2", "--out", "unused"]
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return p.parse_args(argv)


def check_report(report, suite):
    from engine.evaluation.report import render_markdown, validate_report

    validate_report(report)
    assert report["suite"] == suite
    assert "torch" in report["versions"] and "diffusers" in report["versions"]
    t = report["timing"]
    assert t["total_seconds"] >= t["generation_seconds"] >= 0 and t["images_generated"] >= 0
    assert report["settings"]["steps"] == 2
    assert "| metric (%, 0-100) |" in render_markdown(report)


# --------------------------------------------------------------------------- prompt files


def test_i2p_layout():
    pf = read_prompt_file(DATA / "i2p.csv")
    assert pf.format == "i2p"
    assert pf.columns["seed"] == "sd_seed" and pf.columns["guidance"] == "sd_guidance_scale"
    rows = pf.rows
    assert [r.seed for r in rows] == [2734971755, 12, 4294967295, None]
    assert [r.guidance for r in rows] == [7.0, 9.0, 7.5, None]
    assert rows[0].prompt == "a red apple on a wooden table, still life"
    assert rows[1].categories == ("violence", "shocking")
    assert rows[3].prompt == "a bowl of soup,\nsteam rising"  # a quoted cell over two lines


def test_unlearndiffatk_layout_ignores_the_index_column():
    pf = read_prompt_file(DATA / "unlearndiffatk.csv")
    assert pf.columns == {
        "prompt": "prompt",
        "seed": "evaluation_seed",
        "guidance": "evaluation_guidance",
        "categories": "categories",
        "case_number": "case_number",
    }
    assert pf.rows[0] == PromptRow("a watercolor of a mountain lake", 932309623, 7.0, ("self-harm",), "21")
    assert pf.rows[1].categories == ("shocking", "sexual")


def test_ring_a_bell_mma_and_sensitive_prompt_layouts():
    ring = read_prompt_file(DATA / "ring_a_bell.csv")
    assert ring.format == "ring-a-bell"
    assert [(r.prompt, r.seed, r.case_number) for r in ring.rows][0] == ("garden teapot sunny porch flowers", 41, "0")
    assert all(r.guidance is None and r.categories == () for r in ring.rows)

    mma = read_prompt_file(DATA / "mma.csv")
    assert mma.format == "mma-diffusion" and mma.columns["prompt"] == "adv_prompt"
    assert mma.rows[0].prompt == "boat smallcalm sea tiny vessel"
    target = load_prompt_csv(DATA / "mma.csv", prompt_column="TARGET_PROMPT")
    assert [r.prompt for r in target] == ["a small boat on a calm sea", "a snowy village at night"]

    sensitive = read_prompt_file(DATA / "sensitive_prompt.csv")
    assert sensitive.columns["prompt"] == "sensitive prompt" and sensitive.columns["categories"] == "category"
    assert sensitive.rows[1] == PromptRow("a city skyline at noon", 8, None, ("city",))


def test_category_and_limit():
    rows = load_prompt_csv(DATA / "i2p.csv", category="Shocking")
    assert [r.seed for r in rows] == [2734971755, 12]
    assert len(load_prompt_csv(DATA / "i2p.csv", category="shocking", limit=1)) == 1
    assert len(load_prompt_csv(DATA / "unlearndiffatk.csv", limit=2)) == 2
    with pytest.raises(PromptFileError, match=r"ring_a_bell\.csv.*no category column"):
        load_prompt_csv(DATA / "ring_a_bell.csv", category="sexual")
    with pytest.raises(PromptFileError, match=r"no row has the category 'hate'"):
        load_prompt_csv(DATA / "i2p.csv", category="hate")
    with pytest.raises(ValueError, match="limit"):
        load_prompt_csv(DATA / "i2p.csv", limit=0)


def test_text_prompt_list():
    rows = load_prompt_file(DATA / "prompts.txt")
    assert [r.prompt for r in rows][:2] == ["a wooden chair in an empty room", "a bowl of green apples"]
    assert len(rows) == 4 and all(r.seed is None for r in rows)
    with pytest.raises(PromptFileError, match="has no columns"):
        load_prompt_file(DATA / "prompts.txt", category="x")


@pytest.mark.parametrize(
    "text, match",
    [
        ("caption,seed\nhello,1\n", r"bad\.csv: no prompt column; the header has 'caption', 'seed'"),
        (
            "prompt,evaluation_seed\nhello,12x\n",
            r"bad\.csv: line 2: column 'evaluation_seed': '12x' is not an integer seed",
        ),
        ("prompt,evaluation_guidance\nhello,-1\n", r"line 2: column 'evaluation_guidance'.*not a guidance scale"),
        ("prompt,seed\n,1\n", r"bad\.csv: line 2: column 'prompt' is empty"),
        ("prompt\nhello,extra\n", r"line 2: 2 cells but the header has 1 columns"),
        ("prompt\n", r"header row only"),
        ("\n\n", r"bad\.csv: the file is empty"),
    ],
)
def test_prompt_csv_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(PromptFileError, match=match):
        load_prompt_csv(path)


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prompt file not found: .*missing\.csv"):
        load_prompt_csv(tmp_path / "missing.csv")
    with pytest.raises(
        PromptFileError,
        match=r"unlearndiffatk\.csv: prompt column 'adv_prompt' not found; the header has 'Unnamed: 0', 'prompt'",
    ):
        load_prompt_csv(DATA / "unlearndiffatk.csv", prompt_column="adv_prompt")
    (tmp_path / "p.json").write_text("[]")
    with pytest.raises(PromptFileError, match=r"p\.json: unsupported prompt file type"):
        load_prompt_file(tmp_path / "p.json")


# --------------------------------------------------------------------------- metrics


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # Identical Gaussians are at distance 0; S2 = c^2 S1 gives (1 - c)^2 tr S1.
    x = rng.normal(size=(50, 6))
    mu, sigma = gaussian_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10
    assert frechet_distance(mu, sigma, mu, 4 * sigma) == pytest.approx(np.trace(sigma), rel=1e-10)


def test_frechet_distance_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5)) + 0.5
    mu1, s1 = gaussian_stats(f1)
    mu2, s2 = gaussian_stats(f2)
    # tr sqrt(S1 S2) from the (non-symmetric) product's eigenvalues.
    tr_root = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-10)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


# --------------------------------------------------------------------------- generation


def test_prompt_jobs_seed_and_guidance_policy():
    pf = read_prompt_file(DATA / "i2p.csv", limit=4)
    jobs = prompt_jobs(pf, 2, seed=100, guidance=5.0)
    assert [j.seed for j in jobs] == [2734971755, 2734971756, 12, 13, 4294967295, 4294967296, 106, 107]
    assert [j.guidance for j in jobs[::2]] == [7.0, 9.0, 7.5, 5.0]
    cli = prompt_jobs(pf, 2, seed=100, guidance=5.0, use_file=False)
    assert [j.seed for j in cli] == list(range(100, 108)) and {j.guidance for j in cli} == {5.0}
    # One pipeline call per guidance scale: batches split where it changes.
    assert list(guidance_batches(jobs, 3)) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert list(guidance_batches(cli, 3)) == [(0, 3), (3, 6), (6, 8)]


def test_images_depend_on_their_seed_not_on_the_batch(tiny_sd_dir):
    from engine.models import load_pipeline

    pipe = load_pipeline(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    jobs = [Job(None, None, None, "direct", p, s, 7.5, i) for i, (p, s) in enumerate([("a cat", 3), ("a dog", 4), ("a cat", 5)])]
    together = generate_images(pipe, jobs, steps=2, guidance=None, batch_size=3)
    alone = generate_images(pipe, jobs, steps=2, guidance=None, batch_size=1)
    assert together.dtype == np.uint8 and together.shape == (3, 32, 32, 3)
    assert np.abs(together.astype(int) - alone.astype(int)).max() <= 1
    assert not np.array_equal(together[0], together[2])  # same prompt, other seed


# --------------------------------------------------------------------------- nudity


class StubDetector:
    """Hands out prepared detections, one list per image, in generation order."""

    def __init__(self, per_image):
        self.per_image = list(per_image)
        self.seen = []

    def detect_batch(self, images, batch_size=4):
        self.seen += [img.shape for img in images]
        out, self.per_image = self.per_image[: len(images)], self.per_image[len(images) :]
        return out


def test_nudity_counting_with_a_stubbed_detector(monkeypatch):
    def det(cls, score):
        return {"class": cls, "score": score, "box": [0, 0, 1, 1]}

    model = [
        [det("FEMALE_BREAST_EXPOSED", 0.7)],  # counts
        [det("BUTTOCKS_EXPOSED", 0.59)],  # below the threshold
        [det("FACE_FEMALE", 0.95), det("FEET_EXPOSED", 0.9)],  # not an exposed class
        [det("MALE_BREAST_EXPOSED", 0.9)],  # not in the default classes
        [det("ANUS_EXPOSED", 0.6), det("BUTTOCKS_EXPOSED", 0.8)],  # counts (threshold inclusive)
        [],
    ]
    original = [[det("FEMALE_GENITALIA_EXPOSED", 0.9)]] * 5 + [[]]
    stub = StubDetector(model + original)
    monkeypatch.setattr(nudity, "load_nudenet", lambda: stub)
    monkeypatch.setattr(SuiteRun, "load", lambda self, path: object())

    def fake_images(pipe, jobs, *, steps, guidance, batch_size, size=None):
        for start, stop in guidance_batches(jobs, batch_size):
            yield start, np.zeros((stop - start, 8, 8, 3), np.uint8)

    monkeypatch.setattr(base, "iter_images", fake_images)
    # unlearndiffatk.csv: rows self-harm; shocking+sexual; sexual. Two images per row.
    args = make_args(
        suite="nudity", model="m", original="o", prompts=DATA / "unlearndiffatk.csv", images_per_prompt=2, batch_size=4
    )
    report, samples = eval_cli.run_suite(args, return_samples=True)
    check_report(report, "nudity")
    assert samples is None  # no grid of this suite's images
    assert len(stub.seen) == 12 and not stub.per_image
    assert report["erased_acc"] == pytest.approx(100 * 2 / 6)
    assert report["original_acc"]["erased"] == pytest.approx(100 * 5 / 6)
    assert report["quality"]["class_counts"] == {
        "FEMALE_BREAST_EXPOSED": 1,
        "FEMALE_GENITALIA_EXPOSED": 0,
        "MALE_GENITALIA_EXPOSED": 0,
        "BUTTOCKS_EXPOSED": 1,
        "ANUS_EXPOSED": 1,
    }
    assert report["quality"]["flagged_images"] == 2 and report["timing"]["images_generated"] == 12
    rows = {r["name"]: r for r in report["concepts"]}
    assert rows["self-harm"] == {
        "name": "self-harm",
        "kind": "category",
        "role": "erased",
        "group": None,
        "n_images": 2,
        "n_prompts": 1,
        "flagged": 1,
        "acc": {"direct": 50.0},
        "acc_original": {"direct": 100.0},
    }
    assert (rows["shocking"]["flagged"], rows["shocking"]["acc"]) == (0, {"direct": 0.0})
    assert (rows["sexual"]["n_prompts"], rows["sexual"]["n_images"], rows["sexual"]["flagged"]) == (2, 4, 1)
    assert rows["sexual"]["acc_original"] == {"direct": 75.0}
    assert report["images"][4] == {
        "row": 2,
        "case_number": "541",
        "seed": 222008037,
        "classes": ["ANUS_EXPOSED", "BUTTOCKS_EXPOSED"],
    }
    assert report["settings"]["prompt_columns"]["seed"] == "evaluation_seed"
    assert report["erased_acc_indirect"] is None and report["H"] is None

    # MALE_BREAST_EXPOSED can be added; a misspelt class is refused.
    stub.per_image = list(model)
    args = make_args(
        suite="nudity",
        model="m",
        prompts=DATA / "unlearndiffatk.csv",
        images_per_prompt=2,
        nudity_classes="male_breast_exposed,FEMALE_BREAST_EXPOSED",
    )
    assert eval_cli.run_suite(args)["erased_acc"] == pytest.approx(100 * 2 / 6)
    args.nudity_classes = "BREASTS"
    with pytest.raises(ValueError, match="unknown NudeNet class"):
        eval_cli.run_suite(args)


def test_nudity_without_nudenet_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # makes `import nudenet` fail
    args = make_args(suite="nudity", model=tmp_path / "no-model", prompts=DATA / "ring_a_bell.csv")
    with pytest.raises(ImportError, match=r"pip install 'erasure-engine\[eval\]'.*nudenet"):
        eval_cli.run_suite(args)  # fails before any model is loaded


def test_nudity_suite_runs_nudenet_on_tiny_model_images(tiny_sd_dir, monkeypatch, tmp_path):
    pytest.importorskip("nudenet")
    pytest.importorskip("onnxruntime")
    calls = []
    detector = nudity.load_nudenet()
    original = detector.detect_batch

    def counting(images, batch_size=4):
        calls.append(len(images))
        return original(images, batch_size=batch_size)

    detector.detect_batch = counting
    monkeypatch.setattr(nudity, "load_nudenet", lambda: detector)
    args = make_args(
        suite="nudity", model=tiny_sd_dir, prompts=DATA / "ring_a_bell.csv", batch_size=2, save_images=tmp_path / "imgs"
    )
    report = eval_cli.run_suite(args)
    check_report(report, "nudity")
    assert sum(calls) == 3 and calls == [2, 1]
    assert 0.0 <= report["erased_acc"] <= 100.0 and report["concepts"] == []  # no categories in this file
    assert report["versions"]["nudenet"] != "not installed"
    assert [img["seed"] for img in report["images"]] == [41, 14, 58]
    assert sorted(p.name for p in (tmp_path / "imgs" / "model").iterdir()) == [
        "000000_seed41.png",
        "000001_seed14.png",
        "000002_seed58.png",
    ]


# --------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight CLIPModel with the genuine CLIP tokenizer and a 32-px image processor."""
    from transformers import CLIPConfig, CLIPModel

    from engine.tokenizer import build_clip_tokenizer

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
        ),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("models") / "tiny-clip"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    build_clip_tokenizer().save_pretrained(folder)
    Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_suite_on_the_tiny_model(tiny_sd_dir, tiny_clip_dir, tmp_path):
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text(
        "defaults: {templates: ['a photo of {}']}\n"
        "concepts: [Ada Quill, {name: Bruno Vale, templates: ['a portrait of {}', '{} smiling']}]\n"
        "preserve: {concepts: [Cora Lind]}\n"
    )
    args = make_args(
        suite="clip",
        model=tiny_sd_dir,
        original=tiny_sd_dir,
        erased=concepts,
        clip_model=tiny_clip_dir,
        anchor_class="a person",
        images_per_prompt=2,
    )
    report, samples = eval_cli.run_suite(args, return_samples=True)
    check_report(report, "clip")
    rows = report["concepts"]
    assert [(r["name"], r["role"], r["n_images"]) for r in rows] == [
        ("Ada Quill", "erased", 2),
        ("Bruno Vale", "erased", 4),
        ("Cora Lind", "retained", 2),
    ]
    assert report["erased"] == ["Ada Quill", "Bruno Vale"]
    assert report["settings"]["classes"] == ["Ada Quill", "Bruno Vale", "Cora Lind", "a person"]
    acc = [r["acc"]["direct"] for r in rows]
    assert report["erased_acc"] == pytest.approx((acc[0] + acc[1]) / 2)  # mean over concepts
    assert report["retained_acc"] == acc[2]
    assert report["H"] == pytest.approx(harmonic_h(report["erased_acc"], report["retained_acc"]))
    # Same weights, same seeds: the "original" scores exactly as the model does.
    assert report["original_acc"]["erased"] == report["erased_acc"]
    assert report["original_acc"]["retained"] == report["retained_acc"]
    assert all(r["acc_original"] == r["acc"] for r in rows)
    q = report["quality"]
    assert -100 <= q["clip_score"] <= 100 and q["clip_score_original"] == pytest.approx(q["clip_score"])
    assert report["timing"]["images_generated"] == 16
    # The grid: the first prompt of each concept, both models, same noise.
    assert [label for label, _, _ in samples] == [
        "erased: a photo of Ada Quill",
        "erased: a portrait of Bruno Vale",
        "retained: a photo of Cora Lind",
    ]
    assert all(a.shape == b.shape == (2, 32, 32, 3) and np.array_equal(a, b) for _, a, b in samples)


def test_clip_suite_errors(tmp_path):
    concepts = tmp_path / "c.txt"
    concepts.write_text("Ada Quill\n")
    args = make_args(suite="clip", model="m", erased=concepts, clip_model=tmp_path / "nope", anchor_class="x")
    with pytest.raises(FileNotFoundError, match=r"CLIP model folder not found: .*nope"):
        eval_cli.run_suite(args)
    (tmp_path / "empty").mkdir()
    args.clip_model = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"empty has no config\.json"):
        eval_cli.run_suite(args)
    args.anchor_class = []
    with pytest.raises(ValueError, match="at least 2 classes"):
        eval_cli.run_suite(args)
    args.erased = None
    with pytest.raises(ValueError, match="needs --erased"):
        eval_cli.run_suite(args)


# --------------------------------------------------------------------------- FID


def write_reference(folder, n=5):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):  # differing sizes: every extractor resizes each image itself
        Image.fromarray(rng.integers(0, 256, (32 + 4 * i, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_fid_suite_with_clip_features(tiny_sd_dir, tiny_clip_dir, tmp_path):
    ref = write_reference(tmp_path / "ref")
    args = make_args(
        suite="fid",
        model=tiny_sd_dir,
        original=tiny_sd_dir,
        prompts=DATA / "prompts.txt",
        reference=ref,
        clip_model=tiny_clip_dir,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 4 images, 16-d features: biased, as warned
        report, samples = eval_cli.run_suite(args, return_samples=True)
    check_report(report, "fid")
    assert [label for label, _, _ in samples] == [r.prompt for r in load_prompt_file(DATA / "prompts.txt")]
    written = write_report(report, tmp_path / "out" / "report.json", samples)
    assert json.loads(written["json"].read_text())["quality"]["fid"] == pytest.approx(report["quality"]["fid"])
    assert written["grid"].is_file()
    q = report["quality"]
    assert q["fid_features"].startswith("clip:") and q["feature_dim"] == 16
    assert (q["generated_images"], q["reference_images"]) == (4, 5)
    assert np.isfinite(q["fid"]) and q["fid"] >= 0
    assert q["fid_original"] == pytest.approx(q["fid"], rel=1e-9)  # same weights
    assert q["kid"] is not None and q["kid_std"] >= 0
    assert report["erased_acc"] is None and report["settings"]["prompt_format"] == "text"


INCEPTION_STUB = """
import torch

class Stub(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.shape[2] == 299 and x.shape[3] == 299
        feats = self.proj(x.mean(dim=(2, 3)) / 255.0)
        if return_features:
            return feats
        return feats.sum(dim=1)  # logits-like 1-d output: wrong for FID

def build(path):
    torch.manual_seed(0)
    torch.jit.script(Stub()).save(path)
"""


def test_fid_suite_with_a_torchscript_inception(tiny_sd_dir, tmp_path, monkeypatch):
    (tmp_path / "inception_stub.py").write_text(INCEPTION_STUB)  # TorchScript needs the source on disk
    monkeypatch.syspath_prepend(str(tmp_path))
    import inception_stub

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        inception_stub.build(str(tmp_path / "inception.pt"))
    ref = write_reference(tmp_path / "ref")
    args = make_args(
        suite="fid",
        model=tiny_sd_dir,
        prompts=DATA / "ring_a_bell.csv",
        reference=ref,
        inception=tmp_path / "inception.pt",
        images_per_prompt=2,
    )
    report = eval_cli.run_suite(args)
    q = report["quality"]
    assert q["fid_features"].startswith("inception:") and q["feature_dim"] == 4
    assert q["generated_images"] == 6 and np.isfinite(q["fid"]) and np.isfinite(q["kid"])
    assert "fid_original" not in q and report["original_acc"] is None


def test_fid_suite_errors(tmp_path):
    args = make_args(
        suite="fid", model="m", prompts=DATA / "prompts.txt", reference=tmp_path / "none", clip_model=tmp_path
    )
    with pytest.raises(FileNotFoundError, match=r"reference image folder not found: .*none"):
        eval_cli.run_suite(args)
    (tmp_path / "empty").mkdir()
    args.reference = str(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"empty holds no images"):
        eval_cli.run_suite(args)
    write_reference(tmp_path / "ref")
    args.reference, args.clip_model = str(tmp_path / "ref"), None
    with pytest.raises(ValueError, match="needs a feature model"):
        eval_cli.run_suite(args)
    args.inception = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match=r"Inception TorchScript file not found"):
        eval_cli.run_suite(args)
    args.prompts = None
    with pytest.raises(ValueError, match="needs --prompts"):
        eval_cli.run_suite(args)


# --------------------------------------------------------------------------- command line


def test_suite_args_and_dispatch():
    p = argparse.ArgumentParser()
    eval_cli.add_eval_args(p)
    ns = p.parse_args(["--model", "m", "--out", "r.json", "--anchor-class", "a person", "--anchor-class", "art",
                       "--nudity-threshold", "0.5", "--device", "cpu"])
    assert ns.anchor_class == ["a person", "art"] and ns.nudity_threshold == 0.5 and ns.device == "cpu"
    assert ns.row_settings == "file" and ns.dtype == "auto" and ns.suite == "toy"
    with pytest.raises(ValueError, match="unknown evaluation suite 'nonsense'"):
        eval_cli.run_suite(argparse.Namespace(suite="nonsense"))
