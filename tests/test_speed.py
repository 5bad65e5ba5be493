"""SPEED (engine/methods/speed.py): against a plain per-layer implementation of the paper's
equations, on a tiny real-format pipeline, its settings, and through the command line."""

import json

import numpy as np
import pytest
import torch

import engine
from engine.cli import main
from engine.closed_form import cross_attention_kv
from engine.concepts import Concept, ConceptSet
from engine.export import MANIFEST_NAME
from engine.methods import get_method
from engine.methods import speed
from engine.models import encode_prompts, load_pipeline


# --------------------------------------------------------------------------- the paper's equations


def reference_layer(W, targets, anchors, retain, K2, tau, alpha, lamb, aug_num, use_filter, gen):
    """One layer of SPEED written from the paper (train_erase_null.py l.88-118) in numpy float64.

    The only thing taken from the engine is how the DPA noise is drawn (a documented protocol):
    per chunk of 128 retained rows, a torch.randn(aug_num, rows) of scalars along v_min, whose
    largest entry is made positive."""
    D = W.shape[1]
    I = np.eye(D)
    C_tt = sum(np.outer(t, t) for t in targets) / len(targets)
    C_at = sum(np.outer(a, t) for a, t in zip(anchors, targets)) / len(targets)
    dW0 = W @ (C_at - C_tt) @ np.linalg.inv(I + C_tt)
    v_min = np.linalg.svd(W, full_matrices=False)[2][-1]
    v_min = v_min * np.sign(v_min[np.abs(v_min).argmax()])  # the protocol's sign
    R = retain
    if aug_num > 0 and use_filter:
        s = np.array([np.linalg.norm(dW0 @ r) for r in R])
        R = R[s > s.mean()]
    refined = []
    for lo in range(0, len(R), 128):
        chunk = R[lo : lo + 128]
        refined += list(chunk)
        if aug_num > 0:
            z = torch.randn(aug_num, len(chunk), generator=gen, dtype=torch.float64).numpy()
            samples = [chunk[i] + z[j, i] * v_min for j in range(aug_num) for i in range(len(chunk))]
            s = np.array([np.linalg.norm(dW0 @ c) for c in samples])
            refined += [c for c, si in zip(samples, s) if si > s.mean()]
    C0 = sum(np.outer(c, c) for c in refined) / len(refined)
    U, S, _ = np.linalg.svd(C0)
    P = U[:, S < tau] @ U[:, S < tau].T
    M = np.linalg.inv(C_tt @ P + alpha * I)
    inner = np.linalg.inv(K2.T @ P @ M @ K2 + lamb * np.eye(K2.shape[1]))
    return W @ (C_at - C_tt) @ P @ (I - M @ K2 @ inner @ K2.T @ P) @ M


def random_problem(seed, D=16, n_retain=300, retain_rank=6, noise=0.0):
    g = np.random.default_rng(seed)
    basis = g.normal(size=(retain_rank, D))
    retain = g.normal(size=(n_retain, retain_rank)) @ basis + noise * g.normal(size=(n_retain, D))
    layers = [g.normal(size=(24, D)), g.normal(size=(10, D))]  # d_out above and below D
    return layers, g.normal(size=(3, D)), g.normal(size=(3, D)), retain, g.normal(size=(D, 4))


