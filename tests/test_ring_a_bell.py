"""Ring-A-Bell (engine/attacks/ring_a_bell.py) on the shipped toy world's text encoder and its
genuine CLIP tokenizer: the concept vector and target against plain references, the GA's
operators, determinism, that the search gets close to a target it can reach, and bad inputs."""

import math

import pytest
import torch

from engine.attacks.ring_a_bell import (CONCEPT_DEFAULTS, RingABellSettings, candidate_ids, concept_vector, crossover,
                                        distances, mutate, ring_a_bell, select, target_embedding, vocabulary_ids)
from engine.toyworld.catalogue import TEMPLATES
from engine.toyworld.world import pipeline_path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    """(text encoder, tokenizer) of the shipped toy world's pipeline, in fp32 as the engine loads it
    (v2 stores fp16)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = pipeline_path()
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder").float().eval()
    return text_encoder, CLIPTokenizer.from_pretrained(root / "tokenizer")


def embed_one(text_encoder, tokenizer, prompt):
    """Reference E(prompt): one prompt, one call, (77, D)."""
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state[0]


def embed_tokens(text_encoder, tokenizer, tokens):
    """Reference E([start, tokens, end, pad ...]), (77, D)."""
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (77 - len(ids))
    with torch.no_grad():
        return text_encoder(torch.tensor([ids])).last_hidden_state[0]


# --------------------------------------------------------------------------- settings


def test_settings_defaults_are_the_official_notebooks():
    s = RingABellSettings()
    assert (s.length, s.strength) == (16, 3.0)
    assert (s.population, s.generations, s.mutation, s.crossover) == (200, 3000, 0.25, 0.5)
    assert s.vocabulary == "all" and s.to_dict()["seed"] == 0
    assert RingABellSettings.for_concept("nudity") == s
    violence = RingABellSettings.for_concept("violence", seed=3)
    assert (violence.length, violence.strength, violence.seed) == (16, 5.5, 3)
    assert set(CONCEPT_DEFAULTS) >= {"nudity", "violence", "identity", "object"}


@pytest.mark.parametrize("changes, message", [
    ({"length": 0}, "length must be an integer >= 1, got 0"),
    ({"length": 76}, "length must be <= 75"),
    ({"length": 2.0}, "length must be an integer"),
    ({"population": 1}, "population must be an integer >= 2, got 1"),
    ({"generations": 0}, "generations must be an integer >= 1, got 0"),
    ({"mutation": 1.5}, r"mutation must be a probability in \[0, 1\], got 1.5"),
    ({"crossover": -0.1}, r"crossover must be a probability in \[0, 1\]"),
    ({"strength": math.nan}, "strength must be a finite number >= 0"),
    ({"strength": -1.0}, "strength must be a finite number >= 0"),
    ({"seed": "0"}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"vocabulary": "tokens"}, "vocabulary must be one of all, words, embedded, got 'tokens'"),
])
def test_settings_refuse_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        RingABellSettings(**changes)
    with pytest.raises(ValueError, match=message):
        RingABellSettings().replace(**changes)


def test_unknown_concept_type_and_field_are_refused():
    with pytest.raises(ValueError, match="unknown concept type 'nudty'"):
        RingABellSettings.for_concept("nudty")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['eta'\]"):
        RingABellSettings().replace(eta=3.0)


# --------------------------------------------------------------------------- concept vector and target


def test_concept_vector_is_the_mean_difference_of_the_pairs(clip):
    text_encoder, tokenizer = clip
    templates = TEMPLATES["unsafe"]["train"] + TEMPLATES["unsafe"]["heldout"]
    with_concept = [t.format(concept="skull") for t in templates]
    without = [t.format(concept="circle") for t in templates]
    vec = concept_vector(text_encoder, tokenizer, with_concept, without)
    reference = torch.stack([embed_one(text_encoder, tokenizer, a) - embed_one(text_encoder, tokenizer, b)
                             for a, b in zip(with_concept, without)]).mean(0)
    assert vec.shape == (77, text_encoder.config.hidden_size) and vec.dtype == torch.float32
    assert reference.abs().max() > 0.1  # the pairs do differ
    torch.testing.assert_close(vec, reference, atol=2e-5, rtol=1e-4)

    target = target_embedding(text_encoder, tokenizer, "a picture of a circle", vec, 3.0)
    torch.testing.assert_close(target, embed_one(text_encoder, tokenizer, "a picture of a circle") + 3.0 * reference,
                               atol=1e-4, rtol=1e-4)
    # the notebook's (1, 77, D) vector is accepted
    batched = target_embedding(text_encoder, tokenizer, "a picture of a circle", vec[None], 3.0)
    torch.testing.assert_close(batched, target)


@pytest.mark.parametrize("with_concept, without, message", [
    ([], [], "with_concept is empty"),
    (["a skull"], [], "without_concept is empty"),
    (["a skull", "a skull"], ["a circle"], "must be pairs: 2 vs 1 prompts"),
    ("a skull", "a circle", "with_concept must be a list of prompts, got str"),
    (["a skull", 3], ["a circle", "a star"], "with_concept must hold strings only, got 3"),
])
def test_concept_vector_refuses_bad_pairs(clip, with_concept, without, message):
    with pytest.raises(ValueError, match=message):
        concept_vector(*clip, with_concept, without)


def test_target_and_attack_refuse_bad_embeddings(clip):
    text_encoder, tokenizer = clip
    width = text_encoder.config.hidden_size
    good = torch.zeros(77, width)
    with pytest.raises(ValueError, match=rf"vector must have shape \(77, {width}\)"):
        target_embedding(text_encoder, tokenizer, "a skull", torch.zeros(77, width + 1), 3.0)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        target_embedding(text_encoder, tokenizer, "a skull", good, math.inf)
    with pytest.raises(ValueError, match="base_prompt must be a string"):
        target_embedding(text_encoder, tokenizer, ["a skull"], good, 3.0)
    with pytest.raises(ValueError, match="target holds NaN"):
        ring_a_bell(text_encoder, tokenizer, torch.full((77, width), math.nan), RingABellSettings(), progress=False)
    with pytest.raises(ValueError, match=rf"target must have shape \(77, {width}\)"):
        ring_a_bell(text_encoder, tokenizer, torch.zeros(76, width), RingABellSettings(), progress=False)
    with pytest.raises(ValueError, match="settings must be RingABellSettings, got dict"):
        ring_a_bell(text_encoder, tokenizer, good, {"length": 16}, progress=False)


# --------------------------------------------------------------------------- candidates and operators


def test_vocabularies_leave_out_the_special_tokens(clip):
    text_encoder, tokenizer = clip
    special = set(tokenizer.all_special_ids)
    every = vocabulary_ids(text_encoder, tokenizer, "all")
    assert len(every) == 49408 - len(special) and not special & set(every.tolist())
    embedded = vocabulary_ids(text_encoder, tokenizer, "embedded")
    table = text_encoder.get_input_embeddings().weight
    assert 0 < len(embedded) < 1000 and bool((table[embedded] != 0).any(1).all())  # the toy world's few known tokens
    assert not special & set(embedded.tolist())


def test_candidates_are_laid_out_as_the_tokenizer_lays_out_text(clip):
    text_encoder, tokenizer = clip
    tokens = tokenizer("a skull in flames", add_special_tokens=False).input_ids
    ids = candidate_ids(tokenizer, torch.tensor([tokens]))
    assert ids[0].tolist() == tokenizer("a skull in flames", padding="max_length", max_length=77).input_ids
    target = embed_one(text_encoder, tokenizer, "a skull")
    d = distances(text_encoder, tokenizer, torch.tensor([tokens]), target)
    reference = ((embed_tokens(text_encoder, tokenizer, tokens) - target) ** 2).sum().double()
    torch.testing.assert_close(d, reference[None], rtol=1e-5, atol=1e-3)


def test_operators_keep_token_ids_in_the_allowed_set():
    gen = torch.Generator().manual_seed(0)
    allowed = torch.randperm(49406, generator=gen)[:50]
    parents = allowed[torch.randint(0, 50, (20, 9), generator=gen)]
    for _ in range(20):
        children, fresh = crossover(parents, 1.0, gen)
        assert children.shape == (60, 9) and fresh.tolist() == [False] * 20 + [True] * 40
        assert torch.equal(children[:20], parents)
        assert bool(torch.isin(children, allowed).all())
        mutated, hit = mutate(children, 1.0, allowed, gen)
        assert bool(hit.all()) and bool(torch.isin(mutated, allowed).all())
        assert bool(((mutated != children).sum(1) <= 1).all())  # one position per member at most
        parents = mutated[torch.randperm(60, generator=gen)[:20]]
    same, fresh = crossover(parents, 0.0, gen)
    assert torch.equal(same, parents) and not fresh.any()
    unchanged, hit = mutate(parents, 0.0, allowed, gen)
    assert torch.equal(unchanged, parents) and not hit.any()


def test_crossover_children_are_a_head_of_one_parent_and_the_tail_of_another():
    gen = torch.Generator().manual_seed(1)
    parents = torch.arange(8 * 6).reshape(8, 6)  # every id tells its parent and position
    children, _ = crossover(parents, 1.0, gen)
    for child in children[8:]:
        owners = (child // 6).tolist()
        cut = next((i for i, o in enumerate(owners) if o != owners[0]), 6)
        assert len(set(owners[:cut])) == 1 and len(set(owners[cut:])) <= 1
        assert (child % 6).tolist() == list(range(6))  # positions never move


def test_select_keeps_the_best_half_in_order():
    tokens = torch.arange(6)[:, None].repeat(1, 3)
    kept, scores = select(tokens, torch.tensor([5.0, 1.0, 4.0, 1.0, 0.5, 9.0], dtype=torch.float64), 3)
    assert kept[:, 0].tolist() == [4, 1, 3] and scores.tolist() == [0.5, 1.0, 1.0]


# --------------------------------------------------------------------------- the search


def test_search_is_deterministic_for_a_seed(clip):
    text_encoder, tokenizer = clip
    target = embed_one(text_encoder, tokenizer, "a skull in flames")
    settings = RingABellSettings(length=4, population=8, generations=5)
    first = ring_a_bell(text_encoder, tokenizer, target, settings, progress=False)
    again = ring_a_bell(text_encoder, tokenizer, target, settings, progress=False)
    assert first == again
    assert len(first["history"]) == 5 and len(first["token_ids"]) == 4
    assert first["distance"] == min(first["history"])
    other = ring_a_bell(text_encoder, tokenizer, target, settings.replace(seed=1), progress=False)
    assert other["token_ids"] != first["token_ids"]
    assert not set(first["token_ids"]) & set(tokenizer.all_special_ids)


def test_children_that_copy_a_scored_candidate_are_not_encoded_again(clip):
    """One parent crossed with itself only makes copies of it: nothing new to encode."""
    text_encoder, tokenizer = clip
    target = embed_one(text_encoder, tokenizer, "a skull")
    settings = RingABellSettings(length=3, population=2, generations=4, mutation=0.0, crossover=1.0)
    out = ring_a_bell(text_encoder, tokenizer, target, settings, progress=False)
    assert out["encodings"] == 2 and len(set(out["history"])) == 1


def test_search_gets_close_to_a_reachable_target(clip):
    """The target is a known 5-token prompt's embedding. The GA must beat, by far, both the best of
    its random initial population and a random search that encodes as many candidates."""
    text_encoder, tokenizer = clip
    known = tokenizer("a skull in flames", add_special_tokens=False).input_ids
    target = embed_tokens(text_encoder, tokenizer, known)
    settings = RingABellSettings(length=len(known), population=32, generations=60, vocabulary="embedded", seed=0)
    out = ring_a_bell(text_encoder, tokenizer, target, settings, progress=False)

    initial_best = out["history"][0]
    assert out["distance"] < 0.5 * initial_best, (out["distance"], initial_best)
    vocabulary = vocabulary_ids(text_encoder, tokenizer, "embedded")
    gen = torch.Generator().manual_seed(123)
    random = vocabulary[torch.randint(0, len(vocabulary), (out["encodings"], len(known)), generator=gen)]
    random_best = distances(text_encoder, tokenizer, random, target).min().item()
    assert out["distance"] < 0.75 * random_best, (out["distance"], random_best)
    # the reported distance is the returned candidate's
    d = ((embed_tokens(text_encoder, tokenizer, out["token_ids"]) - target) ** 2).sum().item()
    assert d == pytest.approx(out["distance"], rel=1e-4)
    assert out["prompt"] == tokenizer.decode(out["token_ids"])


def test_the_typed_prompt_is_reported_and_word_tokens_round_trip(clip):
    text_encoder, tokenizer = clip
    target = embed_one(text_encoder, tokenizer, "a skull in flames")
    out = ring_a_bell(text_encoder, tokenizer, target, RingABellSettings(length=6, population=6, generations=2,
                                                                         vocabulary="words"), progress=False)
    assert out["retokenized_ids"] == out["token_ids"] and not out["retokenized_truncated"]
    assert out["retokenized_distance"] == pytest.approx(out["distance"], rel=1e-4)
    retyped = ((embed_one(text_encoder, tokenizer, out["prompt"]) - target) ** 2).sum().item()
    assert out["retokenized_distance"] == pytest.approx(retyped, rel=1e-4)

    # byte and sub-word tokens ("all") need not survive decoding; the typed prompt is what counts
    out = ring_a_bell(text_encoder, tokenizer, target, RingABellSettings(length=12, population=6, generations=2,
                                                                         seed=1), progress=False)
    tokens = tokenizer(out["prompt"], add_special_tokens=False).input_ids
    assert out["retokenized_ids"] == tokens[:75] != out["token_ids"]  # this seed's text re-tokenizes differently
    retyped = ((embed_one(text_encoder, tokenizer, out["prompt"]) - target) ** 2).sum().item()
    assert out["retokenized_distance"] == pytest.approx(retyped, rel=1e-4)
