"""MACE (engine/methods/mace.py, mace_lora.py): the two closed-form solves against plain per-layer
numpy implementations of their objectives, the official token alignment, the attention loss and
its gradient, an end-to-end run on a tiny pipeline and the command line."""

import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.closed_form import cross_attention_kv
from engine.concepts import Concept, ConceptSet
from engine.export import MANIFEST_NAME
from engine.methods import get_method
from engine.methods import mace, mace_lora
from engine.models import encode_prompts, load_pipeline, tokenize_prompts

FAST = dict(steps=2, images=1, image_steps=2, backend="torch", progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


def t64(x):
    return torch.from_numpy(np.ascontiguousarray(x))


# --------------------------------------------------------------------------- stage 1: CFR


def reference_cfr_layer(W0, src, tgt, w, pres, scale, lamb):
    """argmin_W sum_i w_i ||W e_i - W0 e*_i||^2 + scale sum_p ||W p - W0 p||^2 + lamb ||W - W0||^2,
    from its normal equations, one layer in numpy float64."""
    D = W0.shape[1]
    lhs = sum(wi * np.outer(e, e) for wi, e in zip(w, src)) + scale * pres.T @ pres + lamb * np.eye(D)
    rhs = sum(wi * np.outer(W0 @ t, e) for wi, e, t in zip(w, src, tgt)) + scale * W0 @ pres.T @ pres + lamb * W0
    return rhs @ np.linalg.inv(lhs)


def test_cfr_transform_matches_a_per_layer_solve_of_its_objective():
    g = np.random.default_rng(0)
    D = 8
    layers = [g.normal(size=(12, D)), g.normal(size=(5, D))]
    src, tgt, pres = g.normal(size=(6, D)), g.normal(size=(6, D)), g.normal(size=(20, D))
    w = np.array([1.0, 1.0, 2.0, 2.0, 0.5, 0.5])
    S, C = t64(src.T * w) @ t64(src), t64(tgt.T * w) @ t64(src)
    for scale, lamb in ((0.3, 0.0), (1e-3, 0.5)):
        T, solver, _ = mace.cfr_transform(S, C, t64(pres.T @ pres), scale, lamb, 1e12)
        assert solver == "cholesky"
        for W0 in layers:
            np.testing.assert_allclose((t64(W0) @ T).numpy(), reference_cfr_layer(W0, src, tgt, w, pres, scale, lamb),
                                       rtol=1e-9, atol=1e-9)


def test_matching_rows_follow_the_official_alignment():
    S, E = 49406, 49407
    # concept (two tokens) longer than its anchor (one), template words after it
    old, new = [S, 1, 2, 3, 10, 11, 5, 6, E], [S, 1, 2, 3, 20, 5, 6, E]
    src, tgt = mace.matching_rows(old, new)
    assert src == [0, 1, 2, 3, 6, 7, 8] + list(range(9, 77))
    assert tgt == [0, 1, 2, 3, 5, 6, 7] + list(range(8, 76))  # the anchor's last padding row unused
    # concept shorter than its anchor: the concept prompt's last padding row is left out
    src, tgt = mace.matching_rows([S, 10, E], [S, 20, 21, E])
    assert src == [0, 2] + list(range(3, 76)) and tgt == [0, 3] + list(range(4, 77))
    # the anchor sharing the concept's first token: the common prefix takes it (as the official)
    src, tgt = mace.matching_rows([S, 7, 10, E], [S, 7, 20, E])
    assert src[:3] == [0, 1, 3] and tgt[:3] == [0, 1, 3] and len(src) == len(tgt) == 76


def test_cfr_on_the_tiny_pipeline_matches_the_reference(pipe):
    """The engine's rows, preservation sums and shared transform against each layer solved from
    rows selected and encoded here."""
    concepts = ConceptSet(concepts=[Concept("Arlen Corrance", "a person", ("a photo of {} at home", "{}")),
                                    Concept("Bexley", "a man", weight=2.0)],
                          preserve_concepts=[Concept("Calder Dunmore")], preserve_captions=["a red bicycle"])
    cfg = mace.MACEConfig(**FAST, train_preserve_scale=1e-2, lamb=0.1)
    S, C, _, counts = mace.concept_rows(pipe, concepts, cfg)
    P, summary = mace.preservation_gram(pipe, concepts, cfg)
    T, _, _ = mace.cfr_transform(S, C, P, cfg.train_preserve_scale ** 2, cfg.lamb, cfg.max_condition)

    tok, eot = pipe.tokenizer, pipe.tokenizer.eos_token_id
    src, tgt, w = [], [], []
    for c in concepts.concepts:
        for _, s, t in c.prompt_pairs():
            (a, b), (ea, eb) = tokenize_prompts(tok, [s, t]).tolist(), encode_prompts(pipe, [s, t])[0].double()
            ka, kb = a.index(eot), b.index(eot)
            pre = next(i for i in range(min(ka, kb) + 1) if a[i] != b[i])
            suf = 0  # common tokens counted back from [EoT], not into the prefix
            while ka - suf >= pre and kb - suf >= pre and a[ka - suf] == b[kb - suf]:
                suf += 1
            pos_a = list(range(pre)) + list(range(ka - suf + 1, 77 - max(0, kb - ka)))
            pos_b = list(range(pre)) + list(range(kb - suf + 1, 77 - max(0, ka - kb)))
            src += [ea[p].numpy() for p in pos_a]
            tgt += [eb[p].numpy() for p in pos_b]
            w += [c.weight] * len(pos_a)
    assert sum(counts.values()) == len(src)
    prior_texts = [x for x in mace.prior.generic_captions()]
    domain = ["Calder Dunmore", "a red bicycle"]
    rows = [encode_prompts(pipe, texts)[0].double().reshape(-1, 32).numpy() for texts in (prior_texts, domain)]
    per_row = [mace.COCO_CAPTIONS / len(prior_texts), cfg.preserve_weight]
    pres = np.concatenate([r * np.sqrt(k) for r, k in zip(rows, per_row)])
    assert summary["prior_weight_per_row"] == per_row[0] and summary["rows"] == {"prior": len(rows[0]), "domain": 154}
    for key, module in cross_attention_kv(pipe.unet):
        W0 = module.weight.detach().double().numpy()
        ref = reference_cfr_layer(W0, src, tgt, w, pres, cfg.train_preserve_scale ** 2, cfg.lamb)
        got = (t64(W0) @ T).numpy()
        assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max(), key


# --------------------------------------------------------------------------- stage 3: fusion


def test_fuse_matches_a_per_layer_solve_of_its_objective():
    g = np.random.default_rng(1)
    D, keys = 7, ("a", "b")
    W_cfr = {k: g.normal(size=(n, D)) for k, n in zip(keys, (9, 4))}
    W0 = {k: g.normal(size=W_cfr[k].shape) for k in keys}
    rows = [g.normal(size=(11, D)), g.normal(size=(5, D))]
    loras = [{k: (g.normal(size=(W_cfr[k].shape[0], 1)), g.normal(size=(1, D))) for k in keys} for _ in rows]
    weights, pres = [1.0, 3.0], g.normal(size=(30, D))
    for scale, lamb in ((0.2, 0.0), (1e-4, 0.7)):
        got, solver, _ = mace.fuse({k: t64(v) for k, v in W_cfr.items()}, {k: t64(v) for k, v in W0.items()},
                                   [{k: (t64(B), t64(A)) for k, (B, A) in lo.items()} for lo in loras],
                                   [t64(E) for E in rows], weights, t64(pres.T @ pres), scale, lamb, 1e12)
        assert solver == "cholesky"
        for k in keys:
            # sum_i w_i sum_e ||W e - (W_cfr + dW_i) e||^2 + scale sum_p ||W p - W0 p||^2 + lamb ||W - W_cfr||^2
            lhs = sum(w * E.T @ E for w, E in zip(weights, rows)) + scale * pres.T @ pres + lamb * np.eye(D)
            rhs = sum(w * (W_cfr[k] + lo[k][0] @ lo[k][1]) @ E.T @ E for w, E, lo in zip(weights, rows, loras))
            ref = (rhs + scale * W0[k] @ pres.T @ pres + lamb * W_cfr[k]) @ np.linalg.inv(lhs)
            np.testing.assert_allclose(got[k].numpy(), ref, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- stage 2: the LoRA loss


def test_attention_term_on_hand_built_attention():
    heads, pixels = 3, 16
    uniform = torch.full((heads, pixels, 77), 1 / 77)
    positions = torch.zeros(77, dtype=torch.bool)
    positions[[2, 3, 9]] = True
    assert float(mace_lora.attention_term(uniform, positions)) == pytest.approx((heads * pixels * 3) ** 0.5 / 77)
    half = torch.zeros(8, 8)
    half[:, :4] = 1  # resized to the 4 x 4 grid: half of its pixels
    assert float(mace_lora.attention_term(uniform, positions, half)) == pytest.approx((heads * 8 * 3) ** 0.5 / 77)
    assert float(mace_lora.attention_term(uniform, positions, torch.zeros(4, 4))) == 0.0
    probs = torch.zeros(heads, pixels, 77)
    probs[:, :, 0] = 1.0  # all attention on the start token: nothing on the concept
    assert float(mace_lora.attention_term(probs, positions)) == 0.0


def test_loss_positions_are_the_name_and_every_end_of_text(pipe):
    tok = pipe.tokenizer
    ids = tokenize_prompts(tok, ["a photo of Arlen Corrance"])[0].tolist()
    hit = mace_lora.loss_positions(tok, "a photo of Arlen Corrance", "Arlen Corrance", use_pooler=True)
    name = tok("Arlen Corrance", add_special_tokens=False).input_ids
    start, eot = 4, ids.index(tok.eos_token_id)
    assert ids[start : start + len(name)] == name
    assert hit.nonzero().flatten().tolist() == list(range(start, start + len(name))) + list(range(eot, 77))
    bare = mace_lora.loss_positions(tok, "a photo of Arlen Corrance", "Arlen Corrance", use_pooler=False)
    assert bare.nonzero().flatten().tolist() == list(range(start, start + len(name)))


def test_timestep_density_is_the_official_window():
    p = mace_lora.timestep_weights(1000, True)
    assert float(p.sum()) == pytest.approx(1.0) and 200 <= int(p.argmax()) <= 400
    assert float(p[200:401].sum()) > 0.85 and float(p[:100].sum()) < 1e-3
    assert torch.allclose(mace_lora.timestep_weights(1000, False), torch.full((1000,), 1e-3, dtype=torch.float64))


def test_the_loss_gradient_reaches_only_the_adapters(pipe):
    unet = pipe.unet
    wrapped = mace_lora.wrap_kv(unet, 1, torch.Generator().manual_seed(0))
    loss_fn = mace_lora.AttentionLoss()
    loss_fn.positions = mace_lora.loss_positions(pipe.tokenizer, "a photo of Arlen", "Arlen", True)
    probed = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    saved = [m.processor for m in probed]
    try:
        for m in probed:
            m.set_processor(mace_lora.AttentionProbe(loss_fn))
        cond = encode_prompts(pipe, ["a photo of Arlen"])[0]
        unet(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([300]), cond)
        assert len(loss_fn.terms) == len(probed)
        loss_fn.pop().backward()
    finally:
        for m, p in zip(probed, saved):
            m.set_processor(p)
        mace_lora.unwrap_kv(unet, wrapped)
    moved = {k: m.up.grad is not None and bool(m.up.grad.abs().sum() > 0) for k, m in wrapped.items()}
    # every key adapter moves its own layer's attention; a value adapter only later layers' (not the last's)
    assert all(v for k, v in moved.items() if ".to_k." in k) and any(v for k, v in moved.items() if ".to_v." in k)
    unet.zero_grad(set_to_none=True)


def test_training_one_concept_moves_only_its_adapters(pipe):
    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = mace.MACEConfig(**{**FAST, "steps": 3})
    factors, losses = mace_lora.train_concept_lora(pipe, Concept("Arlen", "a person", ("a photo of {}",)), 0, latents, cfg)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # adapters removed, base untouched
    assert all(p.grad is None for p in unet.parameters())
    assert set(factors) == {k for k, _ in cross_attention_kv(unet)}
    assert all(up.abs().sum() > 0 for k, (up, down) in factors.items() if ".to_k." in k)
    assert all(up.shape[1] == down.shape[0] == 1 for up, down in factors.values())


# --------------------------------------------------------------------------- end to end


def _concepts():
    return ConceptSet(concepts=[Concept("Arlen Corrance", "a person", ("a photo of {}", "{} smiling"))],
                      preserve_concepts=[Concept("Calder Dunmore")])


def test_run_changes_only_kv_finite_and_deterministic(tiny_sd_dir):
    outs = []
    for _ in range(2):
        p = load_pipeline(tiny_sd_dir)
        before = {k: v.clone() for k, v in p.unet.state_dict().items()}
        flags = [q.requires_grad for q in p.unet.parameters()]
        cfg = get_method("mace").defaults.replace(**FAST, lamb=0.1)
        out = get_method("mace").run(p, _concepts(), cfg)
        after = p.unet.state_dict()
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert moved == set(out.changed) == get_method("mace").touched(p.unet, cfg)
        assert all(torch.isfinite(v).all() for v in out.changed.values())
        assert [q.requires_grad for q in p.unet.parameters()] == flags  # restored after training
        outs.append(out)
    assert all(torch.equal(outs[0].changed[k], outs[1].changed[k]) for k in outs[0].changed)
    section = outs[0].manifest["mace"]
    assert section["lora"]["Arlen Corrance"]["steps"] == 2 and section["rows"]["fusion"] == 2 * 77
    assert set(outs[0].timings) >= {"images", "text_encoding", "cfr", "lora", "fusion"}


def test_a_zero_mask_trains_nothing_and_fusion_keeps_the_refinement(tiny_sd_dir):
    """No pixel in the mask: zero loss, the adapters stay zero, and a fusion without preservation
    returns the refined weights."""
    p = load_pipeline(tiny_sd_dir)
    W0 = {k: m.weight.detach().double().clone() for k, m in cross_attention_kv(p.unet)}
    cfg = mace.MACEConfig(**FAST, lamb=0.1, fuse_preserve_scale=0.0)
    out = mace.mace_edit(p, _concepts(), cfg, mask_provider=lambda concept, latents: torch.zeros(len(latents), 16, 16))
    assert out.manifest["mace"]["lora"]["Arlen Corrance"]["final_loss"] == 0.0
    assert out.manifest["mace"]["mask"] == "mask provider"
    S, C, _, _ = mace.concept_rows(p, _concepts(), cfg)
    P, _ = mace.preservation_gram(p, _concepts(), cfg)
    T, _, _ = mace.cfr_transform(S, C, P, cfg.train_preserve_scale ** 2, cfg.lamb, cfg.max_condition)
    for key, W in W0.items():
        torch.testing.assert_close(out.changed[key].double(), W @ T, rtol=1e-5, atol=1e-6)


def test_settings_are_validated_and_tokens_modes_refused(pipe):
    with pytest.raises(ValueError, match="'lr' must be > 0"):
        mace.MACEConfig(lr=0)
    with pytest.raises(ValueError, match="unknown config field"):
        mace.MACEConfig().replace(iterations=3)
    assert mace.MACEConfig().to_dict()["preserve_weight"] == 8e3
    method = get_method("mace")
    assert method.preset("celebrity-100") == {"preserve_weight": 2e5}
    for name in method.presets:
        cfg = method.defaults.replace(**method.preset(name))
        assert all(getattr(cfg, k) == v for k, v in method.preset(name).items())
    bad = ConceptSet(concepts=[Concept("Arlen", "a person", tokens="last")])
    with pytest.raises(ValueError, match="field 'tokens'"):
        mace.concept_rows(pipe, bad, mace.MACEConfig(**FAST))


def test_cli_erase_with_mace_writes_its_manifest(tiny_sd_dir, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text('defaults: {anchor: "a person"}\nconcepts: [Arlen Corrance]\n'
                                     "preserve: {concepts: [Calder Dunmore]}\n")
    out = tmp_path / "out"
    sets = [f"{k}={str(v).lower()}" for k, v in {**FAST, "lamb": 0.1}.items()]
    assert main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(tmp_path / "c.yaml"), "--method", "mace",
                 *[a for s in sets for a in ("--set", s)], "--out", str(out), "--no-pipeline", "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["method"] == "mace" and manifest["seed"] == 0 and manifest["config"]["steps"] == 2
    assert manifest["mace"]["rows"]["domain_preserve"] == 77 and "Arlen Corrance" in manifest["mace"]["lora"]
    assert (out / "delta.safetensors").exists()
    assert "erased 1 concept(s) with mace" in capsys.readouterr().out
