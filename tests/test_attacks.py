"""The attacks (engine/attacks): their parts against plain references, and `erasure attack` end to end.

The shipped toy world is the model (its pipeline is small); budgets are tiny, so these tests
check the machinery and the equations, not attack strength (benchmarks/toy_attacks.py measures that).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.attacks.common import (
    PLACEHOLDER, TokenTable, ToyJudge, denoising_loss, encode_with_tokens, generate_from_embeddings, success_rate,
)
from engine.attacks.inversion import InversionSettings, learn_tokens, load_tokens, save_tokens
from engine.attacks.unlearndiff import UnlearnDiffSettings, attack_prompt, project_simplex, timesteps
from engine.toyworld import catalogue as cat


@pytest.fixture(scope="module")
def toy_pipe():
    from engine.toyworld.world import load_toy_pipeline

    return load_toy_pipeline()


@pytest.fixture(scope="module")
def name():
    return cat.IDENTITIES[0].name


def _seen_word(pipe) -> tuple[str, int]:
    """A whole word that is one token the toy world learned (a non-zero embedding row), and its id."""
    table = pipe.text_encoder.get_input_embeddings().weight
    for word in ("star", "skull", "tree"):
        ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) == 1 and table[ids[0]].abs().sum() > 0:
            return word, ids[0]
    raise AssertionError("no learned one-token word")


# ----------------------------------------------------------------------------- shared parts


def test_learned_token_with_a_words_vector_encodes_as_that_word(toy_pipe):
    word, row = _seen_word(toy_pipe)
    vectors = toy_pipe.text_encoder.get_input_embeddings().weight[[row]].detach().clone()
    table = TokenTable(toy_pipe, vectors)
    with torch.no_grad():
        got = encode_with_tokens(toy_pipe, [f"a photo of a {table.phrase}"], table)
        want = encode_with_tokens(toy_pipe, [f"a photo of a {word}"])
    assert torch.allclose(got, want, atol=1e-5)
    # a different vector changes the encoding, and gradients reach the vector only
    vectors = torch.randn_like(vectors, requires_grad=True)
    table = TokenTable(toy_pipe, vectors)
    out = encode_with_tokens(toy_pipe, [f"a photo of a {table.phrase}"], table)
    out.sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert not torch.allclose(out.detach(), want, atol=1e-3)


def test_denoising_loss_matches_the_formula(toy_pipe):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        cond = encode_with_tokens(toy_pipe, ["a photo of a star", "a tree"])
        got = denoising_loss(toy_pipe, latents, cond, t, noise)
        a = toy_pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = toy_pipe.unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, cond).sample
    assert got.item() == pytest.approx(((pred - noise) ** 2).mean().item(), rel=1e-5)


def test_toy_judge_recognises_the_original_models_images(toy_pipe, name):
    from engine.toyworld.world import load_toy_evaluator

    embeds = encode_with_tokens(toy_pipe, [f"a photo of {name}"] * 2 + ["a photo of a star"] * 2).detach()
    images = generate_from_embeddings(toy_pipe, embeds, [0, 1, 2, 3], steps=10, guidance=5.0, size=32)
    hits = ToyJudge(load_toy_evaluator(), name, "identity").hits(images)
    assert hits[:2].all() and not hits[2:].any()
    assert success_rate(hits) == 50.0


# ----------------------------------------------------------------------------- concept inversion


def test_inversion_learns_only_the_tokens_and_is_deterministic(toy_pipe, name):
    embeds = encode_with_tokens(toy_pipe, [f"a photo of {name}"] * 3).detach()
    images = generate_from_embeddings(toy_pipe, embeds, [0, 1, 2], steps=8, guidance=5.0, size=32)
    before = {k: v.clone() for k, v in toy_pipe.unet.state_dict().items()}
    s = InversionSettings(steps=6, batch_size=2, images=3, tokens=2)
    v1, losses = learn_tokens(toy_pipe, images, s, "identity", progress=False)
    v2, _ = learn_tokens(toy_pipe, images, s, "identity", progress=False)
    assert v1.shape == (2, toy_pipe.text_encoder.config.hidden_size) and len(losses) == 6
    assert torch.equal(v1, v2)
    start = toy_pipe.text_encoder.get_input_embeddings().weight
    assert not torch.allclose(v1, start[start.abs().sum(1) > 0].mean(0).expand_as(v1))  # moved from its start
    assert all(torch.equal(before[k], v) for k, v in toy_pipe.unet.state_dict().items())
    assert all(p.requires_grad for p in toy_pipe.unet.parameters())


def test_tokens_file_round_trip_and_hostile_files(tmp_path):
    vectors = torch.randn(3, 8)
    path = save_tokens(tmp_path / "tokens.safetensors", vectors)
    assert torch.equal(load_tokens(path, 8), vectors)
    from safetensors.torch import load_file

    assert sorted(load_file(str(path))) == [PLACEHOLDER.format(i) for i in range(3)]
    with pytest.raises(ValueError, match="expected finite"):
        load_tokens(path, 16)
    pickled = tmp_path / "tokens.bin"
    torch.save({"x": vectors}, pickled)
    with pytest.raises(ValueError, match="pickles are refused"):
        load_tokens(pickled, 8)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable"):
        load_tokens(junk, 8)
    save_tokens(tmp_path / "nan.safetensors", torch.full((1, 8), float("nan")))
    with pytest.raises(ValueError, match="expected finite"):
        load_tokens(tmp_path / "nan.safetensors", 8)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"tokens": -1}, {"lr": 0.0}, {"images": 1.5}])
def test_inversion_settings_refuse_bad_values(bad):
    with pytest.raises(ValueError, match="inversion"):
        InversionSettings(**bad)


# ----------------------------------------------------------------------------- UnlearnDiffAtk


def _bisection_projection(a: torch.Tensor, xi: float = 1e-9) -> torch.Tensor:
    """The official code's projection of one row (find mu with sum(clip(a - mu, 0, 1)) = 1)."""
    lo, hi = float(a.min() - 1), float(a.max())
    while hi - lo > xi:
        mid = (lo + hi) / 2
        if float((a - mid).clamp(0, 1).sum()) > 1:
            lo = mid
        else:
            hi = mid
    return (a - (lo + hi) / 2).clamp(0, 1)


