"""Loading Stable Diffusion checkpoints from local paths, offline, and encoding prompts.

Supported: a diffusers folder (model_index.json) of a StableDiffusionPipeline or
StableDiffusionXLPipeline; a single original-format `.safetensors` file together with `config=`, a
local diffusers folder of the same architecture (its configs, tokenizers and scheduler are used);
a toy world folder (its pipeline/ subfolder);
and, only with allow_pickle=True, pickled weights (a single .ckpt/.pt/.pth/.bin file, or a folder
whose components hold .bin files), read with torch.load(weights_only=True) so that no code in them
is run. Without allow_pickle a folder is read from its .safetensors files only, as diffusers does
by default.

Every loaded pipeline is checked before use (``check_pipeline``): safetensors files whole (not
truncated, a readable header), every weight finite, and the text encoders' width equal to the
UNet's cross-attention width. Each failure is a one-line error naming the file or tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from engine.tokenizer import MAX_LENGTH, check_tokenizer

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2")
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
# A toy world folder (engine.toyworld.world) holds its diffusers pipeline in a subfolder.
WORLD_FILE, WORLD_PIPELINE = "world.json", "pipeline"


# --------------------------------------------------------------------------- loading


def _pipeline_class_of(folder: Path, what: str):
    """The diffusers pipeline class a folder's model_index.json names; only SD and SDXL are accepted."""
    import diffusers

    index = folder / "model_index.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder} is not a folder")
    if not index.is_file():
        raise FileNotFoundError(
            f"{what} {folder} has no model_index.json: it is not a diffusers pipeline folder "
            "(pass the folder that holds model_index.json, unet/, text_encoder/, ...)"
        )
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {index}: {err}") from err
    if name not in PIPELINE_CLASSES:
        raise ValueError(
            f"{index} names pipeline class {name!r}; only {' and '.join(PIPELINE_CLASSES)} are supported"
        )
    return getattr(diffusers, name)


def _dtype_kwargs(torch_dtype) -> dict:
    # diffusers renamed torch_dtype= to dtype= (and warns on the old name); older releases in our
    # supported range only know torch_dtype=. _resolve_dtype arrived with the rename.
    import diffusers.utils

    return {"dtype" if hasattr(diffusers.utils, "_resolve_dtype") else "torch_dtype": torch_dtype}


def _sd_only_kwargs(cls) -> dict:
    # SD pipelines ship a safety checker (and its image processor) that an erasure engine never
    # runs; SDXL pipelines have neither argument.
    if cls.__name__ == "StableDiffusionPipeline":
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


def check_safetensors_file(path: Path) -> None:
    """Refuse a truncated .safetensors file or one with a malformed header, by its size and header
    alone (nothing is read but the header)."""
    size = path.stat().st_size
    problem = None
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            problem = f"its header is {'missing' if n < 0 else 'malformed'} ({size} bytes in all)"
        else:
            try:
                header = json.loads(f.read(n))
                end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
            except (ValueError, KeyError, TypeError, IndexError) as err:
                problem = f"its header is not valid ({type(err).__name__}: {str(err)[:100]})"
            else:
                if 8 + n + end != size:
                    problem = f"it is {size} bytes long but its header describes {8 + n + end} (truncated?)"
    if problem:
        raise ValueError(f"{path} is not a usable .safetensors file: {problem}; re-download or re-save it")


