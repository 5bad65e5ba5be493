"""Checkpoints and target caches of fine-tuning runs: safetensors and JSON, never a pickle.

Every ``checkpoint_every`` steps the trained tensors, the optimizer state, the RNG states and the
step are written into a folder per step (``stepNNNNNNNN/``) that ``latest`` names once it is
complete; a resumed run continues exactly as if it had not stopped. Checkpoints and caches carry
the run's signature (method, settings, concepts and the fingerprint of the model's weights) and
are refused, naming what differs, by a run with another one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from engine.concepts import ConceptSet
from engine.finetune.config import TrainConfig

LATEST_NAME = "latest"  # names the newest complete checkpoint folder (stepNNNNNNNN)
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
CACHE_NAME = "trajectories.safetensors"
CHECKPOINT_FORMAT = "erasure-engine/checkpoint-v3"  # v3: settings per method (engine/methods)
OLDER_FORMATS = ("erasure-engine/checkpoint-v2",)
LEGACY_NAMES = ("checkpoint.pt", "trajectories.pt")  # pickles of older versions: never loaded


def _encode(obj, tensors: dict[str, torch.Tensor]):
    """A JSON-able form of nested dicts / lists / tuples / numbers / strings / tensors (an
    optimizer's state_dict, RNG states); tensors go into ``tensors`` and are named in the JSON."""
    if isinstance(obj, torch.Tensor):
        name = f"state.{len(tensors)}"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name}
    if isinstance(obj, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_encode(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint cannot hold a {type(obj).__name__}")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if not isinstance(obj, dict):
        return obj
    (kind, value), = obj.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    items = [_decode(v, tensors) for v in value]
    return tuple(items) if kind == "tuple" else items


def save_checkpoint(folder: Path, step: int, trained: dict, opt, rng_state: dict, signature: dict) -> None:
    """Write the step's folder completely, then point ``latest`` at it, then drop older ones."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tag = f"step{step:08d}"
    tensors = {f"trained.{k}": p.detach().to("cpu", copy=True).contiguous() for k, p in trained.items()}
    state = {"format": CHECKPOINT_FORMAT, "step": step, "signature": signature, "trained": list(trained),
             "optimizer": _encode(opt.state_dict(), tensors), "rng": _encode(rng_state, tensors)}
    tmp = folder / f".{tag}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(state))
    shutil.rmtree(folder / tag, ignore_errors=True)
    os.replace(tmp, folder / tag)
    (folder / (LATEST_NAME + ".tmp")).write_text(tag)
    os.replace(folder / (LATEST_NAME + ".tmp"), folder / LATEST_NAME)
    for old in [*folder.glob("step*"), *folder.glob(".step*.tmp-*")]:  # the folder is this run's (locked)
        if old.name != tag and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def run_signature(method: str, cfg: TrainConfig, concepts: ConceptSet, model: str, **extra) -> dict:
    """What a checkpoint or cache must match to be used: method, settings (but progress and
    checkpoint cadence), concepts, the fingerprint of the model's weights (``model``; see
    ``engine.models.weights_fingerprint``) and ``extra``. In its JSON form, as stored."""
    from engine.export import sha256_file

    config = {k: v for k, v in cfg.to_dict().items() if k not in ("progress", "checkpoint_every")}
    ip_adapter = getattr(cfg, "ip_adapter", None)  # the image-branch methods: the adapter file is an input
    if ip_adapter is not None and Path(ip_adapter).is_file():
        extra["ip_adapter_sha256"] = sha256_file(ip_adapter)
    signature = {"method": method, "config": config, "concepts": concepts.to_dict(), "model": model, **extra}
    return json.loads(json.dumps(signature))


def restore_checkpoint(state: dict, trained: dict[str, torch.nn.Parameter], opt) -> int:
    """Load a checkpoint's trained tensors and optimizer state; returns its step."""
    with torch.no_grad():
        for k, p in trained.items():
            p.copy_(state["trained"][k].to(p.device, p.dtype))
    opt.load_state_dict(state["optimizer"])
    return state["step"]


def checkpoint_due(cfg: TrainConfig, done: int) -> bool:
    """Whether a run with a checkpoint folder writes a checkpoint after ``done`` steps (every
    ``checkpoint_every``, and the last)."""
    return bool(cfg.checkpoint_every) and (done % cfg.checkpoint_every == 0 or done == cfg.iterations)




def check_signature(what: str, found, signature: dict) -> None:
    """Refuse a checkpoint or cache of another run, naming what differs."""
    if found == signature:
        return
    if not isinstance(found, dict):
        raise ValueError(f"{what} carries no run signature; use another checkpoint folder or drop --resume")
    changed = []
    if isinstance(found.get("config"), dict) and set(found["config"]) != set(signature["config"]):
        changed.append("settings layout (written by another version of the engine)")
    for key in signature:
        if key == "config" and isinstance(found.get(key), dict):
            fields = [k for k in signature[key] if found[key].get(k) != signature[key][k]]
            changed += [f"setting {k} ({found[key].get(k)!r} there, {signature[key][k]!r} now)" for k in fields]
        elif found.get(key) != signature[key]:
            changed.append({"model": "model weights", "concepts": "concepts"}.get(key, key))
    raise ValueError(f"{what} belongs to another run (different {', '.join(changed) or 'signature'}); "
                     "use another checkpoint folder or drop --resume")


def refuse_legacy(folder: Path) -> None:
    """Refuse a checkpoint folder holding an older version's pickles: unpickling can run code."""
    old = [name for name in LEGACY_NAMES if (folder / name).exists()]
    if old:
        raise ValueError(f"{folder} holds {' and '.join(old)}, a checkpoint in the old pickle format, which is never "
                         "loaded (unpickling a file can run code); delete it and start without --resume")


def load_checkpoint(folder: Path, signature: dict) -> dict | None:
    """The last complete checkpoint in ``folder`` (tensors via safetensors, the rest JSON), after
    checking it belongs to this run; None if there is none."""
    from engine.export import read_safetensors

    refuse_legacy(folder)
    latest = folder / LATEST_NAME
    if not latest.is_file():
        return None
    where = folder / latest.read_text().strip()
    try:
        state = json.loads((where / STATE_JSON).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"the checkpoint {where} is unreadable ({err}); delete {folder} or drop --resume") from None
    if isinstance(state, dict) and state.get("format") in OLDER_FORMATS:
        raise ValueError(f"the checkpoint {where} was written by an earlier version of the engine "
                         f"({state['format']}), whose settings are laid out differently; it cannot be resumed: "
                         f"delete {folder} or drop --resume")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where / STATE_JSON} is not an erasure-engine checkpoint ({CHECKPOINT_FORMAT})")
    check_signature(f"the checkpoint in {folder}", state.get("signature"), signature)
    tensors, _ = read_safetensors(where / STATE_TENSORS, "checkpoint tensors")
    state["trained"] = {k: tensors[f"trained.{k}"] for k in state["trained"]}
    state["optimizer"] = _decode(state["optimizer"], tensors)
    state["rng"] = _decode(state["rng"], tensors)
    return state


