"""The closed-form editor on tiny real-format pipelines."""

import math
import warnings

import pytest
import torch

from engine.closed_form import (
    ClosedFormConfig,
    aligned_targets,
    token_positions,
    prefix_end,
    caption_gram,
    closed_form_edit,
    cross_attention_kv,
    solve_transform,
)
from engine.concepts import Concept, ConceptSet
from engine.methods import get_method
from engine.models import encode_prompts, load_pipeline


# uce-plus's solve without what it preserves by itself (tests/test_prior.py covers that part).
PLAIN = dict(tokens="concept", preserve_weight=None, prior="none", neighbours=0, skip_shared_rows=False,
             max_prior_drift=None)


@pytest.fixture
def pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


def kv_weights(p):
    return {k: m.weight.detach().clone() for k, m in cross_attention_kv(p.unet)}


def rows_of(p, prompt, positions):
    emb, _ = encode_prompts(p, [prompt])
    return emb[0, positions]  # (n, D)


CONCEPTS = ConceptSet(
    concepts=(
        Concept("Arlen Corrance", anchor="a person", templates=("a photo of {}", "{} smiling")),
        Concept("Bexley Holloway", anchor="a person", templates=("a photo of {}", "{} smiling")),
        Concept("Van Gogh", anchor="art", templates=("a painting by {}",)),
    ),
    preserve_concepts=(Concept("Calder Dunmore", templates=("a photo of {}",)),),
)


def test_positions_and_alignment_follow_real_token_ids(pipe):
    tok = pipe.tokenizer
    eot = tok.eos_token_id
    ids_s = tok("a photo of brad pitt").input_ids + [eot] * 3
    ids_t = tok("a photo of a person").input_ids
    # <start> a photo of brad pitt <eot>: concept tokens at 4, 5 and the eot at 6
    assert token_positions("eot", tok, "a photo of {}", "brad pitt", ids_s, eot, "t") == [6]
    src = token_positions("concept", tok, "a photo of {}", "brad pitt", ids_s, eot, "t")
    assert src == [4, 5, 6]
    assert prefix_end(tok, "a photo of {}") == 4
    assert aligned_targets(src, 6, ids_t.index(eot), 4) == [4, 5, 6]
    # A three-token source aligned to a one-token anchor clamps at the anchor's first token.
    assert aligned_targets([4, 5, 6, 7], 7, 5, 4) == [4, 4, 4, 5]


def test_missing_concept_tokens_raise(pipe):
    tok = pipe.tokenizer
    ids = tok("a photo of somebody").input_ids
    with pytest.raises(ValueError, match="cannot find the tokens of 'zebra'"):
        token_positions("concept", tok, "a photo of {}", "zebra", ids, tok.eos_token_id, "concept 'zebra'")


def test_uce_maps_concept_rows_onto_anchor_rows_and_preserves_others(pipe):
    before = kv_weights(pipe)
    cfg = get_method("uce").defaults.replace(tokens="eot", ridge=1e-4, progress=False)
    edit = closed_form_edit(pipe, CONCEPTS, cfg)
    after = kv_weights(pipe)
    assert set(edit.changed) == set(before) and len(before) >= 4
    eot = pipe.tokenizer.eos_token_id
    for concept in CONCEPTS.concepts:
        for _, src, tgt in concept.prompt_pairs():
            e = rows_of(pipe, src, [pipe.tokenizer(src).input_ids.index(eot)])
            e_t = rows_of(pipe, tgt, [pipe.tokenizer(tgt).input_ids.index(eot)])
            for key in before:  # every layer, checked independently of the engine's own report
                new = e @ after[key].T
                old_anchor = e_t @ before[key].T
                old_concept = e @ before[key].T
                rel = (new - old_anchor).norm() / old_anchor.norm()
                assert rel < 0.02, (concept.name, key, float(rel))
                assert (old_concept - old_anchor).norm() / old_anchor.norm() > 0.1  # it did move
    # The preserved concept keeps its projections.
    text = "a photo of Calder Dunmore"
    p = rows_of(pipe, text, [pipe.tokenizer(text).input_ids.index(eot)])
    for key in before:
        rel = (p @ after[key].T - p @ before[key].T).norm() / (p @ before[key].T).norm()
        assert rel < 0.02, (key, float(rel))
    assert max(edit.concept_residual.values()) < 0.02
    assert edit.preserve_drift < 0.02
    assert edit.solver == "cholesky"
    assert set(edit.timings) >= {"text_encoding", "gram", "solve", "weight_update"}