def _check_folder_files(folder: Path, allow_pickle: bool) -> None:
    """A diffusers folder: every .safetensors file whole; pickled weights only with allow_pickle
    (a component without .safetensors weights would otherwise be unpickled by diffusers)."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [p for p in sub.iterdir() if p.is_file()]
        for f in files:
            if f.suffix.lower() == ".safetensors":
                check_safetensors_file(f)
        pickled = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickled and not allow_pickle and not any(f.suffix.lower() == ".safetensors" for f in files):
            raise ValueError(
                f"{pickled[0]} is pickled weights, which can run code when loaded; refusing it. Convert the "
                "folder to .safetensors (save_pretrained(..., safe_serialization=True)); if you trust it pass "
                "allow_pickle=True (CLI: --allow-pickle), it is then read with torch.load(weights_only=True)"
            )


def _load_pickled_state_dict(path: Path) -> dict:
    """A pickled checkpoint's tensors, unpickled with weights_only=True (no code runs)."""
    try:
        # mmap avoids a second copy of a multi-GB file; only the zip format supports it.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:
        raise ValueError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(err).__name__}: {err}); "
            "it may hold arbitrary Python objects: convert it to .safetensors with a trusted tool"
        ) from err
    # Original LDM checkpoints nest the weights under "state_dict" (sometimes more than once).
    while isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _from_single_file(cls, path: Path, config: Path, torch_dtype, state_dict: dict | None):
    """cls.from_single_file(path, config=config), offline; state_dict replaces reading `path`."""
    kwargs = dict(config=str(config), local_files_only=True, **_dtype_kwargs(torch_dtype), **_sd_only_kwargs(cls))
    if state_dict is None:
        return cls.from_single_file(str(path), **kwargs)
    # The pipeline-level from_single_file only takes a file path and would unpickle it itself; we
    # have already read it safely, so hand diffusers that dict instead of letting it open the file.
    from unittest import mock

    from diffusers.loaders import single_file

    if not hasattr(single_file, "load_single_file_checkpoint"):
        raise RuntimeError("this diffusers version has no single_file.load_single_file_checkpoint to load a .ckpt")
    with mock.patch.object(single_file, "load_single_file_checkpoint", lambda *a, **k: state_dict):
        return cls.from_single_file(str(path), **kwargs)


def pipeline_folder(path: str | os.PathLike) -> Path:
    """The diffusers folder that ``path`` stands for: a toy world folder (``world.json`` and
    ``pipeline/model_index.json``, no ``model_index.json`` of its own) stands for its ``pipeline/``;
    any other path for itself."""
    path = Path(path)
    if (path.is_dir() and not (path / "model_index.json").is_file() and (path / WORLD_FILE).is_file()
            and (path / WORLD_PIPELINE / "model_index.json").is_file()):
        return path / WORLD_PIPELINE
    return path


