"""RECE (engine/methods/rece.py) against plain implementations written from the paper (Gong et al.,
ECCV 2024) and its official code (train.py, utils/embedding_calculation/close_form_emb.py,
erase_methods/uce.py), on random matrices and a tiny real-format pipeline; its settings and the
command line."""

import copy
import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.closed_form import cross_attention_kv
from engine.concepts import Concept, ConceptSet
from engine.export import MANIFEST_NAME
from engine.methods import get_method
from engine.methods import rece
from engine.models import load_pipeline

CONCEPTS = ConceptSet(concepts=(Concept("Arlen Corrance"), Concept("Van Gogh", anchor="art")),
                      preserve_concepts=(Concept("a tree"),))


# --------------------------------------------------------------------------- the adversarial embedding


@pytest.mark.parametrize("reg", [0.1, 1e-3])
def test_adversarial_map_minimises_the_papers_objective(reg):
    """c' = argmin sum_l ||W_l T c' - W_l c||^2 + reg ||c'||^2, as one stacked least-squares
    problem [W_1 T; ...; W_L T; sqrt(reg) I] c' = [W_1 c; ...; W_L c; 0] solved by numpy."""
    g = np.random.default_rng(3)
    D = 12
    layers = [g.normal(size=(d, D)) for d in (5, 9, 4)]  # 18 rows: the layers alone are full rank
    T = np.eye(D) + 0.5 * g.normal(size=(D, D))
    c = g.normal(size=(7, D))
    G = sum(W.T @ W for W in layers)
    A, solver, cond = rece.adversarial_map(torch.from_numpy(G), torch.from_numpy(T), reg)
    lhs = np.vstack([W @ T for W in layers] + [np.sqrt(reg) * np.eye(D)])
    for row, ours in zip(c, c @ A.numpy().T):
        rhs = np.concatenate([W @ row for W in layers] + [np.zeros(D)])
        ref = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
        assert np.abs(ours - ref).max() <= 1e-9 * np.abs(ref).max()
    assert solver == "cholesky" and cond > 1
    # Unregularised, the edited layers regenerate c exactly (c' = T^-1 c): why the paper regularises.
    A0, _, _ = rece.adversarial_map(torch.from_numpy(G), torch.from_numpy(T), 0.0)
    found = c @ A0.numpy().T
    assert np.allclose(found @ T.T, c, atol=1e-8) and np.linalg.norm(found) > np.linalg.norm(c @ A.numpy().T)


# --------------------------------------------------------------------------- a whole run


def rece_reference(pipe, erase, anchors, preserve, epochs, lam, l1=0.1, l2=0.1, uce_lam=0.5, uce_preserve=1.0):
    """key -> final weight and each epoch's ||c'|| per concept, from the official code in float64,
    one layer at a time: UCE (the engine's uce preset: last token before [EoT], UCE eq. 7), then per
    epoch close_form_emb_regzero for every concept (all 77 rows), then edit_model_adversarial
    (technique replace, erase scale 1, "" and the preserved prompts' 77 rows kept with l2)."""

    def embed(text):  # (77, D), and the row of the last token before [EoT]
        tok = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            rows = pipe.text_encoder(tok.input_ids)[0][0].double()
        return rows, rows[int(tok.attention_mask.sum()) - 2]

    W0 = {k: m.weight.detach().double().clone() for k, m in cross_attention_kv(pipe.unet)}
    I = torch.eye(next(iter(W0.values())).shape[1], dtype=torch.float64)
    pairs = [(embed(e)[1], embed(a)[1], 1.0) for e, a in zip(erase, anchors)]
    pairs += [(embed(p)[1], embed(p)[1], uce_preserve) for p in preserve]
    W = {}
    for key, w in W0.items():
        mat1, mat2 = uce_lam * w, uce_lam * I
        for c, guide, scale in pairs:
            mat1 = mat1 + scale * torch.outer(w @ guide, c)
            mat2 = mat2 + scale * torch.outer(c, c)
        W[key] = mat1 @ torch.linalg.inv(mat2)
    C, N = [embed(e)[0] for e in erase], [embed(a)[0] for a in anchors]
    kept = [embed("")[0]] + [embed(p)[0] for p in preserve]
    norms = []
    for _ in range(epochs):
        mat1 = lam * I + sum(W[k].T @ W[k] for k in W0)
        mat2 = sum(W[k].T @ W0[k] for k in W0)
        advs = [c @ (torch.linalg.inv(mat1) @ mat2).T for c in C]
        norms.append([float(a.norm()) for a in advs])
        new = {}
        for key, w in W.items():
            mat1, mat2 = l1 * w, l1 * I
            for adv, n in zip(advs, N):
                mat1, mat2 = mat1 + w @ n.T @ adv, mat2 + adv.T @ adv
            for p in kept:
                mat1, mat2 = mat1 + l2 * w @ p.T @ p, mat2 + l2 * p.T @ p
            new[key] = mat1 @ torch.linalg.inv(mat2)
        W = new
    return W, W0, norms


