"""The genuine CLIP BPE tokenizer, built offline from the vocabulary shipped in open_clip_torch.

Stable Diffusion's tokenizers are OpenAI CLIP's: 49,408 tokens made of the 256 byte characters,
the same with `</w>`, the 48,894 BPE merges and the two special tokens. open_clip_torch ships the
merge list (`bpe_simple_vocab_16e6.txt.gz`), so we can rebuild the exact vocabulary without the
hub. open_clip itself is never imported: it needs torchvision, which we do not depend on.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Number of merges OpenAI CLIP uses: the file has more lines; CLIP keeps 49152 - 256 - 2 of them.
N_MERGES = 49152 - 256 - 2
INSTALL_HINT = "pip install --no-deps open_clip_torch"


def clip_bpe_path() -> Path:
    """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed open_clip package.

    Found through the import system's spec, without importing open_clip (whose import pulls in
    torchvision).
    """
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / BPE_FILE
        if path.is_file():
            return path
    where = ", ".join(locations) if locations else "open_clip is not installed"
    raise FileNotFoundError(
        f"the CLIP BPE vocabulary {BPE_FILE} was not found ({where}); it ships with open_clip_torch: {INSTALL_HINT}"
    )


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode character table (GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) exactly as OpenAI CLIP's simple tokenizer builds them."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(merges) != N_MERGES:
        raise ValueError(
            f"{clip_bpe_path()} gives {len(vocab)} tokens and {len(merges)} merges, "
            f"expected {VOCAB_SIZE} and {N_MERGES}; reinstall it: {INSTALL_HINT}"
        )
    return vocab, merges


def write_vocab_files(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (the files of a CLIP tokenizer on the hub) into out_dir."""
    vocab, merges = clip_vocab_and_merges()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def check_tokenizer(tok, where: str) -> None:
    """Raise if `tok` is not a full CLIP tokenizer (a broken load gives a few tokens silently)."""
    n = len(tok)
    if n != VOCAB_SIZE:
        raise ValueError(
            f"tokenizer from {where} has {n} tokens, expected the CLIP vocabulary's {VOCAB_SIZE}; "
            "its vocab.json/merges.txt are missing or were not read (with transformers 5, build CLIPTokenizer "
            "with vocab=/merges= or from_pretrained on a folder, not vocab_file=/merges_file=)"
        )


def build_clip_tokenizer(pad_token: str = EOS):
    """A transformers CLIPTokenizer with the genuine CLIP vocabulary, model_max_length 77.

    SD1 pads with `<|endoftext|>`; SD2 and SDXL's second tokenizer pad with `!`.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary")
    # vocab=/merges= (not vocab_file=/merges_file=, which transformers 5 ignores -> a 2-token tokenizer).
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)
    check_tokenizer(tok, "build_clip_tokenizer")
    return tok
