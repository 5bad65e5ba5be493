"""What a new user meets first: the toy world's concept names, a world folder as --model, an
interrupted run, and what the printed figures mean."""

import io
import json
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.export import MANIFEST_NAME
from engine.toyworld import concepts

ROOT = Path(__file__).resolve().parent.parent


# --- erasure toyworld concepts ----------------------------------------------------------------

def test_toyworld_concepts_lists_each_kind_under_a_heading(capsys):
    assert main(["toyworld", "concepts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headings = [line for line in lines if line.startswith("#")]
    assert headings == [f"# {kind} ({len(concepts(kind))})" for kind in ("identity", "object", "style", "unsafe")]
    start = lines.index(f"# style ({len(concepts('style'))})")
    assert lines[start + 1 : start + 1 + len(concepts("style"))] == concepts("style")


def test_toyworld_concepts_out_writes_a_concepts_file(tmp_path, capsys):
    from engine.concepts import load_concepts

    out = tmp_path / "ids.txt"
    assert main(["toyworld", "concepts", "--kind", "identity", "--out", str(out)]) == 0
    assert f"wrote {len(concepts('identity'))} concept names" in capsys.readouterr().out
    assert load_concepts(out, anchor="a person").names() == concepts("identity")


def test_toyworld_concepts_refuses_a_folder_that_is_not_a_world(tmp_path, capsys):
    assert main(["toyworld", "concepts", "--world", str(tmp_path)]) == 2
    assert "no toy world" in capsys.readouterr().err


def test_the_example_toy_identities_are_identities_of_the_world():
    from engine.concepts import load_concepts

    names = load_concepts(ROOT / "examples" / "toy_identities.txt", anchor="a person").names()
    assert len(names) == 3 and set(names) <= set(concepts("identity"))
    # The YAML form erases the same three and keeps every other identity and captions naming none of them.
    full = load_concepts(ROOT / "examples" / "toy_identities.yaml")
    assert full.names() == names and all(c.anchor == "a person" for c in full.concepts)
    kept = [c.name for c in full.preserve_concepts]
    assert sorted(kept + names) == sorted(concepts("identity"))
    assert full.preserve_captions and not any(n.lower() in cap.lower() for cap in full.preserve_captions for n in names)


# --- a world folder as --model ------------------------------------------------------------------

def test_load_pipeline_reads_a_world_folder_as_its_pipeline(quick_world, tiny_sd_dir, tmp_path):
    from engine.models import load_pipeline, pipeline_folder

    assert pipeline_folder(quick_world) == quick_world / "pipeline"
    assert pipeline_folder(quick_world / "pipeline") == quick_world / "pipeline"
    assert pipeline_folder(tiny_sd_dir) == Path(tiny_sd_dir)
    (tmp_path / "world.json").write_text("{}")  # a world.json without pipeline/ is not a world
    assert pipeline_folder(tmp_path) == tmp_path
    a = load_pipeline(quick_world).unet.state_dict()
    b = load_pipeline(quick_world / "pipeline").unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_image_branch_finds_the_world_ip_adapter_from_either_folder(quick_world, tiny_sd_dir):
    from engine.methods import get_method

    method = get_method("co-erasing")
    expected = quick_world / "ip_adapter" / "ip_adapter.safetensors"
    for model in (quick_world, quick_world / "pipeline"):
        assert Path(method.prepare(method.defaults, str(model)).ip_adapter) == expected
    assert method.prepare(method.defaults, str(tiny_sd_dir)).ip_adapter is None


def test_erase_the_example_identities_from_a_world_folder(quick_world, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["erase", "--model", str(quick_world), "--concepts", str(ROOT / "examples" / "toy_identities.txt"),
                 "--anchor", "a person", "--out", str(out), "--no-pipeline", "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(manifest["solve"]["concept_residual"]) == sorted(
        ["Aldric Corrance", "Bexley Vantorre", "Brisa Oakhurst"])


# --- an interrupted run ---------------------------------------------------------------------------

def test_an_interrupt_prints_one_line_and_leaves_no_output(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    import engine.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.api, "erase", interrupted)
    names = tmp_path / "names.txt"
    names.write_text("Arlen Corrance\n")
    out = tmp_path / "out"
    code = main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(names), "--anchor", "a person",
                 "--out", str(out), "--quiet"])
    assert code == 130
    assert capsys.readouterr().err.splitlines() == ["erasure: interrupted"]
    assert not out.exists()


# --- the printed figures -----------------------------------------------------------------------

def test_kid_is_printed_with_its_scale():
    from engine.evaluation.report import describe_kid

    line = describe_kid({"kid": 3.6917, "kid_std": None, "kid_features": "toy evaluator features"})
    assert line.startswith("KID 3.692 (squared MMD on toy evaluator features;")
    assert "0 = same distribution as the original model's images" in line and "lower is better" in line
    fid = describe_kid({"kid": 0.01, "kid_std": 0.002, "kid_reference": "the --reference images"})
    assert "KID 0.01 +- 0.002" in fid and "the reference images" in fid
    assert describe_kid({"kid": None}) == "KID n/a"


def test_the_demo_preserves_no_caption_that_names_an_erased_identity():
    from engine.demo import preservation_captions

    captions = ["Bexley Vantorre smiling", "a portrait of bexley vantorre", "Aldric Corrance at the beach",
                "a red star", "a red star"]
    assert preservation_captions(captions, ["Bexley Vantorre"]) == ["Aldric Corrance at the beach", "a red star"]


# --- progress bars in a log ---------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_redraw_rarely_in_a_log_and_as_before_on_a_terminal(monkeypatch):
    import sys

    from tqdm.auto import tqdm

    from engine.progress import LOG_INTERVAL_S, bar_settings, progress_bar

    assert bar_settings(_Terminal()) == {}
    assert bar_settings(io.StringIO()) == {"mininterval": LOG_INTERVAL_S, "ascii": True}
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(total=10, desc="work") as bar:
        assert bar.mininterval == LOG_INTERVAL_S and bar.ascii
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with progress_bar(total=10, desc="work") as bar, tqdm(total=10, file=sys.stderr) as plain:
        assert bar.mininterval == plain.mininterval and bar.ascii == plain.ascii
    assert progress_bar(range(3), progress=False).disable


def test_the_demo_prints_the_recorded_figures_with_their_scales(tmp_path, capsys, monkeypatch):
    """The demo on the shipped world, with the erasure and the evaluation replaced by the recorded report."""
    import argparse

    import engine.api
    import engine.evaluation
    import engine.evaluation.report
    from engine.demo import run_demo

    record = json.loads((ROOT / "benchmarks" / "results" / "toyworld_v2_seed0_demo_uce_plus_10_identities.json").read_text())
    seen = {}

    class Result:
        manifest = {}

        def save(self, out, **kwargs):
            return out

    def erase(model, concept_set, **kwargs):
        seen["concepts"] = concept_set
        return Result()

    monkeypatch.setattr(engine.api, "erase", erase)
    monkeypatch.setattr(engine.evaluation, "evaluate_toy", lambda *a, **k: (record, []))
    monkeypatch.setattr(engine.evaluation.report, "write_report", lambda report, out, samples: {"json": out})
    args = argparse.Namespace(out=str(tmp_path), erase=10, images_per_prompt=1, world=None, quiet=True)
    assert run_demo(args) == 0
    printed = capsys.readouterr().out
    erased = [c.name.lower() for c in seen["concepts"].concepts]
    assert erased == [n.lower() for n in record["erased"]]
    assert not [c for c in seen["concepts"].preserve_captions if any(n in c.lower() for n in erased)]
    q = record["quality"]
    assert f"{q['clip_score_original']:5.1f}" in printed and f"{q['clip_score']:5.1f}" in printed
    assert f"KID {q['kid']:.4g} (squared MMD on toy evaluator features;" in printed
    assert f"H {record['H']:.1f} (" in printed
