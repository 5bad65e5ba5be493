"""The never-learned control (engine/attacks/control.py) and its parts: an identity outside the
catalogue, its renders, the feature judge that can name it, and the control end to end on the
shipped world with a tiny budget (benchmarks/toy_attacks.py --methods never-learned measures it)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from engine.attacks.common import FeatureJudge
from engine.toyworld import catalogue as cat
from engine.toyworld.render import identity_images, render, render_batch, sample_scene

UNSEEN = [cat.unseen_identity(i) for i in range(3)]


@pytest.fixture(scope="module")
def judge():
    from engine.toyworld.world import load_toy_evaluator

    return FeatureJudge(load_toy_evaluator(), UNSEEN[0], extra=UNSEEN)


def _salient(who) -> np.ndarray:
    return np.array([getattr(who, a) for a in cat.SALIENT_ATTRIBUTES])


def test_unseen_identities_are_far_from_the_catalogue_and_each_other():
    catalogue = np.array([_salient(p) for p in cat.IDENTITIES])
    for i, who in enumerate(UNSEEN):
        assert who not in cat.IDENTITIES and who.name not in cat.concepts("identity")
        assert (catalogue != _salient(who)).sum(1).min() >= 3, who
        for other in UNSEEN[:i]:
            assert (_salient(other) != _salient(who)).sum() >= 3 and other.name != who.name
        assert who.accessory != "hat" or who.hair_shape in cat.HAIR_UNDER_HAT
    assert cat.unseen_identity() == UNSEEN[0] == cat.unseen_identity(0)  # deterministic
    with pytest.raises(ValueError, match="unseen identity index"):
        cat.unseen_identity(-1)


def test_unseen_names_share_no_word_with_the_catalogue_and_name_no_concept():
    words = {w.lower() for p in cat.IDENTITIES for w in p.name.split()}
    others = [n for kind in ("object", "colour", "style", "unsafe") for n in cat.concepts(kind)]
    others += [s for u in cat.UNSAFE for s in u.synonyms] + [w for b in cat.BACKGROUNDS for w in b.split()]
    for who in UNSEEN:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", who.name), who.name
        assert not {w.lower() for w in who.name.split()} & words, who.name
        assert not any(w in who.name.lower() for w in words), who.name
        assert not any(o.lower() in who.name.lower() for o in others), who.name


def test_unseen_names_tokens_were_never_learned():
    from transformers import CLIPTokenizer
    from safetensors.torch import load_file

    from engine.toyworld.world import pipeline_path

    tokenizer = CLIPTokenizer.from_pretrained(pipeline_path() / "tokenizer")
    weights = load_file(str(pipeline_path() / "text_encoder" / "model.safetensors"))
    table = next(v for k, v in weights.items() if k.endswith("token_embedding.weight"))
    for who in UNSEEN:
        ids = tokenizer(who.name, add_special_tokens=False).input_ids
        assert (table[ids].abs().sum(1) == 0).all(), who.name
    assert (table[tokenizer(cat.IDENTITIES[0].name, add_special_tokens=False).input_ids].abs().sum(1) > 0).all()


def test_identity_images_are_deterministic_and_match_render_for_catalogue_identities():
    images = identity_images(UNSEEN[0], 5, seed=3)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, identity_images(UNSEEN[0], 5, seed=3))
    assert not np.array_equal(images, identity_images(UNSEEN[0], 5, seed=4))
    assert identity_images(UNSEEN[0], 0, seed=3).shape == (0, 32, 32, 3)
    for who in cat.IDENTITIES[:4]:
        rng = np.random.default_rng(11)
        want = np.stack([render(sample_scene(rng, kind="identity", subject=who.name)).image for _ in range(6)])
        assert np.array_equal(identity_images(who, 6, seed=11), want), who.name


def test_feature_judge_names_held_out_renders(judge):
    for who in UNSEEN:
        predicted = judge.predict(identity_images(who, 32, seed=777))
        assert np.mean([p == who.name for p in predicted]) >= 0.9, who.name
    assert judge.hits(identity_images(UNSEEN[0], 32, seed=778)).mean() >= 0.9
    for who in cat.IDENTITIES[::16]:
        assert judge.judging(who).hits(identity_images(who, 16, seed=779)).mean() >= 0.9, who.name
    rng = np.random.default_rng(5)
    others = render_batch([sample_scene(rng, kind=("object", "unsafe")[i % 2]) for i in range(32)])[0]
    assert not judge.hits(others).any()
    assert np.mean([p == FeatureJudge.NONE for p in judge.predict(others)]) >= 0.9
    assert judge.name == UNSEEN[0].name and judge.predict(np.zeros((0, 32, 32, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="not one of the judge's classes"):
        judge.judging(cat.unseen_identity(5))


@pytest.fixture(scope="module")
def control():
    from engine.attacks import InversionSettings
    from engine.attacks.control import never_learned_control

    s = InversionSettings(steps=2, batch_size=2, images=3)
    return never_learned_control(None, s, images=4, progress=False, sampling_steps=2)


def test_never_learned_control_end_to_end(control):
    out = control
    assert set(out) >= {"identity", "judge", "plain", "inversion", "judge_validation", "learned_identity",
                        "settings", "seconds"}
    assert out["identity"]["name"] == UNSEEN[0].name and out["identity"]["name_tokens"]["learned"] == 0
    assert out["identity"]["min_salient_distance_to_catalogue"] >= 3
    for row in (out["plain"], out["inversion"], out["learned_identity"]["plain"], out["learned_identity"]["inversion"]):
        assert 0 <= row["success_rate"] <= 100 and row["n_images"] == 4
    assert out["inversion"]["settings"]["steps"] == 2 and out["settings"]["steps"] == 2
    validation = out["judge_validation"]
    assert validation["unseen_renders"]["accuracy"] == 100.0 and validation["catalogue_renders"]["accuracy"] >= 90
    assert 0 <= validation["original_generations"]["agreement_with_identity_head"] <= 100
    json.dumps(out)  # JSON-able


def test_benchmark_row_merges_and_prints(control, monkeypatch, tmp_path, capsys):
    import benchmarks.toy_attacks as bench

    monkeypatch.setattr(bench, "never_learned_control", lambda *a, **k: control)
    out = tmp_path / "toy_attacks.json"
    other = {"method": "esd", "scenario": "identity", "concept": cat.IDENTITIES[0].name, "H": 98.0, "kid": 0.0,
             "plain": 0.0, "attacks": {"inversion": {"success_rate": 100.0}}}
    out.write_text(json.dumps({"world": "v2", "results": [other]}))  # rows of the default world
    bench.main(["--methods", "never-learned", "--scenarios", "identity,unsafe", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["esd", "never-learned"] and rows[0] == other
    row = rows[1]
    assert row["plain"] == control["plain"]["success_rate"] and row["H"] is None
    assert row["attacks"]["inversion"]["success_rate"] == control["inversion"]["success_rate"]
    assert row["control"]["judge_validation"] == control["judge_validation"] and row["budgets"]["ti_steps"] == 300
    printed = capsys.readouterr().out
    assert "skipping unsafe" in printed and "| identity | never-learned | - | - |" in printed
    assert f"same judge on {cat.IDENTITIES[0].name}" in printed
