"""The clip suite: zero-shot concept accuracy of an edited model's images with a local CLIP.

Images of every erased concept (the ``erased`` concept file) and retained concept (the
``retained`` file, or the erased file's preserve.concepts) are generated from the concept's
templates (or ``eval_templates``) and classified among all concept names plus the
``anchor_classes``, each class embedded with an ensemble of ``clip_templates`` prompts. A
concept's accuracy is the % of its images classified as itself; erased_acc and retained_acc are
the mean over concepts, H the harmonic mean of (100 - erased_acc) and retained_acc. The CLIP
score (mean image-prompt cosine x 100) of the retained images goes into quality. Image i uses
seed + i.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.evaluation.clip_scorer import ClipScorer
from engine.evaluation.generation import Job
from engine.evaluation.metrics import clip_score, percent
from engine.evaluation.suites.base import GRID_ROWS, PathLike, RealSettings, SuiteRun, optional_h

CLIP_TEMPLATES = ("a photo of {}.", "a painting of {}.", "an image of {}.")


def _templates(values, option: str) -> tuple[str, ...]:
    for t in values:
        if t.count("{}") != 1:
            raise ValueError(f"{option} {t!r} must hold exactly one {{}} for the name")
    return tuple(values)


@dataclass(frozen=True)
class ClipSettings(RealSettings):
    """The clip suite's settings: the CLIP folder, the retained concept file (default: the
    erased file's preserve.concepts), extra zero-shot classes that are no concept, the
    zero-shot text templates and the generation templates (default: each concept's own)."""

    clip_model: PathLike | None = None
    retained: PathLike | None = None
    anchor_classes: tuple[str, ...] = ()
    clip_templates: tuple[str, ...] = CLIP_TEMPLATES
    eval_templates: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not self.erased:
            raise ValueError("--suite clip needs --erased FILE: the concept file of the erased concepts")
        if not self.clip_model:
            raise ValueError("--suite clip needs --clip-model DIR: a local transformers CLIP folder")
        object.__setattr__(self, "anchor_classes", tuple(a.strip() for a in self.anchor_classes if a.strip()))
        object.__setattr__(self, "clip_templates", _templates(self.clip_templates or CLIP_TEMPLATES, "--clip-template"))
        object.__setattr__(self, "eval_templates", _templates(self.eval_templates, "--eval-template"))


@dataclass
class _Classes:
    """The concepts (erased first) with their roles, and the zero-shot class names."""

    erased: list
    retained: list
    names: list[str]

    @property
    def concepts(self) -> list[tuple]:
        return [(c, "erased") for c in self.erased] + [(c, "retained") for c in self.retained]


def _classes(s: ClipSettings) -> _Classes:
    from engine.concepts import load_concepts

    erased_set = load_concepts(s.erased)
    retained = load_concepts(s.retained).concepts if s.retained else erased_set.preserve_concepts
    out = _Classes(list(erased_set.concepts), list(retained), [])
    out.names = [c.name for c, _ in out.concepts] + list(s.anchor_classes)
    seen = set()
    for name in out.names:
        key = " ".join(name.split()).casefold()
        if key in seen:
            raise ValueError(f"class {name!r} appears twice among the erased, retained and anchor classes")
        seen.add(key)
    if len(out.names) < 2:
        raise ValueError(
            "zero-shot classification needs at least 2 classes: add --retained concepts or --anchor-class names"
        )
    return out


def concept_jobs(concepts: list[tuple], templates, images_per_prompt: int, seed: int) -> list[Job]:
    """images_per_prompt jobs per template of each (concept, role); image i has seed seed + i."""
    jobs = []
    for owner, (concept, role) in enumerate(concepts):
        for template in templates or concept.templates:
            for _ in range(images_per_prompt):
                jobs.append(Job(concept.name, "concept", role, "direct", template.format(concept.name),
                                seed + len(jobs), None, owner))
    return jobs


def concept_rows(jobs: list[Job], concepts: list[tuple], names: list[str], preds: list[int]) -> list[dict]:
    """One row per concept: the % of its images classified as itself, and the most frequent class."""
    rows = []
    for owner, (concept, role) in enumerate(concepts):
        mine = [i for i, j in enumerate(jobs) if j.owner == owner]
        counts = np.bincount([preds[i] for i in mine], minlength=len(names))
        rows.append(
            {
                "name": concept.name,
                "kind": "concept",
                "role": role,
                "group": None,
                "n_images": len(mine),
                "acc": {"direct": percent(sum(preds[i] == owner for i in mine), len(mine))},
                "top_prediction": names[int(counts.argmax())],
            }
        )
    return rows


def _macro(rows, role):
    values = [r["acc"]["direct"] for r in rows if r["role"] == role]
    return float(np.mean(values)) if values else None


class _Scores:
    """Zero-shot predictions and the retained images' embeddings, per model."""

    def __init__(self, run: SuiteRun, s: ClipSettings, jobs: list[Job], names: list[str]):
        t = time.perf_counter()
        self.scorer = ClipScorer.from_folder(s.clip_model, run.device)
        self.class_matrix = self.scorer.class_embeddings(names, s.clip_templates)
        self.kept = [i for i, j in enumerate(jobs) if j.role == "retained"]
        texts = [jobs[i].prompt for i in self.kept]
        self.prompt_embeds = self.scorer.text_features(texts).numpy() if self.kept else None
        run.clock["scoring_seconds"] += time.perf_counter() - t
        self.predictions = {tag: [] for tag, _ in run.models}
        self.retained_embeds = {tag: [] for tag, _ in run.models}

    def __call__(self, tag, start, images):
        feats = self.scorer.image_features(images)
        self.predictions[tag] += (torch.nn.functional.normalize(feats, dim=-1) @ self.class_matrix.T).argmax(dim=1).tolist()
        self.retained_embeds[tag] += [feats[i - start].numpy() for i in self.kept if start <= i < start + len(images)]

    def clip_score(self, tag):
        return clip_score(np.stack(self.retained_embeds[tag]), self.prompt_embeds) if self.kept else None


def clip_suite(s: ClipSettings, return_samples: bool = False):
    """Run the clip suite; returns the report (``return_samples``: (report, grid samples or None))."""
    run = SuiteRun(s)
    classes = _classes(s)
    concepts = classes.concepts
    jobs = concept_jobs(concepts, s.eval_templates, s.images_per_prompt, s.seed)
    n_erased = len(classes.erased)
    grid_owners = list(range(min(n_erased, GRID_ROWS // 2))) + list(range(n_erased, len(concepts)))
    run.keep_for_grid(jobs, grid_owners, lambda owner, prompt: f"{concepts[owner][1]}: {prompt}")

    scores = _Scores(run, s, jobs, classes.names)
    run.generate_and_score(jobs, scores)

    rows = concept_rows(jobs, concepts, classes.names, scores.predictions["model"])
    erased_acc, retained_acc = _macro(rows, "erased"), _macro(rows, "retained")
    quality = {
        "clip_score": scores.clip_score("model"),
        "clip_score_reason": None if scores.kept else "no retained concepts to score",
        "clip_score_model": str(s.clip_model),
    }
    original_acc = None
    if "original" in scores.predictions:
        o_rows = concept_rows(jobs, concepts, classes.names, scores.predictions["original"])
        for row, o_row in zip(rows, o_rows):
            row["acc_original"] = o_row["acc"]
        original_acc = {
            "erased": _macro(o_rows, "erased"),
            "erased_other_templates": None,
            "erased_indirect": None,
            "retained": _macro(o_rows, "retained"),
        }
        quality["clip_score_original"] = scores.clip_score("original")
    settings = {
        "clip_model": str(s.clip_model),
        "retained": str(s.retained) if s.retained else None,
        "classes": classes.names,
        "anchor_classes": list(s.anchor_classes),
        "clip_templates": list(s.clip_templates),
        "eval_templates": list(s.eval_templates) or "each concept's own templates",
        "n_erased": n_erased,
        "n_retained": len(classes.retained),
    }
    report = run.report(
        "clip", settings, quality=quality, erased_acc=erased_acc, retained_acc=retained_acc,
        H=optional_h(erased_acc, retained_acc), original_acc=original_acc, concepts=rows,
    )
    return (report, run.samples()) if return_samples else report