def save_cache(folder: Path, cache: dict, signature: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CACHE_NAME}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in cache.items()}, str(tmp), metadata={"signature": json.dumps(signature)})
    os.replace(tmp, folder / CACHE_NAME)


def load_cache(folder: Path, signature: dict) -> dict | None:
    """The targets cached by an earlier start of this run (refused if it was another run's)."""
    from engine.export import read_safetensors

    if not (folder / CACHE_NAME).is_file():
        return None
    cache, meta = read_safetensors(folder / CACHE_NAME, "target cache")
    try:
        found = json.loads(meta.get("signature", "null"))
    except ValueError:
        found = None
    check_signature(f"the target cache {folder / CACHE_NAME}", found, signature)
    return cache




def checkpoint_lock(checkpoint_dir, cfg: TrainConfig):
    """One run at a time per checkpoint folder: its lock, held by the process that writes it
    (rank 0 of a distributed run; the launcher sets RANK before the process group exists)."""
    from engine.export import output_lock

    if checkpoint_dir is None or (cfg.distributed != "none" and os.environ.get("RANK", "0") != "0"):
        return contextlib.nullcontext()
    return output_lock(checkpoint_dir)


def checkpoint_signature(pipe, method: str, cfg: TrainConfig, concepts: ConceptSet, folder: Path | None,
                         model_fingerprint: str | None, **extra) -> dict | None:
    """The run signature of a run that checkpoints into ``folder`` (None without one)."""
    from engine.models import weights_fingerprint

    if folder is None:
        return None
    return run_signature(method, cfg, concepts, model_fingerprint or weights_fingerprint(pipe), **extra)

