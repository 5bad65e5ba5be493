"""The benchmark instruments measure what they say: closed-form throughput, fine-tuning memory and the step profile;
and every benchmark runs as a module of the benchmarks package."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_adapters, bench_closed_form, bench_finetune, profile_finetune

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_cpu_optimizer_memory_is_measured_in_a_fresh_process():
    adamw = bench_finetune.optimizer_memory("tiny", torch.device("cpu"), "adamw")
    eight = bench_finetune.optimizer_memory("tiny", torch.device("cpu"), "adamw8bit")
    # AdamW keeps two fp32 moments per parameter; the 8-bit one about a quarter of that.
    assert adamw["optimizer_state_bytes"] >= 8 * adamw["parameters"]
    assert eight["optimizer_state_bytes"] < adamw["optimizer_state_bytes"] / 2
    # The step (weights, gradients, state) raises the peak above the process before the UNet.
    assert adamw["peak_rss_bytes"] > adamw["rss_before_bytes"] + 3 * adamw["param_bytes"]


def test_model_too_large_for_memory_is_skipped_with_its_need(monkeypatch):
    monkeypatch.setattr(bench_finetune, "_available_bytes", lambda: 2**30)
    out = bench_finetune.optimizer_memory("sd15", torch.device("cpu"), "adamw")
    assert out["parameters"] > 8e8
    assert "skipped" in out and "GiB" in out["skipped"]


@pytest.mark.parametrize("name,kind", [("aten::mm", "matmul/conv"), ("aten::convolution_backward", "matmul/conv"),
                                       ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
                                       ("aten::native_group_norm_backward", "normalization"),
                                       ("aten::index", "copy/data"), ("aten::add_", "elementwise/other")])
def test_operator_kinds(name, kind):
    assert profile_finetune.kind_of(name) == kind


def test_profile_splits_a_training_step_into_phases():
    out = profile_finetune.profile_case("tiny", torch.device("cpu"), "esd cached", steps=2, batch=2, sample_steps=4,
                                        trajectories=1)
    phases = out["phases"]
    assert set(phases) == {*profile_finetune.PHASES, "step: rest"}
    # The trained UNet's forward and backward are convolutions and matmuls above all.
    for phase in ("UNet forward", "backward"):
        assert phases[phase]["ops_ms"]["matmul/conv"] > 0
    assert phases["optimizer"]["wall_ms"] > 0
    # Phases tile the step; operator time never exceeds its phase's wall time.
    assert sum(p["wall_ms"] for p in phases.values()) == pytest.approx(out["step_ms"], rel=1e-6)
    for p in phases.values():
        assert sum(p["ops_ms"].values()) <= p["wall_ms"] * 1.05 + 0.5


def test_sdxl_step_gets_the_trainers_conditioning():
    """On SDXL the bench's step feeds the pooled embedding and time ids, as the trainer does."""
    row = bench_finetune.bench_case("tiny-sdxl", torch.device("cpu"), "esd cached", steps=1, batch=2,
                                    sample_steps=4, trajectories=1, gradient_checkpointing=True)
    assert row["gradient_checkpointing"] and row["flops_per_step"] > 0 and row["step_s"] > 0


def test_variant_runs_the_same_step_another_way():
    row = bench_finetune.bench_case("tiny", torch.device("cpu"), "esd cached", steps=1, batch=2, sample_steps=4,
                                    trajectories=1, variant="channels-last")
    assert row["variant"] == "channels-last" and row["step_s"] > 0 and row["warmup_s"] > 0


def test_closed_form_bench_counts_the_prompts_it_encodes(monkeypatch, tmp_path):
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path))
    templates = ["a photo of {}", "a portrait of {}"]
    (r,) = bench_closed_form.run("sd15", [3], templates, torch.device("cpu"), "torch", sequential_max=3)
    # 3 names x 2 templates as sources, the anchor in 2 templates as targets
    assert r["prompts_encoded"] == 3 * 2 + 2
    assert r["text_encoder_prompts_per_s"] == pytest.approx(r["prompts_encoded"] / r["text_encoding_s"])
    assert r["text_encoding_flops"] > 0
    assert r["text_encoding_tflops"] == pytest.approx(r["text_encoding_flops"] / r["text_encoding_s"] / 1e12)
    assert r["max_rel_diff_engine_vs_fp64"] < 1e-5
    assert r["speedup"] == pytest.approx(r["per_layer_total_s"] / r["engine_total_s"])
    end_to_end = r["text_encoding_s"] + r["engine_total_s"] + r["report_s"]
    assert r["engine_end_to_end_s"] == pytest.approx(end_to_end) and 0 < r["report_share"] < 1
    assert r["published_style_end_to_end_s"] == pytest.approx(r["sequential_77_encoding_s"] + r["per_layer_total_s"])


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_every_suite_benchmark_accepts_its_arguments(mode):
    # Full mode runs only on a GPU: its arguments are checked here, before a GPU hour is spent on them.
    from benchmarks import run_all

    names = [n for n in run_all.SUITE if mode in run_all.SUITE[n][1]]
    assert names
    assert [run_all.check_arguments(n, mode, torch.device("cuda")) for n in names] == [None] * len(names)