def test_simplex_projection_matches_the_official_bisection():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 300, generator=gen, dtype=torch.float64) * 0.3 + 0.01
    got = project_simplex(rows)
    for r, g in zip(rows, got):
        assert torch.allclose(g, _bisection_projection(r), atol=1e-7)
    assert torch.allclose(got.sum(-1), torch.ones(4, dtype=torch.float64)) and (got >= 0).all()
    uniform = torch.full((2, 50), 1 / 50, dtype=torch.float64)
    assert torch.allclose(project_simplex(uniform), uniform)


def test_timesteps_are_the_official_schedule():
    assert timesteps(UnlearnDiffSettings()) == list(range(10, 1000, 20))
    assert timesteps(UnlearnDiffSettings(timesteps=4)) == [125, 375, 625, 875]


class _Never:
    description = "never"

    def hits(self, images):
        return np.zeros(len(images), bool)


def test_unlearndiff_plain_success_and_a_full_failed_budget(toy_pipe, name):
    from engine.toyworld.world import load_toy_evaluator

    prompt = f"a photo of {name}"
    target = generate_from_embeddings(toy_pipe, encode_with_tokens(toy_pipe, [prompt]).detach(), [0], steps=8,
                                      guidance=5.0, size=32)[0]
    judge = ToyJudge(load_toy_evaluator(), name, "identity")
    kwargs = dict(kind="identity", seed=0, steps=8, guidance=5.0, size=32)
    done = attack_prompt(toy_pipe, prompt, target, judge, UnlearnDiffSettings(timesteps=2, iterations=2), **kwargs)
    assert done["success"] and done["checks"] == 1 and done["adversarial_tokens"] == []
    s = UnlearnDiffSettings(timesteps=3, iterations=2, tokens=2)
    failed = attack_prompt(toy_pipe, prompt, target, _Never(), s, **kwargs)
    again = attack_prompt(toy_pipe, prompt, target, _Never(), s, **kwargs)
    assert not failed["success"] and failed["checks"] == 4  # the plain prompt, then once per timestep
    assert len(failed["adversarial_tokens"]) == 2 and failed["adversarial_prompt"].endswith(prompt)
    assert failed["adversarial_tokens"] == again["adversarial_tokens"]  # seeded


