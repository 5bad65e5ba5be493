"""Trust: files the engine did not write run no code, finished results are never lost, wrong
weights are never written with success, and bad input is one line with exit code 2. One test (or
more) per case of issue 15, numbered as there."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
import engine.finetune.checkpoint as ckpt
import engine.methods.esd as esd_module
from engine.cli import main
from engine.concepts import ConceptFileError, concepts_from_names, load_concepts
from engine.export import DELTA_NAME, MANIFEST_NAME, atomic_output_dir, reserve_output, tensors_fingerprint
from engine.methods import finetune
from engine.methods.esd import ESDConfig
from engine.models import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
CONCEPTS = concepts_from_names(["Van Gogh"], templates=["{}"])
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


class Evil:
    """Unpickling this creates the marker file: proof that a load ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cfg(**kw):
    base = dict(iterations=2, lr=1e-3, batch_size=1, sample_steps=2, trajectories=1, progress=False,
                checkpoint_every=1)
    return ESDConfig(**{**base, **kw})


def _copy_model(src, dst, change=None):
    """A copy of a diffusers folder; ``change(unet_state)`` edits its UNet tensors in place."""
    shutil.copytree(src, dst)
    if change is not None:
        state = load_file(str(dst / UNET_FILE))
        change(state)
        save_file(state, str(dst / UNET_FILE))
    return dst


def _names(tmp_path, text="Van Gogh\n"):
    path = tmp_path / "names.txt"
    path.write_text(text)
    return path


def _erase_args(model, concepts, out, *extra):
    return ["erase", "--model", str(model), "--concepts", str(concepts), "--out", str(out), "--quiet", *extra]


ESD_FAST = ["--method", "esd", "--set", "iterations=1", "--set", "sample_steps=2", "--set", "trajectories=1",
            "--set", "checkpoint_every=1"]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("erasure: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def saved(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "erased"
    engine.erase(str(tiny_sd_dir), ["Arlen Corrance"], anchor="a person", progress=False).save(out)
    return out


# --------------------------------------------------------------------------- 1. code execution


def test_1_no_unpickling_load_in_the_engine():
    """Every torch.load in the engine is weights-only (DeepSpeed's own is forced to be)."""
    for path in (ROOT / "engine").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


@pytest.mark.parametrize("name", ["checkpoint.pt", "trajectories.pt"])
def test_1_a_crafted_pickle_in_the_checkpoint_folder_runs_no_code(tiny_sd_dir, tmp_path, name):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"step": Evil(marker), "signature": {}}, folder / name)
    with pytest.raises(ValueError, match="old pickle format"):
        finetune(load_pipeline(tiny_sd_dir), CONCEPTS, _cfg(), checkpoint_dir=folder, resume=True)
    assert not marker.exists()