def load_pipeline(
    path: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a Stable Diffusion (SD1/SD2) or SDXL pipeline from a local path, without the hub.

    path: a diffusers folder (with model_index.json), a toy world folder (its pipeline/ is loaded,
    see ``pipeline_folder``), or a single original-format checkpoint file
    (`.safetensors`; `.ckpt`/`.pt`/`.pth`/`.bin` only with allow_pickle=True). A single file needs
    config: a local diffusers folder of the same architecture, whose model_index.json decides SD vs
    SDXL and whose component configs, tokenizers and scheduler are used (ignored for a folder).
    Every tokenizer is checked to hold the full CLIP vocabulary. Returns the pipeline on `device`.
    """
    path = pipeline_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")

    if path.is_dir():
        cls = _pipeline_class_of(path, "model folder")
        _check_folder_files(path, allow_pickle)
        with _load_errors(path):
            pipe = cls.from_pretrained(
                str(path), local_files_only=True, use_safetensors=None if allow_pickle else True,
                **_dtype_kwargs(torch_dtype), **_sd_only_kwargs(cls),
            )
        components_from = path
    else:
        components_from = Path(config) if config is not None else None
        pipe = _load_single_file(path, components_from, allow_pickle, torch_dtype)

    for name in TOKENIZER_NAMES:
        tok = getattr(pipe, name, None)
        if tok is not None:
            check_tokenizer(tok, str(components_from / name))
    pipe = pipe.to(device)
    check_pipeline(pipe, str(path))
    return pipe


def _load_single_file(path: Path, components_from: Path | None, allow_pickle: bool, torch_dtype: torch.dtype):
    """A single original-format checkpoint, with the configs and tokenizers of ``components_from``."""
    suffix = path.suffix.lower()
    pickled = suffix in PICKLE_SUFFIXES
    if suffix != ".safetensors" and not pickled:
        raise ValueError(
            f"unknown model file type {path.name!r}: expected a diffusers folder, a .safetensors file "
            f"or (with allow_pickle=True) one of {', '.join(PICKLE_SUFFIXES)}"
        )
    if pickled and not allow_pickle:
        raise ValueError(
            f"{path} is a pickled checkpoint ({suffix}), which can run code when loaded; refusing it. "
            "Prefer a .safetensors file; if you trust this file pass allow_pickle=True "
            "(CLI: --allow-pickle); it is then read with torch.load(weights_only=True)"
        )
    if components_from is None:
        raise ValueError(
            f"loading the single file {path} offline needs config=: a local diffusers folder of the same "
            "architecture (with model_index.json), e.g. the diffusers release of the base model "
            "(CLI: --model-config DIR)"
        )
    cls = _pipeline_class_of(components_from, "config")  # before reading a multi-GB file
    if not pickled:
        check_safetensors_file(path)
    state_dict = _load_pickled_state_dict(path) if pickled else None
    with _load_errors(path):
        return _from_single_file(cls, path, components_from, torch_dtype, state_dict)


@contextmanager
def _load_errors(path: Path):
    """diffusers' and transformers' loading failures (a missing component, a bad config, a
    malformed file) as one ValueError naming the model."""
    from safetensors import SafetensorError

    try:
        from diffusers.loaders.single_file_utils import SingleFileComponentError
    except ImportError:  # older diffusers raise ValueError for a missing component
        SingleFileComponentError = ValueError
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, SafetensorError,
            SingleFileComponentError) as err:
        text = " ".join(str(err).split())
        raise ValueError(f"cannot load the model {path}: {type(err).__name__}: "
                         f"{text[:300] + ' ...' if len(text) > 300 else text}") from err


def _text_width(pipe) -> int:
    return sum(getattr(pipe, name).config.hidden_size for name in TEXT_ENCODER_NAMES if getattr(pipe, name, None))


def check_pipeline(pipe, where: str) -> None:
    """Refuse a pipeline whose text encoders do not fit its UNet, or whose weights hold NaN or
    inf (one reduction per tensor: see ``engine.export.non_finite``)."""
    from engine.export import non_finite

    width = pipe.unet.config.cross_attention_dim
    text = _text_width(pipe)
    widths = set(width) if isinstance(width, (list, tuple)) else {width}
    if widths != {text}:
        names = " + ".join(n for n in TEXT_ENCODER_NAMES if getattr(pipe, n, None))
        raise ValueError(f"the model {where} does not fit together: its {names} output {text} features, its UNet's "
                         f"cross-attention takes {width}; use the text encoder of the UNet's model")
    for name in ("unet", *TEXT_ENCODER_NAMES, "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        bad = non_finite(module.state_dict())
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise FloatingPointError(f"the model {where} has NaN or inf in {name} tensor {bad[0]}{more}: its weights "
                                     "are damaged; nothing was done")


def weights_fingerprint(pipe) -> str:
    """sha256 over the UNet's tensors and the text encoders' (``text_encoder_fingerprint``): the
    key of everything a fine-tuning run derives from the model (checkpoints, cached targets)."""
    from engine.export import tensors_fingerprint

    return hashlib.sha256((tensors_fingerprint(pipe.unet.state_dict()) + text_encoder_fingerprint(pipe)).encode()).hexdigest()


def pipeline_family(pipe) -> str:
    """'sdxl' for a pipeline with a second text encoder, else 'sd'."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def text_encoder_fingerprint(pipe) -> str:
    """sha256 over the text encoder(s)' tensors (names, shapes, dtypes, bytes) and tokenizer sizes.

    A cache key for anything derived from prompt embeddings: it changes when any text encoder
    weight or the vocabulary changes, and not when only the UNet does.
    """
    digest = hashlib.sha256()
    for name in TEXT_ENCODER_NAMES:
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue
        state = encoder.state_dict()
        for key in sorted(state):
            t = state[key].detach().cpu().contiguous()
            digest.update(f"{name}.{key}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for name in TOKENIZER_NAMES:
        tok = getattr(pipe, name, None)
        if tok is not None:
            digest.update(f"{name}:{len(tok)}".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- prompts


class PromptTooLongError(ValueError):
    """A prompt over the text encoder's 77 tokens; ``engine.api`` names the concept it came from."""

    def __init__(self, prompt: str, tokens: int):
        self.prompt, self.tokens = prompt, tokens
        shown = prompt if len(prompt) <= 120 else prompt[:100] + "..."
        super().__init__(f"prompt is {tokens} tokens long, over the {MAX_LENGTH}-token limit: {shown!r}")


def tokenize_prompts(tokenizer, prompts: list[str]) -> torch.Tensor:
    """input_ids (N, 77) int64, padded with the tokenizer's pad token; raises on a prompt over 77 tokens.

    A longer prompt would be truncated by the pipeline and lose its end-of-text token, so rows taken
    from it would not be the ones the model sees for the full text.
    """
    rows = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=False).input_ids
    for text, ids in zip(prompts, rows):
        if len(ids) > MAX_LENGTH:
            raise PromptTooLongError(text, len(ids))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(prompts), MAX_LENGTH)


def encode_prompts(
    pipe, prompts: list[str], *, batch_size: int = 64, progress: bool = False, min_positions: int = MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings float32 (N, L, D), float64 from a float64 encoder; input_ids int64 (N, L)) for
    `prompts`; L = 77 by default.

    The embeddings are exactly the pipeline's encoder_hidden_states for each prompt (SD1/SD2: the
    text encoder's last hidden state; SDXL: both encoders' penultimate hidden states concatenated),
    computed by the pipeline's own encode_prompt without classifier-free guidance, on the text
    encoder's device. input_ids (CPU) are `pipe.tokenizer`'s, padded to L.

    ``min_positions`` below 77 encodes only L = max(min_positions, the longest prompt through its
    end-of-text) positions. CLIP's text encoders are causal, so every position up to a prompt's
    end-of-text is the same as in the 77-token encoding (to float rounding); only the padding
    after it changes. Callers that need the rows up to end-of-text save most of the encoder's
    work that way: a short prompt's 77-token encoding is mostly padding.
    """
    hidden, _, ids = _encode(pipe, prompts, batch_size, progress, min_positions)
    return hidden, ids


def encode_sdxl_prompts(
    pipe, prompts: list[str], *, batch_size: int = 64, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: (embeddings as `encode_prompts`, pooled text embeddings float32 (N, P)), the pooled
    ones being what SDXL's UNet takes as `added_cond_kwargs["text_embeds"]`."""
    if pipeline_family(pipe) != "sdxl":
        raise ValueError("pooled text embeddings are an SDXL input; this pipeline is not SDXL")
    hidden, pooled, _ = _encode(pipe, prompts, batch_size, progress)
    return hidden, pooled