def engine_layers(layers, targets, anchors, retain, K2, cfg, seed):
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    n = len(targets)
    C_tt, C_at = speed.target_stats(t(targets), t(anchors), torch.arange(n), torch.ones(n, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    return [speed.layer_edit(t(W), C_tt, C_at, t(retain), t(K2), cfg, gen) for W in layers]


@pytest.mark.parametrize(
    "changes, noise",
    [
        (dict(aug_num=0, filter=False, threshold=1e-3), 0.0),  # the plain null-space solve first
        (dict(aug_num=0, filter=False, threshold=1e-3, lamb=0.3, retain_scale=0.05), 0.0),
        (dict(aug_num=10, filter=False, threshold=1e-3), 0.0),  # DPA, every row (the celebrity runs)
        (dict(aug_num=10, filter=True, threshold=1e-3), 0.0),  # IPF and DPA (the defaults but tau)
        (dict(aug_num=4, filter=True, threshold=1e-4), 1e-3),  # full-rank priors, a tau between scales
    ],
)
def test_layer_edit_matches_the_papers_equations(changes, noise):
    cfg = speed.SpeedConfig(progress=False).replace(**changes)
    layers, targets, anchors, retain, K2 = random_problem(7, noise=noise)
    ours = engine_layers(layers, targets, anchors, retain, K2, cfg, seed=5)
    gen = torch.Generator().manual_seed(5)  # the layers draw from one stream, in order
    for W, (delta, stats) in zip(layers, ours):
        ref = reference_layer(W, targets, anchors, retain, K2, cfg.threshold, cfg.retain_scale, cfg.lamb,
                              cfg.aug_num, cfg.filter, gen)
        assert np.abs(delta.numpy() - ref).max() <= 1e-9 * np.abs(ref).max() and np.abs(ref).max() > 1e-3
        assert stats["iec_rank"] == 4 and 0 < stats["null_space_dim"] < 16
        if cfg.lamb == 0:  # IEC: the invariants keep their outputs exactly
            assert np.abs(delta.numpy() @ K2).max() < 1e-9 * np.abs(W @ K2).max()
        if noise == 0 and cfg.aug_num == 0:  # the retained rows span C_0: kept exactly
            assert np.abs(retain @ delta.numpy().T).max() < 1e-9 * np.abs(retain @ W.T).max()
        if cfg.filter and cfg.aug_num:
            assert 0 < stats["retain_after_ipf"] < len(retain) and stats["augmented"] > 0


def test_target_stats_sum_a_prompts_rows_then_average_prompts_by_weight():
    rows = torch.randn(3, 5, dtype=torch.float64)
    anchors = torch.randn(3, 5, dtype=torch.float64)
    C_tt, C_at = speed.target_stats(rows, anchors, torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0]).double())
    outer = lambda a, b: torch.outer(a, b)  # noqa: E731
    assert torch.allclose(C_tt, 0.25 * (outer(rows[0], rows[0]) + outer(rows[1], rows[1]))
                          + 0.75 * outer(rows[2], rows[2]))
    assert torch.allclose(C_at, 0.25 * (outer(anchors[0], rows[0]) + outer(anchors[1], rows[1]))
                          + 0.75 * outer(anchors[2], rows[2]))


def test_singular_iec_system_still_keeps_the_invariants():
    """An invariant inside the retained span makes K2^T P M K2 singular at lamb = 0 (the official
    .inverse() gives inf there); the pseudo-inverse keeps every invariant's output."""
    layers, targets, anchors, retain, K2 = random_problem(3)
    K2 = np.concatenate([K2[:, :3], retain[:1].T], axis=1)
    cfg = speed.SpeedConfig(aug_num=0, filter=False, threshold=1e-3, progress=False)
    for W, (delta, stats) in zip(layers, engine_layers(layers, targets, anchors, retain, K2, cfg, seed=0)):
        assert stats["iec_rank"] == 3 and torch.isfinite(delta).all()
        assert np.abs(delta.numpy() @ K2).max() < 1e-9 * np.abs(W @ K2).max()


# --------------------------------------------------------------------------- the tiny pipeline


@pytest.fixture
def pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


CONCEPTS = ConceptSet(
    concepts=(Concept("Arlen Corrance", anchor="a person", templates=("{}", "a photo of {}")),
              Concept("Bexley Holloway", anchor="a person")),
    preserve_concepts=(Concept("Calder Dunmore"), Concept("Dorian Ashby"), Concept("a red bicycle")),
)