def test_concept_token_mode_edits_every_selected_row(pipe):
    before = kv_weights(pipe)
    concepts = ConceptSet(concepts=(Concept("Arlen Corrance", anchor="a person", templates=("a photo of {}",)),))
    edit = closed_form_edit(pipe, concepts, get_method("uce-plus").defaults.replace(**PLAIN, ridge=1e-4, progress=False))
    after = kv_weights(pipe)
    tok = pipe.tokenizer
    ids_s = tok("a photo of Arlen Corrance").input_ids
    ids_t = tok("a photo of a person").input_ids
    src = token_positions("concept", tok, "a photo of {}", "Arlen Corrance", ids_s, tok.eos_token_id, "t")
    tgt = aligned_targets(src, len(ids_s) - 1, len(ids_t) - 1, 4)
    e = rows_of(pipe, "a photo of Arlen Corrance", src)
    e_t = rows_of(pipe, "a photo of a person", tgt)
    assert edit.rows["edit"] == len(src) >= 3
    for key in before:
        rel = (e @ after[key].T - e_t @ before[key].T).norm() / (e_t @ before[key].T).norm()
        assert rel < 0.02, (key, float(rel))


def test_triton_and_torch_backends_agree(tiny_sd_dir):
    results = {}
    for backend in ("torch", "triton"):
        p = load_pipeline(tiny_sd_dir)
        cfg = get_method("trce-stage1").defaults.replace(backend=backend, progress=False)
        results[backend] = closed_form_edit(p, CONCEPTS, cfg)
    assert torch.allclose(results["torch"].transform, results["triton"].transform, rtol=1e-4, atol=1e-5)
    for key, value in results["torch"].changed.items():
        assert torch.allclose(value, results["triton"].changed[key], rtol=1e-4, atol=1e-5)


def test_caption_gram_is_cached_and_keyed_by_the_encoder(tiny_sd_dir, tmp_path, monkeypatch):
    import engine.closed_form as cf

    pipe = load_pipeline(tiny_sd_dir)
    cfg = ClosedFormConfig(cache_dir=str(tmp_path), progress=False)
    captions = ["a dog on a beach", "a bowl of fruit", "a city street at night"]
    gram, rows = caption_gram(pipe, captions, cfg)
    emb, ids = encode_prompts(pipe, captions)
    eot = pipe.tokenizer.eos_token_id
    token_rows = [emb[i, : ids[i].tolist().index(eot) + 1].double() for i in range(3)]
    expected = sum(r.T @ r for r in token_rows)
    assert gram.dtype == torch.float64  # the default accumulation
    # The rows come from an encoding only as long as the longest caption: equal to fp32 rounding.
    torch.testing.assert_close(gram, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert rows == sum(ids[i].tolist().index(eot) + 1 for i in range(3))
    assert len(list(tmp_path.glob("caption-gram-*.safetensors"))) == 1

    calls = []
    monkeypatch.setattr(cf, "encode_prompts", lambda *a, **k: calls.append(1) or encode_prompts(*a, **k))
    again, _ = caption_gram(pipe, captions, cfg)
    assert calls == [] and torch.equal(again, gram)
    with torch.no_grad():  # a different text encoder must not reuse the cached matrix
        next(pipe.text_encoder.parameters()).add_(0.1)
    caption_gram(pipe, captions, cfg)
    assert calls and len(list(tmp_path.glob("caption-gram-*.safetensors"))) == 2


def test_captions_enter_the_preservation_sum(tiny_sd_dir, tmp_path):
    concepts = ConceptSet(
        concepts=CONCEPTS.concepts[:1],
        preserve_captions=("a dog on a beach", "a bowl of fruit"),
    )
    cfg = get_method("uce-plus").defaults.replace(**PLAIN, cache_dir=str(tmp_path), progress=False)
    edit = closed_form_edit(load_pipeline(tiny_sd_dir), concepts, cfg)
    assert edit.rows["caption"] > 0
    assert edit.preserve_weight == pytest.approx(0.5)  # max(0.1, 1/2 prompts)


def test_ill_conditioned_system_falls_back_with_a_warning():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 16, generator=g)
    e_t = torch.randn(3, 16, generator=g)
    S, C = e.T @ e, e_t.T @ e  # rank 3 of 16: singular without a ridge
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        T, solver, cond = solve_transform(S, C, ridge=0.0, max_condition=1e8)
    assert solver == "eigen-clamped" and torch.isfinite(T).all()
    assert torch.allclose(e @ T.T.float(), e_t, rtol=1e-3, atol=1e-3)  # the edit still holds on its rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T2, solver2, cond2 = solve_transform(S, C, ridge=1.0, max_condition=1e8)
    assert solver2 == "cholesky" and math.isfinite(cond2)


def test_non_finite_solve_is_refused():
    S = torch.eye(4)
    C = torch.eye(4)
    C[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        solve_transform(S, C, ridge=0.1, max_condition=1e8)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="'tokens'"):
        ClosedFormConfig(tokens="some")
    with pytest.raises(ValueError, match="'ridge'"):
        ClosedFormConfig(ridge=-1)
    with pytest.raises(ValueError, match="'preserve_weight'"):
        ClosedFormConfig(preserve_weight=float("nan"))
    with pytest.raises(ValueError, match="unknown config field"):
        ClosedFormConfig().replace(lr=1)


