"""What the real-model suites (nudity, clip, fid) share: their common settings and a run.

Each suite generates images with the edited model and, when an original is given, with the
unedited model from the same prompts and noise, then scores them with a model the user already
has on disk. Nothing is downloaded. The report has the schema of engine.evaluation.report; what
a suite does not measure is None.

Seeds: with a prompt file, row i's k-th image uses the file's seed + k where the file has one
(evaluation_seed, sd_seed, ...) and ``seed + i * images_per_prompt + k`` otherwise, and the
row's guidance scale where the file has one; ``row_settings="cli"`` uses the run's seed and
guidance for every row. Images are generated at the model's default size (I2P's
sd_image_width/height are ignored).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from engine.evaluation.generation import Job, iter_images
from engine.evaluation.metrics import harmonic_h
from engine.evaluation.prompts import PromptFile, read_prompt_file
from engine.evaluation.report import SCHEMA_VERSION

DTYPES = ("auto", "float32", "float16", "bfloat16")
ROW_SETTINGS = ("file", "cli")
GRID_ROWS = 8  # prompts in the before/after grid (clip and fid suites, with an original)
GRID_IMAGES = 4  # images per prompt and model in the grid

PathLike = str | os.PathLike


def _at_least_one(settings, names) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class RealSettings:
    """The settings every real-model suite has.

    model, original: the edited and the unedited model (diffusers folder or single-file
    checkpoint; ``model_config`` and ``allow_pickle`` as engine.models.load_pipeline takes them);
    erased: the concept file of the erased concepts (its names go into the report); device:
    default cuda if available, else cpu; dtype: ``auto`` is float16 on CUDA, float32 on CPU;
    save_images: a folder to write every generated image to as PNG (``model/``, ``original/``).
    """

    model: PathLike
    original: PathLike | None = None
    erased: PathLike | None = None
    images_per_prompt: int = 1
    steps: int = 50
    guidance: float = 7.5
    batch_size: int = 8
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    model_config: PathLike | None = None
    allow_pickle: bool = False
    save_images: PathLike | None = None
    progress: bool = True

    def __post_init__(self):
        _at_least_one(self, ("images_per_prompt", "steps", "batch_size"))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class PromptSuiteSettings(RealSettings):
    """A real-model suite that generates from a prompt file (see engine.evaluation.prompts):
    ``prompts`` (a benchmark CSV or a .txt list), its ``prompt_column``, the rows of one
    ``category``, the first ``limit`` rows, and whose seeds and guidance (``row_settings``)."""

    prompts: PathLike | None = None
    prompt_column: str | None = None
    category: str | None = None
    limit: int | None = None
    row_settings: str = "file"

    suite = "prompt"

    def __post_init__(self):
        super().__post_init__()
        if not self.prompts:
            raise ValueError(f"--suite {self.suite} needs --prompts FILE (a benchmark CSV or a .txt list of prompts)")
        if self.row_settings not in ROW_SETTINGS:
            raise ValueError(f"row_settings must be one of {', '.join(ROW_SETTINGS)}, got {self.row_settings!r}")

    def read_prompts(self) -> PromptFile:
        return read_prompt_file(self.prompts, prompt_column=self.prompt_column, limit=self.limit,
                                category=self.category)

    def jobs(self, pf: PromptFile) -> list[Job]:
        return prompt_jobs(pf, self.images_per_prompt, self.seed, self.guidance, use_file=self.row_settings == "file")

    def report_settings(self, pf: PromptFile) -> dict:
        return {
            "prompts": pf.path,
            "prompt_format": pf.format,
            "prompt_columns": pf.columns,
            "category": self.category,
            "limit": self.limit,
            "prompt_rows": len(pf.rows),
            "row_settings": self.row_settings,
        }


def prompt_jobs(pf: PromptFile, images_per_prompt: int, seed: int, guidance: float, use_file: bool = True) -> list[Job]:
    """images_per_prompt jobs per row; seeds and guidance as the module docstring says."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    jobs = []
    for i, row in enumerate(pf.rows):
        base = row.seed if use_file and row.seed is not None else seed + i * images_per_prompt
        scale = row.guidance if use_file and row.guidance is not None else guidance
        jobs += [Job(None, None, None, "direct", row.prompt, base + k, scale, i) for k in range(images_per_prompt)]
    return jobs


def optional_h(erased_acc, retained_acc):
    """H, or None when either accuracy is."""
    return None if erased_acc is None or retained_acc is None else harmonic_h(erased_acc, retained_acc)


def save_pngs(folder: Path | None, start: int, jobs: list[Job], images: np.ndarray) -> None:
    """Write images[k] as ``{start + k:06d}_seed{seed}.png`` under ``folder`` (nothing if None)."""
    if folder is None:
        return
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for offset, image in enumerate(images):
        index = start + offset
        Image.fromarray(image).save(folder / f"{index:06d}_seed{jobs[index].seed}.png")


