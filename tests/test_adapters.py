"""engine.finetune.adapters: per-concept LoRA adapters trained in one batched run equal separate
single-concept runs, save/load as diffusers LoRA files with an index, resume after a kill,
and refuse what they cannot do."""

import json

import pytest
import torch

import engine.finetune.adapters as ad
import engine.methods.esd as esd_module
from engine.concepts import ConceptSet, concepts_from_names
from engine.finetune.adapters import load_concept_adapters, train_concept_adapters
from engine.methods import finetune
from engine.methods.esd import ESDConfig
from engine.models import load_pipeline

CONCEPTS = concepts_from_names(["Van Gogh", "a red car", "Monet"], templates=["{}", "a painting of {}"])


def _cfg(**kw):
    base = dict(params="lora", lora_rank=2, iterations=3, lr=1e-2, batch_size=2, sample_steps=4, trajectories=1,
                progress=False, checkpoint_every=0, seed=3)
    return ESDConfig(**{**base, **kw})


def _delta(adapter: dict, key: str) -> torch.Tensor:
    module = "unet." + key.removesuffix(".weight")
    return adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"]


@pytest.fixture(scope="module")
def batched(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    run = train_concept_adapters(pipe, CONCEPTS, _cfg())
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())  # untouched
    return run


def _float64_loss(pred, frozen, coeffs, mask=None, backend=None):
    # The loss kernel and its reference compute in fp32: the same equation in float64.
    target = torch.einsum("bk,bkn->bn", coeffs.to(pred.dtype), frozen.to(pred.dtype))
    return (pred - target).pow(2).mean(1)


def test_each_adapter_equals_its_own_single_concept_run(tiny_sd_dir, monkeypatch):
    """In float64, so that rounding cannot hide a difference: in fp32, Adam's division of each
    gradient by its own magnitude turns rounding noise on near-zero gradients into steps that
    differ by up to 0.1% of the largest change."""
    monkeypatch.setattr(ad, "guidance_loss", _float64_loss)
    monkeypatch.setattr(esd_module, "guidance_loss", _float64_loss)
    batched = train_concept_adapters(load_pipeline(tiny_sd_dir).to(dtype=torch.float64), CONCEPTS, _cfg())
    assert batched.steps_run == 3 and len(batched.losses) == 3
    for k, concept in enumerate(CONCEPTS.concepts):
        pipe = load_pipeline(tiny_sd_dir).to(dtype=torch.float64)
        original = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
        single = finetune(pipe, ConceptSet(concepts=(concept,)), _cfg())
        assert single.changed
        for key, merged in single.changed.items():
            want = merged - original[key]
            assert want.abs().max() > 0
            torch.testing.assert_close(_delta(batched.adapters[k], key), want, rtol=0, atol=1e-9 * want.abs().max().item())


def test_adapters_differ_between_concepts(batched):
    a, b = batched.adapters[0], batched.adapters[1]
    assert any(not torch.allclose(a[k], b[k]) for k in a if k.endswith("lora_B.weight"))


def test_saved_adapters_load_and_switch(batched, tiny_sd_dir, tmp_path):
    pytest.importorskip("peft")
    out = batched.save(tmp_path / "out")
    index = json.loads((out / "adapters" / "index.json").read_text())
    assert [e["concept"] for e in index["adapters"]] == ["Van Gogh", "a red car", "Monet"]
    assert index["format"] == ad.INDEX_FORMAT and index["rank"] == 2
    assert all((out / "adapters" / e["file"]).is_file() for e in index["adapters"])

    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500])
    plain = load_pipeline(tiny_sd_dir)
    text = torch.randn(1, 77, plain.unet.config.cross_attention_dim, generator=gen)

    def merged_output(ks):
        pipe = load_pipeline(tiny_sd_dir)
        params = dict(pipe.unet.named_parameters())
        with torch.no_grad():
            for key in (k.removeprefix("unet.").replace(".lora_A.weight", ".weight") for k in batched.adapters[0]
                        if k.endswith("lora_A.weight")):
                for k in ks:
                    params[key] += _delta(batched.adapters[k], key)
            return pipe.unet(x, t, text).sample

    pipe = load_pipeline(tiny_sd_dir)
    names = load_concept_adapters(pipe, out, ["a red car"])
    assert names == ["001-a-red-car"]
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, text).sample, merged_output([1]), rtol=1e-4, atol=1e-5)
        load_concept_adapters(pipe, out, ["Van Gogh"])  # now both adapters active
        pipe.set_adapters(["000-van-gogh", "001-a-red-car"])
        torch.testing.assert_close(pipe.unet(x, t, text).sample, merged_output([0, 1]), rtol=1e-4, atol=1e-5)
        pipe.disable_lora()
        torch.testing.assert_close(pipe.unet(x, t, text).sample, plain.unet(x, t, text).sample)
    with pytest.raises(ValueError, match="no adapter for"):
        load_concept_adapters(load_pipeline(tiny_sd_dir), out, ["Picasso"])
    with pytest.raises(FileNotFoundError, match="no per-concept adapters"):
        load_concept_adapters(load_pipeline(tiny_sd_dir), tmp_path)