def test_a_run_matches_the_official_equations_in_fp64(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir).to(torch.float64)
    ref, W0, norms = rece_reference(pipe, ["Arlen Corrance", "Van Gogh"], ["", "art"], ["a tree"], epochs=2, lam=0.1)
    cfg = rece.RECEConfig(epochs=2, backend="torch", progress=False)
    outcome = get_method("rece").run(pipe, CONCEPTS, cfg)
    assert set(outcome.changed) == set(ref) and len(ref) >= 4
    for key, w in ref.items():
        d_ref, d = w - W0[key], outcome.changed[key].double() - W0[key]
        assert float((d - d_ref).norm() / d_ref.norm()) < 1e-6, key
    solve = outcome.manifest["solve"]
    for epoch, expected in zip(solve["epochs"], norms):
        assert list(epoch["embedding"]["norm"].values()) == pytest.approx(expected, rel=1e-6)
    assert solve["rows"] == {"edit": 2 * 77, "preserve": 2 * 77, "caption": 0} and solve["epochs_run"] == 2
    assert solve["stage1"]["rows"] == {"edit": 2, "preserve": 1, "caption": 0}


def regeneration_gap(pipe, W0, lam):
    """Per concept, ||W' c' - W c|| / ||W c|| over all layers of the embedding c' the paper's closed
    form finds on the edited model W' (rows: each concept's 77), written out plainly."""
    W = {k: m.weight.detach().double() for k, m in cross_attention_kv(pipe.unet)}
    I = torch.eye(next(iter(W.values())).shape[1], dtype=torch.float64)
    coef = torch.linalg.inv(lam * I + sum(w.T @ w for w in W.values())) @ sum(W[k].T @ W0[k] for k in W)
    gaps = []
    for name in ("Arlen Corrance", "Van Gogh"):
        tok = pipe.tokenizer(name, padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            c = pipe.text_encoder(tok.input_ids)[0][0].double()
        adv = c @ coef.T
        num = sum(float((adv @ W[k].T - c @ W0[k].T).square().sum()) for k in W)
        gaps.append((num / sum(float((c @ W0[k].T).square().sum()) for k in W)) ** 0.5)
    return np.array(gaps)


def test_the_epochs_push_what_the_closed_form_finds_away_from_the_concept(tiny_sd_dir):
    """After plain UCE the closed-form embedding regenerates the concepts' K/V outputs closely; after
    RECE the one found on the result lands far away, further after every epoch. (The concepts
    alone: on the tiny model's crowded text space a preserved prompt caps what UCE can move.)"""
    base = load_pipeline(tiny_sd_dir)
    concepts = ConceptSet(concepts=CONCEPTS.concepts)
    W0 = {k: m.weight.detach().double().clone() for k, m in cross_attention_kv(base.unet)}
    cfg = get_method("rece").defaults.replace(**{**get_method("rece").preset("object-hard"), "epochs": 2},
                                              backend="torch", progress=False)
    uce_pipe, rece_pipe = copy.deepcopy(base), copy.deepcopy(base)
    with pytest.warns(UserWarning, match="preserves nothing"):
        get_method("uce").run(uce_pipe, concepts, get_method("uce").defaults.replace(backend="torch", progress=False))
        solve = get_method("rece").run(rece_pipe, concepts, cfg).manifest["solve"]
    after_uce = regeneration_gap(uce_pipe, W0, cfg.embedding_reg)
    after_rece = regeneration_gap(rece_pipe, W0, cfg.embedding_reg)
    assert (after_uce < 0.05).all() and (after_rece > 10 * after_uce).all(), (after_uce, after_rece)
    # The manifest reports the same: before the first epoch (on the UCE model) and on the result.
    steps = [list(e["embedding"]["regeneration_residual"].values()) for e in solve["epochs"]]
    steps.append(list(solve["final_embedding"]["regeneration_residual"].values()))
    assert steps[0] == pytest.approx(after_uce, rel=1e-3) and steps[-1] == pytest.approx(after_rece, rel=1e-3)
    assert all((np.array(a) < np.array(b)).all() for a, b in zip(steps, steps[1:])), steps


# --------------------------------------------------------------------------- settings and the command line


@pytest.mark.parametrize(
    "field, value",
    [("epochs", -1), ("epochs", 1.5), ("embedding_reg", -0.1), ("embedding_reg", float("nan")), ("ridge", -1.0),
     ("preserve_weight", "high"), ("erase_weight", 0.0), ("tokens", "first"), ("uce_tokens", "every"),
     ("uce_ridge", -0.5), ("max_condition", 1.0), ("backend", "cuda"), ("gram_dtype", "float16"), ("batch_size", 0),
     ("progress", "yes")],
)
def test_bad_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"config field '{field}'"):
        rece.RECEConfig().replace(**{field: value})


