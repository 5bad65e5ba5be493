"""engine.finetune and the fine-tuning methods (engine/methods): each method's loss against its
equation (ESD, TRCE on the tiny SD pipeline; Co-Erasing, Bi-Erasing on the quick toy world, which has an IP-Adapter), the cached targets,
resume after a kill, parameter sets, the 8-bit optimizer, masks and bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine.methods.esd as esd_module
import engine.methods.trce as trce_module
from engine.concepts import concepts_from_names
from engine.finetune.frozen import Prompts, build_trajectory_cache
from engine.finetune.images import generate_images, read_images
from engine.finetune.params import make_optimizer, trainable_parameters
from engine.methods import finetune
from engine.methods.bi_erasing import BiErasingConfig, BiErasingObjective
from engine.methods.co_erasing import CoErasingConfig, CoErasingObjective
from engine.methods.esd import ESDConfig
from engine.methods.trce import TRCEConfig, TRCEObjective
from engine.models import load_pipeline

CONCEPTS = concepts_from_names(["Van Gogh", "a red car"], templates=["{}", "a painting of {}"])
ANCHORED = concepts_from_names(["nudity", "a skull"], anchor="a flower", templates=["{}", "a picture of {}"])


BASE = dict(iterations=4, lr=1e-3, batch_size=2, sample_steps=4, trajectories=1, progress=False, checkpoint_every=0)


def _cfg(cls=ESDConfig, **kw):
    return cls(**{**BASE, **kw})


@pytest.fixture
def pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


def test_cache_holds_the_frozen_models_predictions(pipe):
    cfg = _cfg(trajectories=2)
    prompts = Prompts(pipe, CONCEPTS, progress=False)
    cache = build_trajectory_cache(pipe, prompts, cfg)
    assert cache["x"].shape[:2] == (len(prompts.items) * 2, 4)
    # Recompute one cached step directly with the UNet: the stored predictions are the frozen model's.
    row, s = 3, 2
    x = cache["x"][row, s : s + 1]
    t = cache["timesteps"][s : s + 1]
    cond = prompts.cond[cache["prompt"][row : row + 1]]
    with torch.no_grad():
        eps_c = pipe.unet(x, t, cond).sample
        eps_u = pipe.unet(x, t, prompts.uncond).sample
    torch.testing.assert_close(cache["eps_cond"][row, s : s + 1], eps_c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache["eps_uncond"][row, s : s + 1], eps_u, atol=1e-5, rtol=1e-4)
    # Consecutive steps follow DDIM with guidance 3 from the stored predictions.
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(4)
    guided = eps_u + 3.0 * (eps_c - eps_u)
    nxt = sched.step(guided, cache["timesteps"][s], x).prev_sample
    torch.testing.assert_close(cache["x"][row, s + 1 : s + 2], nxt, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("xt_source", ["cached", "on-policy"])
def test_first_loss_is_the_esd_equation(pipe, tiny_sd_dir, xt_source, monkeypatch):
    """The first step's loss equals ||eps_theta - (u - eta (e_c - u))||^2 computed directly from
    the inputs the trainer fed the kernel (captured), with an untouched copy of the model."""
    reference = load_pipeline(tiny_sd_dir).unet
    seen = {}
    real_loss = esd_module.guidance_loss

    def spy(pred, frozen, coeffs, mask=None, backend="auto"):
        seen.setdefault("frozen", frozen.detach().clone())
        seen.setdefault("coeffs", coeffs.detach().clone())
        return real_loss(pred, frozen, coeffs, mask, backend=backend)

    real_unet_forward = type(pipe.unet).forward

    def record(self, x, t, cond, *a, **k):
        out = real_unet_forward(self, x, t, cond, *a, **k)
        if self.training and "x" not in seen:
            seen.update(x=x.detach().clone(), t=t.detach().clone(), cond=cond.detach().clone())
        return out

    monkeypatch.setattr(esd_module, "guidance_loss", spy)
    monkeypatch.setattr(type(pipe.unet), "forward", record)
    run = finetune(pipe, CONCEPTS, _cfg(iterations=1, eta=1.5, xt_source=xt_source))
    monkeypatch.undo()
    with torch.no_grad():
        x, t, cond = seen["x"], seen["t"], seen["cond"]
        uncond = Prompts(load_pipeline(tiny_sd_dir), CONCEPTS, progress=False).uncond
        e_c = reference(x, t, cond).sample
        u = reference(x, t, uncond.expand(len(x), -1, -1)).sample
        # the frozen predictions the trainer used are the original model's
        torch.testing.assert_close(seen["frozen"][:, 0].reshape(u.shape), u, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(seen["frozen"][:, 1].reshape(e_c.shape), e_c, atol=1e-5, rtol=1e-4)
        target = u - 1.5 * (e_c - u)
        direct = F.mse_loss(reference(x, t, cond).sample, target)
    assert run.losses[0] == pytest.approx(direct.item(), rel=1e-4)


def test_sdxl_esd_loss_is_the_equation_with_pooled_text_and_time_ids(tiny_sdxl_dir, monkeypatch):
    """On SDXL the trainee gets the prompt's pooled embedding and the native-size time ids; the
    first loss is ESD's equation with the unconditional branch the pipeline uses (zeros)."""
    pipe = load_pipeline(tiny_sdxl_dir)
    reference = load_pipeline(tiny_sdxl_dir)
    seen = {}
    real_forward = type(pipe.unet).forward

    def record(self, x, t, cond, *a, **k):
        if self.training and "x" not in seen:
            seen.update(x=x.detach().clone(), t=t.detach().clone(), cond=cond.detach().clone(),
                        added={n: v.detach().clone() for n, v in k["added_cond_kwargs"].items()})
        return real_forward(self, x, t, cond, *a, **k)

    monkeypatch.setattr(type(pipe.unet), "forward", record)
    run = finetune(pipe, CONCEPTS, _cfg(iterations=1, eta=1.5))
    monkeypatch.undo()
    assert not pipe.unet._forward_pre_hooks  # the conditioning hook is gone afterwards
    x, t, cond, added = seen["x"], seen["t"], seen["cond"], seen["added"]
    assert cond.shape[1:] == (77, 64)
    size = 16 * reference.vae_scale_factor
    assert added["time_ids"].tolist() == [[size, size, 0, 0, size, size]] * len(x)
    prompts = [src for c in CONCEPTS.concepts for _, src, _ in c.prompt_pairs()]
    hidden, _, pooled, _ = reference.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    for row in range(len(x)):  # each sample's text and pooled embedding are one prompt's
        match = [i for i in range(len(prompts)) if torch.allclose(hidden[i], cond[row], atol=1e-6)]
        assert len(match) == 1
        torch.testing.assert_close(added["text_embeds"][row], pooled[match[0]], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        unet = reference.unet
        e_c = unet(x, t, cond, added_cond_kwargs=added).sample
        zeros = {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]}
        u = unet(x, t, torch.zeros_like(cond), added_cond_kwargs=zeros).sample
        direct = F.mse_loss(e_c, u - 1.5 * (e_c - u))
    assert run.losses[0] == pytest.approx(direct.item(), rel=1e-4)