def test_resume_after_a_kill_gives_the_same_adapters(batched, tiny_sd_dir, tmp_path, monkeypatch):
    cfg = _cfg(checkpoint_every=2)
    real_loss, calls = ad.guidance_loss, {"n": 0}

    def dies_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_loss(*a, **k)

    monkeypatch.setattr(ad, "guidance_loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_concept_adapters(load_pipeline(tiny_sd_dir), CONCEPTS, cfg, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    run = train_concept_adapters(load_pipeline(tiny_sd_dir), CONCEPTS, cfg, checkpoint_dir=tmp_path, resume=True)
    assert run.resumed_from == 2 and run.steps_run == 1
    for got, want in zip(run.adapters, batched.adapters):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_cli_writes_adapters_and_manifest(tiny_sd_dir, tmp_path, capsys):
    from engine.cli import main

    concepts = tmp_path / "c.txt"
    concepts.write_text("Van Gogh\na red car\n")
    out = tmp_path / "out"
    rc = main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(concepts), "--method", "esd",
               "--per-concept-adapters", "--set", "iterations=2", "--set", "sample_steps=3", "--set", "trajectories=1",
               "--set", "lora_rank=2", "--out", str(out), "--quiet"])
    assert rc == 0 and "trained 2 per-concept adapter(s)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["per_concept_adapters"] and manifest["config"]["params"] == "lora"
    assert manifest["training"]["adapters"] == 2 and manifest["inputs"]["base_fingerprint"]
    assert len(json.loads((out / "adapters" / "index.json").read_text())["adapters"]) == 2
    with pytest.raises(SystemExit, match="per-concept-adapters"):
        main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(concepts), "--method", "uce",
              "--per-concept-adapters", "--out", str(tmp_path / "o2")])


def test_sdxl_adapters_train_and_load(tiny_sdxl_dir, tmp_path):
    """On SDXL (pooled text and time ids through sdxl_conditioning) the adapters train, take their
    hook off the UNet again and load into a StableDiffusionXLPipeline with the merged output."""
    pytest.importorskip("peft")
    pipe = load_pipeline(tiny_sdxl_dir)
    run = train_concept_adapters(pipe, ConceptSet(concepts=CONCEPTS.concepts[:2]), _cfg(iterations=2))
    assert not pipe.unet._forward_pre_hooks
    assert all(torch.isfinite(torch.tensor(run.losses)))
    out = run.save(tmp_path / "out")
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([500])
    text = torch.randn(1, 77, 64, generator=gen)
    added = {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    merged = load_pipeline(tiny_sdxl_dir)
    params = dict(merged.unet.named_parameters())
    with torch.no_grad():
        for key in (k.removeprefix("unet.").replace(".lora_A.weight", ".weight") for k in run.adapters[1]
                    if k.endswith("lora_A.weight")):
            params[key] += _delta(run.adapters[1], key)
        want = merged.unet(x, t, text, added_cond_kwargs=added).sample
        loaded = load_pipeline(tiny_sdxl_dir)
        load_concept_adapters(loaded, out, ["a red car"])
        torch.testing.assert_close(loaded.unet(x, t, text, added_cond_kwargs=added).sample, want, rtol=1e-4, atol=1e-5)


def test_bad_input(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    for cfg, match in [(_cfg(params="xattn"), "params must be 'lora'"),
                       (_cfg(optimizer="adamw8bit"), "element-wise optimizer"),
                       (_cfg(xt_source="on-policy"), "cached trajectories")]:
        with pytest.raises(ValueError, match=match):
            train_concept_adapters(pipe, CONCEPTS, cfg)
    layer = ad.BatchedLoRALinear(torch.nn.Linear(4, 3), 2, [torch.Generator().manual_seed(0)] * 2)
    with pytest.raises(RuntimeError, match="set route"):
        layer(torch.randn(2, 4))
