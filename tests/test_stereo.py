"""STEREO (engine/methods/stereo.py) on the tiny SD pipeline: REO's loss against a plain computation
of the paper's compositional target, STE's rounds (each erases the previous round's token), REO
starting from the original model, the manifest, and bad settings."""

import json

import pytest
import torch
import torch.nn.functional as F

from engine.attacks.common import encode_with_tokens
from engine.cli import main
from engine.concepts import concepts_from_names
from engine.finetune.trainer import train
from engine.methods import get_method
from engine.methods import stereo as stereo_module
from engine.methods.stereo import StereoConfig, _reo_objective
from engine.models import load_pipeline

CONCEPT = concepts_from_names(["Van Gogh"], anchor="a painting", templates=["a painting of {}"])
FAST = dict(iterations=3, ste_iterations=2, rounds=2, lr=1e-3, ste_lr=1e-3, batch_size=2, sample_steps=4,
            trajectories=2, inversion_steps=2, inversion_batch=2, inversion_images=3, image_steps=2, progress=False,
            checkpoint_every=0, loss_backend="torch")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


def random_tokens(k: int, width: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(k, 77, width, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_reo_loss_is_the_papers_compositional_target(pipe, tiny_sd_dir):
    """|| eps_theta(x_t, c_e) - (eps*("") + eta_a (eps*(a) - eps*("")) - eta_e mean_n (eps*(n) - eps*(""))) ||^2,
    with eps* the original model loaded afresh, n over the concept's prompt and the tokens."""
    cfg = StereoConfig(**{**FAST, "batch_size": 3, "anchor_guidance": 0.7, "erase_guidance": 2.5})
    tokens = random_tokens(2, pipe.unet.config.cross_attention_dim)
    frozen = load_pipeline(tiny_sd_dir).unet.eval()
    objective = _reo_objective(tokens, frozen)(pipe, CONCEPT, cfg, None)
    trainee = pipe.unet
    gen = torch.Generator().manual_seed(4)
    for p in trainee.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=gen))  # the trainee part-way through training
    seen = {}
    handle = trainee.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], t=args[1], c=args[2]))
    loss = objective.loss(trainee, torch.Generator().manual_seed(7))
    handle.remove()

    original = load_pipeline(tiny_sd_dir)
    x, t, cond = seen["x"], seen["t"], seen["c"]
    eps = lambda c: original.unet(x, t, c.expand(len(x), -1, -1)).sample  # noqa: E731
    # The anchor prompt is the concept's template filled with its anchor.
    texts = encode_with_tokens(original, ["", "a painting of a painting", "a painting of Van Gogh"])
    uncond, anchor, concept = eps(texts[:1]), eps(texts[1:2]), eps(texts[2:])
    negatives = [concept, eps(tokens[:1]), eps(tokens[1:])]
    target = uncond + 0.7 * (anchor - uncond) - 2.5 * sum(n - uncond for n in negatives) / 3
    expected = F.mse_loss(trainee(x, t, cond).sample, target)
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-7)
    # The erased conditions are the concept's prompt or the tokens, nothing else.
    allowed = torch.cat([texts[2:], tokens])
    assert all(any(torch.allclose(c, a, atol=1e-5) for a in allowed) for c in cond)


def test_ste_rounds_erase_the_previous_rounds_token_and_reo_starts_from_the_original(pipe, tiny_sd_dir,
                                                                                      monkeypatch):
    erased, found = [], {}
    round_objective = stereo_module._round_objective
    monkeypatch.setattr(stereo_module, "_round_objective", lambda erase: erased.append(erase) or round_objective(erase))
    search = stereo_module.search_thoroughly_enough

    def recording_search(*args):
        found["tokens"], found["rounds"] = search(*args)
        found["model_after_ste"] = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        return found["tokens"], found["rounds"]

    monkeypatch.setattr(stereo_module, "search_thoroughly_enough", recording_search)
    cfg = StereoConfig(**FAST)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    outcome = get_method("stereo").run(pipe, CONCEPT, cfg)

    assert len(erased) == 2 and torch.equal(erased[1], found["tokens"][:1])  # round 2 erases round 1's token
    assert torch.allclose(erased[0], encode_with_tokens(pipe, ["a painting of Van Gogh"]), atol=1e-6)
    assert not torch.equal(found["tokens"][0], found["tokens"][1])
    changed_by_ste = [k for k in original if not torch.equal(original[k], found["model_after_ste"][k])]
    assert changed_by_ste  # the STE rounds erased in the model
    # REO from the original: the same as REO alone on a fresh original model with the same tokens.
    fresh = load_pipeline(tiny_sd_dir)
    frozen = load_pipeline(tiny_sd_dir).unet.eval().requires_grad_(False)
    alone = train(fresh, CONCEPT, cfg, _reo_objective(found["tokens"], frozen), "stereo")
    assert outcome.changed.keys() == alone.changed.keys()
    assert all(torch.allclose(outcome.changed[k], alone.changed[k], atol=1e-6) for k in alone.changed)
    assert outcome.manifest["stereo"]["adversarial_concepts"] == 2 and len(outcome.manifest["stereo"]["ste_rounds"]) == 2


def test_only_some_tokens_and_reo_from_the_ste_model(pipe):
    cfg = StereoConfig(**{**FAST, "adversarial_concepts": 1, "reo_start": "ste", "iterations": 1})
    outcome = get_method("stereo").run(pipe, CONCEPT, cfg)
    assert outcome.manifest["stereo"] == {**outcome.manifest["stereo"], "adversarial_concepts": 1, "reo_start": "ste"}


@pytest.mark.parametrize("bad", [{"reo_start": "later"}, {"rounds": 0}, {"adversarial_concepts": -1},
                                 {"ste_lr": 0.0}, {"distributed": "deepspeed"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        StereoConfig(**bad)


def test_one_concept_per_run_and_cli(pipe, tiny_sd_dir, tmp_path):
    two = concepts_from_names(["Van Gogh", "Monet"])
    with pytest.raises(ValueError, match="one concept per run"):
        get_method("stereo").run(pipe, two, StereoConfig(**FAST))
    (tmp_path / "c.txt").write_text("Van Gogh\n")
    sets = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={str(value).lower()}")]
    out = tmp_path / "out"
    assert main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(tmp_path / "c.txt"), "--method", "stereo",
                 *sets, "--no-pipeline", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "stereo" and len(manifest["stereo"]["ste_rounds"]) == 2
