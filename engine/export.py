"""Writing results: the delta file, an optional LoRA, the manifest, all atomically.

An output folder holds

    model_index.json, unet/, text_encoder/, ...   the edited pipeline (diffusers format)
    delta.safetensors                             only the changed tensors (of the UNet, or of the
                                                  component its "component" metadata names), new values
    lora/pytorch_lora_weights.safetensors         optional; `pipe.load_lora_weights(OUT / "lora")`
    manifest.json                                 what was run, on what, with which versions

It is written into a hidden temporary sibling folder (``.OUT.tmp-<pid>-<random>``) and renamed
into place at the end, so an interrupted run leaves either the complete folder or nothing. The
output path is locked (``fcntl.flock`` on ``.OUT.lock`` beside it) from ``reserve_output`` (before
any work) until the rename: a second run on the same path is refused at once, and an existing
folder is only ever replaced with ``overwrite=True``. Temporary folders left by a killed process
are removed by the next run on that path.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import sys
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.progress import progress_bar

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


def cache_root() -> Path:
    """Where the engine keeps caches that only save time: $ERASURE_CACHE or ~/.cache/erasure-engine."""
    return Path(os.environ.get("ERASURE_CACHE", Path.home() / ".cache" / "erasure-engine"))


# Weight files are hashed for the manifest on every run (4 GB for SD1.5: seconds). Their hashes
# are remembered under the file's identity (device, inode, size, modification time in ns): a
# rewrite or an edit in place changes the time, a hard link (an output sharing the model's
# files) keeps it. Small files are hashed every time.
HASH_CACHE_NAME = "file-sha256.json"
HASH_CACHE_MIN_BYTES = 1 << 24
HASH_CACHE_ENTRIES = 10_000


def file_identity(st: os.stat_result) -> str:
    """A file's identity for caches: device, inode, size, modification time in ns."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _read_hash_cache(path: Path) -> dict[str, str]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, str)} if isinstance(cache, dict) else {}


def _write_hash_cache(path: Path, cache: dict[str, str]) -> None:
    try:  # a cache only saves time: an unwritable one is left alone
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(dict(list(cache.items())[-HASH_CACHE_ENTRIES:])))
        os.replace(tmp, path)
    except OSError:
        pass


def sha256_tree(root: str | os.PathLike, desc: str = "sha256", progress: bool = True) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by its relative path (a progress bar past 256 MB);
    the hashes of large files are remembered across runs (see HASH_CACHE_NAME)."""
    root = Path(root)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    cache_file = cache_root() / HASH_CACHE_NAME
    cache = _read_hash_cache(cache_file)
    stats = {p: p.stat() for p in files}
    identity = {p: file_identity(st) for p, st in stats.items() if st.st_size >= HASH_CACHE_MIN_BYTES}
    total = sum(st.st_size for p, st in stats.items() if identity.get(p) not in cache)
    hashes, added = {}, False
    with progress_bar(total=total, unit="B", unit_scale=True, desc=desc, progress=progress and total >= 1 << 28) as bar:
        for p in files:
            key = identity.get(p)
            if key is not None and key in cache:
                hashes[str(p.relative_to(root))] = cache[key]
                continue
            hashes[str(p.relative_to(root))] = digest = sha256_file(p, bar=bar)
            if key is not None:
                cache[key], added = digest, True
    if added:
        _write_hash_cache(cache_file, cache)
    return hashes


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


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of the tensors holding a NaN or an inf. One sum per tensor, in float32 at least
    (NaN and inf propagate through it; a float64 sum of float32 values costs 100 times more on a
    CPU), stacked per device so that a GPU is synchronised once; a tensor whose sum is not finite
    is then checked element-wise, so a sum that overflowed on huge finite values is not taken for
    an inf."""
    by_device: dict[torch.device, list[str]] = {}
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append(key)
    bad = []
    for keys in by_device.values():
        sums = torch.stack([tensors[k].detach().sum(dtype=torch.promote_types(tensors[k].dtype, torch.float32))
                            .double() for k in keys])
        finite = torch.isfinite(sums).cpu().tolist()
        bad += [k for k, ok in zip(keys, finite) if not ok and not bool(torch.isfinite(tensors[k]).all())]
    return bad