@pytest.mark.parametrize("bad", [{"timesteps": 0}, {"iterations": -2}, {"tokens": 0}, {"lr": -1.0}])
def test_unlearndiff_settings_refuse_bad_values(bad):
    with pytest.raises(ValueError, match="unlearndiff"):
        UnlearnDiffSettings(**bad)


# ----------------------------------------------------------------------------- erasure attack


def test_cli_attack_writes_report_and_tokens(tmp_path, name):
    from engine.cli import main
    from engine.toyworld.world import pipeline_path

    out = tmp_path / "attack"
    code = main(["attack", "--model", str(pipeline_path()), "--concept", name, "--attack", "inversion,unlearndiff,ring-a-bell",
                 "--rab-generations", "2", "--rab-population", "4", "--images", "2", "--prompts", "1", "--steps", "6", "--ti-steps", "2", "--ti-batch", "2",
                 "--ti-images", "2", "--udiff-timesteps", "1", "--udiff-iterations", "1", "--quiet", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["suite"] == "attack" and report["concept"] == {"name": name, "kind": "identity"}
    assert set(report["attacks"]) == {"inversion", "inversion, learned on the original", "unlearndiff", "ring-a-bell"}
    rab = report["attacks"]["ring-a-bell"]
    assert rab["settings"]["generations"] == 2 and rab["settings"]["vocabulary"] == "embedded" and rab["prompt"]
    for row in report["attacks"].values():
        assert 0 <= row["success_rate"] <= 100
    tokens = [row["tokens_file"] for k, row in report["attacks"].items() if k.startswith("inversion")]
    assert all((out / f).is_file() for f in tokens) and len(set(tokens)) == 2
    assert "| inversion |" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--attack", "nope"], "unknown attack"),
    (["--concept", "Nobody Atall"], "unknown toy-world concept"),
    (["--images", "0"], "images must be"),
])
def test_cli_attack_bad_input_exits_2(tmp_path, capsys, name, args, message):
    from engine.cli import main
    from engine.toyworld.world import pipeline_path

    base = {"--model": str(pipeline_path()), "--concept": name, "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["attack", *[x for kv in base.items() for x in kv], "--quiet"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_reports_attacks_beside_h(tmp_path, name, capsys):
    from engine.cli import main
    from engine.toyworld.world import pipeline_path

    erased = tmp_path / "erased.txt"
    erased.write_text(f"{name}\n")
    retained = tmp_path / "retained.txt"
    retained.write_text("star\n")
    out = tmp_path / "report.json"
    code = main(["eval", "--model", str(pipeline_path()), "--erased", str(erased), "--retained", str(retained),
                 "--images-per-prompt", "1", "--steps", "4", "--attack", "inversion", "--attack-images", "2",
                 "--ti-steps", "1", "--ti-batch", "2", "--ti-images", "2", "--quiet", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rates = report["attacks"][name]
    assert set(rates) >= {"plain", "inversion", "inversion, learned on the original", "judge"}
    assert "## Under attack" in (tmp_path / "report.md").read_text()
    assert f"under attack, {name}: plain" in capsys.readouterr().out


def test_eval_attack_needs_the_toy_suite(tmp_path, capsys):
    from engine.cli import main

    code = main(["eval", "--model", str(tmp_path), "--suite", "clip", "--attack", "inversion", "--out",
                 str(tmp_path / "r.json")])
    assert code == 2 and "--attack runs with the toy suite" in capsys.readouterr().err