def test_defaults_are_the_official_ones_and_presets_apply():
    method = get_method("rece")
    cfg = method.defaults
    assert (cfg.epochs, cfg.embedding_reg, cfg.ridge, cfg.preserve_weight, cfg.erase_weight, cfg.tokens) == (
        3, 0.1, 0.1, 0.1, 1.0, "all")
    assert cfg.uce_config().to_dict() == get_method("uce").defaults.to_dict()  # stage 1 is the uce preset
    assert cfg.replace(epochs=0).epochs == 0  # UCE alone (the README: objects UCE already erases)
    assert method.preset("art") == {"epochs": 1, "embedding_reg": 1e-3, "uce_preserve_weight": None}
    for name in method.presets:
        assert cfg.replace(**method.preset(name)).epochs in (1, 2)
    with pytest.raises(TypeError, match="rece takes RECEConfig settings"):
        method.run(None, CONCEPTS, get_method("uce").defaults)


def test_cli_erase_with_rece_writes_its_manifest(tiny_sd_dir, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text('concepts: [Arlen Corrance, {name: Van Gogh, anchor: art}]\n'
                                     "preserve: {concepts: [a tree]}\n")
    out = tmp_path / "out"
    assert main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(tmp_path / "c.yaml"), "--method", "rece",
                 "--preset", "art", "--set", "epochs=2", "--set", "backend=torch", "--out", str(out), "--no-pipeline",
                 "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["method"] == "rece" and manifest["preset"] == "art" and manifest["config"]["epochs"] == 2
    solve = manifest["solve"]
    assert len(solve["epochs"]) == 2 and solve["stage1"]["preserve_weight"] == 1.0  # UCE's max(0.1, 1/1)
    assert set(solve["final_embedding"]["norm"]) == {"Arlen Corrance", "Van Gogh"}
    assert (out / "delta.safetensors").exists()
    assert "erased 2 concept(s) with rece" in capsys.readouterr().out