def check_finite(tensors: dict[str, torch.Tensor], what: str, consequence: str = "nothing written") -> None:
    bad = non_finite(tensors)
    if bad:
        raise FloatingPointError(f"{what} contains NaN or inf in {len(bad)} tensor(s), e.g. {bad[0]}; {consequence}")


# --------------------------------------------------------------------------- delta


DELTA_COMPONENTS = ("unet", "text_encoder")  # the pipeline components a delta may change


def save_delta(path: str | os.PathLike, changed: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
               component: str = "unet") -> None:
    """Write the edited tensors of the pipeline's ``component`` (state-dict keys) with the
    fingerprint of the weights they replace and their own."""
    if component not in DELTA_COMPONENTS:
        raise ValueError(f"a delta changes one of {DELTA_COMPONENTS}, not {component!r}")
    check_finite(changed, "delta")
    # copy=True: the edited matrices may be views of one stacked buffer, which safetensors refuses.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in changed.items()}
    meta = {"format": DELTA_FORMAT, "component": component, "base_fingerprint": tensors_fingerprint(original),
            "delta_fingerprint": tensors_fingerprint(tensors)}
    save_file(tensors, str(path), metadata=meta)


# A delta changes weights by a fraction of their size; one that changes a tensor by more than this
# many times its norm (or zeroes it) is damaged or hostile, whatever its checksum says.
MAX_RELATIVE_CHANGE = 100.0


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; a truncated or malformed file is a ValueError
    that names it (safetensors' own error is not)."""
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{what} {path} is not a readable .safetensors file (truncated or corrupt?): {err}") from None


def delta_target(pipe, component: str, path) -> tuple[dict[str, torch.nn.Parameter], str]:
    """The parameters of the pipeline component a delta changes, and its name for messages."""
    if component not in DELTA_COMPONENTS or not isinstance(getattr(pipe, component, None), torch.nn.Module):
        raise ValueError(f"{path}: the delta changes the pipeline's {component!r}, which this model does not have")
    return dict(getattr(pipe, component).named_parameters()), "UNet" if component == "unet" else "text encoder"


def apply_delta(pipe, path: str | os.PathLike, force: bool = False) -> dict[str, torch.Tensor]:
    """Copy a delta's tensors into `pipe.unet` (or the component its metadata names, e.g.
    `pipe.text_encoder`). Everything is checked before any write: keys and
    shapes, finite values, the delta's own checksum, the sha256 that a manifest.json beside it
    lists for it, that it was made from these base weights, and that no tensor is zeroed or
    changed by more than MAX_RELATIVE_CHANGE times its norm. ``force=True`` applies a delta made
    for other base weights, without a checksum, or with an implausible change, with a warning
    for each; a checksum that does not match is always refused (the file is not what was written).

    Returns the replaced (original) tensors.
    """
    path = Path(path)
    delta, meta = read_safetensors(path, "delta file")
    if meta.get("format") != DELTA_FORMAT:
        raise ValueError(f"{path}: not an erasure-engine delta (format {meta.get('format')!r})")

    def refuse(problem: str) -> None:
        if not force:
            raise ValueError(f"{path}: {problem}; refusing to apply it (--force / force=True applies it anyway)")
        warnings.warn(f"{path}: {problem}; applying it anyway because of --force", RuntimeWarning, stacklevel=3)

    manifest = path.parent / MANIFEST_NAME
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text()).get("outputs", {}).get(path.name)
        except (ValueError, AttributeError):
            listed = None
        if listed is not None and listed != sha256_file(path):
            raise ValueError(f"{path}: its sha256 differs from the one {manifest} lists: the file was changed "
                             "after it was written; refusing it")
    if "delta_fingerprint" not in meta:
        refuse("the delta has no checksum (delta_fingerprint) to verify it by")
    elif tensors_fingerprint(delta) != meta["delta_fingerprint"]:
        raise ValueError(f"{path}: the tensors do not match the checksum stored with them: the file was changed "
                         "or damaged after it was written; refusing it")
    params, where = delta_target(pipe, meta.get("component", "unet"), path)
    for key, value in delta.items():
        if key not in params:
            raise ValueError(f"{path}: tensor {key!r} does not exist in this model's {where}")
        if tuple(params[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}, the model's is {tuple(params[key].shape)}")
    check_finite(delta, str(path), "nothing applied")
    original = {k: params[k].detach().clone() for k in delta}
    if tensors_fingerprint(original) != meta.get("base_fingerprint"):
        refuse("it was made from different base weights than this model's (fingerprint mismatch)")
    for key, value in delta.items():
        before, after = original[key].detach().cpu().double(), value.double()
        norm = float(before.norm())
        if norm > 0 and float(after.norm()) == 0:
            refuse(f"tensor {key!r} would be zeroed")
            break
        if norm > 0 and float((after - before).norm()) > MAX_RELATIVE_CHANGE * norm:
            refuse(f"tensor {key!r} would change by {float((after - before).norm()) / norm:.3g} times its norm")
            break
    with torch.no_grad():
        for key, value in delta.items():
            params[key].copy_(value.to(params[key].dtype))
    return original


# --------------------------------------------------------------------------- LoRA


def lora_from_delta(
    changed: dict[str, torch.Tensor], original: dict[str, torch.Tensor], rank: int | None = None,
    prefix: str = "unet",
) -> tuple[dict[str, torch.Tensor], dict]:
    """LoRA factors B A = W' - W per changed linear weight, in diffusers' PEFT key format
    (``prefix``: the pipeline component the weights belong to, "unet" or "text_encoder").

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
        module = f"{prefix}." + key.removesuffix(".weight")
        dtype = changed[key].dtype
        state[f"{module}.lora_A.weight"] = A.to(dtype).contiguous()
        state[f"{module}.lora_B.weight"] = B.to(dtype).contiguous()
    check_finite(state, "LoRA")
    return state, {"rank": rank, "max_relative_residual": worst, "layers": len(changed)}


# --------------------------------------------------------------------------- atomic folder


_HELD: dict[Path, int] = {}  # output paths this process has locked -> nesting depth


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Remove the temporary folders of `out` whose process is gone (a run killed while saving).
    Called with the lock held, so no live run is writing any of them."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(.+)")
    for tmp in out.parent.iterdir():
        match = pattern.fullmatch(tmp.name)
        if not match or not tmp.is_dir():
            continue
        owner = match.group(2).split("-")[0]
        if owner.isdigit() and (int(owner) == os.getpid() or _pid_running(int(owner))):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        who = f"process {owner}, no longer running" if owner.isdigit() else "an interrupted run"
        print(f"erasure: removed {tmp}, a temporary folder left by {who}", file=sys.stderr)


def check_writable_parent(out: str | os.PathLike) -> None:
    """Check that the output path `out` can be created: its nearest existing ancestor is a folder
    in which a folder can be made (nothing is left behind). A read-only destination is found
    before any work, not after."""
    out = Path(os.path.abspath(out))
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        probe = parent / f".{out.name}.probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise PermissionError(f"cannot write the output {out}: {err.strerror} in {parent}; "
                              "choose an --out in a folder you can write to") from None


@contextmanager
def output_lock(out_dir: str | os.PathLike):
    """Hold an exclusive lock on the output path `out_dir` (``.OUT.lock`` beside it) while open;
    re-entrant within a process. Refuses at once (FileExistsError) if another process holds it.
    On entry, temporary folders of `out_dir` left by killed processes are removed."""
    out = Path(os.path.abspath(out_dir))
    if out in _HELD:
        _HELD[out] += 1
        try:
            yield
        finally:
            _HELD[out] -= 1
        return
    check_writable_parent(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise FileExistsError(f"{out} is being written by another run (process {owner}; lock {lock}); "
                                  "wait for it to finish or choose another --out") from None
        try:  # the previous holder may have removed the file between our open and our lock
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[out] = 1
    try:
        _remove_stale_temporaries(out)
        yield
    finally:
        del _HELD[out]
        try:
            os.unlink(lock)  # while still locked: a waiting run then sees a new inode and retries
        except OSError:
            pass
        os.close(fd)


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder is not empty: {out} (choose another --out, or remove it)")


@contextmanager
def reserve_output(out_dir: str | os.PathLike, overwrite: bool = False):
    """Lock the output path and check it can be written (absent or empty unless `overwrite`, in
    a writable folder) BEFORE any work; the `atomic_output_dir` opened inside reuses the lock."""
    with output_lock(out_dir):
        _check_target(Path(out_dir), overwrite)
        yield


def temporary_sibling(out_dir: str | os.PathLike) -> Path:
    """A new name for a temporary folder of the output ``out_dir``, beside it (one file system, so
    it can be renamed into place) and named so that a later run removes it if this process dies."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder that becomes `out_dir` only if the block finishes. The path is
    locked meanwhile; an existing folder is replaced only with `overwrite=True`."""
    out = Path(out_dir)
    with output_lock(out):
        _check_target(out, overwrite)
        # mkdir (not mkdtemp, which makes it 0700): the output's mode follows the umask.
        tmp = temporary_sibling(out)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _move_into_place(tmp, out, overwrite)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)  # replaces an empty folder at most; a non-empty one makes it fail
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        kept = out.parent / f"{out.name}.unsaved-{os.getpid()}"
        os.rename(tmp, kept)
        raise FileExistsError(f"{out} was filled by something else while this run worked; it was left as it is "
                              f"and this run's result is in {kept}") from None


PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def pipeline_entries(root: Path) -> set[str] | None:
    """The top-level names a diffusers folder's pipeline consists of: model_index.json and the
    component folders it lists (None if it has no readable model_index.json). Anything else in the
    folder (notes, earlier outputs, other files) is not part of the pipeline."""
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict):
        return None
    return {"model_index.json"} | {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}


def shareable_source(model_path: str | os.PathLike | None, changed: str = "unet") -> Path | None:
    """The local diffusers folder ``model_path`` if a saved pipeline can take its unchanged files
    as they are: it has a model_index.json and no pickled weights in its other components (those
    would need allow_pickle to load again). None otherwise (a single file, a pipeline in memory)."""
    if model_path is None:
        return None
    root = Path(model_path)
    entries = pipeline_entries(root)
    if entries is None:
        return None
    for name in entries - {changed}:
        files = [root / name] if (root / name).is_file() else (root / name).rglob("*")
        if any(path.suffix in PICKLED_SUFFIXES for path in files):
            return None
    return root


def link_tree(source: str | os.PathLike, dest: str | os.PathLike, skip: set[str]) -> dict[str, int]:
    """Hard-link the pipeline's files under ``source`` (model_index.json and its components'
    folders; ``pipeline_entries``) into ``dest`` at the same relative paths (a symbolic link, as in
    a hub cache, links its target), copying where a link cannot be made (another file system);
    top-level names in ``skip`` are left out. Returns the counts linked and copied."""
    source, dest = Path(source), Path(dest)
    entries = (pipeline_entries(source) or set()) - set(skip)
    counts = {"linked": 0, "copied": 0}
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if rel.parts[0] not in entries or not path.is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
            counts["linked"] += 1
        except OSError:
            shutil.copy2(path, target)
            counts["copied"] += 1
    return counts


def write_json(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