def last_rows(pipe, prompts):
    """Each prompt's row at the last token before its first [EoT]."""
    emb, ids = encode_prompts(pipe, prompts)
    eot = pipe.tokenizer.eos_token_id
    return torch.stack([emb[i, ids[i].tolist().index(eot) - 1] for i in range(len(prompts))]).double()


def test_speed_keeps_priors_and_invariants_and_moves_targets(pipe):
    before = {k: p.detach().clone() for k, p in pipe.unet.named_parameters()}
    cfg = get_method("speed").defaults.replace(**get_method("speed").preset("celebrity"), progress=False)
    assert cfg.lamb == 0 and not cfg.filter
    outcome = get_method("speed").run(pipe, CONCEPTS, cfg)
    after = {k: p.detach() for k, p in pipe.unet.named_parameters()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    to_v = {k for k, _ in cross_attention_kv(pipe.unet) if ".to_v." in k}
    assert changed == to_v == set(outcome.changed) and len(to_v) >= 4  # params V: only to_v
    kept = last_rows(pipe, ["Calder Dunmore", "Dorian Ashby", "a red bicycle"])
    empty, _ = encode_prompts(pipe, [""])
    invariants = torch.cat([empty[0, :1].double(), speed.iec_invariants(empty[0].double(), 3, cfg.seed).T])
    assert torch.allclose(invariants[0], empty[0, 0].double())  # [SOT]
    prompts = ["Arlen Corrance", "a photo of Arlen Corrance", "Bexley Holloway"]
    targets, anchors = last_rows(pipe, prompts), last_rows(pipe, ["a person", "a photo of a person", "a person"])
    for key in to_v:
        W, W_new = before[key].double(), after[key].double()
        for rows in (kept, invariants):  # the same outputs within 1e-4 relative
            rel = (rows @ (W_new - W).T).norm(dim=1) / (rows @ W.T).norm(dim=1)
            assert float(rel.max()) < 1e-4, (key, rel)
        start = (targets @ W.T - anchors @ W.T).norm(dim=1)
        left = (targets @ W_new.T - anchors @ W.T).norm(dim=1)
        assert bool((left < 0.25 * start).all()), (key, left / start)
    solve = outcome.manifest["solve"]
    assert solve["rows"]["edit"] == 3 and solve["rows"]["preserve"] == 3 and solve["layers_changed"] == len(to_v)
    assert max(solve["concept_residual"].values()) < 0.25 * min(solve["concept_residual_before"].values())
    assert solve["preserve_drift"] < 1e-4 and solve["iec_drift"] < 1e-4 and solve["threshold"] == 1e-4
    assert solve["retained"]["source"].startswith("concept file")


def test_defaults_with_ipf_keep_the_invariants_and_params_kv_edit_keys_too(pipe):
    cfg = speed.SpeedConfig(params="KV", progress=False)
    kv = {k for k, _ in cross_attention_kv(pipe.unet)}
    assert get_method("speed").touched(pipe.unet, cfg) == kv
    before = {k: m.weight.detach().double().clone() for k, m in cross_attention_kv(pipe.unet)}
    solve = get_method("speed").run(pipe, CONCEPTS, cfg).manifest["solve"]
    assert solve["layers_changed"] == len(kv) and solve["iec_drift"] < 1e-4
    assert solve["rows"]["retain_after_ipf"]["max"] < 3 and solve["rows"]["augmented"]["min"] > 0
    assert all(r < b for r, b in zip(solve["concept_residual"].values(), solve["concept_residual_before"].values()))
    empty, _ = encode_prompts(pipe, [""])
    sot = empty[0, 0].double()
    for key, module in cross_attention_kv(pipe.unet):
        assert float((module.weight.detach().double() @ sot - before[key] @ sot).norm() / (before[key] @ sot).norm()) < 1e-4


def test_no_preserved_prompts_falls_back_to_the_generic_prior_and_says_so(pipe):
    concepts = ConceptSet(concepts=(Concept("Arlen Corrance", anchor="a person"),))
    solve = get_method("speed").run(pipe, concepts, speed.SpeedConfig(progress=False)).manifest["solve"]
    assert solve["retained"]["source"].startswith("generic prior") and solve["retained"]["prompts"] >= 300
    assert solve["rows"]["preserve"] > solve["retained"]["prompts"]  # every token through [EoT]


def test_nothing_is_written_unless_every_weight_is_finite(pipe, monkeypatch):
    before = {k: m.weight.detach().clone() for k, m in cross_attention_kv(pipe.unet)}
    real = speed.layer_edit
    calls = []

    def poisoned(W, *args):
        delta, stats = real(W, *args)
        calls.append(1)
        return (delta * float("nan") if len(calls) == 3 else delta), stats

    monkeypatch.setattr(speed, "layer_edit", poisoned)
    with pytest.raises(FloatingPointError, match="not changed"):
        get_method("speed").run(pipe, CONCEPTS, speed.SpeedConfig(aug_num=0, progress=False))
    assert all(torch.equal(m.weight, before[k]) for k, m in cross_attention_kv(pipe.unet))


# --------------------------------------------------------------------------- settings and the command line


@pytest.mark.parametrize(
    "field, value",
    [("params", "Q"), ("threshold", 0.0), ("threshold", float("nan")), ("retain_scale", -1.0), ("lamb", -0.1),
     ("aug_num", -1), ("aug_num", 2.5), ("filter", "yes"), ("iec_clusters", 77), ("seed", -3), ("batch_size", 0),
     ("progress", 1)],
)
def test_bad_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"config field '{field}'"):
        speed.SpeedConfig().replace(**{field: value})


