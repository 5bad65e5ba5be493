"""What a closed-form edit keeps when the user lists nothing to keep.

A closed-form edit changes K/V along every direction its erased rows span. CLIP embeddings
share large common components (the start token, template words, the end-of-text), so an edit
with nothing to preserve moves every prompt, not only the erased ones. Four sources of
preservation rows need no input from the user:

* the empty prompt, every one of its 77 positions: the unconditional branch of classifier-free
  guidance sees it at every sampling step;
* a shipped set of generic captions (``engine/data/generic_captions.txt``: everyday scenes,
  people named by generic words, objects, animals, art media), less those that name an erased
  concept;
* the model's own vocabulary (``vocabulary_words``): its most frequent trained words, each a
  one-word prompt, so words that no caption uses are kept too;
* the neighbours of each erased multi-word name (``name_neighbours``): the name with one word
  replaced by the same word of another erased name, or by one of its nearest whole-word tokens
  in the text encoder's token-embedding table (e.g. another first name). They share a word with
  the erased name, which is where a name-level edit does collateral damage. Single-word
  concepts get none: their nearest words are often synonyms (skull -> skeleton), which an
  erasure should not keep.

``shared_prefixes``: CLIP's text encoders are causal, so the row at position p of a prompt
depends only on its tokens 0..p. An edit row whose token prefix is also a preserved prompt's
(the first name of "Alice Smith" when "Alice Jones" is kept) is the same vector as a
preserved row: asking to change and to keep it at once does neither. Presets that skip such
rows (``skip_shared_rows``) erase through the rows that have seen the whole name.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch

from engine.concepts import Concept, ConceptSet

GENERIC_CAPTIONS = Path(__file__).parent / "data" / "generic_captions.txt"
WORD_SUFFIX = "</w>"  # CLIP BPE marks the last piece of a word
VOCABULARY_WORDS = 2000  # the most frequent trained words preserved as one-word prompts


@lru_cache(maxsize=1)
def generic_captions() -> tuple[str, ...]:
    """The shipped generic captions, one per line."""
    lines = GENERIC_CAPTIONS.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def naming_erased(captions, concepts: ConceptSet) -> tuple[list[str], list[str]]:
    """(kept, left out): captions that contain an erased concept's name as whole words are left out."""
    names = [" ".join(_words(c.name)) for c in concepts.concepts]
    kept, dropped = [], []
    for caption in captions:
        text = f" {' '.join(_words(caption))} "
        (dropped if any(n and f" {n} " in text for n in names) else kept).append(caption)
    return kept, dropped


def _word_table(tokenizer) -> tuple[list[int], list[str]]:
    """Ids and text of the vocabulary's whole alphabetic words (no pieces, digits or symbols)."""
    ids, words = [], []
    for token, idx in tokenizer.get_vocab().items():
        if token.endswith(WORD_SUFFIX) and token[: -len(WORD_SUFFIX)].isalpha() and len(token) > len(WORD_SUFFIX) + 1:
            ids.append(idx)
            words.append(token[: -len(WORD_SUFFIX)])
    return ids, words


def _word_vector(tokenizer, table: torch.Tensor, word: str) -> torch.Tensor:
    """A word's input embedding: the mean of its BPE pieces' rows (zero for an untrained word)."""
    piece_ids = tokenizer(word.lower(), add_special_tokens=False).input_ids
    return table[piece_ids].mean(0) if piece_ids else torch.zeros(table.shape[1])


def name_neighbours(pipe, concepts: ConceptSet, k: int) -> dict[str, list[str]]:
    """For each erased name of two or more words: up to ``k`` names per word position, the word at
    that position replaced by

    1. the word at the same position of another erased name with as many words (first names and
       last names recombined: "Ann Lee" and "Bo Park" give "Bo Lee" and "Ann Park", other people
       who share a name with an erased one), nearest first;
    2. then its nearest whole-word tokens in the vocabulary that no erased name uses.

    Nearness is the cosine similarity of the first text encoder's input token embeddings; zero
    rows (words a model never trained) are never chosen. Names that are erased or already
    preserved are skipped."""
    if k <= 0:
        return {}
    tokenizer = pipe.tokenizer
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float().cpu()  # (V, D)
    ids, words = _word_table(tokenizer)
    candidates = table[ids]
    norms = candidates.norm(dim=1)
    erased_words = {w for c in concepts.concepts for w in _words(c.name)}
    taken = {" ".join(_words(c.name)) for c in (*concepts.concepts, *concepts.preserve_concepts)}
    usable = torch.tensor([w not in erased_words for w in words]) & (norms > 1e-6 * norms.max())
    unit = candidates / norms.clamp_min(1e-12)[:, None]
    split = [c.name.split() for c in concepts.concepts]

    def cosine(a, b):
        return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-12))

    out: dict[str, list[str]] = {}
    for concept, parts in zip(concepts.concepts, split):
        if len(parts) < 2:
            continue
        found = []
        for i, part in enumerate(parts):
            query = _word_vector(tokenizer, table, part)
            if float(query.norm()) == 0.0:
                continue  # a word the model never trained: it has no neighbours
            others = {o[i] for o in split if len(o) == len(parts) and o[i].lower() != part.lower()}
            ranked = sorted(others, key=lambda w: -cosine(query, _word_vector(tokenizer, table, w)))
            score = (unit @ (query / query.norm())).masked_fill(~usable, -2.0)
            ranked += [words[j] for j in score.topk(min(len(words), 4 * k + 8)).indices.tolist() if score[j] > -2.0]
            added = 0
            for word in ranked:
                if added == k:
                    break
                name = " ".join(parts[:i] + [word] + parts[i + 1 :])
                key = " ".join(_words(name))
                if key not in taken:
                    taken.add(key)
                    found.append(name)
                    added += 1
        if found:
            out[concept.name] = found
    return out


def neighbour_concepts(neighbours: dict[str, list[str]], concepts: ConceptSet) -> list[Concept]:
    """The neighbour names as preserved concepts, with the templates of the concept they neighbour."""
    by_name = {c.name: c for c in concepts.concepts}
    return [Concept(name=n, templates=by_name[c].templates) for c, names in neighbours.items() for n in names]


def shared_prefixes(preserved_ids: list[tuple[list[int], list[int]]]) -> set[tuple[int, ...]]:
    """The token prefixes (through each preserved position) of preserved prompts:
    preserved_ids is [(input ids, preserved positions)]."""
    return {tuple(ids[: p + 1]) for ids, positions in preserved_ids for p in positions}


def vocabulary_words(pipe, concepts: ConceptSet, limit: int) -> list[str]:
    """The ``limit`` most frequent whole words of the vocabulary that the model trained (non-zero
    input embeddings) and no erased name uses; CLIP's BPE numbers tokens in merge order, so a
    lower id is a more frequent word."""
    if limit <= 0:
        return []
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float().cpu()
    ids, words = _word_table(pipe.tokenizer)
    norms = table[ids].norm(dim=1)
    erased_words = {w for c in concepts.concepts for w in _words(c.name)}
    order = sorted(range(len(ids)), key=ids.__getitem__)
    floor = 1e-6 * float(norms.max())
    return [words[i] for i in order if norms[i] > floor and words[i] not in erased_words][:limit]