def test_a_misspelled_argument_is_refused_before_anything_runs(monkeypatch, capsys):
    from benchmarks import run_all

    suite = dict(run_all.SUITE)
    script, args = suite["finetune"]
    suite["finetune"] = (script, {**args, "quick": [*args["quick"], "--variants", "eager,channel-last"]})
    monkeypatch.setattr(run_all, "SUITE", suite)
    monkeypatch.setattr(run_all, "device_roofs", lambda *a: pytest.fail("the suite started"))
    with pytest.raises(SystemExit):
        run_all.main(["--mode", "quick", "--device", "cpu", "--only", "finetune"])
    err = capsys.readouterr().err
    assert "channel-last" in err and "finetune" in err


def test_adapters_bench_counts_the_flops_of_a_training_step_only():
    cpu = torch.device("cpu")
    concepts = bench_adapters.concepts_from_names(["Alice Example", "Bob Example"], anchor="a person",
                                                  templates=["a photo of {}"])
    cfg = bench_adapters.ESDConfig(params="lora", lora_rank=2, batch_size=1, sample_steps=4, trajectories=1,
                                        progress=False, checkpoint_every=0, loss_backend="torch")  # not interpreted
    pipe, _ = bench_adapters.load_model("tiny", cpu)
    f1, f2, f3 = (bench_adapters.run_flops(pipe, concepts, cfg.replace(iterations=n)) for n in (1, 2, 3))
    step = f2 - f1
    # every step costs the same, and a run's cached targets cost more than nothing on top of its steps
    assert f3 - f2 == step > 0
    assert f1 > step


def test_no_benchmark_file_touches_sys_path():
    """The scripts import each other and the engine as packages: no file under benchmarks/ edits sys.path."""
    offenders = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders


def test_the_suite_runs_every_benchmark_as_a_module(monkeypatch, tmp_path):
    from benchmarks import run_all

    assert {module for module, _ in run_all.SUITE.values()} <= set(SCRIPTS)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs["cwd"]))
        return subprocess.CompletedProcess(cmd, 1, "", "not run")

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    report, _, error = run_all.run_benchmark("losses", "quick", torch.device("cpu"), tmp_path)
    assert report is None and error == "not run"
    ((cmd, cwd),) = calls
    assert cmd[:3] == [sys.executable, "-m", "benchmarks.bench_losses"] and Path(cwd) == ROOT
    assert cmd[3:] == ["--quick", "--out", str(tmp_path / "losses.json"), "--device", "cpu"]


@pytest.fixture(scope="module")
def help_runs():
    """`python -m benchmarks.<name> --help` for every script, from the repository root, all started at once."""
    procs = {name: subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in SCRIPTS}
    runs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        runs[name] = (proc.returncode, out, err)
    return runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_runs_as_a_module(name, help_runs):
    code, out, err = help_runs[name]
    assert code == 0, err[-2000:]
    assert out.startswith("usage:") and "--help" in out


