"""The second toy world's settings: more identities, generic captions, a wide frozen text tower,
resumable UNet training, and the anchor and image-only IP-Adapter gates."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import quick_v2_config

from engine.toyworld import build as b
from engine.toyworld import catalogue as cat
from engine.toyworld.render import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _salient(people):
    return np.array([[getattr(p, a) for a in cat.SALIENT_ATTRIBUTES] for p in people])


def test_a_larger_world_extends_the_shipped_one_and_keeps_people_apart():
    small = cat.IDENTITIES
    unseen_small = cat.unseen_identity(5)
    cat.set_identity_count(432)
    assert len(cat.IDENTITIES) == len(cat.concepts("identity")) == 432
    assert cat.IDENTITIES[: len(small)] == small  # same names and looks for the first ones
    assert len({p.name for p in cat.IDENTITIES}) == 432
    unseen = [cat.unseen_identity(i) for i in range(16)]
    assert not {u.name for u in unseen} & set(cat.concepts("identity"))
    codes = _salient([*cat.IDENTITIES, *unseen])
    distance = (codes[:, None, :] != codes[None, :, :]).sum(-1)
    np.fill_diagonal(distance, 99)
    assert distance.min() >= 3
    assert {p.gender for p in cat.IDENTITIES} == {"man", "woman"}
    assert cat.identity(cat.IDENTITIES[400].name) == cat.IDENTITIES[400]
    cat.set_identity_count(len(small))
    assert cat.IDENTITIES == small and cat.unseen_identity(5) == unseen_small
    with pytest.raises(ValueError, match="identity count"):
        cat.set_identity_count(cat.MAX_IDENTITIES + 1)


def test_generic_captions_name_the_class_not_the_subject():
    cat.set_identity_count(200)
    data = make_dataset(400, seed=2, generic_captions=1.0)
    generic_identity = {"a person", "someone", "a man", "a woman"}
    for caption, label, scene in zip(data["captions"], data["labels"], data["scenes"]):
        if "style" in label:
            assert any(caption.startswith(t.split("{")[0]) or t.split("}")[-1] in caption
                       for t in cat.GENERIC_STYLE_TEMPLATES), caption
        elif scene.kind == "identity":
            assert scene.subject not in caption
            said = [w for w in generic_identity if w in caption]
            assert said and all(w in ("a person", "someone", f"a {cat.identity(scene.subject).gender}") for w in said), caption
        elif scene.kind == "object":
            assert f" {scene.subject}" not in caption.replace(" shape on", " on") and \
                any(w in caption for w in ("object", "thing", "shape")), caption
    # At the default rate the captions are those of a world without generic captions.
    assert make_dataset(50, seed=2)["captions"] == make_dataset(50, seed=2, generic_captions=0.0)["captions"]
    mixed = make_dataset(600, seed=3, generic_captions=0.3)["captions"]
    generic = sum(any(w in c for w in ("a person", "someone", "a man", "a woman")) for c in mixed)
    assert 0.05 < generic / len(mixed) < 0.25  # 30% of the identity captions (40% of the images)


def test_object_captions_leave_the_colour_out_at_times_in_worlds_with_generic_captions():
    cat.set_identity_count(200)
    data = make_dataset(1200, seed=4, generic_captions=0.1)
    plain = [(c, s) for c, s in zip(data["captions"], data["scenes"]) if s.kind == "object" and s.style is None]
    colourless = [c for c, s in plain if f"{s.colour} " not in c]
    assert 0.15 < len(colourless) / len(plain) < 0.35, len(colourless) / len(plain)  # COLOURLESS_OBJECTS = 0.25
    assert any(c.startswith(("a tree", "an object", "a thing")) for c in colourless)
    assert all("  " not in c and not re.search(r"\ba [aeiou]", c) for c in data["captions"])
    v1 = make_dataset(300, seed=4)
    assert all(f"{s.colour} " in c for c, s in zip(v1["captions"], v1["scenes"]) if s.kind == "object")


def test_the_look_term_reads_the_look_of_named_identities_only():
    cat.set_identity_count(200)
    person = cat.IDENTITIES[150]
    captions = [f"a photo of {person.name}", f"a photo of a {person.gender}", "a red star"]
    targets = b._look_targets(captions, [{"identity": person.name}, {"identity": person.name}, {"object": "star"}])
    expected = [cat.attribute_values(a).index(getattr(person, a)) for a in cat.IDENTITY_ATTRIBUTES]
    assert targets[0].tolist() == expected and (targets[1:] == -100).all()
    head = torch.nn.Linear(16, sum(b._look_sizes()))
    states = torch.randn(3, 16, requires_grad=True)
    loss = b._look_loss(head, states, targets)
    logits = head(states[0]).split(b._look_sizes())
    by_hand = sum(-lg.log_softmax(0)[k] for lg, k in zip(logits, expected)) / len(expected)
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    assert states.grad[0].abs().sum() > 0 and states.grad[1:].abs().sum() == 0


def test_world_settings_and_text_widths():
    v2 = b.BuildConfig.for_world("v2", seed=1)
    assert (v2.identities, v2.text_width, v2.text_layers, v2.seed) == (432, 768, 0, 1)
    assert b.BuildConfig.for_world("v1") == b.BuildConfig()
    assert b.text_config(768)["num_attention_heads"] == 12 and b.text_config(96) == b.TOY_TEXT
    assert b.unet_config(768)["cross_attention_dim"] == 768
    with pytest.raises(ValueError, match="unknown world"):
        b.BuildConfig.for_world("v3")
    with pytest.raises(ValueError, match="text width"):
        b.BuildConfig(text_width=100)
    with pytest.raises(ValueError, match="generic_captions"):
        b.BuildConfig(generic_captions=1.5)


def test_clip_phrases_keep_the_batch_concepts_and_reindex_targets():
    spans = {"identity": slice(0, 50), "unsafe": slice(50, 54)}
    targets = {"identity": torch.tensor([7, -100, 31, 7]), "unsafe": torch.tensor([-100, 2, 3, 0])}
    rows, per_kind = b._phrase_rows(spans, targets, 4, np.random.default_rng(0))
    kept = per_kind["identity"][1]
    assert len(kept) == 2 + 4 and {7, 31} <= set(kept.tolist())
    reindexed = per_kind["identity"][0]
    assert [kept[i] if i >= 0 else -100 for i in reindexed.tolist()] == [7, -100, 31, 7]
    assert per_kind["unsafe"][0].tolist() == [-100, 2, 3, 0]  # no more than 4 phrases: all kept, as they were
    assert rows.tolist() == [*kept.tolist(), *range(50, 54)]


def test_training_state_round_trip_continues_exactly(tmp_path):
    def run(steps, resume_from=None, save_at=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        params = list(model.parameters())
        ema = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=0.05)
        rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(2)
        losses, first = [], 0
        if resume_from is not None:
            first = b._load_training_state(resume_from, params, ema, opt, rng, gen, losses, [])
        for step in range(first, steps):
            x = torch.randn(4, 6, generator=gen) + float(rng.random())
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.lerp_(p, 0.1)
            if save_at == step + 1:
                b._save_training_state(tmp_path / "ckpt", step + 1, params, ema, opt, rng, gen, losses, [])
        return [p.detach().clone() for p in params], ema, losses

    straight = run(6, save_at=3)
    resumed = run(6, resume_from=tmp_path / "ckpt")
    for a, c in zip(straight[0] + straight[1], resumed[0] + resumed[1]):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert straight[2] == resumed[2]
    assert not (tmp_path / "ckpt.tmp").exists()


def test_v2_build_selects_its_catalogue_and_loads(quick_world_v2):
    from engine.toyworld.world import load_toy_evaluator, load_toy_pipeline, world_info

    assert cat.N_IDENTITIES == cat.DEFAULT_IDENTITIES  # building did not change the caller's catalogue
    info = world_info(quick_world_v2)
    assert info["config"]["identities"] == 200 and cat.N_IDENTITIES == 200  # loading a world selects it
    assert info["metrics"]["unet"]["text_layers_tuned"] == 0
    pipe = load_toy_pipeline(quick_world_v2)
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 128
    from safetensors import safe_open

    for stored in ("pipeline/unet/diffusion_pytorch_model.safetensors", "pipeline/text_encoder/model.safetensors",
                   "ip_adapter/ip_adapter.safetensors"):
        with safe_open(quick_world_v2 / stored, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, stored
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32  # loaded back as fp32
    assert len(load_toy_evaluator(quick_world_v2).heads_names["identity"]) == 201
    assert not (quick_world_v2 / ".stages" / "unet.partial").exists()
    from engine.toyworld.card import model_card

    card = model_card(info)
    assert "200 made-up identities" in card and "width 128" in card and "--world v2" in card
    assert "IP-Adapter Plus (16 image tokens)" in card and "IP-Adapter 3 aligning + 3 (batch 16)" in card
    assert "stored in fp16" in card


def _interrupt_training_at(monkeypatch, step: int):
    """Make the build's ``step``-th training step (1-based) raise KeyboardInterrupt; returns the real one."""
    real_step, calls = b._train_step, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(b, "_train_step", dies)
    return real_step