def test_sdxl_trce_runs_and_image_methods_say_they_need_sd(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    run = finetune(pipe, ANCHORED, _trce_cfg(iterations=2), method="trce")
    assert np.isfinite(run.losses).all() and run.changed
    assert any(not torch.equal(before[k], v) for k, v in run.changed.items())
    with pytest.raises(NotImplementedError, match="co-erasing needs an SD1.x / SD2.x pipeline"):
        finetune(pipe, CONCEPTS, _cfg(CoErasingConfig))


def test_parameter_sets(pipe):
    xattn, noxattn, full = (trainable_parameters(pipe.unet, p) for p in ("xattn", "noxattn", "full"))
    assert xattn and all(".attn2." in k for k in xattn)
    assert noxattn and not any(".attn2." in k for k in noxattn)
    assert set(xattn) | set(noxattn) == set(full) and not set(xattn) & set(noxattn)


@pytest.mark.parametrize("params", ["xattn", "noxattn"])
def test_only_the_chosen_parameters_change(pipe, params):
    before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    run = finetune(pipe, CONCEPTS, _cfg(params=params, iterations=2))
    after = pipe.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(run.changed)
    assert all((".attn2." in k) == (params == "xattn") for k in changed)


@pytest.mark.parametrize("method, xt_source", [("esd", "cached"), ("esd", "on-policy"), ("trce", "cached")])
def test_resume_after_a_kill_gives_the_same_weights(tiny_sd_dir, tmp_path, method, xt_source, monkeypatch):
    concepts = ANCHORED if method == "trce" else CONCEPTS
    if method == "trce":
        cfg = _cfg(TRCEConfig, iterations=6, checkpoint_every=2, early_steps=2, optimizer="adam", sample_guidance=3.0)
    else:
        cfg = _cfg(iterations=6, checkpoint_every=2, xt_source=xt_source)
    module = trce_module if method == "trce" else esd_module
    whole = load_pipeline(tiny_sd_dir)
    finetune(whole, concepts, cfg, checkpoint_dir=tmp_path / "a", method=method)

    killed = load_pipeline(tiny_sd_dir)
    calls = {"n": 0}
    real_loss = module.guidance_loss

    def dies_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_loss(*a, **k)

    monkeypatch.setattr(module, "guidance_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(killed, concepts, cfg, checkpoint_dir=tmp_path / "b", method=method)
    monkeypatch.undo()
    resumed = load_pipeline(tiny_sd_dir)  # a fresh process: the original weights, then the checkpoint
    run = finetune(resumed, concepts, cfg, checkpoint_dir=tmp_path / "b", resume=True, method=method)
    assert run.resumed_from == 4 and run.steps_run == 2
    for k, v in whole.unet.state_dict().items():
        torch.testing.assert_close(resumed.unet.state_dict()[k], v, atol=0, rtol=0)


def test_resume_refuses_another_runs_checkpoint(tiny_sd_dir, tmp_path):
    finetune(load_pipeline(tiny_sd_dir), CONCEPTS, _cfg(iterations=2, checkpoint_every=1), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="belongs to another run"):
        finetune(load_pipeline(tiny_sd_dir), CONCEPTS, _cfg(iterations=2, eta=2.0, checkpoint_every=1),
                 checkpoint_dir=tmp_path, resume=True)


def test_adamw8bit_steps_with_8bit_states(pipe):
    pytest.importorskip("bitsandbytes")
    before = {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}
    run = finetune(pipe, CONCEPTS, _cfg(params="full", optimizer="adamw8bit", iterations=2))
    assert all(torch.isfinite(torch.tensor(run.losses)))
    moved = [k for k, v in pipe.unet.named_parameters() if not torch.equal(v, before[k])]
    assert moved
    opt = make_optimizer("adamw8bit", [torch.nn.Parameter(torch.randn(64, 128))], lr=1e-3)
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8  # 8-bit moments, not fp32


def test_bad_input(pipe, tiny_sd_dir):
    with pytest.raises(ValueError, match="params"):
        ESDConfig(params="everything")
    with pytest.raises(ValueError, match="iterations"):
        ESDConfig(iterations=0)
    with pytest.raises(ValueError, match="optimizer"):
        ESDConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        finetune(pipe, CONCEPTS, _cfg(), resume=True)
    with pytest.raises(ValueError, match="unknown config field"):
        _cfg().replace(learning_rate=1.0)
    with pytest.raises(TypeError, match="trce takes TRCEConfig settings, got ESDConfig"):
        finetune(pipe, ANCHORED, _cfg(), method="trce")
    with pytest.raises(ValueError, match="cached trajectories"):
        ESDConfig(xt_source="on-policy", distributed="deepspeed")
    with pytest.raises(TypeError):  # TRCE's settings are not ESD's
        ESDConfig(early_steps=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            finetune(pipe, CONCEPTS, _cfg(precision="bf16"))


def test_cli_erase_with_esd_writes_outputs_and_resumes(tiny_sd_dir, tmp_path, capsys):
    import json

    from engine.cli import main
    from engine.export import apply_delta

    concepts = tmp_path / "c.txt"
    concepts.write_text("Van Gogh\n")
    args = ["erase", "--model", str(tiny_sd_dir), "--concepts", str(concepts), "--method", "esd", "--quiet",
            "--set", "iterations=3", "--set", "sample_steps=3", "--set", "trajectories=1", "--set", "lr=1e-3",
            "--set", "checkpoint_every=1"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "3 steps," in out and "resumed" not in out  # a fresh run does not speak of resuming
    assert f"checkpoints kept in {tmp_path / 'out'}.checkpoints" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["method"] == "esd" and manifest["config"]["iterations"] == 3 and manifest["seed"] == 0
    assert manifest["training"]["steps_run"] == 3 and "trained_fingerprint" in manifest["inputs"]
    # The saved delta turns the original model into the trained one.
    trained = load_pipeline(tmp_path / "out")
    patched = load_pipeline(tiny_sd_dir)
    apply_delta(patched, tmp_path / "out" / "delta.safetensors")
    for k, v in trained.unet.state_dict().items():
        torch.testing.assert_close(patched.unet.state_dict()[k], v)
    # A finished run resumed: nothing left to train, same outputs.
    assert main(args + ["--out", str(tmp_path / "again"), "--checkpoint-dir", str(tmp_path / "out.checkpoints"),
                        "--resume"]) == 0
    assert "0 steps (resumed from step 3)" in capsys.readouterr().out


def _trce_cfg(**kw):
    return _cfg(TRCEConfig, **{"optimizer": "adam", "early_steps": 3, "sample_guidance": 7.5, "steer_guidance": 15.0,
                               "hinge_beta": 2.0, **kw})


def test_trce_targets_and_stage1(tiny_sd_dir):
    """Cached targets are the original model's f_safe / f_unsafe; stage 1 is the closed-form
    trce-stage1 edit; the regulariser's targets are the stage-1 model's unconditional predictions."""
    from engine.closed_form import closed_form_edit
    from engine.methods import get_method

    pipe = load_pipeline(tiny_sd_dir)
    objective = TRCEObjective(pipe, ANCHORED, _trce_cfg(), None)
    original = load_pipeline(tiny_sd_dir)
    prompts = objective.prompts
    row, s = 1, 2
    cache = objective.cache
    x, t = cache["x"][row, s : s + 1], cache["timesteps"][s : s + 1]
    item = cache["prompt"][row]
    with torch.no_grad():
        e_s = original.unet(x, t, prompts.anchor[item : item + 1]).sample
        e_m = original.unet(x, t, prompts.cond[item : item + 1]).sample
        e_u = original.unet(x, t, prompts.uncond).sample
    torch.testing.assert_close(cache["f_safe"][row, s : s + 1], e_s + 15 * (e_s - e_u), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache["f_unsafe"][row, s : s + 1], e_m + 15 * (e_m - e_u), atol=1e-4, rtol=1e-4)
    stage1 = load_pipeline(tiny_sd_dir)
    closed_form_edit(stage1, ANCHORED, get_method("trce-stage1").defaults.replace(progress=False))
    for k, v in stage1.unet.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[k], v)
    xu = cache["uncond_x"][0, 1:2]
    with torch.no_grad():
        want = stage1.unet(xu, cache["timesteps"][1:2], prompts.uncond).sample
    torch.testing.assert_close(cache["uncond_eps"][0, 1:2], want, atol=1e-5, rtol=1e-4)


def test_trce_stage1_preservation_weight_is_an_option(tiny_sd_dir):
    """stage1_preserve_weight replaces the published 1e-6 (None: UCE's rule) in the stage-1 solve."""
    from engine.closed_form import closed_form_edit
    from engine.methods import get_method

    concepts = concepts_from_names(["nudity"], anchor="a flower", templates=["{}"], preserve=["a cat", "a house"])
    pipe = load_pipeline(tiny_sd_dir)
    TRCEObjective(pipe, concepts, _trce_cfg(stage1_preserve_weight=None), None)
    stage1 = load_pipeline(tiny_sd_dir)
    edit = closed_form_edit(stage1, concepts, get_method("trce-stage1").defaults.replace(preserve_weight=None, progress=False))
    assert edit.preserve_weight >= 0.1  # UCE's max(0.1, 1/n), not the published 1e-6
    for k, v in stage1.unet.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[k], v)
    for bad in (-1.0, float("nan"), "much"):
        with pytest.raises(ValueError, match="stage1_preserve_weight"):
            TRCEConfig(stage1_preserve_weight=bad)


def test_trce_loss_is_its_equation(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    cfg = _trce_cfg()
    objective = TRCEObjective(pipe, ANCHORED, cfg, None)
    loss = objective.loss(pipe.unet, torch.Generator().manual_seed(5)).item()
    # Replay the same draws and compute the equation with plain torch.
    gen, b, cache, prompts = torch.Generator().manual_seed(5), cfg.batch_size, objective.cache, objective.prompts
    rows = torch.randint(0, len(cache["x"]), (b,), generator=gen)
    steps = torch.randint(0, cfg.early_steps, (b,), generator=gen)
    urows = torch.randint(0, len(cache["uncond_x"]), (b,), generator=gen)
    usteps = torch.randint(0, cfg.early_steps, (b,), generator=gen)
    unet, mse = pipe.unet, F.mse_loss
    total = 0.0
    with torch.no_grad():
        for i in range(b):
            x, t = cache["x"][rows[i], steps[i]][None], cache["timesteps"][steps[i]][None]
            f_s, f_u = cache["f_safe"][rows[i], steps[i]][None], cache["f_unsafe"][rows[i], steps[i]][None]
            for cond in (prompts.cond[cache["prompt"][rows[i]]][None], prompts.uncond):
                a = unet(x, t, cond).sample
                total += torch.relu(2.0 * (mse(a, f_s) - mse(a, f_u) + 0.01)).item() / b
            xu, tu = cache["uncond_x"][urows[i], usteps[i]][None], cache["timesteps"][usteps[i]][None]
            total += 100 * mse(unet(xu, tu, prompts.uncond).sample, cache["uncond_eps"][urows[i], usteps[i]][None]).item() / b
    assert loss == pytest.approx(total, rel=1e-4)


def test_trce_trains_attention_and_needs_anchors(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    run = finetune(pipe, ANCHORED, _trce_cfg(iterations=2, lr=1e-3), method="trce")
    changed = {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])}
    kv = {k for k in changed if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    assert kv and changed - kv and changed <= set(run.changed)
    assert all(".attn1." in k or ".attn2.to_q." in k for k in changed - kv)
    with pytest.raises(ValueError, match="needs a safe anchor"):
        finetune(load_pipeline(tiny_sd_dir), CONCEPTS, _trce_cfg(), method="trce")


# --- the image branch (Co-Erasing, Bi-Erasing), on the quick toy world (it has an IP-Adapter) ---

IDENTITY = "Aldric Corrance"


def _image_cfg(world, cls=CoErasingConfig, **kw):
    return _cfg(cls, params="noxattn", ip_adapter=str(world / "ip_adapter" / "ip_adapter.safetensors"), concept_images=2,
                trajectories=1, sample_steps=3, **kw)


def _world_concepts(anchor=""):
    return concepts_from_names([IDENTITY], anchor=anchor, templates=["a photo of {}"])


def test_projection_bypass_equals_the_ip_adapter_path(quick_world):
    """Feeding projected tokens with the projection set to identity is the UNet's own IP path."""
    from engine.toyworld.world import load_toy_pipeline

    pipe = load_toy_pipeline(quick_world, ip_adapter=True)
    embeds, _ = pipe.encode_image(make_images(2), "cpu", 1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    layers = pipe.unet.encoder_hid_proj.image_projection_layers
    with torch.no_grad():
        normal = pipe.unet(x, t, text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        tokens = layers[0](embeds)
        layers[0] = torch.nn.Identity()
        bypass = pipe.unet(x, t, text, added_cond_kwargs={"image_embeds": [tokens[:, None]]}).sample
    torch.testing.assert_close(bypass, normal)


def make_images(n):
    from PIL import Image

    from engine.toyworld import make_dataset

    return [Image.fromarray(im) for im in make_dataset(n, seed=11)["images"]]


def test_co_erasing_targets_and_loss_are_its_equations(quick_world):
    from engine.toyworld.world import load_toy_pipeline

    pipe = load_toy_pipeline(quick_world)
    cfg = _image_cfg(quick_world, eta=1.5)
    objective = CoErasingObjective(pipe, _world_concepts(), cfg, None)
    cache, prompts = objective.cache, objective.prompts
    # cached targets are constants: no autograd graph (and its memory) hangs on to them
    assert not any(v.requires_grad for v in cache.values() if torch.is_tensor(v))
    # text-guided refinement: softmax(Q K^T / sqrt(d)) V with K = V = the prompt's text states
    images = generate_images(load_toy_pipeline(quick_world), [f"a photo of {IDENTITY}"], 2, 7.5, 3, cfg.seed, False)[0]
    with torch.no_grad():
        embeds, _ = pipe.encode_image(images, "cpu", 1)
        q = objective._projection(embeds)
        text = prompts.cond[0]
        refined = torch.softmax(q @ text.T / q.shape[-1] ** 0.5, -1) @ text
    torch.testing.assert_close(cache["neg_tokens"], refined, atol=1e-5, rtol=1e-4)
    # frozen image-conditioned predictions at one cached x_t
    r, s = 0, 1
    tok = cache["neg_tokens"][cache["neg_image"][r, s]][None]
    x, t = cache["x"][r, s : s + 1], cache["timesteps"][s : s + 1]
    with torch.no_grad():
        e = pipe.unet(x, t, text[None], added_cond_kwargs={"image_embeds": [tok[:, None]]}).sample
        u = pipe.unet(x, t, prompts.uncond, added_cond_kwargs={"image_embeds": [tok[:, None]]}).sample
    torch.testing.assert_close(cache["neg_eps_cond"][r, s : s + 1], e, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache["neg_eps_uncond"][r, s : s + 1], u, atol=1e-5, rtol=1e-4)
    # the loss: ||eps_theta(x,t,[c; c_img']) - (u - eta (e - u))||^2 on the replayed draws
    loss = objective.loss(pipe.unet, torch.Generator().manual_seed(2)).item()
    gen = torch.Generator().manual_seed(2)
    rows = torch.randint(0, len(cache["x"]), (cfg.batch_size,), generator=gen)
    steps = torch.randint(0, cfg.sample_steps, (cfg.batch_size,), generator=gen)
    total = 0.0
    with torch.no_grad():
        for rr, ss in zip(rows.tolist(), steps.tolist()):
            tok = cache["neg_tokens"][cache["neg_image"][rr, ss]][None]
            pred = pipe.unet(cache["x"][rr, ss][None], cache["timesteps"][ss][None], text[None],
                             added_cond_kwargs={"image_embeds": [tok[:, None]]}).sample
            e, u = cache["neg_eps_cond"][rr, ss][None], cache["neg_eps_uncond"][rr, ss][None]
            total += F.mse_loss(pred, u - 1.5 * (e - u)).item() / cfg.batch_size
    assert loss == pytest.approx(total, rel=1e-4)


def test_co_erasing_run_leaves_a_plain_pipeline(quick_world, tmp_path):
    from engine.toyworld.world import load_toy_pipeline

    pipe = load_toy_pipeline(quick_world)
    before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    run = finetune(pipe, _world_concepts(), _image_cfg(quick_world, iterations=2), method="co-erasing")
    assert pipe.unet.encoder_hid_proj is None and pipe.image_encoder is not None  # adapter out, encoder kept
    after = pipe.unet.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(run.changed) and not any(".attn2." in k for k in changed)
    pipe.save_pretrained(tmp_path / "out")
    assert load_pipeline(tmp_path / "out").image_encoder is not None


def test_bi_erasing_branches_and_positive_first(quick_world):
    from engine.toyworld.world import load_toy_pipeline

    cfg = _image_cfg(quick_world, BiErasingConfig, positive_first=True, iterations=4)
    objective = BiErasingObjective(load_toy_pipeline(quick_world), _world_concepts("a person"), cfg, None)
    cache, unet = objective.cache, objective.pipe.unet
    assert "pos_tokens" in cache and "neg_tokens" in cache
    # positive branch target u_p + eta (e_p - u_p); the first half of the steps trains it alone
    early = objective.loss(unet, torch.Generator().manual_seed(3), step=0).item()
    late = objective.loss(unet, torch.Generator().manual_seed(3), step=3).item()
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(0, len(cache["x"]), (cfg.batch_size,), generator=gen)
    steps = torch.randint(0, cfg.sample_steps, (cfg.batch_size,), generator=gen)
    parts = {}
    with torch.no_grad():
        for branch, sign in (("pos", -1.0), ("neg", 1.0)):
            pred, frozen = objective._branch_batch(unet, branch, rows, steps)
            u, e = frozen[:, 0], frozen[:, 1]
            parts[branch] = F.mse_loss(pred, u - sign * 1.0 * (e - u)).item()
    assert early == pytest.approx(0.4 * parts["pos"], rel=1e-4)
    assert late == pytest.approx(0.6 * parts["neg"] + 0.4 * parts["pos"], rel=1e-4)


def test_image_branch_bad_input(quick_world, tiny_sd_dir, tmp_path):
    from engine.toyworld.world import load_toy_pipeline

    with pytest.raises(ValueError, match="needs an anchor"):
        finetune(load_toy_pipeline(quick_world), _world_concepts(), _image_cfg(quick_world, BiErasingConfig))
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        finetune(load_toy_pipeline(quick_world), _world_concepts(), _image_cfg(quick_world, images=str(tmp_path / "nope")),
                 method="co-erasing")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(FileNotFoundError, match="no images of 'Aldric Corrance'"):
        finetune(load_toy_pipeline(quick_world), _world_concepts(), _image_cfg(quick_world, images=str(tmp_path / "imgs")),
                 method="co-erasing")
    with pytest.raises(ValueError, match="needs an IP-Adapter"):
        finetune(load_toy_pipeline(quick_world), _world_concepts(), _image_cfg(quick_world).replace(ip_adapter=None),
                 method="co-erasing")
    # The toy world's IP-Adapter on the tiny SD pipeline (no image encoder, other widths).
    with pytest.raises(ValueError, match="image_encoder|does not fit"):
        finetune(load_pipeline(tiny_sd_dir), CONCEPTS, _image_cfg(quick_world), method="co-erasing")


def test_user_images_are_read_per_concept(quick_world, tmp_path):
    from engine.toyworld.world import load_toy_pipeline

    folder = tmp_path / "imgs" / IDENTITY
    folder.mkdir(parents=True)
    for i, im in enumerate(make_images(3)):
        im.save(folder / f"{i}.png")
    objective = CoErasingObjective(load_toy_pipeline(quick_world), _world_concepts(),
                                            _image_cfg(quick_world, images=str(tmp_path / "imgs")), None)
    assert len(objective.cache["neg_tokens"]) == 3


def test_masks_keep_only_the_concept_region(quick_world, tmp_path):
    """x' = m x + (1 - m) mean(x) before the image encoder: a white mask changes nothing, a
    black one leaves the image's mean colour."""
    from PIL import Image

    from engine.toyworld.world import load_toy_pipeline

    folder = tmp_path / "imgs" / IDENTITY
    (folder / "masks").mkdir(parents=True)
    images = make_images(2)
    for i, (im, value) in enumerate(zip(images, (255, 0))):
        im.save(folder / f"{i}.png")
        Image.new("L", im.size, value).save(folder / "masks" / f"{i}.png")
    read, masks = read_images(tmp_path / "imgs", IDENTITY)
    assert [m.mean() for m in masks] == [1.0, 0.0]
    objective = CoErasingObjective(load_toy_pipeline(quick_world), _world_concepts(),
                                            _image_cfg(quick_world, images=str(tmp_path / "imgs")), None)
    text = objective.prompts.cond[0]
    x1 = np.asarray(images[1], np.float32)
    flat = Image.fromarray(np.broadcast_to(x1.mean((0, 1)), x1.shape).round().astype(np.uint8))
    want = objective._refined_tokens(objective.pipe, [images[0], flat], text)
    torch.testing.assert_close(objective.cache["neg_tokens"], want.cpu())
    (folder / "masks" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match="no mask 1.png"):
        read_images(tmp_path / "imgs", IDENTITY)


def test_lora_training_merges_into_a_low_rank_delta(pipe, tiny_sd_dir, tmp_path):
    from engine.api import erase
    from engine.export import LORA_DIR

    result = erase(pipe, CONCEPTS, method="esd", **{**_cfg(params="lora", lora_rank=2, iterations=3).to_dict()})
    assert set(result.delta) == {k for k in trainable_parameters(pipe.unet, "lora")}
    assert not any("lora_" in k for k in pipe.unet.state_dict())  # plain layers again
    for key, new in result.delta.items():
        d = (new - result.original[key]).double()
        assert 0 < torch.linalg.matrix_rank(d, rtol=1e-3).item() <= 2, key  # fp32 rounding aside
    result.save(tmp_path / "out", export_lora=True)
    with_lora = load_pipeline(tiny_sd_dir)
    with_lora.load_lora_weights(tmp_path / "out" / LORA_DIR)
    with_lora.fuse_lora()
    for key, new in result.delta.items():
        fused = with_lora.unet.get_submodule(key.removesuffix(".weight")).weight  # peft layers expose the base weight
        torch.testing.assert_close(fused, new, rtol=1e-4, atol=1e-5)