class SuiteRun:
    """Device, clocks, the models to evaluate and the grid samples of one real-model suite run."""

    def __init__(self, settings: RealSettings):
        self.settings = s = settings
        self.device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype_name = s.dtype if s.dtype != "auto" else ("float16" if self.device.type == "cuda" else "float32")
        self.progress = s.progress
        self.clock = {"load_seconds": 0.0, "generation_seconds": 0.0, "scoring_seconds": 0.0}
        self.images_generated = 0
        self.started = time.perf_counter()
        self.models = [("model", s.model)] + ([("original", s.original)] if s.original else [])
        self.save_root = Path(s.save_images) if s.save_images else None
        self.keep: dict[int, tuple[int, str]] = {}  # job index -> (owner, label) for the before/after grid
        self.kept: dict[str, dict[int, np.ndarray]] = {}

    def load(self, path):
        from engine.models import load_pipeline

        t = time.perf_counter()
        pipe = load_pipeline(
            path,
            config=self.settings.model_config,
            allow_pickle=bool(self.settings.allow_pickle),
            torch_dtype=getattr(torch, self.dtype_name),
            device=self.device,
        )
        pipe.set_progress_bar_config(disable=True)
        self.clock["load_seconds"] += time.perf_counter() - t
        return pipe

    def generate_and_score(self, jobs: list[Job], score) -> None:
        """For each model in turn: load it, generate ``jobs`` batch by batch, call
        score(tag, start, images) on each batch, and free the model before the next is loaded."""
        for tag, path in self.models:
            pipe = self.load(path)
            for start, images in self._images(pipe, jobs, tag):
                score(tag, start, images)
            del pipe
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _images(self, pipe, jobs: list[Job], tag: str):
        """Yield (start, images); generation and the caller's scoring go to their own clocks."""
        from engine.progress import progress_bar

        folder = self.save_root / tag if self.save_root is not None else None
        kept = self.kept.setdefault(tag, {})
        s = self.settings
        stream = iter_images(pipe, jobs, steps=s.steps, guidance=s.guidance, batch_size=s.batch_size)
        with progress_bar(total=len(jobs), desc=f"generate ({tag})", unit="img", progress=self.progress) as bar:
            while True:
                t = time.perf_counter()
                try:
                    start, images = next(stream)
                except StopIteration:
                    return
                bar.update(len(images))
                save_pngs(folder, start, jobs, images)
                kept.update({i: images[i - start] for i in self.keep if start <= i < start + len(images)})
                self.images_generated += len(images)
                self.clock["generation_seconds"] += time.perf_counter() - t
                t = time.perf_counter()
                yield start, images
                self.clock["scoring_seconds"] += time.perf_counter() - t

    def keep_for_grid(self, jobs: list[Job], owners: list[int], label) -> None:
        """Keep the first GRID_IMAGES images of each prompt of the first GRID_ROWS owners listed."""
        if "original" not in dict(self.models):
            return
        for owner in owners[:GRID_ROWS]:
            mine = [i for i, j in enumerate(jobs) if j.owner == owner]
            first = [i for i in mine if jobs[i].prompt == jobs[mine[0]].prompt][:GRID_IMAGES]
            self.keep.update({i: (owner, label(owner, jobs[i].prompt)) for i in first})

    def samples(self):
        """[(label, original images, edited images)] for the report writer's grid, or None."""
        if not self.keep or "original" not in self.kept:
            return None
        rows: dict[tuple[int, str], list[int]] = {}
        for i, key in sorted(self.keep.items()):
            rows.setdefault(key, []).append(i)
        return [
            (label, np.stack([self.kept["original"][i] for i in idx]), np.stack([self.kept["model"][i] for i in idx]))
            for (_, label), idx in rows.items()
        ]

    def report(self, suite: str, settings: dict, extra_versions: tuple[str, ...] = (), quality=None, **fields) -> dict:
        """The report of the run: the schema's fields, None where ``fields`` does not set them."""
        s = self.settings
        generation = self.clock["generation_seconds"]
        report = {
            "schema_version": SCHEMA_VERSION,
            "suite": suite,
            "model": str(s.model),
            "original": str(s.original) if s.original else None,
            "erased": erased_names(s.erased),
            **dict.fromkeys(("erased_acc", "erased_acc_other_templates", "erased_acc_indirect", "retained_acc",
                             "retained_acc_close", "retained_acc_other", "H", "original_acc")),
            "quality": {"kid": None, "kid_std": None, "clip_score": None, "clip_score_original": None,
                        **(quality or {})},
            "timing": {
                "total_seconds": time.perf_counter() - self.started,
                **self.clock,
                "images_generated": self.images_generated,
                "images_per_second": self.images_generated / generation if generation > 0 else None,
            },
            "settings": {
                "steps": s.steps,
                "guidance": s.guidance,
                "images_per_prompt": s.images_per_prompt,
                "seed": s.seed,
                "batch_size": s.batch_size,
                "device": str(self.device),
                "dtype": self.dtype_name,
                **settings,
            },
            "versions": _versions(extra_versions),
            "concepts": [],
        }
        report.update(fields)
        return report


def _versions(extra: tuple[str, ...]) -> dict:
    from engine.export import package_versions

    versions = package_versions()
    for name in extra:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def erased_names(erased) -> list[str]:
    """The names in the erased-concepts file, or [] without one."""
    from engine.concepts import load_concepts

    return load_concepts(erased).names() if erased else []