@contextmanager
def _padded_to(pipe, length: int):
    """While open, the pipeline's tokenizers pad (and encode_prompt encodes) `length` positions."""
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    saved = [t.model_max_length for t in tokenizers]
    for t in tokenizers:
        t.model_max_length = length
    try:
        yield
    finally:
        for t, n in zip(tokenizers, saved):
            t.model_max_length = n


def _encode(pipe, prompts, batch_size: int, progress: bool, min_positions: int = MAX_LENGTH):
    """(hidden states, pooled embeddings or None for SD1/SD2, input_ids): see `encode_prompts`."""
    from engine.progress import progress_bar

    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    prompts = list(prompts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sdxl = pipeline_family(pipe) == "sdxl"
    if not prompts:
        dim = pipe.unet.config.cross_attention_dim
        pooled = torch.empty(0, pipe.text_encoder_2.config.projection_dim) if sdxl else None
        return torch.empty(0, MAX_LENGTH, dim), pooled, torch.empty(0, MAX_LENGTH, dtype=torch.int64)
    if not 1 <= min_positions <= MAX_LENGTH:
        raise ValueError(f"min_positions must be in 1..{MAX_LENGTH}, got {min_positions}")
    # tokenizer_2 (SDXL) has the same vocabulary, so the same lengths: checking one is enough.
    ids = tokenize_prompts(pipe.tokenizer, prompts)
    longest = int(first_eot_positions(ids, pipe.tokenizer.eos_token_id).max()) + 1
    length = max(min_positions, longest)

    device = pipe.text_encoder.device
    hidden, pooled = [], []
    with torch.no_grad(), _padded_to(pipe, length):
        for lo in progress_bar(range(0, len(prompts), batch_size), desc="encode prompts", progress=progress, unit="batch"):
            batch = prompts[lo : lo + batch_size]
            if sdxl:
                out = pipe.encode_prompt(batch, device=device, do_classifier_free_guidance=False)
                pooled.append(_at_least_fp32(out[2]))
            else:
                out = pipe.encode_prompt(batch, device, 1, False)  # (prompt, device, per prompt, cfg)
            hidden.append(_at_least_fp32(out[0]))  # stays on the encoder's device: the editor's kernels run there
    return torch.cat(hidden), torch.cat(pooled) if sdxl else None, ids[:, :length]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 (an exact reference encoder) unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def first_eot_positions(input_ids: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """The first position of the end-of-text id in each row of input_ids (N, L), as int64 (N,)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (N, L), got shape {tuple(input_ids.shape)}")
    hit = input_ids == eot_token_id
    missing = (~hit.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"no end-of-text token {eot_token_id} in row(s) {missing[:10]} of input_ids")
    # argmax returns the first maximal index, i.e. the first hit.
    return hit.to(torch.int8).argmax(dim=1).to(torch.int64)
