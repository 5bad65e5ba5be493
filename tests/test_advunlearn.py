"""AdvUnlearn (engine/methods/advunlearn.py, advunlearn_attack.py) on the tiny SD pipeline: the upper
loss against a plain computation of the paper's equation, the attack lowering the recovery loss,
which parameters change (text-encoder layers and parts, or the UNet's set), determinism, resume,
bad settings, and the command line writing a pipeline whose text encoder is the trained one."""

import json

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.cli import main
from engine.concepts import concepts_from_names
from engine.export import MANIFEST_NAME
from engine.methods import finetune, get_method
from engine.methods.advunlearn import AdvUnlearnConfig, AdvUnlearnObjective
from engine.methods.advunlearn_attack import retain_indices, soft_prompt_attack
from engine.models import load_pipeline

CONCEPTS = concepts_from_names(["Van Gogh"], templates=["{}", "a painting of {}"])
# A few steps on a random model move it little: the trainer's "likely not erased" warning is expected.
pytestmark = [pytest.mark.filterwarnings("ignore:advunlearn. after .* steps the erased concepts"), pytest.mark.usefixtures("one_thread")]

FAST = dict(iterations=3, lr=1e-3, batch_size=2, sample_steps=4, trajectories=2, progress=False, checkpoint_every=0,
            loss_backend="torch", warmup_iterations=1, attack_steps=2, retain_batch=2)


@pytest.fixture
def pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


def cfg(**kw):
    return AdvUnlearnConfig(**{**FAST, **kw})


