"""What a closed-form edit preserves by itself (engine/prior.py) and the automatic preservation
weight, on a tiny real-format pipeline."""

import dataclasses
import warnings

import pytest
import torch

from engine import prior
from engine.closed_form import (AUTO_RESIDUAL, PRESERVE_GRID, EditRefusedError, closed_form_edit, collect_rows,
                                 cross_attention_kv)
from engine.concepts import Concept, ConceptSet, concepts_from_names
from engine.methods import get_method
from engine.models import encode_prompts, load_pipeline


@pytest.fixture
def pipe(tiny_sd_dir):
    return load_pipeline(tiny_sd_dir)


def plain(**changes):
    """uce-plus's rows with none of the preservation it adds by itself, then ``changes``."""
    base = dict(prior="none", neighbours=0, skip_shared_rows=False, preserve_weight=None, max_prior_drift=None,
                progress=False)
    return get_method("uce-plus").defaults.replace(**{**base, **changes})


def test_the_shipped_captions_are_many_distinct_and_generic():
    captions = prior.generic_captions()
    assert len(captions) >= 300 and len(set(captions)) == len(captions)
    assert all(c.strip() == c and c for c in captions)


def test_captions_naming_an_erased_concept_are_left_out():
    concepts = concepts_from_names(["Bo Park", "skull"])
    kept, dropped = prior.naming_erased(["a photo of Bo Park smiling", "a parking lot at night",
                                         "a skull on a desk", "a skullcap", "bo and park"], concepts)
    assert dropped == ["a photo of Bo Park smiling", "a skull on a desk"]
    assert kept == ["a parking lot at night", "a skullcap", "bo and park"]


def test_neighbours_recombine_erased_names_then_take_the_vocabulary(pipe):
    concepts = concepts_from_names(["Ann Lee", "Bo Park", "skull"], preserve=["Ann Park"])
    found = prior.name_neighbours(pipe, concepts, k=3)
    assert "skull" not in found  # single words: their nearest words are often synonyms
    assert "Bo Lee" in found["Ann Lee"] and "Bo Park" not in found["Ann Lee"]
    assert "Ann Park" not in found["Bo Park"]  # already preserved
    every = [n for names in found.values() for n in names]
    assert len(every) == len(set(n.lower() for n in every))
    for name in found["Ann Lee"]:  # one word replaced, the other kept
        first, last = name.split()
        assert (first == "Ann") != (last == "Lee")
    assert len(found["Ann Lee"]) == 6  # k per word position


def test_neighbours_and_vocabulary_skip_untrained_words(pipe):
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    vocab = pipe.tokenizer.get_vocab()
    concepts = concepts_from_names(["Ann Lee"])
    first = prior.name_neighbours(pipe, concepts, k=2)["Ann Lee"]
    chosen = first[0].split()[0].lower()
    with torch.no_grad():
        embeddings[vocab[chosen + "</w>"]] = 0.0  # a word this model never trained
    again = prior.name_neighbours(pipe, concepts, k=2)["Ann Lee"]
    assert all(chosen not in n.lower().split() for n in again)
    words = prior.vocabulary_words(pipe, concepts_from_names(["the cat"]), 50)
    assert chosen not in words and "the" not in words and "cat" not in words and len(words) == 50
    ids = [vocab[w + "</w>"] for w in words]
    assert ids == sorted(ids)  # the most frequent (earliest merged) first


def test_rows_a_preserved_prompt_shares_are_not_edited(pipe):
    kept = Concept("Ann Park")
    concepts = ConceptSet(concepts=(Concept("Ann Lee", anchor="a person"),), preserve_concepts=(kept,))
    n_ann = len(pipe.tokenizer("Ann", add_special_tokens=False).input_ids)
    full = collect_rows(pipe, concepts, plain())
    skipping = collect_rows(pipe, concepts, plain(skip_shared_rows=True))
    assert skipping.n_edit == full.n_edit - n_ann  # the first name's rows are the same vector in both prompts
    assert skipping.preserved["skipped_shared_rows"] == {"Ann Lee": n_ann}


def test_a_concept_left_without_rows_is_refused_by_name(pipe):
    concepts = ConceptSet(concepts=(Concept("Ann", anchor="a person"),), preserve_concepts=(Concept("Ann Park"),))
    with pytest.raises(ValueError, match="'Ann'.*nothing would erase it"):
        collect_rows(pipe, concepts, plain(tokens="last", skip_shared_rows=True))