def test_toy_scale_lists_half_of_the_rest_and_splits_what_was_kept():
    from benchmarks.toy_scale import concept_set, split_retained
    from engine.toyworld import concepts

    ids = concepts("identity")
    cs, names, listed = concept_set(3, "listed")
    assert names == ids[:3] and listed == ids[3:][::2] and [c.name for c in cs.preserve_concepts] == listed
    assert concept_set(3, "names")[2] == [] and not concept_set(3, "names")[0].preserve_concepts
    with pytest.raises(ValueError, match="kind identity"):
        concept_set(len(ids) + 1, "names")
    objects = concepts("object")
    cs, names, listed = concept_set(2, "listed", kind="object")
    assert names == objects[:2] and listed == objects[2:][::2]
    assert {c.anchor for c in cs.concepts} == {"an object"}
    with pytest.raises(ValueError, match="demo"):
        concept_set(2, "all", kind="style")
    templates = ["a photo of {}", "{} on a table"]
    cs, names, listed = concept_set(2, "listed", kind="object", templates=templates)
    assert {c.templates for c in cs.concepts} == {tuple(templates)}
    assert {c.templates for c in cs.preserve_concepts} == {tuple(templates)}
    with pytest.raises(ValueError, match="own templates"):
        concept_set(2, "all", templates=templates)
    report = {"concepts": [
        {"name": ids[0], "kind": "identity", "role": "erased", "acc": {"direct": 0.0}},
        {"name": listed[0], "kind": "identity", "role": "retained", "acc": {"direct": 100.0}},
        {"name": ids[4], "kind": "identity", "role": "retained", "acc": {"direct": 40.0}},
        {"name": "star", "kind": "object", "role": "retained", "acc": {"direct": 80.0}},
    ]}
    split = split_retained(report, listed)
    assert split["identities_listed"] == 100.0 and split["identities_never_listed"] == 40.0
    assert split["object"] == 80.0 and split["style"] is None


def test_toy_attacks_variant_rows_take_the_settings_and_keep_the_plain_rows(monkeypatch, tmp_path):
    from benchmarks import toy_attacks

    seen = {}

    class Erased:
        pipeline = "edited pipeline"

    def fake_erase(model, concepts, method, progress, **settings):
        seen.update(method=method, **settings)
        return Erased()

    report = {"H": 90.0, "quality": {"kid": 1.0}, "erased_acc": 0.0, "erased_acc_other_templates": 0.0,
              "erased_acc_indirect": None, "retained_acc": 90.0}
    attacked = {"plain": {"success_rate": 0.0}, "attacks": {}, "judge": "toy", "timing": {"total_seconds": 1.0}}
    monkeypatch.setattr(toy_attacks, "erase", fake_erase)
    monkeypatch.setattr(toy_attacks, "evaluate_toy", lambda *a, **k: report)
    monkeypatch.setattr(toy_attacks, "run_attacks", lambda s: attacked if s.model == "edited pipeline" else None)
    out = tmp_path / "toy_attacks.json"
    plain = {"method": "esd", "scenario": "identity", "H": 98.0, "kid": 0.0, "plain": 0.0, "attacks": {}}
    out.write_text(json.dumps({"world": "v2", "results": [plain]}))  # rows of the default world
    toy_attacks.main(["--methods", "esd", "--scenarios", "identity", "--set", "lr=0.0005", "--label", "esd, lr=5e-4",
                      "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert seen["method"] == "esd" and seen["lr"] == 0.0005 and seen["iterations"] == 300  # the preset, then --set
    assert rows[0] == plain and rows[1]["method"] == "esd, lr=5e-4" and rows[1]["base_method"] == "esd"
    assert rows[1]["settings"]["lr"] == 0.0005


def test_benchmark_rows_of_another_world_are_never_merged(tmp_path):
    from benchmarks._common import previous_results

    out = tmp_path / "rows.json"
    assert previous_results(out, "v2") == []  # nothing yet
    out.write_text(json.dumps({"world": "v2", "results": [{"method": "uce"}]}))
    assert previous_results(out, "v2") == [{"method": "uce"}]
    with pytest.raises(SystemExit, match="results of the toy world v2, not v1"):
        previous_results(out, "v1")
    out.write_text(json.dumps({"world": "/some/folder", "results": []}))  # a world by its folder
    with pytest.raises(SystemExit, match="not v2"):
        previous_results(out, "v2")


def test_a_world_is_recorded_by_its_shipped_name_or_its_folder(tmp_path):
    import shutil

    from engine.toyworld.world import SHIPPED_WORLDS, world_name

    assert world_name() == "v2" and world_name("v1") == "v1" and world_name(SHIPPED_WORLDS["v1"]) == "v1"
    copy = tmp_path / "w"
    copy.mkdir()
    shutil.copy(SHIPPED_WORLDS["v1"] / "world.json", copy / "world.json")
    assert world_name(copy) == str(copy.resolve())
