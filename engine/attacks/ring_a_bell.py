"""Ring-A-Bell: a model-agnostic prompt attack on concept erasure (Tsai, Hsu et al., "Ring-A-Bell!
How Reliable are Concept Removal Methods for Diffusion Models?", ICLR 2024; official code:
github.com/chiayi-hsu/Ring-A-Bell, ``Get_Concept_Vector.ipynb`` and ``InversePrompt.ipynb``).

It needs only the text encoder (the erased UNet is never queried) and works in three steps.

1. Concept extraction (``concept_vector``; ``Get_Concept_Vector.ipynb``). For N prompt pairs that
   differ only by the concept (``"The man's hand has been cut, and he is bleeding."`` /
   ``"... and he is fine."``), with ``E(p)`` the text encoder's full last hidden state (77 x D,
   what the UNet of SD 1.x and 2.x is conditioned on):

       c = 1/N sum_i ( E(p_i with the concept) - E(p_i without it) )                  (77 x D)

2. Target (``target_embedding``): for a base prompt ``p`` (the notebook uses I2P prompts),

       target = E(p) + eta * c

3. Prompt discovery (``ring_a_bell``; ``InversePrompt.ipynb``): a genetic algorithm over hard
   prompts of K token ids, each laid out as ``[start, t_1 .. t_K, end, pad ...]`` (77 ids), minimising

       d(t) = || E(t) - target ||_F^2        (squared error summed over all 77 x D entries)

   Per generation (the notebook's loop): score every candidate; sort; keep the best
   ``population // 2`` (truncation selection); crossover: each kept parent stays and, with
   probability ``crossover``, is paired with a uniformly drawn kept parent and one cut point
   (uniform over the K positions) to add both one-point children; mutation: every member of the
   new population (kept parents included), with probability ``mutation``, has one uniformly drawn
   position replaced by a uniformly drawn token. The last generation is only scored. The found
   prompt is the decoded token ids (``tokenizer.decode``).

Defaults (``RingABellSettings``) are the notebook's: population 200, 3000 generations, mutation
rate 0.25, crossover rate 0.5, ``length = 16`` and ``cof`` (eta) 3. ``length`` is the number of
free tokens K; the paper evaluates K in {77, 38, 16}, and the notebook notes "for K = 77, please
set length = 75" (every position between the start and end tokens), so ``length`` is at most
``model_max_length - 2``. Per concept type (``CONCEPT_DEFAULTS``, ``RingABellSettings.for_concept``):

* nudity: K 16, eta 3 (the notebook's defaults, its nudity setting);
* violence: K 16, eta 5.5 (the eta of the released violence prompt sets,
  ``data/InvPrompt/Violence/Violence_eta_5.5_K_77.csv`` and ``..._K_38.csv``; there is also an
  eta 5 set at K 77);
* identities, objects, styles (no default in the paper or the code): K 16, eta 3, the notebook's
  defaults; the toy world's ``unsafe`` analogues (blood, weapons) take the violence values.

Re-tokenization. The GA works on token ids, but a user types text: decoding joins sub-word pieces
(``"bloo" + "ater"`` -> ``"blooater"``) and byte tokens of partial UTF-8 characters decode to
U+FFFD, so the typed prompt may tokenize differently from the candidate (it may even exceed 77
tokens and be truncated, as SD's pipeline truncates). ``ring_a_bell`` therefore also reports the
re-tokenized ids and their distance. ``vocabulary="words"`` restricts the search to whole-word
tokens that re-tokenize to themselves, so that the typed prompt is exactly the candidate.

Deviations from the official code:

* the result is the best candidate ever scored; the notebook returns the best of the last
  generation, which can be worse, since mutation also hits the kept parents;
* tokens are drawn from the tokenizer's ordinary tokens (``vocabulary="all"``: every id but the
  special start/end/pad ids); the notebook draws from ``[1, 49406)``, which also leaves out ``!``
  (id 0, SD2's pad token); ``"words"`` and ``"embedded"`` (ids whose input embedding is not all
  zero: on the toy world, the tokens it was trained on) are additions;
* positions after the end token hold the tokenizer's pad id (49407 in the notebook, the same id
  for SD1's tokenizer), so a candidate is laid out as the tokenizer lays out text;
* the GA operators are vectorised (same distributions, another random stream, children appended
  after their parents rather than interleaved), and a candidate equal to one already scored (a
  kept parent that was not mutated, a child that copies a parent, a duplicate) is not encoded
  again (the same values, fewer encodings: ``encodings`` in the result counts them);
* the concept vector takes the caller's pairs as given: the notebook repeats each prompt 5 times
  (no effect on the mean) and drops the nudity pairs whose images NudeNet found clean.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from engine.settings import Settings

VOCABULARIES = ("all", "words", "embedded")
ENCODE_BATCH = 256  # prompts per text-encoder call

# K (length) and eta (strength) per concept type; see the module docstring for their sources.
CONCEPT_DEFAULTS: dict[str, dict] = {
    "nudity": {"length": 16, "strength": 3.0},
    "violence": {"length": 16, "strength": 5.5},
    "identity": {"length": 16, "strength": 3.0},
    "object": {"length": 16, "strength": 3.0},
    "style": {"length": 16, "strength": 3.0},
    "unsafe": {"length": 16, "strength": 5.5},
}


@dataclass(frozen=True)
class RingABellSettings(Settings):
    """Ring-A-Bell's settings, defaults from ``InversePrompt.ipynb`` (module docstring)."""

    length: int = 16  # K: free tokens between the start and end tokens (at most 75 for SD)
    strength: float = 3.0  # eta: target = E(base prompt) + eta * concept vector
    population: int = 200  # candidates scored in the first generation; the best half are kept
    generations: int = 3000
    mutation: float = 0.25  # probability that a member has one token replaced
    crossover: float = 0.5  # probability that a kept parent makes two one-point children
    seed: int = 0
    vocabulary: str = "all"  # all | words | embedded: which token ids candidates are made of

    def __post_init__(self):
        for name, low in (("length", 1), ("population", 2), ("generations", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.length > 75:
            raise ValueError(f"length must be <= 75 (77 positions less the start and end tokens), got {self.length}")
        for name in ("mutation", "crossover"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if not _is_number(self.strength) or self.strength < 0:
            raise ValueError(f"strength must be a finite number >= 0, got {self.strength!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.vocabulary not in VOCABULARIES:
            raise ValueError(f"vocabulary must be one of {', '.join(VOCABULARIES)}, got {self.vocabulary!r}")

    @classmethod
    def for_concept(cls, kind: str, **changes) -> RingABellSettings:
        """The defaults with the K and eta of a concept type (``CONCEPT_DEFAULTS``), then ``changes``."""
        if kind not in CONCEPT_DEFAULTS:
            raise ValueError(f"unknown concept type {kind!r}; known: {', '.join(CONCEPT_DEFAULTS)}")
        return cls().replace(**{**CONCEPT_DEFAULTS[kind], **changes})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- encoding


@contextmanager
def _eval_mode(module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def embed_ids(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state for ``input_ids`` (N, L): float32 (N, L, D) on its device,
    computed without gradients in batches of ``ENCODE_BATCH``."""
    device = next(text_encoder.parameters()).device
    if input_ids.shape[0] == 0:
        return torch.zeros(0, input_ids.shape[1], text_encoder.config.hidden_size, device=device)
    out = []
    with torch.no_grad(), _eval_mode(text_encoder):
        for lo in range(0, input_ids.shape[0], ENCODE_BATCH):
            ids = input_ids[lo : lo + ENCODE_BATCH].to(device)
            out.append(text_encoder(ids).last_hidden_state.float())  # (n, L, D)
    return torch.cat(out)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """input_ids (N, L) int64, L = ``tokenizer.model_max_length``, padded and truncated as SD's
    pipeline (and the official code) tokenizes a prompt."""
    length = tokenizer.model_max_length
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def embed_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """E(p) for each prompt: float32 (N, L, D) on the text encoder's device."""
    return embed_ids(text_encoder, tokenize(tokenizer, prompts))


def _check_prompts(name: str, prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{name} must be a list of prompts, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{name} is empty: the concept vector needs at least one prompt pair")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{name} must hold strings only, got {bad[0]!r}")
    return list(prompts)


def concept_vector(text_encoder, tokenizer, with_concept: list[str], without_concept: list[str]) -> torch.Tensor:
    """The concept vector c = mean_i (E(with_concept[i]) - E(without_concept[i])): float32 (L, D)
    on the text encoder's device (L = 77 for SD). Pair i is ``with_concept[i]`` / ``without_concept[i]``."""
    with_concept = _check_prompts("with_concept", with_concept)
    without_concept = _check_prompts("without_concept", without_concept)
    if len(with_concept) != len(without_concept):
        raise ValueError(
            f"with_concept and without_concept must be pairs: {len(with_concept)} vs {len(without_concept)} prompts"
        )
    with_emb = embed_prompts(text_encoder, tokenizer, with_concept)  # (N, L, D)
    without_emb = embed_prompts(text_encoder, tokenizer, without_concept)  # (N, L, D)
    return (with_emb - without_emb).double().mean(0).float()  # (L, D)


def _check_embedding(name: str, value, text_encoder, tokenizer) -> torch.Tensor:
    """``value`` as float32 (L, D) on the encoder's device; (1, L, D), the notebook's shape, is accepted."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    shape = (tokenizer.model_max_length, text_encoder.config.hidden_size)
    if value.dim() == 3 and value.shape[0] == 1:
        value = value[0]
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (positions x hidden size), got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return value.to(next(text_encoder.parameters()).device, torch.float32)


def target_embedding(text_encoder, tokenizer, base_prompt: str, vector: torch.Tensor, strength: float) -> torch.Tensor:
    """The attack's target E(base_prompt) + strength * vector: float32 (L, D) on the encoder's device."""
    if not isinstance(base_prompt, str):
        raise ValueError(f"base_prompt must be a string, got {type(base_prompt).__name__}")
    if not _is_number(strength):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    vector = _check_embedding("vector", vector, text_encoder, tokenizer)
    return embed_prompts(text_encoder, tokenizer, [base_prompt])[0] + strength * vector


# --------------------------------------------------------------------------- candidates


def vocabulary_ids(text_encoder, tokenizer, vocabulary: str = "all") -> torch.Tensor:
    """The token ids candidates are drawn from, int64 (V,) sorted (``RingABellSettings.vocabulary``):

    * ``all``: every id of the tokenizer (and the encoder's embedding table) but the special ones;
    * ``words``: those of ``all`` that decode to a whole word which re-tokenizes to that one id;
    * ``embedded``: those of ``all`` whose input embedding is not all zero.
    """
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary must be one of {', '.join(VOCABULARIES)}, got {vocabulary!r}")
    table = text_encoder.get_input_embeddings().weight  # (vocab, D)
    ids = torch.ones(min(len(tokenizer), table.shape[0]), dtype=torch.bool)
    ids[[i for i in tokenizer.all_special_ids if i < len(ids)]] = False
    if vocabulary == "embedded":
        ids &= (table[: len(ids)].detach() != 0).any(1).cpu()
    ids = ids.nonzero().flatten()
    if vocabulary == "words":
        texts = tokenizer.batch_decode(ids[:, None].tolist())
        again = tokenizer(texts, add_special_tokens=False).input_ids
        ids = ids[torch.tensor([a == [i] for a, i in zip(again, ids.tolist())], dtype=torch.bool)]
    if len(ids) == 0:
        raise ValueError(f"the {vocabulary!r} vocabulary of this tokenizer and text encoder is empty")
    return ids


def candidate_ids(tokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """Full input_ids (N, L) for candidates ``tokens`` (N, K): [start, tokens, end, pad ...]."""
    n, k = tokens.shape
    length = tokenizer.model_max_length
    if k > length - 2:
        raise ValueError(f"{k} tokens do not fit in {length} positions with the start and end tokens")
    ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.int64)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, 1 : k + 1] = tokens
    ids[:, k + 1] = tokenizer.eos_token_id
    return ids


def distances(text_encoder, tokenizer, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d = ||E(candidate) - target||_F^2 for candidates ``tokens`` (N, K): float64 (N,) on the CPU.
    ``target``: float32 (L, D) on the encoder's device."""
    emb = embed_ids(text_encoder, candidate_ids(tokenizer, tokens))  # (N, L, D)
    return ((emb - target) ** 2).sum((1, 2)).double().cpu()


# --------------------------------------------------------------------------- GA operators


def select(tokens: torch.Tensor, scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncation selection: the ``keep`` candidates of lowest score, best first (ties keep order)."""
    order = torch.argsort(scores, stable=True)[:keep]
    return tokens[order], scores[order]


def crossover(parents: torch.Tensor, rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One-point crossover: (new population (M + 2C, K), which rows are new children (M + 2C,) bool).

    Every parent (M, K) stays; each, with probability ``rate``, is paired with a uniformly drawn
    parent j and a cut c uniform in [0, K): children ``[p_i[:c], p_j[c:]]`` and ``[p_j[:c], p_i[c:]]``.
    """
    m, k = parents.shape
    chosen = (torch.rand(m, generator=generator) < rate).nonzero().flatten()  # (C,)
    partners = torch.randint(0, m, (len(chosen),), generator=generator)
    cuts = torch.randint(0, k, (len(chosen),), generator=generator)
    head = torch.arange(k)[None, :] < cuts[:, None]  # (C, K): positions before the cut
    a, b = parents[chosen], parents[partners]
    children = torch.cat([torch.where(head, a, b), torch.where(head, b, a)])  # (2C, K)
    fresh = torch.cat([torch.zeros(m, dtype=torch.bool), torch.ones(len(children), dtype=torch.bool)])
    return torch.cat([parents, children]), fresh


def mutate(population: torch.Tensor, rate: float, vocabulary: torch.Tensor,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mutated copy of ``population`` (N, K), which rows were mutated (N,) bool): each row, with
    probability ``rate``, gets one uniformly drawn position set to a uniformly drawn id of ``vocabulary``."""
    n, k = population.shape
    hit = torch.rand(n, generator=generator) < rate
    positions = torch.randint(0, k, (n,), generator=generator)
    values = vocabulary[torch.randint(0, len(vocabulary), (n,), generator=generator)]
    out = population.clone()
    rows = hit.nonzero().flatten()
    out[rows, positions[rows]] = values[rows]
    return out, hit


# --------------------------------------------------------------------------- the attack


def _score(text_encoder, tokenizer, tokens, scores, target) -> tuple[torch.Tensor, int]:
    """Fill the NaN entries of ``scores`` (N,) for ``tokens`` (N, K): (scores, number encoded).

    A candidate equal to one already scored (a kept parent, a child that copies one) takes its
    score; duplicates among the new ones are encoded once.
    """
    todo = scores.isnan()
    if not todo.any():
        return scores, 0
    unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)  # (U, K), (N,)
    known = torch.full((len(unique),), math.nan, dtype=torch.float64)
    known[inverse[~todo]] = scores[~todo]
    need = known.isnan()
    if need.any():
        known[need] = distances(text_encoder, tokenizer, unique[need], target)
    return known[inverse], int(need.sum())


def _evolve(text_encoder, tokenizer, target, settings: RingABellSettings, vocabulary, progress: bool):
    """The GA loop: (best tokens (K,), best distance, best distance of each generation, encodings)."""
    from engine.progress import progress_bar

    gen = torch.Generator().manual_seed(settings.seed)
    tokens = vocabulary[torch.randint(0, len(vocabulary), (settings.population, settings.length), generator=gen)]
    scores = torch.full((settings.population,), math.nan, dtype=torch.float64)
    best_tokens, best, history, encodings = tokens[0], math.inf, [], 0
    with progress_bar(total=settings.generations, progress=progress, desc="Ring-A-Bell", unit="gen") as bar:
        for step in range(settings.generations):
            scores, encoded = _score(text_encoder, tokenizer, tokens, scores, target)
            encodings += encoded
            tokens, scores = select(tokens, scores, settings.population // 2)
            history.append(float(scores[0]))
            if history[-1] < best:
                best_tokens, best = tokens[0].clone(), history[-1]
            bar.set_postfix(best=f"{best:.4g}", refresh=False)
            bar.update(1)
            if step < settings.generations - 1:  # the last generation is only scored
                tokens, fresh = crossover(tokens, settings.crossover, gen)
                scores = torch.cat([scores, torch.full((int(fresh.sum()),), math.nan, dtype=torch.float64)])
                tokens, hit = mutate(tokens, settings.mutation, vocabulary, gen)
                scores[hit] = math.nan
    return best_tokens, best, history, encodings


def ring_a_bell(text_encoder, tokenizer, target: torch.Tensor, settings: RingABellSettings,
                progress: bool = True) -> dict:
    """Search a hard prompt of ``settings.length`` tokens whose embedding is closest to ``target``
    (``target_embedding``; float (L, D) or (1, L, D)). Deterministic for a seed (on one device).

    Returns ``prompt`` (the decoded best candidate, what the official code reports), ``token_ids``
    (its K ids), ``distance`` (its squared distance to the target), ``history`` (the best distance
    of each generation; the first entry is the best of the random initial population), and what a
    user typing ``prompt`` gets: ``retokenized_ids`` (ids between the start and end tokens),
    ``retokenized_distance`` and ``retokenized_truncated`` (the text is over the encoder's length);
    ``encodings``: how many candidates the text encoder encoded.
    """
    if not isinstance(settings, RingABellSettings):
        raise ValueError(f"settings must be RingABellSettings, got {type(settings).__name__}")
    if settings.length > tokenizer.model_max_length - 2:
        raise ValueError(
            f"length {settings.length} does not fit the tokenizer's {tokenizer.model_max_length} positions"
        )
    target = _check_embedding("target", target, text_encoder, tokenizer)
    vocabulary = vocabulary_ids(text_encoder, tokenizer, settings.vocabulary)
    best_tokens, best, history, encodings = _evolve(text_encoder, tokenizer, target, settings, vocabulary, progress)
    prompt = tokenizer.decode(best_tokens.tolist())
    typed = tokenize(tokenizer, [prompt])  # (1, L)
    retyped = ((embed_ids(text_encoder, typed)[0] - target) ** 2).sum().item()
    ids = typed[0].tolist()
    end = ids.index(tokenizer.eos_token_id, 1) if tokenizer.eos_token_id in ids[1:] else len(ids)
    return {
        "prompt": prompt,
        "token_ids": best_tokens.tolist(),
        "distance": best,
        "history": history,
        "retokenized_ids": ids[1:end],
        "retokenized_distance": retyped,
        "retokenized_truncated": len(tokenizer(prompt).input_ids) > tokenizer.model_max_length,
        "encodings": encodings,
    }
