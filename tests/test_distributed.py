"""engine.distributed: 2-process DeepSpeed ZeRO-2 / ZeRO-3 runs under torchrun (gloo, CPU) give
the weights of a single-process run, with torch AdamW and bitsandbytes AdamW8bit, and a killed
distributed run resumes from its DeepSpeed checkpoint."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from engine.methods import finetune  # noqa: E402
from engine.models import load_pipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import CONCEPTS, config  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"
LAUNCH_TIMEOUT = 600  # the first launch JIT-builds DeepSpeed's CPU comm op (about a minute)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model, out, runs, *extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(WORKER), "--model", str(model), "--out", str(out), "--runs", runs, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def _reference(model, optimizer: str):
    """A single-process run of the same settings: (the original weights, the run)."""
    pipe = load_pipeline(model)
    original = {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}
    return original, finetune(pipe, CONCEPTS, config(optimizer=optimizer))


def _assert_same_run(got: dict, losses: list, optimizer: str, reference) -> None:
    """The 2-rank run took the single-process run's steps. Its losses (same samples, same
    weights) must match closely. Weights, against the largest change training made: AdamW
    divides every gradient by its own size, so rounding noise on near-zero gradients moves a few
    elements by a few % of that (under 1 in 500 by more than 0.1%); bitsandbytes' AdamW8bit
    quantises the flattened ZeRO partitions in other blocks than the separate tensors, so its
    updates agree in direction (cosine, signs) rather than element by element."""
    original, run = reference
    want = run.changed
    assert set(got) == set(want)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(run.losses), rtol=1e-4, atol=0)
    step = torch.cat([(w - original[k]).flatten() for k, w in want.items()])
    moved = torch.cat([(got[k] - original[k]).flatten() for k in want])
    scale = step.abs().max()
    assert scale > 0
    if optimizer == "adamw":
        err = (moved - step).abs()
        assert err.max() <= 0.1 * scale, (err.max(), scale)
        assert (err > 1e-3 * scale).float().mean() < 0.002
    else:
        assert torch.nn.functional.cosine_similarity(moved, step, dim=0) > 0.999
        same_sign = (moved.sign() == step.sign()) | (step.abs() < 1e-3 * scale)
        assert same_sign.float().mean() > 0.99


@pytest.fixture(scope="module")
def zero_runs(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    proc = _launch(tiny_sd_dir, out, "2:adamw,3:adamw,2:adamw8bit,3:adamw8bit")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_two_ranks_give_the_single_process_weights(zero_runs, tiny_sd_dir, stage, optimizer):
    pytest.importorskip("bitsandbytes")
    got = load_file(str(zero_runs / f"zero{stage}-{optimizer}.safetensors"))
    info = json.loads((zero_runs / f"zero{stage}-{optimizer}.json").read_text())
    assert info["ranks"] == 2 and len(info["losses"]) == 4
    _assert_same_run(got, info["losses"], optimizer, _reference(tiny_sd_dir, optimizer))


def test_killed_distributed_run_resumes(tiny_sd_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    killed = _launch(tiny_sd_dir, tmp_path / "a", "3:adamw", "--checkpoint-dir", str(ckpt), "--die-at-step", "3")
    assert killed.returncode != 0 and not (tmp_path / "a").exists()
    assert (ckpt / "deepspeed" / "latest").read_text().strip() == "step00000002"
    resumed = _launch(tiny_sd_dir, tmp_path / "b", "3:adamw", "--checkpoint-dir", str(ckpt), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    info = json.loads((tmp_path / "b" / "zero3-adamw.json").read_text())
    assert info["resumed_from"] == 2 and len(info["losses"]) == 2
    original, run = _reference(tiny_sd_dir, "adamw")
    run.losses = run.losses[2:]  # the resumed run logs steps 3 and 4
    _assert_same_run(load_file(str(tmp_path / "b" / "zero3-adamw.safetensors")), info["losses"], "adamw",
                     (original, run))


def test_cli_under_torchrun_writes_one_output_from_rank_0(tiny_sd_dir, tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("Van Gogh\na red car\n")
    out = tmp_path / "erased"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "engine", "erase", "--model", str(tiny_sd_dir), "--concepts", str(concepts), "--method", "esd",
           "--distributed", "deepspeed", "--zero-stage", "2", "--set", "iterations=2", "--set", "batch_size=2",
           "--set", "sample_steps=3", "--set", "trajectories=1", "--set", "params=full", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 only
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["distributed"] == {"backend": "deepspeed", "zero_stage": 2, "ranks": 2}
    assert manifest["training"]["steps_run"] == 2 and (out / "delta.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".erased")] == []  # no leftover temporary folder


def test_distributed_needs_a_launcher(tiny_sd_dir, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        finetune(load_pipeline(tiny_sd_dir), CONCEPTS, config(distributed="deepspeed"))


def test_deepspeed_config_and_the_single_process_share():
    from engine import distributed

    assert distributed.shard(4) == slice(0, 4)  # one process: the whole batch
    cfg = distributed.deepspeed_config(8, 3, bf16=False)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(ValueError, match="zero_stage"):
        distributed.deepspeed_config(8, 1, bf16=False)