def test_settings_defaults_preset_and_unknown_fields():
    cfg = get_method("speed").defaults
    assert (cfg.params, cfg.threshold, cfg.retain_scale, cfg.lamb, cfg.aug_num, cfg.filter, cfg.iec_clusters,
            cfg.seed) == ("V", 0.1, 1.0, 0.0, 10, True, 3, 0)
    assert cfg.replace().to_dict() == cfg.to_dict()
    assert get_method("speed").preset("celebrity") == {"threshold": 1e-4, "retain_scale": 0.05, "filter": False}
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['tau'\]"):
        cfg.replace(tau=0.2)


def test_a_token_mode_speed_does_not_define_is_refused_naming_the_field(pipe):
    concepts = ConceptSet(concepts=(Concept("Arlen Corrance", anchor="a person", tokens="eot"),))
    with pytest.raises(ValueError, match="concept 'Arlen Corrance': field 'tokens'"):
        get_method("speed").run(pipe, concepts, speed.SpeedConfig(progress=False))


def test_cli_erase_with_speed_writes_its_manifest(tiny_sd_dir, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(
        'defaults: {anchor: "a person"}\nconcepts: [Arlen Corrance, Bexley Holloway]\n'
        "preserve: {concepts: [Calder Dunmore, Dorian Ashby]}\n")
    out = tmp_path / "out"
    assert main(["erase", "--model", str(tiny_sd_dir), "--concepts", str(tmp_path / "c.yaml"), "--method", "speed",
                 "--preset", "celebrity", "--set", "aug_num=3", "--out", str(out), "--no-pipeline", "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["method"] == "speed" and manifest["preset"] == "celebrity" and manifest["seed"] == 0
    assert manifest["config"]["threshold"] == 1e-4 and manifest["config"]["aug_num"] == 3
    assert manifest["solve"]["rows"]["preserve"] == 2 and set(manifest["solve"]["concept_residual"]) == {
        "Arlen Corrance", "Bexley Holloway"}
    assert (out / "delta.safetensors").exists()
    assert "erased 2 concept(s) with speed" in capsys.readouterr().out
    assert engine.get_method("speed") is get_method("speed")
