"""The offline CLIP tokenizer: genuine vocabulary, ids, round trip, and the broken-load guard."""

import gzip
import importlib.util
import json

import pytest
import regex
from transformers import CLIPTokenizer

from engine import tokenizer as tk
from engine.tokenizer import build_clip_tokenizer, check_tokenizer, clip_bpe_path, clip_vocab_and_merges


@pytest.fixture(scope="module")
def tok():
    return build_clip_tokenizer()


def test_bpe_file_found_without_importing_open_clip():
    path = clip_bpe_path()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.is_file()
    with gzip.open(path) as f:
        assert f.readline().startswith(b"\"bpe_simple_vocab_16e6.txt#version: 0.2")


def test_missing_open_clip_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open_clip_torch"):
        tk.clip_bpe_path()


def test_vocabulary_layout():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    chars = list(tk.bytes_to_unicode().values())
    ordered = sorted(vocab, key=vocab.get)
    assert ordered[:256] == chars
    assert ordered[256:512] == [c + "</w>" for c in chars]
    assert ordered[512] == "".join(merges[0])
    assert ordered[-2:] == ["<|startoftext|>", "<|endoftext|>"]


def test_known_ids(tok):
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    padded = tok("a photo of", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[5:] == [49407] * 72


def test_bang_padding_for_sd2_and_sdxl():
    tok = build_clip_tokenizer(pad_token="!")
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    ids = tok("a photo of", padding="max_length", max_length=77).input_ids
    assert ids[:5] == [49406, 320, 1125, 539, 49407] and ids[5:] == [0] * 72


def _reference_bpe_ids(text: str) -> list[int]:
    """OpenAI CLIP's SimpleTokenizer.encode, for plain ASCII text (where ftfy cleaning is a no-op)."""
    vocab, merges = clip_vocab_and_merges()
    ranks = {m: i for i, m in enumerate(merges)}
    byte_enc = tk.bytes_to_unicode()
    pat = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    ids = [vocab["<|startoftext|>"]]
    for token in pat.findall(" ".join(text.split()).lower()):
        word = tuple("".join(byte_enc[b] for b in token.encode("utf-8")))
        word = word[:-1] + (word[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        ids.extend(vocab[w] for w in word)
    return ids + [vocab["<|endoftext|>"]]


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat",
        "A Portrait of Barack Obama, oil on canvas!!",
        "Van Gogh's starry night in 1889 -- 4k, hdr",
        "an astronaut riding a horse on mars, trending on artstation",
    ],
)
def test_matches_openai_bpe(tok, text):
    assert tok(text).input_ids == _reference_bpe_ids(text)


def test_round_trip_through_save_pretrained(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    back = CLIPTokenizer.from_pretrained(tmp_path)
    check_tokenizer(back, str(tmp_path))
    assert back.model_max_length == 77 and back.pad_token == tok.pad_token
    text = "a photo of Marilyn Monroe"
    assert back(text).input_ids == tok(text).input_ids


def test_vocab_files_load_as_a_folder(tmp_path):
    vocab_path, merges_path = tk.write_vocab_files(tmp_path)
    assert merges_path.read_text().splitlines()[0] == "#version: 0.2"
    assert len(merges_path.read_text().splitlines()) == 1 + 48894
    assert len(json.loads(vocab_path.read_text())) == 49408
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    check_tokenizer(loaded, str(tmp_path))
    assert loaded("a photo of").input_ids == [49406, 320, 1125, 539, 49407]


def test_check_tokenizer_catches_broken_load(tmp_path):
    # Without vocab/merges transformers 5 quietly builds a tokenizer of just the special tokens.
    with pytest.raises(ValueError, match="somewhere/tokenizer.*49408"):
        check_tokenizer(CLIPTokenizer(), "somewhere/tokenizer")
    # The transformers-4 spelling vocab_file=/merges_file= is ignored by transformers 5 the same way.
    vocab_path, merges_path = tk.write_vocab_files(tmp_path)
    legacy = CLIPTokenizer(vocab_file=str(vocab_path), merges_file=str(merges_path))
    if len(legacy) != 49408:
        with pytest.raises(ValueError, match="legacy"):
            check_tokenizer(legacy, "legacy")


def test_unknown_pad_token():
    with pytest.raises(ValueError, match="pad_token"):
        build_clip_tokenizer(pad_token="<pad>")