def test_an_interrupted_unet_stage_resumes_to_the_same_weights(quick_world_v2, tmp_path, monkeypatch):
    out = tmp_path / "w"
    shutil.copytree(quick_world_v2 / ".stages", out / ".stages")
    shutil.rmtree(out / ".stages" / "unet")  # the later stages are kept: only the UNet reruns
    real_step = _interrupt_training_at(monkeypatch, step=3)
    with pytest.raises(KeyboardInterrupt):
        b.build_world(out, quick_v2_config(), progress=False)
    assert json.loads((out / ".stages" / "unet.partial" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(b, "_train_step", real_step)
    b.build_world(out, quick_v2_config(), progress=False)
    assert json.loads((out / ".stages" / "unet" / "stage.json").read_text())["metrics"]["resumed_at_step"] == 2
    files = [json.loads((w / "world.json").read_text())["files"] for w in (out, quick_world_v2)]
    unet = "pipeline/unet/diffusion_pytorch_model.safetensors"
    assert files[0][unet] == files[1][unet]


def test_anchor_and_ip_gates_are_measured(quick_world_v2, tmp_path):
    from engine.evaluation.gates import THRESHOLDS, _anchor_hit, gate_summary, measure_gates

    predicted = {"identity": ["none", "Aldric Corrance"], "object": ["tree", "none"], "style": ["none", "neon"]}
    assert _anchor_hit(predicted, 1, "identity") and not _anchor_hit(predicted, 0, "identity")
    assert _anchor_hit(predicted, 0, "tree") and _anchor_hit(predicted, 0, "object")
    assert _anchor_hit(predicted, 1, "style") and not _anchor_hit(predicted, 1, "tree")
    rows = [{"kind": k, "acc": {"other_templates": 95.0, "indirect": 90.0}} for k in ("identity", "object", "style", "unsafe")]
    summary = gate_summary({"identity": 99.0}, rows, {"a person": 80.0, "a tree": 96.0}, 85.0)
    assert summary["anchors"]["mean"] == 88.0 and not summary["checks"]["anchors"]
    assert summary["checks"]["ip_image_only.identity"] and not summary["all_pass"]
    assert THRESHOLDS["anchors"] == 90.0 and THRESHOLDS["ip_image_only"] == 80.0

    copy = tmp_path / "w"
    shutil.copytree(quick_world_v2, copy)
    gates = measure_gates(copy, images_per_prompt=1, n_renders=32, limit=1, steps=2, progress=False)
    s = gates["summary"]
    assert set(s["anchors"]["per_prompt"]) == set(cat.ANCHOR_PROMPTS)
    assert 0 <= s["ip_image_only"]["identity"] <= 100 and "ip_image_only.identity" in s["checks"]
    card = (copy / "README.md").read_text()
    assert "anchor prompts draw their class" in card and "IP-Adapter image only" in card


def test_ip_adapter_training_drops_both_conditions_too():
    drop_text, drop_image = b.ip_condition_drops(np.random.default_rng(0), 200_000)
    share = lambda mask: mask.mean() * 100  # noqa: E731
    assert share(drop_text & drop_image) == pytest.approx(5, abs=0.3)  # unconditional, for guidance
    assert share(~drop_text & drop_image) == pytest.approx(5, abs=0.3)
    assert share(drop_text & ~drop_image) == pytest.approx(65, abs=0.5)  # the image alone
    assert share(~drop_text & ~drop_image) == pytest.approx(25, abs=0.5)


def test_an_interrupted_clip_stage_resumes_to_the_same_weights(quick_world_v2, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    cfg = quick_v2_config(clip_steps=4)
    out = tmp_path / "w"
    (out / ".stages").mkdir(parents=True)
    data = b.stage_data(cfg, progress=False)
    real_step = _interrupt_training_at(monkeypatch, step=4)
    with pytest.raises(KeyboardInterrupt):
        b.stage_clip(cfg, data, out / "resumed", progress=False, checkpoint=out / "clip.partial")
    assert json.loads((out / "clip.partial" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(b, "_train_step", real_step)
    resumed = b.stage_clip(cfg, data, out / "resumed", progress=False, checkpoint=out / "clip.partial")
    straight = b.stage_clip(cfg, data, out / "straight", progress=False)
    assert resumed == straight
    weights = [load_file(out / name / "model.safetensors") for name in ("resumed", "straight")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)


def test_plus_ip_adapter_files_load_in_diffusers_as_trained(quick_world_v2):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import load_file

    from engine.toyworld.world import load_toy_pipeline, world_info

    metrics = world_info(quick_world_v2)["metrics"]["ip_adapter"]
    assert metrics["kind"] == "plus" and "align_heldout_name_retrieval" in metrics
    pipe = load_toy_pipeline(quick_world_v2, ip_adapter=True)
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert isinstance(proj, IPAdapterPlusImageProjection) and proj.latents.shape[1] == 16
    saved = load_file(quick_world_v2 / "ip_adapter" / "ip_adapter.safetensors")
    loaded = b.ip_adapter_state_dict(pipe.unet)
    assert saved.keys() == loaded.keys()
    for key in saved:  # stored in fp16, loaded as fp32: the same values
        assert loaded[key].dtype == torch.float32
        torch.testing.assert_close(loaded[key].half(), saved[key], rtol=0, atol=0)
    # A fresh projection written in the file layout is the same function once diffusers loads it.
    fresh = b.plus_image_projection(128, 128, 16, seed=9)
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows
        for p in fresh.parameters():
            p.add_(0.1 * torch.randn_like(p))
    unet = pipe.unet
    unet._load_ip_adapter_weights([b._initial_ip_adapter(unet, b.plus_projection_file_layout(fresh.state_dict()))],
                                  low_cpu_mem_usage=False)
    x = torch.randn(3, 17, 128)
    with torch.no_grad():
        torch.testing.assert_close(unet.encoder_hid_proj.image_projection_layers[0](x), fresh(x))


def test_image_phrases_name_what_an_image_shows():
    assert b.image_phrase({"identity": "Ann Lee", "background": "sky"}) == "Ann Lee"
    assert b.image_phrase({"identity": "Ann Lee", "style": "neon"}) == "Ann Lee in neon style"
    assert b.image_phrase({"object": "star", "colour": "red", "background": "sky"}) == "a red star"
    assert b.image_phrase({"object": "heart", "colour": "orange", "style": "neon"}) == "an orange heart in neon style"
    assert b.image_phrase({"unsafe": "weapon", "background": "grass"}) == "a weapon"


def test_a_batch_cannot_share_per_image_prompts(quick_world_v2):
    from engine.evaluation.generation import generate_batch, generate_with_image_prompts, image_prompt_embeds
    from engine.toyworld.world import load_toy_pipeline

    pipe = load_toy_pipeline(quick_world_v2, ip_adapter=True)
    images = make_dataset(2, seed=4)["images"]
    embeds, uncond = image_prompt_embeds(pipe, images)
    assert embeds.shape == (2, 17, 128) and uncond.shape == (2, 17, 128)  # hidden states for a Plus adapter
    with pytest.raises(ValueError, match="same image prompt"):
        generate_batch(pipe, ["", ""], [0, 1], steps=2, guidance=5.0, size=32,
                       ip_adapter_image_embeds=[torch.cat([uncond, embeds])[:, None]])
    both = generate_with_image_prompts(pipe, ["", ""], [0, 1], embeds, uncond, steps=2, guidance=5.0, size=32)
    first = generate_with_image_prompts(pipe, [""], [0], embeds[:1], uncond, steps=2, guidance=5.0, size=32)
    np.testing.assert_array_equal(both[:1], first)
    assert not np.array_equal(both[0], both[1])
