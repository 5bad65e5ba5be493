"""Saving an edited UNet without writing it again: copy the source's weight file while the edit
runs, then overwrite the changed tensors' bytes in place.

A closed-form edit changes about 1% of the UNet (its cross-attention K/V matrices), yet writing
the whole file (3.4 GB for SD1.5) took most of an end-to-end run on a CPU machine. When the model
came from a local diffusers folder whose UNet is a single safetensors file, ``StagedUnet`` copies
that file in a background thread (disk work, done while the text encoder computes) into a
temporary folder beside the output; ``finish`` then writes the changed tensors at their offsets,
reads them back, and moves the file into the output. It only does so when the file holds exactly
the model's tensors in the model's dtypes and shapes and was not modified during the run;
otherwise it reports that it cannot, and the caller writes the UNet in full.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from engine.export import file_identity, shareable_source, temporary_sibling

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CHUNK_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(offset of the data section, {name: (dtype, shape, begin, end)}) of a safetensors file.
    Every entry is checked against the file's size, so a hostile header cannot point a write
    outside the file. ValueError if the file is not a well-formed safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path}: header length {length} does not fit the file")
        try:
            header = json.loads(f.read(length))
        except ValueError as err:
            raise ValueError(f"{path}: unreadable header ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    start, data_size, entries = 8 + length, size - 8 - length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: malformed header entry {name!r}") from None
        if not all(isinstance(v, int) and v >= 0 for v in (begin, end, *shape)) or not begin <= end <= data_size:
            raise ValueError(f"{path}: header entry {name!r} points outside the file")
        entries[name] = (dtype, shape, begin, end)
    return start, entries


class StagedUnet:
    """A background copy of ``source_unet/diffusion_pytorch_model.safetensors`` into ``folder``
    (which this object owns and removes unless ``finish`` moved the file out of it)."""

    def __init__(self, source_unet: str | os.PathLike, folder: str | os.PathLike):
        self.source = Path(source_unet) / WEIGHTS_NAME
        self.folder = Path(folder)
        self.copy = self.folder / WEIGHTS_NAME
        self._source_stat = file_identity(os.stat(self.source))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._copy, name="unet-copy", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        try:
            with open(self.source, "rb") as src, open(self.copy, "wb") as dst:
                left = os.fstat(src.fileno()).st_size
                while left and not self._stop.is_set():
                    try:  # kernel-side copy; a plain read/write where the file system refuses it
                        n = os.copy_file_range(src.fileno(), dst.fileno(), min(CHUNK_BYTES, left))
                    except OSError:
                        n = dst.write(src.read(min(CHUNK_BYTES, left)))
                    if n == 0:
                        raise OSError(f"{self.source} shrank while it was copied")
                    left -= n
        except BaseException as err:  # reported by finish(); a thread must not die silently
            self._error = err

    def cancel(self) -> None:
        """Stop the copy and remove the temporary folder (after a failed or interrupted run)."""
        self._stop.set()
        self._thread.join()
        shutil.rmtree(self.folder, ignore_errors=True)

    def finish(self, unet, changed: dict[str, torch.Tensor], dest: str | os.PathLike) -> str | None:
        """Write ``unet`` into the folder ``dest`` as the copy with ``changed`` patched in. Returns
        None when done, else why it could not (``dest`` is then untouched)."""
        self._thread.join()
        if self._error is not None:
            return f"the copy failed ({self._error})"
        if file_identity(os.stat(self.source)) != self._source_stat:
            return f"{self.source} changed during the run"
        try:
            start, entries = read_header(self.copy)
        except (OSError, ValueError) as err:
            return str(err)
        state = unet.state_dict()
        problem = _mismatch(entries, state, changed)
        if problem:
            return problem
        with open(self.copy, "r+b") as f:
            for name, value in changed.items():
                data = value.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
                _, _, begin, end = entries[name]
                f.seek(start + begin)
                f.write(data)
        with safe_open(str(self.copy), framework="pt") as f:  # read back what was written
            wrong = [name for name, value in changed.items() if not torch.equal(f.get_tensor(name), value.detach().cpu())]
        if wrong:
            return f"tensor {wrong[0]} reads back different from what was written"
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        os.rename(self.copy, dest / WEIGHTS_NAME)
        unet.save_config(dest)
        shutil.rmtree(self.folder, ignore_errors=True)
        return None


def _mismatch(entries: dict, state: dict[str, torch.Tensor], changed: dict[str, torch.Tensor]) -> str | None:
    """Why the file cannot stand for ``state`` with ``changed`` written in (None if it can)."""
    if set(entries) != set(state):
        extra = sorted(set(entries) ^ set(state))
        return f"the file and the model hold different tensors (e.g. {extra[0]})"
    for name, tensor in state.items():
        dtype, shape, begin, end = entries[name]
        if SAFETENSORS_DTYPES.get(tensor.dtype) != dtype or shape != tuple(tensor.shape):
            return f"tensor {name} is {dtype} {list(shape)} in the file, {tensor.dtype} {list(tensor.shape)} in the model"
        if end - begin != tensor.numel() * tensor.element_size():
            return f"tensor {name}'s byte range does not match its shape"
    for name, value in changed.items():
        if name not in state:
            return f"changed tensor {name} is not in the UNet"
        if value.dtype != state[name].dtype or value.shape != state[name].shape:
            return f"changed tensor {name} is {value.dtype} {list(value.shape)}, the model's is {state[name].dtype}"
    return None


@contextmanager
def staged_unet(model_path: str | os.PathLike | None, out_dir: str | os.PathLike):
    """Start copying the UNet of the local diffusers folder ``model_path`` into a temporary folder
    beside ``out_dir`` (call with the output locked); yields the StagedUnet, or None where the
    model is not such a folder or its UNet is not one safetensors file. The copy is cancelled
    and removed on leaving unless ``finish`` used it."""
    from engine.models import pipeline_folder

    source = shareable_source(pipeline_folder(model_path)) if model_path is not None else None
    unet = source / "unet" if source is not None else None
    if unet is None or not (unet / WEIGHTS_NAME).is_file() or any(unet.glob("*.index.json")):
        yield None
        return
    folder = temporary_sibling(out_dir)
    folder.mkdir()
    staged = StagedUnet(unet, folder)
    try:
        yield staged
    finally:
        staged.cancel()