def test_the_prior_keeps_what_the_file_never_names(pipe):
    """The same names-only edit, with and without the prior: prompts that no file lists (an
    everyday caption, the unconditional prompt) move less with it, and the concept still moves."""
    concepts = concepts_from_names(["Ann Lee", "Bo Park"], anchor="a person", templates=["a photo of {}"])
    probes = ["a dog sleeping on a porch", ""]
    x, _ = encode_prompts(pipe, probes)

    def change(cfg):
        before = {k: m.weight.detach().clone() for k, m in cross_attention_kv(pipe.unet)}
        edit = closed_form_edit(pipe, concepts, cfg)
        for k, m in cross_attention_kv(pipe.unet):  # the next edit starts from the same weights
            with torch.no_grad():
                m.weight.copy_(before[k])
        M = edit.transform.float() - torch.eye(edit.transform.shape[0])
        return float((x @ M.T).norm() / x.norm()), edit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare, _ = change(plain(preserve_weight=0.1))
        kept, edit = change(plain(preserve_weight="auto", prior="generic", neighbours=2, skip_shared_rows=True))
    assert kept < 0.5 * bare
    for name in concepts.names():  # at least 1 - AUTO_RESIDUAL of the way to the anchor
        assert edit.concept_residual[name] <= AUTO_RESIDUAL * edit.concept_residual_before[name] + 1e-9
    listed = edit.preserved
    assert listed["prior"] == "generic" and listed["empty_prompt"] is True
    assert listed["generic_captions"] == len(prior.generic_captions())
    assert listed["vocabulary_words"] == prior.VOCABULARY_WORDS
    assert set(listed["neighbours"]) == {"Ann Lee", "Bo Park"}


def test_an_edit_that_preserves_nothing_says_so(pipe):
    concepts = concepts_from_names(["Ann Lee"], anchor="a person")
    with pytest.warns(UserWarning, match="preserves nothing"):
        closed_form_edit(pipe, concepts, get_method("uce").defaults.replace(progress=False))


def test_the_automatic_weight_is_the_largest_that_still_erases(pipe):
    concepts = concepts_from_names(["Ann Lee", "Bo Park"], anchor="a person", preserve=["Cy Moss"],
                                   captions=["a dog sleeping on a porch", "a bowl of fruit"])
    edit = closed_form_edit(pipe, concepts, plain(preserve_weight="auto", prior="generic"))
    tried = edit.preserve_weight_search["max_concept_residual"]
    lam = edit.preserve_weight
    assert lam in PRESERVE_GRID and tried[f"{lam:.3g}"] <= AUTO_RESIDUAL and edit.preserve_weight_search["met"]
    following = list(tried.values())[list(tried).index(f"{lam:.3g}") + 1 :]  # tried in increasing order
    assert lam == PRESERVE_GRID[-1] or following[0] > AUTO_RESIDUAL
    ratios = [edit.concept_residual[n] / edit.concept_residual_before[n] for n in concepts.names()]
    assert max(ratios) == pytest.approx(tried[f"{lam:.3g}"], rel=1e-3)  # the search's fit is the edit's


def test_preserve_weight_accepts_auto_and_nothing_else_of_its_kind():
    from engine.closed_form import ClosedFormConfig

    assert ClosedFormConfig(preserve_weight="auto").preserve_weight == "auto"
    for bad in ("automatic", -1.0):
        with pytest.raises(ValueError, match="preserve_weight"):
            ClosedFormConfig(preserve_weight=bad)
    for field, bad in (("prior", "coco"), ("neighbours", -1), ("neighbours", 1.5)):
        with pytest.raises(ValueError, match=field):
            ClosedFormConfig(**{field: bad})


def test_the_automatic_weight_gives_the_edit_of_that_weight_set_by_hand(pipe):
    # The search's sums are reused for the final solve; they must be the ones a fixed weight builds.
    concepts = concepts_from_names(["Ann Lee", "Bo Park"], anchor="a person", preserve=["Cy Moss"],
                                   captions=["a dog sleeping on a porch", "a bowl of fruit"])
    before = {k: m.weight.detach().clone() for k, m in cross_attention_kv(pipe.unet)}

    def edit(weight):  # each edit starts from the same weights
        result = closed_form_edit(pipe, concepts, plain(preserve_weight=weight, prior="generic"))
        for k, m in cross_attention_kv(pipe.unet):
            with torch.no_grad():
                m.weight.copy_(before[k])
        return result

    auto = edit("auto")
    by_hand = edit(auto.preserve_weight)
    assert by_hand.preserve_weight == auto.preserve_weight
    torch.testing.assert_close(auto.transform, by_hand.transform, rtol=1e-6, atol=1e-8)