def test_1_pickled_single_file_and_folder_weights_run_no_code(tiny_sd_dir, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": Evil(marker)}}, ckpt)
    with pytest.raises(ValueError, match="weights_only"):
        load_pipeline(ckpt, config=tiny_sd_dir, allow_pickle=True)
    folder = _copy_model(tiny_sd_dir, tmp_path / "m")
    (folder / UNET_FILE).unlink()
    torch.save({"conv_in.weight": Evil(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot load the model"):
        load_pipeline(folder, allow_pickle=True)  # read weights-only: the pickle's call is refused
    assert not marker.exists()


def test_1_deepspeed_checkpoints_are_read_weights_only(tmp_path):
    from engine.distributed import weights_only_loads

    marker = tmp_path / "pwned"
    torch.save({"client": Evil(marker)}, tmp_path / "mp_rank_00_model_states.pt")
    with weights_only_loads(), pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        torch.load(tmp_path / "mp_rank_00_model_states.pt", weights_only=False)  # as DeepSpeed calls it
    assert not marker.exists()


# --------------------------------------------------------------------------- 2. pickled folder weights


def test_2_a_folder_with_pickled_weights_is_refused_without_allow_pickle(tiny_sd_dir, tmp_path, capsys):
    folder = _copy_model(tiny_sd_dir, tmp_path / "m")
    torch.save(load_file(str(folder / UNET_FILE)), folder / "unet" / "diffusion_pytorch_model.bin")
    (folder / UNET_FILE).unlink()
    assert main(_erase_args(folder, _names(tmp_path), tmp_path / "o")) == 2
    _one_line_error(capsys, "diffusion_pytorch_model.bin", "pickled", "--allow-pickle")
    assert main(["eval", "--model", str(folder), "--erased", str(_names(tmp_path)), "--out",
                 str(tmp_path / "r.json"), "--quiet"]) == 2
    _one_line_error(capsys, "pickled")
    pipe = load_pipeline(folder, allow_pickle=True)  # trusted: loaded, weights-only
    torch.testing.assert_close(pipe.unet.state_dict()["conv_in.weight"], load_pipeline(tiny_sd_dir).unet.conv_in.weight)


# --------------------------------------------------------------------------- 3. lost results


def test_3_two_concurrent_runs_leave_one_result_and_one_refusal(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    names = _names(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "engine", *_erase_args(tiny_sd_dir, names, out)]
    runs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert re.search(r"being written by another run|not empty", refused) and "Traceback" not in refused
    assert (out / MANIFEST_NAME).is_file() and (out / DELTA_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["names.txt", "out"]  # no lock, no temporaries


def test_3_a_locked_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engine.export import reserve_output\n"
         f"with reserve_output({str(out)!r}):\n    print('held', flush=True); time.sleep(120)"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(engine.api, "erase", lambda *a, **k: pytest.fail("worked on a locked output"))
        assert main(_erase_args("nowhere", _names(tmp_path), out)) == 2
        _one_line_error(capsys, "being written by another run", f"process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_3_an_existing_folder_is_never_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError, match="this run's result is in"):
        with atomic_output_dir(out) as tmp:
            (tmp / "mine.txt").write_text("result")
            out.mkdir()  # someone else fills the folder meanwhile
            (out / "theirs.txt").write_text("theirs")
    assert (out / "theirs.txt").read_text() == "theirs"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.unsaved-")]
    assert len(kept) == 1 and (kept[0] / "mine.txt").read_text() == "result"
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


# --------------------------------------------------------------------------- 4. resume tied to its inputs


def test_4_resume_with_another_model_is_refused(tiny_sd_dir, tmp_path, capsys):
    other = _copy_model(tiny_sd_dir, tmp_path / "other", lambda s: s["conv_in.weight"].add_(0.01))
    names = _names(tmp_path)
    assert main(_erase_args(tiny_sd_dir, names, tmp_path / "a", *ESD_FAST)) == 0
    capsys.readouterr()
    code = main(_erase_args(other, names, tmp_path / "b", *ESD_FAST, "--resume", "--checkpoint-dir",
                            str(tmp_path / "a.checkpoints")))
    assert code == 2
    _one_line_error(capsys, "belongs to another run", "model weights")
    assert not (tmp_path / "b").exists()


def test_4_a_cache_from_a_run_killed_before_its_first_checkpoint_is_tied_to_seed_and_model(
        tiny_sd_dir, tmp_path, monkeypatch):
    cfg = _cfg(checkpoint_every=100)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(esd_module, "guidance_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_pipeline(tiny_sd_dir), CONCEPTS, cfg, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    assert (tmp_path / ckpt.CACHE_NAME).is_file() and not (tmp_path / ckpt.LATEST_NAME).exists()
    with pytest.raises(ValueError, match=r"different setting seed \(0 there, 1 now\)"):
        finetune(load_pipeline(tiny_sd_dir), CONCEPTS, cfg.replace(seed=1), checkpoint_dir=tmp_path, resume=True)
    changed = load_pipeline(tiny_sd_dir)
    with torch.no_grad():
        changed.unet.conv_in.weight.add_(0.01)
    with pytest.raises(ValueError, match="different model weights"):
        finetune(changed, CONCEPTS, cfg, checkpoint_dir=tmp_path, resume=True)
    run = finetune(load_pipeline(tiny_sd_dir), CONCEPTS, cfg, checkpoint_dir=tmp_path, resume=True)
    assert run.steps_run == 2  # the same run: its cache is used


def test_4_checkpoints_are_safetensors_and_json(tiny_sd_dir, tmp_path):
    finetune(load_pipeline(tiny_sd_dir), CONCEPTS, _cfg(), checkpoint_dir=tmp_path)
    tag = (tmp_path / ckpt.LATEST_NAME).read_text()
    assert tag == "step00000002"
    assert sorted(p.name for p in (tmp_path / tag).iterdir()) == sorted([ckpt.STATE_TENSORS, ckpt.STATE_JSON])
    state = json.loads((tmp_path / tag / ckpt.STATE_JSON).read_text())
    assert state["step"] == 2 and len(state["signature"]["model"]) == 64
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("step00000001"))


def test_4_a_checkpoint_of_the_earlier_layout_is_refused_by_name(tiny_sd_dir, tmp_path):
    """Checkpoints written before settings became per method (checkpoint-v2) cannot resume: their
    signature holds one settings record for every method."""
    finetune(load_pipeline(tiny_sd_dir), CONCEPTS, _cfg(), checkpoint_dir=tmp_path)
    state_file = tmp_path / (tmp_path / ckpt.LATEST_NAME).read_text() / ckpt.STATE_JSON
    state = json.loads(state_file.read_text())
    state["format"] = "erasure-engine/checkpoint-v2"
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"earlier version of the engine \(erasure-engine/checkpoint-v2\).*drop --resume"):
        finetune(load_pipeline(tiny_sd_dir), CONCEPTS, _cfg(), checkpoint_dir=tmp_path, resume=True)


# --------------------------------------------------------------------------- 5. apply integrity


def _tampered(saved, tmp_path, change, checksum=True):
    """A copy of the saved delta (without its manifest) with ``change`` applied to its tensors."""
    from safetensors import safe_open

    with safe_open(str(saved / DELTA_NAME), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    if checksum:
        meta["delta_fingerprint"] = tensors_fingerprint(tensors)
    path = tmp_path / DELTA_NAME
    save_file(tensors, str(path), metadata=meta)
    return path


def test_5_apply_detects_tampering(saved, tiny_sd_dir, tmp_path, capsys):
    first = lambda t: next(iter(t))  # noqa: E731

    def scale(t, by):
        t[first(t)] = t[first(t)] * by

    changed = _tampered(saved, tmp_path, lambda t: scale(t, 2.0), checksum=False)
    with pytest.raises(ValueError, match="do not match the checksum"):
        engine.apply_delta(str(tiny_sd_dir), changed)
    for damage, message in [(lambda t: scale(t, 0.0), "would be zeroed"), (lambda t: scale(t, 1e30), "times its norm")]:
        path = _tampered(saved, tmp_path, damage)
        with pytest.raises(ValueError, match=message):
            engine.apply_delta(str(tiny_sd_dir), path)
    # A delta listed in its manifest with another sha256 was changed after it was written.
    shutil.copytree(saved, tmp_path / "copy")
    fake = _tampered(saved, tmp_path, lambda t: scale(t, 1.001))
    shutil.copy(fake, tmp_path / "copy" / DELTA_NAME)
    with pytest.raises(ValueError, match="differs from the one .* lists"):
        engine.apply_delta(str(tiny_sd_dir), tmp_path / "copy" / DELTA_NAME)
    # A truncated delta: one line, exit 2.
    data = (saved / DELTA_NAME).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["apply", "--model", str(tiny_sd_dir), "--delta", str(tmp_path / "cut.safetensors"),
                 "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "cut.safetensors", "truncated or corrupt")


def test_5_a_delta_for_another_model_needs_force(saved, tiny_sd_dir, tmp_path, capsys):
    other = _copy_model(tiny_sd_dir, tmp_path / "other",
                        lambda s: [v.add_(0.01) for k, v in s.items() if k.endswith("attn2.to_k.weight")])
    args = ["apply", "--model", str(other), "--delta", str(saved / DELTA_NAME), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    _one_line_error(capsys, "different base weights", "--force")
    assert not (tmp_path / "o").exists()
    assert main(args + ["--force"]) == 0
    assert "erasure: warning:" in capsys.readouterr().err and (tmp_path / "o" / "model_index.json").is_file()


# --------------------------------------------------------------------------- 6. alias bomb


def test_6_an_alias_bomb_is_refused_fast_and_small(tmp_path, capsys):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 11)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines + ["concepts: [*a10]"]) + "\n")
    assert bomb.stat().st_size < 600
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ConceptFileError, match="expands to more than"):
        load_concepts(bomb)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 100e6
    assert main(["erase", "--model", "nowhere", "--concepts", "x.txt", "--config", str(bomb), "--out",
                 str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "expands to more than")


def test_6_values_shown_in_errors_are_cut_short(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("concepts: [[" + ", ".join(["x" * 50] * 10000) + "]]\n")
    with pytest.raises(ConceptFileError) as err:
        load_concepts(path)
    assert len(str(err.value)) < 1000


# --------------------------------------------------------------------------- 7. non-finite input weights


@pytest.mark.parametrize("method", [["--method", "uce"], ESD_FAST])
def test_7_nan_in_the_input_weights_is_refused_naming_the_tensor(tiny_sd_dir, tmp_path, capsys, method):
    bad = _copy_model(tiny_sd_dir, tmp_path / "bad", lambda s: s["conv_in.weight"].view(-1)[0].fill_(float("nan")))
    assert main(_erase_args(bad, _names(tmp_path), tmp_path / "o", *method)) == 2
    _one_line_error(capsys, "NaN or inf", "unet tensor conv_in.weight")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- 8. one line, exit 2


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_8_a_damaged_model_file_is_one_line(tiny_sd_dir, tmp_path, capsys, damage):
    model = _copy_model(tiny_sd_dir, tmp_path / "m")
    data = (model / UNET_FILE).read_bytes()
    (model / UNET_FILE).write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\xff" * 8 + data[8:])
    assert main(_erase_args(model, _names(tmp_path), tmp_path / "o")) == 2
    _one_line_error(capsys, "diffusion_pytorch_model.safetensors", "not a usable .safetensors file")


def test_8_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:
        parent = Path("/sys")  # read-only even for root
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    monkeypatch.setattr(engine.api, "erase", lambda *a, **k: pytest.fail("worked on an unwritable output"))
    assert main(_erase_args("nowhere", _names(tmp_path), parent / "erasure-out")) == 2
    _one_line_error(capsys, "cannot write the output", "erasure-out")


def test_8_bad_setting_values_are_one_line(tiny_sd_dir, tmp_path, capsys):
    names = _names(tmp_path)
    assert main(_erase_args(tiny_sd_dir, names, tmp_path / "o", *ESD_FAST, "--set", "seed=abc")) == 2
    _one_line_error(capsys, "'seed'", "int")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(_erase_args(tiny_sd_dir, names, tmp_path / "o", "--set", f"cache_dir={blocker / 'cache'}")) == 2
    _one_line_error(capsys, "cache_dir", "cannot write")


def test_8_a_prompt_over_77_tokens_names_the_file_and_entry(tiny_sd_dir, tmp_path, capsys):
    concepts = tmp_path / "c.yaml"
    concepts.write_text("concepts:\n  - Van Gogh\n  - {name: Long One, templates: ['" + "very " * 80 + "{}']}\n")
    assert main(_erase_args(tiny_sd_dir, concepts, tmp_path / "o")) == 2
    _one_line_error(capsys, "c.yaml", "concepts[1] ('Long One')", "77-token limit")


def test_8_a_text_encoder_that_does_not_fit_the_unet_is_one_line(tiny_sd_dir, tmp_path, capsys):
    from transformers import CLIPTextModel

    pipe = load_pipeline(tiny_sd_dir)
    config = pipe.text_encoder.config.to_dict()
    config.update(hidden_size=config["hidden_size"] * 2)
    pipe.text_encoder = CLIPTextModel(type(pipe.text_encoder.config).from_dict(config))
    pipe.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert main(_erase_args(tmp_path / "m", _names(tmp_path), tmp_path / "o")) == 2
    _one_line_error(capsys, "does not fit together", "cross-attention")


def test_8_a_single_file_checkpoint_missing_components_is_one_line(tiny_sd_dir, tmp_path, capsys):
    from helpers import UNET_PREFIX, sd_pipeline_to_original

    state = {k: v for k, v in sd_pipeline_to_original(load_pipeline(tiny_sd_dir)).items() if k.startswith(UNET_PREFIX)}
    save_file(state, str(tmp_path / "unet-only.safetensors"))
    assert main(_erase_args(tmp_path / "unet-only.safetensors", _names(tmp_path), tmp_path / "o",
                            "--model-config", str(tiny_sd_dir))) == 2
    _one_line_error(capsys, "unet-only.safetensors")


# --------------------------------------------------------------------------- 9. late refusals


def test_9_a_non_empty_out_is_refused_before_training(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    monkeypatch.setattr(engine.api, "erase", lambda *a, **k: pytest.fail("trained before refusing --out"))
    assert main(_erase_args(tiny_sd_dir, _names(tmp_path), tmp_path / "o", *ESD_FAST)) == 2
    _one_line_error(capsys, "not empty")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine" and not (tmp_path / "o.checkpoints").exists()


# --------------------------------------------------------------------------- 10. leftovers


def test_10_temporaries_of_killed_runs_are_removed_and_reported(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-0000"
    live = tmp_path / f".out.tmp-{os.getppid()}-0000"  # a running process: left alone
    stale.mkdir()
    live.mkdir()
    (stale / "half-written").write_text("x")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("x")
    assert not stale.exists() and live.exists()
    assert f"removed {stale}" in capsys.readouterr().err


# --------------------------------------------------------------------------- 11. reporting


def test_11_a_preserved_caption_that_is_also_erased_is_warned_about():
    with pytest.warns(UserWarning, match="both erased and kept"):
        concepts_from_names(["Van Gogh"], templates=["a painting by {}"], captions=["a painting by Van Gogh", "a dog"])


def test_11_output_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
        with reserve_output(tmp_path / "other"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------- beyond the list


def test_per_concept_adapter_files_are_checked_before_loading(tmp_path):
    from engine.finetune.adapters import ADAPTER_DIR, INDEX_NAME, ConceptAdapters, load_concept_adapters

    state = {"unet.x.lora_A.weight": torch.ones(1, 2), "unet.x.lora_B.weight": torch.ones(2, 1)}
    run = ConceptAdapters(concepts=["Van Gogh"], adapters=[state], rank=1, losses=[], timings={}, steps_run=0,
                          resumed_from=0, manifest={})
    out = run.save(tmp_path / "out")
    index_file = out / ADAPTER_DIR / INDEX_NAME
    index = json.loads(index_file.read_text())
    file = out / ADAPTER_DIR / index["adapters"][0]["file"]
    file.write_bytes(file.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="differs from the sha256"):
        load_concept_adapters(None, out)
    index["adapters"][0]["file"] = "../../evil.bin"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        load_concept_adapters(None, out)
