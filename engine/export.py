"""Writing results: the delta file, an optional LoRA, the manifest, all atomically.

An output folder holds

    model_index.json, unet/, text_encoder/, ...   the edited pipeline (diffusers format)
    delta.safetensors                             only the changed UNet tensors, new values
    lora/pytorch_lora_weights.safetensors         optional; `pipe.load_lora_weights(OUT / "lora")`
    manifest.json                                 what was run, on what, with which versions

It is written into a hidden temporary sibling folder and renamed into place at the end, so an
interrupted run leaves either the complete folder or nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

DELTA_NAME = "delta.safetensors"
LORA_DIR = "lora"
LORA_NAME = "pytorch_lora_weights.safetensors"
MANIFEST_NAME = "manifest.json"
DELTA_FORMAT = "erasure-engine/delta-v1"


def file_slug(text: str, fallback: str = "unnamed") -> str:
    """A file-name-safe form of ``text``: lower-case letters, digits and dashes, at most 60 characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.casefold()).strip("-")[:60] or fallback


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22, bar=None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
    return digest.hexdigest()


def sha256_tree(root: str | os.PathLike, desc: str = "sha256", progress: bool = True) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by its relative path (a progress bar past 256 MB)."""
    root = Path(root)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress or total < 1 << 28) as bar:
        return {str(p.relative_to(root)): sha256_file(p, bar=bar) for p in files}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("erasure-engine", "torch", "triton", "diffusers", "transformers", "safetensors", "peft"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"{what} contains NaN or inf in {len(bad)} tensor(s), e.g. {bad[0]}; nothing written")


# --------------------------------------------------------------------------- delta


def save_delta(path: str | os.PathLike, changed: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    """Write the edited tensors with the fingerprint of the weights they replace."""
    check_finite(changed, "delta")
    meta = {"format": DELTA_FORMAT, "component": "unet", "base_fingerprint": tensors_fingerprint(original)}
    # copy=True: the edited matrices may be views of one stacked buffer, which safetensors refuses.
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in changed.items()}, str(path), metadata=meta)


def apply_delta(pipe, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Copy a delta's tensors into `pipe.unet`. Every key and shape is checked before any write.

    Returns the replaced (original) tensors. Warns when the base weights differ from those the
    delta was made from: the edit is then applied to a different model than it was solved for.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"delta file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != DELTA_FORMAT:
            raise ValueError(f"{path}: not an erasure-engine delta (format {meta.get('format')!r})")
        delta = {k: f.get_tensor(k) for k in f.keys()}
    params = dict(pipe.unet.named_parameters())
    for key, value in delta.items():
        if key not in params:
            raise ValueError(f"{path}: tensor {key!r} does not exist in this model's UNet")
        if tuple(params[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}, the model's is {tuple(params[key].shape)}")
    check_finite(delta, str(path))
    original = {k: params[k].detach().clone() for k in delta}
    if tensors_fingerprint(original) != meta.get("base_fingerprint"):
        warnings.warn(f"{path} was made from different base weights; applying it anyway", RuntimeWarning, stacklevel=2)
    with torch.no_grad():
        for key, value in delta.items():
            params[key].copy_(value.to(params[key].dtype))
    return original


# --------------------------------------------------------------------------- LoRA


def lora_from_delta(
    changed: dict[str, torch.Tensor], original: dict[str, torch.Tensor], rank: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """LoRA factors B A = W' - W per changed linear weight, in diffusers' PEFT key format.

    The closed-form update W (T - I) has rank at most the number of edited rows, so with
    `rank=None` the numerical rank is used and the LoRA is exact; a smaller `rank` keeps the
    leading singular directions and reports the relative residual ||dW - B A|| / ||dW||.
    """
    svds = {}
    for key, new in changed.items():
        dW = new.double() - original[key].double()
        U, s, Vh = torch.linalg.svd(dW, full_matrices=False)
        svds[key] = (U, s, Vh)
    if rank is None:
        tol = lambda s: s.max() * max(s.shape) * torch.finfo(torch.float32).eps  # noqa: E731
        rank = max(1, max(int((s > tol(s)).sum()) for _, s, _ in svds.values()))
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    state, worst = {}, 0.0
    for key, (U, s, Vh) in svds.items():
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        B = U[:, :r] * root  # (out, r)
        A = root[:, None] * Vh[:r]  # (r, in)
        if r < rank:  # keep one rank for every layer: pad with zero directions
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1)
            A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], 0)
        total = s.square().sum()
        resid = float((s[r:].square().sum() / total).sqrt()) if total > 0 else 0.0
        worst = max(worst, resid)
        module = "unet." + key.removesuffix(".weight")
        dtype = changed[key].dtype
        state[f"{module}.lora_A.weight"] = A.to(dtype).contiguous()
        state[f"{module}.lora_B.weight"] = B.to(dtype).contiguous()
    check_finite(state, "LoRA")
    return state, {"rank": rank, "max_relative_residual": worst, "layers": len(changed)}


# --------------------------------------------------------------------------- atomic folder


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder that becomes `out_dir` only if the block finishes."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder is not empty: {out} (choose another --out, or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_json(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
