"""The shipped toy world: where its files are, checking them, and loading its parts.

A world folder (``erasure toyworld build --out DIR`` writes one; the package ships the default
world under ``engine/toyworld/assets`` and the v2 world under ``assets_v2``) holds:

* ``pipeline/``: a diffusers ``StableDiffusionPipeline`` (VAE, CLIP text encoder with the genuine
  CLIP BPE tokenizer, UNet, scheduler) plus its ``image_encoder`` (CLIP vision tower) and
  ``feature_extractor``, for the IP-Adapter;
* ``ip_adapter/ip_adapter.safetensors``: loadable with ``pipe.load_ip_adapter``;
* ``clip/projection.safetensors``: the CLIP text projection and logit scale, which with the
  pipeline's text encoder and image encoder give the CLIP alignment score;
* ``evaluator/``: the render-trained classifier (``engine.toyworld.evaluator``);
* ``world.json``: seed, build settings, versions, measured quality gates and the sha256 of
  every file above; ``README.md``: the model card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "assets_v2"  # the default world (v2)
# Every world the package ships, by the name `erasure toyworld build --world` gives its kind: a
# ``--world`` / ``path`` argument may name one instead of a folder. v1 (128 identities, text
# width 96) is smaller and faster: some tests use it.
SHIPPED_WORLDS = {"v1": Path(__file__).resolve().parent / "assets", "v2": SHIPPED}
WORLD_FILE = "world.json"
IP_ADAPTER_WEIGHTS = "ip_adapter.safetensors"


def world_path(path: str | os.PathLike | None = None) -> Path:
    """The world folder: ``path`` if given, else ``$ERASURE_TOYWORLD``, else the shipped default.
    Either may also name a shipped world (``SHIPPED_WORLDS``: "v1", "v2") where no folder of
    that name exists.

    Raises FileNotFoundError naming the folder when it holds no ``world.json``.
    """
    chosen = path if path is not None else os.environ.get("ERASURE_TOYWORLD") or SHIPPED
    root = Path(chosen)
    if str(chosen) in SHIPPED_WORLDS and not root.exists():
        root = SHIPPED_WORLDS[str(chosen)]
    if not (root / WORLD_FILE).is_file():
        raise FileNotFoundError(
            f"no toy world at {root} (missing {WORLD_FILE}); rebuild it with "
            "`erasure toyworld build --out DIR` and pass DIR, or reinstall the package"
        )
    _select_catalogue(root)
    return root


def _select_catalogue(root: Path) -> None:
    """Make ``catalogue`` the one this world learned (its identity count, from world.json)."""
    from engine.toyworld import catalogue as cat

    config = json.loads((root / WORLD_FILE).read_text()).get("config") or {}
    cat.set_identity_count(int(config.get("identities", cat.V1_IDENTITIES)))


def world_name(path: str | os.PathLike | None = None) -> str:
    """How a record names the world: its shipped name ("v1", "v2") or its folder, so results
    measured on two worlds are never merged or compared by mistake."""
    root = world_path(path).resolve()
    return next((name for name, folder in SHIPPED_WORLDS.items() if folder.resolve() == root), str(root))


def world_info(path: str | os.PathLike | None = None) -> dict:
    """The world's ``world.json`` (settings, gates, file hashes)."""
    return json.loads((world_path(path) / WORLD_FILE).read_text())


def verify_world(path: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Check every file listed in ``world.json`` against its sha256; raise ValueError naming the
    first missing or corrupted file. Returns the world folder."""
    from engine.export import sha256_file

    root = world_path(path)
    expected = world_info(root)["files"]
    for rel, digest in expected.items():
        f = root / rel
        if not f.is_file():
            raise ValueError(f"toy world {root} is missing {rel}; rebuild it with `erasure toyworld build`")
        if sha256_file(f) != digest:
            raise ValueError(f"toy world file {f} is corrupted (sha256 mismatch); rebuild or reinstall")
    return root


def pipeline_path(path: str | os.PathLike | None = None) -> Path:
    """The world's diffusers pipeline folder (``StableDiffusionPipeline.from_pretrained`` loads it)."""
    return world_path(path) / "pipeline"


def load_toy_pipeline(path: str | os.PathLike | None = None, ip_adapter: bool = False, device: str = "cpu"):
    """The world's ``StableDiffusionPipeline`` (fp32 whatever the stored precision, safety checker off, progress bar off);
    with ``ip_adapter=True`` the IP-Adapter is loaded too (``pipe(..., ip_adapter_image=...)``)."""
    import torch
    from diffusers import StableDiffusionPipeline

    root = world_path(path)
    pipe = StableDiffusionPipeline.from_pretrained(root / "pipeline", torch_dtype=torch.float32,
                                                   use_safetensors=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    if ip_adapter:
        load_toy_ip_adapter(pipe, root)
    return pipe


def load_toy_ip_adapter(pipe, path: str | os.PathLike | None = None, scale: float = 1.0):
    """Load the world's IP-Adapter into ``pipe`` (any pipeline with the world's UNet)."""
    root = world_path(path)
    pipe.load_ip_adapter(str(root / "ip_adapter"), subfolder="", weight_name=IP_ADAPTER_WEIGHTS)
    pipe.set_ip_adapter_scale(scale)
    return pipe


def load_toy_evaluator(path: str | os.PathLike | None = None):
    """The world's render-trained classifier (``engine.toyworld.evaluator.ToyEvaluator``)."""
    from engine.toyworld.evaluator import ToyEvaluator

    return ToyEvaluator.load(world_path(path) / "evaluator")