@torch.no_grad()
def perturb(text_encoder, seed=1, scale=0.05):
    """Move every encoder layer a little: a text encoder part-way through training."""
    gen = torch.Generator().manual_seed(seed)
    for key, p in text_encoder.named_parameters():
        if ".layers." in key:
            p.add_(scale * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def encode_with_spare_row(text_encoder, tokenizer, prompt, vectors):
    """E([v; prompt]) the textual-inversion way: the k vectors written into spare rows of the
    token-embedding table, their ids placed right after the start token (prefix_k)."""
    table = text_encoder.get_input_embeddings().weight
    spare = list(range(1000, 1000 + len(vectors)))
    saved = table[spare].clone()
    ids = tokenizer(prompt, padding="max_length", max_length=77).input_ids
    ids = [ids[0], *spare, *ids[1:]][:77]
    table[spare] = vectors
    try:
        return text_encoder(torch.tensor([ids]))[0]
    finally:
        table[spare] = saved


def test_upper_loss_is_the_papers_equation(pipe, tiny_sd_dir):
    """L = ||eps(x_t,t,E_phi([v;c])) - (eps*(x_t,t,"") - eta (eps*(x_t,t,c) - eps*(x_t,t,"")))||^2
    + w mean ||eps(x_r,t,E_phi(r)) - eps*(x_r,t,E*(r))||^2, recomputed here from the latents the
    step fed the UNet, with the original model loaded afresh and the adversarial vectors put in
    through the token-embedding table."""
    settings = cfg(eta=1.5, retain_weight=0.7, batch_size=3, attack_every=2, warmup_iterations=0)
    objective = AdvUnlearnObjective(pipe, CONCEPTS, settings, None)
    perturb(pipe.text_encoder)  # E_phi != E*
    vectors = 0.02 * torch.randn(1, 32, generator=torch.Generator().manual_seed(5))
    objective.item, objective.vectors = 1, vectors  # "a painting of Van Gogh"
    calls = []
    forward = type(pipe.unet).forward

    def record(self, x, t, cond, *a, **k):
        if torch.is_grad_enabled():  # the trainee's forwards (the frozen ones run without grad)
            calls.append((x.detach().clone(), t.detach().clone(), cond.detach().clone()))
        return forward(self, x, t, cond, *a, **k)

    pipe.unet.forward = record.__get__(pipe.unet)
    loss = objective.loss(pipe.text_encoder, torch.Generator().manual_seed(0), step=1)  # no attack at step 1
    del pipe.unet.forward
    assert len(calls) == 2
    (x, t, _), (x_r, t_r, cond_r) = calls
    assert x.shape[0] == 3 and x_r.shape[0] == 2 and torch.equal(t_r[:1], t[:1])  # the same DDIM step

    original = load_pipeline(tiny_sd_dir)
    unet, tok = original.unet, original.tokenizer
    with torch.no_grad():
        e0 = unet(x, t, original.text_encoder(tok([""] * 3, padding="max_length", max_length=77,
                                                  return_tensors="pt").input_ids)[0]).sample
        c = original.text_encoder(tok(["a painting of Van Gogh"] * 3, padding="max_length", max_length=77,
                                      return_tensors="pt").input_ids)[0]
        ep = unet(x, t, c).sample
        adv = encode_with_spare_row(pipe.text_encoder, tok, "a painting of Van Gogh", vectors).expand(3, -1, -1)
        en = unet(x, t, adv).sample
        erase = F.mse_loss(en, e0 - 1.5 * (ep - e0))
        # Which retain prompts the step took: the rows of E_phi over the whole retain set it matches.
        retain = objective.retain
        ids = tok(retain, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        every = pipe.text_encoder(ids)[0]
        rows = [int((every - row).flatten(1).norm(dim=1).argmin()) for row in cond_r]
        torch.testing.assert_close(every[rows], cond_r, atol=1e-6, rtol=0)
        target = unet(x_r, t_r, original.text_encoder(ids[rows])[0]).sample
        keep = F.mse_loss(unet(x_r, t_r, every[rows]).sample, target)
    assert erase > 0 and keep > 0
    torch.testing.assert_close(loss.detach(), erase + 0.7 * keep, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("method", ["pgd", "fast_at"])
def test_attack_lowers_the_recovery_loss(pipe, method):
    """The lower level against a text encoder part-way through erasure: the mean of
    ||eps(x_t,t,E_phi([v;c])) - eps*(x_t,t,c)||^2 over every cached latent of c is lower at the
    attack's vectors than at its starting ones; the models get no gradient and do not change."""
    settings = cfg(attack_steps=25, attack_lr=0.02, attack_method=method)
    objective = AdvUnlearnObjective(pipe, CONCEPTS, settings, None)
    perturb(pipe.text_encoder, scale=0.1)
    cache, item = objective.cache, 0
    rows = torch.arange(cache["x"].shape[0])[cache["prompt"] == item]
    x = cache["x"][rows].flatten(0, 1)
    t = cache["timesteps"].repeat(len(rows))
    target = cache["eps_cond"][rows].flatten(0, 1)

    @torch.no_grad()
    def recovery(vectors):
        cond = objective.adversarial.encode(pipe, item, vectors).expand(len(x), -1, -1)
        return F.mse_loss(pipe.unet(x, t, cond).sample, target).item()

    weights = {k: v.clone() for k, v in [*pipe.unet.state_dict().items(), *pipe.text_encoder.state_dict().items()]}
    start = pipe.text_encoder.get_input_embeddings().weight[[2000]].detach().clone()
    vectors, losses = soft_prompt_attack(pipe, pipe.unet, objective.adversarial, item, objective.draw, settings,
                                         torch.Generator().manual_seed(0), start)
    assert vectors.shape == (1, 32) and len(losses) == 25
    assert recovery(vectors) < 0.9 * recovery(start)
    assert all(p.grad is None for p in [*pipe.unet.parameters(), *pipe.text_encoder.parameters()])
    after = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in weights.items())


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("layers, part, norm, expected", [
    ("all", "all", False, lambda k: ".layers." in k or "final_layer_norm" in k),
    (0, "ffn", False, lambda k: ".layers.0.mlp." in k),
    ("1", "attn", True, lambda k: ".layers.1.self_attn." in k or "final_layer_norm" in k),
])
def test_only_the_chosen_text_encoder_parameters_change(pipe, layers, part, norm, expected):
    te, unet = ({k: v.clone() for k, v in m.state_dict().items()} for m in (pipe.text_encoder, pipe.unet))
    run = finetune(pipe, CONCEPTS, cfg(text_encoder_layers=layers, text_encoder_part=part, final_layer_norm=norm),
                   method="advunlearn")
    changed = _changed(te, pipe.text_encoder)
    wanted = {k for k in te if expected(k)}
    assert changed == wanted == set(run.changed)  # every trained tensor moved; nothing else did
    assert not _changed(unet, pipe.unet)  # the UNet and every frozen text-encoder tensor: bit-identical
    assert get_method("advunlearn").touched(pipe.text_encoder, cfg(text_encoder_layers=layers, text_encoder_part=part,
                                                                   final_layer_norm=norm)) == wanted


def test_unet_variant_trains_the_unet_set_only(pipe):
    te, unet = ({k: v.clone() for k, v in m.state_dict().items()} for m in (pipe.text_encoder, pipe.unet))
    run = finetune(pipe, CONCEPTS, cfg(module="unet", params="xattn"), method="advunlearn")
    changed = _changed(unet, pipe.unet)
    assert changed and all(".attn2." in k for k in changed) and changed <= set(run.changed)
    assert not _changed(te, pipe.text_encoder)


def test_the_same_seed_gives_the_same_weights(tiny_sd_dir):
    def trained(seed):
        p = load_pipeline(tiny_sd_dir)
        run = finetune(p, CONCEPTS, cfg(seed=seed, attack_init="latest"), method="advunlearn")
        return run.losses, {k: v.clone() for k, v in p.text_encoder.state_dict().items()}

    (losses_a, a), (losses_b, b), (losses_c, c) = trained(0), trained(0), trained(1)
    assert losses_a == losses_b and all(torch.equal(a[k], b[k]) for k in a)
    assert losses_a != losses_c and any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_continues_exactly(tiny_sd_dir, tmp_path, monkeypatch):
    """Killed after its checkpoint at step 2 and resumed: the weights of an uninterrupted run (the
    latest adversarial vectors and the current prompt come back with the checkpoint)."""
    import engine.methods.advunlearn as module

    settings = cfg(iterations=4, checkpoint_every=2, attack_every=3, attack_init="latest", warmup_iterations=0)
    whole = load_pipeline(tiny_sd_dir)
    finetune(whole, CONCEPTS, settings, checkpoint_dir=tmp_path / "a", method="advunlearn")
    calls, real = {"n": 0}, module.guidance_loss

    def dies_at_step_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(module, "guidance_loss", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_pipeline(tiny_sd_dir), CONCEPTS, settings, checkpoint_dir=tmp_path / "b", method="advunlearn")
    monkeypatch.undo()
    resumed = load_pipeline(tiny_sd_dir)
    run = finetune(resumed, CONCEPTS, settings, checkpoint_dir=tmp_path / "b", resume=True, method="advunlearn")
    assert run.resumed_from == 2 and run.steps_run == 2
    for k, v in whole.text_encoder.state_dict().items():
        torch.testing.assert_close(resumed.text_encoder.state_dict()[k], v, atol=0, rtol=0)


def test_retain_prompts_are_drawn_without_replacement():
    seen = torch.cat([retain_indices(11, 5, step, seed=0) for step in range(2)])
    assert len(set(seen.tolist())) == 10  # two batches of one round: ten different prompts
    assert torch.equal(retain_indices(11, 5, 3, seed=0), retain_indices(11, 5, 3, seed=0))
    assert len(retain_indices(3, 5, 0, seed=0)) == 3


@pytest.mark.parametrize("field, value, match", [
    ("module", "vae", "'module' must be one of"),
    ("attack_method", "free_at", "'attack_method' must be one of"),
    ("attack_type", "mid_k", "'attack_type' must be one of"),
    ("attack_init", "zeros", "'attack_init' must be one of"),
    ("text_encoder_part", "mlp", "'text_encoder_part' must be one of"),
    ("text_encoder_layers", "first", "'text_encoder_layers' must be 'all' or encoder layer indices"),
    ("text_encoder_layers", "-1", "'text_encoder_layers' must be 'all'"),
    ("attack_steps", 0, "'attack_steps' must be a positive integer"),
    ("adv_tokens", 0, "'adv_tokens' must be a positive integer"),
    ("attack_every", 1.5, "'attack_every' must be a positive integer"),
    ("retain_batch", 0, "'retain_batch' must be a positive integer"),
    ("retain_weight", -1.0, "'retain_weight' must be a finite number >= 0"),
    ("attack_lr", 0.0, "'attack_lr' must be > 0"),
    ("warmup_iterations", -1, "'warmup_iterations' must be an integer >= 0"),
    ("distributed", "deepspeed", "advunlearn trains in one process"),
    ("params", "lora", "apply to the UNet variant"),
])
def test_bad_settings_are_refused_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        AdvUnlearnConfig(**{field: value})


def test_bad_input_on_a_model(pipe, tiny_sdxl_dir):
    with pytest.raises(ValueError, match=r"the text encoder has 2 layers \(0..1\), got '0,5'"):
        finetune(pipe, CONCEPTS, cfg(text_encoder_layers="0,5"), method="advunlearn")
    long = concepts_from_names(["Van Gogh"], templates=[" ".join(["word"] * 73) + " {}"])
    with pytest.raises(ValueError, match="with 1 adversarial token"):
        finetune(pipe, long, cfg(), method="advunlearn")
    with pytest.raises(NotImplementedError, match="SDXL is not supported"):
        finetune(load_pipeline(tiny_sdxl_dir), CONCEPTS, cfg(), method="advunlearn")


@pytest.mark.parametrize("module", ["text_encoder", "unet"])
def test_cli_writes_a_pipeline_that_carries_the_trained_weights(tiny_sd_dir, tmp_path, capsys, module):
    concepts = tmp_path / "c.txt"
    concepts.write_text("Van Gogh\n")
    out = tmp_path / "out"
    assert main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(concepts), "--method", "advunlearn",
                 "--preset", "toy", "--set", "iterations=2", "--set", "warmup_iterations=1", "--set", "attack_steps=2",
                 "--set", f"module={module}", "--out", str(out), "--quiet"]) == 0
    assert "erased 1 concept(s) with advunlearn: 2 steps" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["component"] == module and manifest["pipeline_files"]["written"] == [module]
    assert manifest["config"]["module"] == module and manifest["preset"] == "toy"
    other = "unet" if module == "text_encoder" else "text_encoder"
    saved, original = load_pipeline(out), load_pipeline(tiny_sd_dir)
    trained = {k: v for k, v in getattr(saved, module).state_dict().items()
               if not torch.equal(v, getattr(original, module).state_dict()[k])}
    assert trained  # the reloaded pipeline carries the trained weights
    for k, v in getattr(saved, other).state_dict().items():
        assert torch.equal(v, getattr(original, other).state_dict()[k])
    patched = engine.apply_delta(str(tiny_sd_dir), out / "delta.safetensors")  # the delta: the same weights
    for k, v in getattr(saved, module).state_dict().items():
        assert torch.equal(getattr(patched, module).state_dict()[k], v), k