def test_an_automatic_weight_that_cannot_erase_says_so(pipe):
    """A ridge this large holds every weight near the original: no preservation weight on the grid
    lets the edit reach 80% of the way, and the edit warns instead of passing the smallest as fit."""
    concepts = concepts_from_names(["Ann Lee"], anchor="a person", preserve=["Cy Moss"])
    with pytest.warns(UserWarning, match="even the smallest weight"):
        edit = closed_form_edit(pipe, concepts, plain(preserve_weight="auto", ridge=1e4))
    assert edit.preserve_weight == PRESERVE_GRID[0] and edit.preserve_weight_search["met"] is False


def test_an_edit_that_moves_the_generic_prior_too_far_is_refused(pipe):
    """prior_drift is the K/V change of every row of the generic prior's prompts, all layers
    (checked against those rows encoded and projected here); past max_prior_drift the edit
    raises and leaves every weight as it was."""
    concepts = concepts_from_names(["Ann Lee", "Bo Park"], anchor="a person", templates=["a photo of {}"])
    before = {k: m.weight.detach().clone() for k, m in cross_attention_kv(pipe.unet)}
    edit = closed_form_edit(pipe, concepts, plain(preserve_weight=0.1, max_prior_drift=1e9))
    x, _ = encode_prompts(pipe, ["", *prior.generic_captions()])
    x = x.reshape(-1, x.shape[-1]).double()  # every position: cross-attention reads all 77
    moved = sum(float(((x @ (edit.changed[k].double() - w.double()).T)).square().sum()) for k, w in before.items())
    size = sum(float((x @ w.double().T).square().sum()) for w in before.values())
    assert edit.prior_drift == pytest.approx((moved / size) ** 0.5, rel=1e-3) and edit.prior_drift > 0
    for k, m in cross_attention_kv(pipe.unet):
        with torch.no_grad():
            m.weight.copy_(before[k])
    with pytest.raises(EditRefusedError, match="nothing was written") as refused:
        closed_form_edit(pipe, concepts, plain(preserve_weight=0.1, max_prior_drift=edit.prior_drift / 2))
    assert refused.value.drift == pytest.approx(edit.prior_drift)
    for k, m in cross_attention_kv(pipe.unet):
        assert torch.equal(m.weight, before[k])
    for bad in (0, -1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="max_prior_drift"):
            plain(max_prior_drift=bad)


def test_balancing_the_concepts_lets_the_others_be_kept_and_is_a_reweighted_solve(pipe):
    """balance_concepts raises the edit weight of the concepts the search leaves furthest: the
    chosen preservation weight is at least the plain search's, every concept still meets the rule,
    and the edit is the plain solve with those concept weights set by hand."""
    names = ["Ann Lee", "Bo Park", "Cy Moss", "Di Fox"]
    concepts = concepts_from_names(names, anchor="a person", preserve=["Ed Hale"],
                                   captions=["a dog sleeping on a porch", "a bowl of fruit"])
    before = {k: m.weight.detach().clone() for k, m in cross_attention_kv(pipe.unet)}

    def edit(concept_set, **changes):  # each edit starts from the same weights
        result = closed_form_edit(pipe, concept_set, plain(prior="generic", **changes))
        for k, m in cross_attention_kv(pipe.unet):
            with torch.no_grad():
                m.weight.copy_(before[k])
        return result

    equal = edit(concepts, preserve_weight="auto")
    balanced = edit(concepts, preserve_weight="auto", balance_concepts=True)
    search = balanced.preserve_weight_search
    assert search["met"] and balanced.preserve_weight > equal.preserve_weight
    factors = search["balanced"]["concept_weights"]
    assert set(factors) == set(names) and min(factors.values()) >= 1.0 and max(factors.values()) > 1.0
    for name in names:
        assert balanced.concept_residual[name] <= 1.01 * AUTO_RESIDUAL * balanced.concept_residual_before[name]
    by_hand = ConceptSet(concepts=[dataclasses.replace(c, weight=factors[c.name]) for c in concepts.concepts],
                         preserve_concepts=concepts.preserve_concepts, preserve_captions=concepts.preserve_captions,
                         source=concepts.source)
    fixed = edit(by_hand, preserve_weight=balanced.preserve_weight)
    torch.testing.assert_close(fixed.transform, balanced.transform, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="balance_concepts"):
        plain(preserve_weight=0.1, balance_concepts=True)
