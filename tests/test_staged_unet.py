"""The CLI saves the edited UNet by patching a background copy of the source's weight file: the
result must hold exactly the tensors a full write holds, a file it cannot vouch for falls back to
a full write, and nothing is left behind when the run fails. Also: the sha256 cache of large files."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine import export
from engine.export import MANIFEST_NAME, sha256_tree
from engine.staged_unet import WEIGHTS_NAME, StagedUnet, read_header, staged_unet


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _erase(model, out, tmp_path, *extra):
    from engine.cli import main

    (tmp_path / "c.txt").write_text("Van Gogh\nClaude Monet\n")
    assert main(["erase", "--model", str(model), "--concepts", str(tmp_path / "c.txt"), "--anchor", "a painting",
                 "--quiet", "--out", str(out), *extra]) == 0
    return json.loads((out / MANIFEST_NAME).read_text())


def test_patched_unet_equals_a_full_write(tiny_sd_dir, tmp_path):
    patched = _erase(tiny_sd_dir, tmp_path / "patched", tmp_path)
    full = _erase(tiny_sd_dir, tmp_path / "full", tmp_path, "--copy-pipeline")
    assert "rewritten" in patched["pipeline_files"]["unet"], patched["pipeline_files"]
    a, b = _tensors(tmp_path / "patched" / "unet" / WEIGHTS_NAME), _tensors(tmp_path / "full" / "unet" / WEIGHTS_NAME)
    source = _tensors(tiny_sd_dir / "unet" / WEIGHTS_NAME)
    assert a.keys() == b.keys() == source.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = [k for k in a if not torch.equal(a[k], source[k])]
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    assert json.loads((tmp_path / "patched" / "unet" / "config.json").read_text())["cross_attention_dim"] == \
        json.loads((tiny_sd_dir / "unet" / "config.json").read_text())["cross_attention_dim"]
    assert patched["outputs"] == {k: v for k, v in sha256_tree(tmp_path / "patched", progress=False).items()
                                  if k != MANIFEST_NAME}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_unet_in_another_dtype_is_written_in_full(tiny_sd_dir, tmp_path):
    import shutil

    model = tmp_path / "fp16-unet"
    shutil.copytree(tiny_sd_dir, model)
    weights = model / "unet" / WEIGHTS_NAME
    save_file({k: v.half() for k, v in _tensors(weights).items()}, str(weights))  # the engine loads it as fp32
    manifest = _erase(model, tmp_path / "out", tmp_path)
    assert manifest["pipeline_files"]["unet"].startswith("written in full (tensor "), manifest["pipeline_files"]
    assert all(v.dtype == torch.float32 for v in _tensors(tmp_path / "out" / "unet" / WEIGHTS_NAME).values())


def test_finish_refuses_a_tensor_the_file_lacks_and_leaves_dest_alone(tiny_sd_dir, tmp_path):
    from engine.models import load_pipeline

    unet = load_pipeline(tiny_sd_dir).unet
    (tmp_path / "stage").mkdir()
    staged = StagedUnet(tiny_sd_dir / "unet", tmp_path / "stage")
    reason = staged.finish(unet, {"not.a.tensor": torch.zeros(2)}, tmp_path / "dest")
    assert reason == "changed tensor not.a.tensor is not in the UNet" and not (tmp_path / "dest").exists()
    staged.cancel()
    assert not (tmp_path / "stage").exists()


def test_a_failed_run_leaves_no_staging_folder(tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_unet(tiny_sd_dir, out) as staged:
            assert staged is not None and staged.folder.parent == tmp_path
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_no_staging_for_a_single_file_or_a_missing_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    for model in (tmp_path / "model.safetensors", tmp_path / "absent", None):
        with staged_unet(model, tmp_path / "out") as staged:
            assert staged is None


def _raw_safetensors(path, header: dict, data: bytes = b"\0" * 16):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, problem", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}, "points outside the file"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}, "points outside the file"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "points outside the file"),
    ({"w": {"dtype": "F32"}}, "malformed header entry"),
    (["w"], "not a JSON object"),
])
def test_read_header_refuses_entries_outside_the_file(tmp_path, header, problem):
    with pytest.raises(ValueError, match=problem):
        read_header(_raw_safetensors(tmp_path / "h.safetensors", header))


def test_read_header_refuses_a_header_longer_than_the_file(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="does not fit"):
        read_header(path)


def test_read_header_reads_a_real_file(tmp_path):
    save_file({"a": torch.randn(3, 2), "b": torch.randn(5).half()}, str(tmp_path / "r.safetensors"))
    start, entries = read_header(tmp_path / "r.safetensors")
    assert entries["a"][:2] == ("F32", (3, 2)) and entries["b"][:2] == ("F16", (5,))
    assert {e[3] - e[2] for e in entries.values()} == {24, 10} and start > 8


def test_large_file_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "HASH_CACHE_MIN_BYTES", 0)
    calls = []
    real = export.sha256_file
    monkeypatch.setattr(export, "sha256_file", lambda p, **kw: calls.append(p) or real(p, **kw))
    (tmp_path / "tree").mkdir()
    weights = tmp_path / "tree" / "w.bin"
    weights.write_bytes(os.urandom(64))
    first = sha256_tree(tmp_path / "tree", progress=False)
    assert sha256_tree(tmp_path / "tree", progress=False) == first and len(calls) == 1
    os.link(weights, tmp_path / "tree" / "link.bin")  # a hard link is the same file: no new hash
    assert sha256_tree(tmp_path / "tree", progress=False)["link.bin"] == first["w.bin"] and len(calls) == 1
    weights.write_bytes(os.urandom(64))  # rewritten in place: a new modification time
    os.utime(weights, ns=(1, 1))
    changed = sha256_tree(tmp_path / "tree", progress=False)
    assert changed["w.bin"] != first["w.bin"] and changed["w.bin"] == real(weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_finds_nan_and_inf_but_not_a_sum_that_overflows(dtype):
    from engine.export import non_finite

    big = torch.finfo(dtype).max
    tensors = {"ok": torch.randn(64, 8).to(dtype), "nan": torch.randn(64, 8).to(dtype),
               "inf": torch.randn(300).to(dtype), "huge": torch.full((1000,), big, dtype=dtype),
               "ints": torch.arange(5)}
    tensors["nan"][3, 2] = float("nan")
    tensors["inf"][-1] = float("-inf")
    assert sorted(non_finite(tensors)) == ["inf", "nan"]