def test_sdxl_edit_uses_both_text_encoders(tiny_sdxl_dir):
    pipe = load_pipeline(tiny_sdxl_dir)
    kv = cross_attention_kv(pipe.unet)
    D = kv[0][1].in_features
    assert D == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    before = kv_weights(pipe)
    concepts = ConceptSet(concepts=(Concept("Arlen Corrance", anchor="a person", templates=("a photo of {}",)),))
    edit = closed_form_edit(pipe, concepts, get_method("trce-stage1").defaults.replace(ridge=1e-4, progress=False))
    after = kv_weights(pipe)
    eot = pipe.tokenizer.eos_token_id
    e = rows_of(pipe, "a photo of Arlen Corrance", [pipe.tokenizer("a photo of Arlen Corrance").input_ids.index(eot)])
    e_t = rows_of(pipe, "a photo of a person", [pipe.tokenizer("a photo of a person").input_ids.index(eot)])
    assert e.shape[-1] == D
    for key in before:
        rel = (e @ after[key].T - e_t @ before[key].T).norm() / (e_t @ before[key].T).norm()
        assert rel < 0.02, (key, float(rel))
    assert edit.rows["edit"] == 1


def test_a_concept_can_choose_its_own_token_rows(pipe):
    concepts = ConceptSet(
        concepts=(
            Concept("Arlen Corrance", anchor="a person", templates=("a photo of {}",), tokens="eot"),
            Concept("Bexley Holloway", anchor="a person", templates=("a photo of {}",)),
        )
    )
    edit = closed_form_edit(pipe, concepts, get_method("uce-plus").defaults.replace(**PLAIN, progress=False))
    tok = pipe.tokenizer
    ids = tok("a photo of Bexley Holloway").input_ids
    concept_rows = token_positions("concept", tok, "a photo of {}", "Bexley Holloway", ids, tok.eos_token_id, "t")
    assert edit.rows["edit"] == 1 + len(concept_rows)  # one [EoT] row, then the name and what follows


def test_fit_report_matches_a_direct_per_layer_computation(tiny_sd_dir, tmp_path):
    """Residuals per concept and the drift of every preserved row, captions included, recomputed
    layer by layer from the weights before and after the edit."""
    from engine.closed_form import collect_rows

    pipe = load_pipeline(tiny_sd_dir)
    captions = ("a dog on a beach", "a bowl of fruit")
    concepts = ConceptSet(concepts=CONCEPTS.concepts, preserve_concepts=CONCEPTS.preserve_concepts,
                          preserve_captions=captions)
    cfg = get_method("uce-plus").defaults.replace(**PLAIN, cache_dir=str(tmp_path), progress=False, backend="torch")
    rows = collect_rows(pipe, concepts, cfg)
    before = {k: w.double() for k, w in kv_weights(pipe).items()}
    edit = closed_form_edit(pipe, concepts, cfg)
    after = {k: w.double() for k, w in kv_weights(pipe).items()}

    def rel(x_new, x_ref, W_new, W_ref):  # sqrt(sum_l ||x_new W_new^T - x_ref W_ref^T||^2 / sum_l ||x_ref W_ref^T||^2)
        num = sum((x_new @ W_new[k].T - x_ref @ W_ref[k].T).square().sum() for k in W_ref)
        return math.sqrt(num / sum((x_ref @ W_ref[k].T).square().sum() for k in W_ref))

    table = rows.table.double()
    for ci, concept in enumerate(concepts.concepts):
        sel = rows.owner == ci
        e, e_t = table[rows.src_index[sel]], table[rows.tgt_index[sel]]
        assert edit.concept_residual[concept.name] == pytest.approx(rel(e, e_t, after, before), rel=1e-3)
        assert edit.concept_residual_before[concept.name] == pytest.approx(rel(e, e_t, before, before), rel=1e-4)
    emb, ids = encode_prompts(pipe, list(captions))
    eot = pipe.tokenizer.eos_token_id
    caption_rows = torch.cat([emb[i, : ids[i].tolist().index(eot) + 1] for i in range(len(captions))]).double()
    p = torch.cat([table[rows.src_index[rows.n_edit :]], caption_rows])
    assert edit.rows["caption"] == len(caption_rows)
    assert edit.preserve_drift == pytest.approx(rel(p, p, after, before), rel=1e-3)
    assert edit.preserve_drift > 0


def test_a_broken_or_unwritable_caption_cache_is_only_a_warning(tiny_sd_dir, tmp_path):
    pipe = load_pipeline(tiny_sd_dir)
    captions = ["a dog on a beach", "a bowl of fruit"]
    cfg = get_method("uce-plus").defaults.replace(cache_dir=str(tmp_path / "cache"), progress=False)
    gram, rows = caption_gram(pipe, captions, cfg)
    (cached,) = (tmp_path / "cache").glob("caption-gram-*.safetensors")
    cached.write_bytes(cached.read_bytes()[:40])  # truncated, e.g. by a full disk
    with pytest.warns(RuntimeWarning, match="unreadable cache"):
        again, rows_again = caption_gram(pipe, captions, cfg)
    assert torch.equal(again, gram) and rows_again == rows
    caption_gram(pipe, captions, cfg)  # the recomputed file replaced the broken one
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="cannot write the caption Gram cache"):
        third, _ = caption_gram(pipe, captions, cfg.replace(cache_dir=str(blocked / "sub")))
    assert torch.equal(third, gram)
