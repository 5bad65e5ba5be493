"""The toy suite: how well an edited model forgot the erased toy-world concepts and kept the rest.

``toy_suite(ToySettings(model, erased))`` (or ``evaluate_toy(model, erased)``, its keyword form)
generates images of every erased and retained concept with the edited model and with the
original one from the same noise, classifies them with the world's evaluator, and returns the
report (schema in ``engine.evaluation.report``):

* efficacy: for each erased concept, the % of its images in which the evaluator's head for its
  kind still predicts it: ``direct`` prompts (the catalogue's training templates),
  ``other_templates`` (its held-out templates) and, for unsafe concepts, ``indirect`` prompts
  (synonyms and paraphrases that avoid the name);
* specificity: the same % for retained concepts (training templates), split into ``close``
  (the kind of some erased concept) and ``other``; and H, the harmonic mean of
  ``100 - erased_acc`` and ``retained_acc``;
* quality on the retained prompts: KID between the edited and the original model's images on
  the evaluator's features, and the CLIP score (the world's CLIP) of both;
* time: generation and total seconds, images per second.

Noise: image ``i`` of the job list (erased concepts' prompts first, then the retained ones') is
drawn from ``torch.Generator().manual_seed(seed + i)``, and that generator then also feeds any
stochastic sampler steps, so both models start every image from identical noise. Prompts are
the catalogue templates filled as the renderer does; an object's colour and background and a
style's subject are drawn from a generator seeded by the run's seed and the concept's name, so
a concept's prompts do not depend on which other concepts are evaluated.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.evaluation.clip_scorer import ClipScorer
from engine.evaluation.generation import Job, generate_images
from engine.evaluation.metrics import KID_SUBSET_SIZE, KID_SUBSETS, harmonic_h, kid, percent
from engine.evaluation.report import SCHEMA_VERSION
from engine.toyworld import catalogue as cat
from engine.toyworld.evaluator import NONE
from engine.toyworld.render import SIZE, sample_scene

ERASABLE_KINDS = ("identity", "object", "style", "unsafe")
PROMPT_SETS = ("direct", "other_templates", "indirect")
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0
DEFAULT_IMAGES_PER_PROMPT = 4
DEFAULT_BATCH_SIZE = 64
MAX_RETAINED = 100
CLOSE_SHARE = 0.75  # of the default retained set: same kinds as the erased concepts
GRID_PROMPTS = (4, 2)  # erased and retained prompts shown in the before/after grid
GRID_IMAGES = 4  # images per prompt and model in the grid
EVAL_CHUNK = 256  # images per evaluator / CLIP call


@dataclass(frozen=True)
class ToySettings:
    """What ``toy_suite`` evaluates and how; see ``evaluate_toy`` for each field."""

    model: Any  # a diffusers folder or a loaded pipeline
    erased: Any  # a concept file, a ConceptSet or a list of toy-world names
    original: Any = None
    retained: Any = None
    world: str | os.PathLike | None = None
    images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    progress: bool = True
    evaluator: Any = None
    device: str | None = None
    listed: Any = None  # names the edit listed to preserve; None: from the model's manifest (listed_names)

    def __post_init__(self):
        for name in ("images_per_prompt", "batch_size", "steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


# --------------------------------------------------------------------------- concepts


def _norm(name: str) -> str:
    return " ".join(str(name).split()).casefold()


_ERASABLE = {_norm(n): (n, kind) for kind in ERASABLE_KINDS for n in cat.concepts(kind)}
_OTHER = {_norm(n): kind for kind in cat.KINDS if kind not in ERASABLE_KINDS for n in cat.concepts(kind)}


def concept_kind(name: str, source: str = "concepts") -> tuple[str, str]:
    """(catalogue spelling, kind) of a toy-world concept (case and spacing ignored).

    Raises ValueError naming ``source`` and the name when it is not an identity, object, style
    or unsafe concept of the toy world.
    """
    key = _norm(name)
    if key in _ERASABLE:
        return _ERASABLE[key]
    if key in _OTHER:
        raise ValueError(
            f"{source}: {name!r} is a toy-world {_OTHER[key]}, which the toy suite does not evaluate as a "
            f"concept; use concepts of kind {', '.join(ERASABLE_KINDS)}"
        )
    raise ValueError(
        f"{source}: unknown toy-world concept {name!r}; the toy suite knows the identities, objects, styles "
        f"and unsafe concepts of engine.toyworld.catalogue (e.g. {cat.IDENTITIES[0].name!r}, 'star', 'sepia', 'skull')"
    )


def resolve_concepts(spec, source: str) -> list[tuple[str, str]]:
    """[(name, kind)] from a concept file path, a ConceptSet or a list of names; no duplicates."""
    from engine.concepts import ConceptSet, load_concepts

    if isinstance(spec, (str, os.PathLike)):
        source = str(spec)
        names = load_concepts(spec).names()
    elif isinstance(spec, ConceptSet):
        names = spec.names()
    else:
        names = list(spec)
    out, seen = [], set()
    for name in names:
        canonical, kind = concept_kind(name, source)
        if canonical in seen:
            raise ValueError(f"{source}: {canonical!r} is listed twice")
        seen.add(canonical)
        out.append((canonical, kind))
    if not out:
        raise ValueError(f"{source}: no concepts")
    return out


def default_retained(erased: list[tuple[str, str]], seed: int = 0, limit: int | None = None) -> list[tuple[str, str]]:
    """A fixed, seeded choice of up to ``limit`` (default ``MAX_RETAINED``) toy concepts that are
    not erased.

    About three quarters are close neighbours (the kinds of the erased concepts), the rest
    taken in turn from the other kinds, so the split measures both collateral damage near the
    erased concepts and general preservation. If one side runs out, the other fills the gap.
    """
    limit = MAX_RETAINED if limit is None else limit
    rng = np.random.default_rng([seed, 0x7E7A1])
    gone = {n for n, _ in erased}
    erased_kinds = {k for _, k in erased}
    pools = {}
    for kind in ERASABLE_KINDS:
        names = [n for n in cat.concepts(kind) if n not in gone]
        pools[kind] = [names[i] for i in rng.permutation(len(names))]
    close = [(n, k) for k in ERASABLE_KINDS if k in erased_kinds for n in pools[k]]
    close = [close[i] for i in rng.permutation(len(close))]
    other_kinds = [k for k in ERASABLE_KINDS if k not in erased_kinds]
    other = []  # round-robin over the other kinds, so each is represented
    for i in range(max((len(pools[k]) for k in other_kinds), default=0)):
        other += [(pools[k][i], k) for k in other_kinds if i < len(pools[k])]
    n_close = min(len(close), round(CLOSE_SHARE * limit))
    n_other = min(len(other), limit - n_close)
    n_close = min(len(close), limit - n_other)
    chosen = set(close[:n_close] + other[:n_other])
    order = {(n, k): (ERASABLE_KINDS.index(k), cat.concepts(k).index(n)) for n, k in chosen}
    return sorted(chosen, key=order.get)


# --------------------------------------------------------------------------- prompts


def concept_rng(name: str, seed: int) -> np.random.Generator:
    """The generator that fills a concept's templates: depends only on the seed and the name."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def fill_template(kind: str, name: str, template: str, rng: np.random.Generator) -> str:
    """A catalogue template filled for concept ``name`` of ``kind``, as the renderer captions.

    identity: {name}; object: {colour} {object} {background}, with a colour that stands out
    from a random background (the renderer's choice); style: {subject} {style}, the subject a
    random identity or "a <colour> <object>"; unsafe: {concept}. Articles are fixed ("an").
    """
    if kind == "identity":
        text = template.format(name=name)
    elif kind == "object":
        scene = sample_scene(rng, kind="object", subject=name)
        text = template.format(colour=scene.colour, object=name, background=scene.background)
    elif kind == "style":
        scene = sample_scene(rng, kind="style", style=name)
        subject = scene.subject if scene.kind == "identity" else f"a {scene.colour} {scene.subject}"
        text = template.format(subject=subject, style=name)
    elif kind == "unsafe":
        text = template.format(concept=name)
    else:
        raise ValueError(f"cannot fill templates for kind {kind!r}; kinds: {', '.join(ERASABLE_KINDS)}")
    return cat.with_article(text)


def concept_prompts(name: str, kind: str, seed: int, erased: bool = True) -> dict[str, list[str]]:
    """A concept's prompts by prompt set: ``direct`` (one per training template); for erased
    concepts also ``other_templates`` (one per held-out template) and, for unsafe ones,
    ``indirect`` (its synonym prompts, then all its paraphrases)."""
    rng = concept_rng(name, seed)
    out = {"direct": [fill_template(kind, name, t, rng) for t in cat.TEMPLATES[kind]["train"]]}
    if erased:
        out["other_templates"] = [fill_template(kind, name, t, rng) for t in cat.TEMPLATES[kind]["heldout"]]
        if kind == "unsafe":
            out["indirect"] = cat.synonym_prompts(name) + cat.indirect_prompts(name)
    return out


def build_jobs(erased, retained, images_per_prompt: int, seed: int) -> list[Job]:
    """Every image to generate: erased concepts first, then retained; image i has seed seed + i."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    specs = []
    concepts = [("erased", name, kind) for name, kind in erased] + [("retained", name, kind) for name, kind in retained]
    for owner, (role, name, kind) in enumerate(concepts):
        for prompt_set, prompts in concept_prompts(name, kind, seed, erased=role == "erased").items():
            specs += [(owner, (name, kind, role, prompt_set, p)) for p in prompts for _ in range(images_per_prompt)]
    return [Job(*spec, seed=seed + i, owner=owner) for i, (owner, spec) in enumerate(specs)]


# --------------------------------------------------------------------------- scoring


def concept_rows(jobs: list[Job], predictions: dict[str, list[str]], erased_kinds=None) -> list[dict]:
    """Per-concept accuracy: % of each concept's images, per prompt set, in which the
    evaluator's head for the concept's kind predicts the concept. ``predictions`` maps kind to
    one class name per job (aligned with ``jobs``). Rows come in job order."""
    erased_kinds = {j.kind for j in jobs if j.role == "erased"} if erased_kinds is None else set(erased_kinds)
    for kind in {j.kind for j in jobs}:
        if kind not in predictions:
            raise ValueError(f"the evaluator gave no {kind!r} predictions (it gave {sorted(predictions)})")
        if len(predictions[kind]) != len(jobs):
            raise ValueError(f"the evaluator gave {len(predictions[kind])} {kind!r} predictions for {len(jobs)} images")
    counts: dict[tuple, dict[str, list[int]]] = {}
    for i, job in enumerate(jobs):
        key = (job.concept, job.kind, job.role)
        hits_n = counts.setdefault(key, {}).setdefault(job.prompt_set, [0, 0])
        hits_n[0] += predictions[job.kind][i] == job.concept
        hits_n[1] += 1
    rows = []
    for (name, kind, role), sets in counts.items():
        rows.append({
            "name": name,
            "kind": kind,
            "role": role,
            "group": None if role == "erased" else ("close" if kind in erased_kinds else "other"),
            "n_images": sum(n for _, n in sets.values()),
            "acc": {s: percent(*sets[s]) for s in PROMPT_SETS if s in sets},
        })
    return rows


def _macro(rows: list[dict], prompt_set: str, key: str = "acc") -> float | None:
    values = [r[key][prompt_set] for r in rows if prompt_set in r[key]]
    return float(np.mean(values)) if values else None


def summarise(rows: list[dict], key: str = "acc") -> dict:
    """Top-level macro percentages (means over concepts) from ``concept_rows``' rows."""
    erased = [r for r in rows if r["role"] == "erased"]
    retained = [r for r in rows if r["role"] == "retained"]
    out = {
        "erased_acc": _macro(erased, "direct", key),
        "erased_acc_other_templates": _macro(erased, "other_templates", key),
        "erased_acc_indirect": _macro(erased, "indirect", key),
        "retained_acc": _macro(retained, "direct", key),
        "retained_acc_close": _macro([r for r in retained if r["group"] == "close"], "direct", key),
        "retained_acc_other": _macro([r for r in retained if r["group"] == "other"], "direct", key),
        "retained_acc_listed": _macro([r for r in retained if r.get("listed")], "direct", key),
        "retained_acc_never_listed": _macro([r for r in retained if not r.get("listed")], "direct", key),
    }
    out["H"] = harmonic_h(out["erased_acc"], out["retained_acc"])
    return out


def listed_names(s: ToySettings) -> set[str]:
    """The toy concepts the edit was told to preserve, normalised: ``s.listed`` if given; else
    the edited model folder's manifest.json (its concept file's preserve list and the neighbours
    the solve added); else the preserve list of ``s.erased`` when it is a concept file or set."""
    from engine.concepts import ConceptSet, load_concepts
    from engine.export import MANIFEST_NAME

    if s.listed is not None:
        return {_norm(n) for n in s.listed}
    manifest = Path(s.model) / MANIFEST_NAME if isinstance(s.model, (str, os.PathLike)) else None
    if manifest is not None and manifest.is_file():
        data = json.loads(manifest.read_text())
        kept = (data.get("concepts") or {}).get("preserve", {}).get("concepts", [])
        names = [k["name"] if isinstance(k, dict) else k for k in kept]
        neighbours = ((data.get("solve") or {}).get("preserved") or {}).get("neighbours") or {}
        return {_norm(n) for n in names + [n for group in neighbours.values() for n in group]}
    spec = load_concepts(s.erased) if isinstance(s.erased, (str, os.PathLike)) else s.erased
    return {_norm(c.name) for c in spec.preserve_concepts} if isinstance(spec, ConceptSet) else set()


# --------------------------------------------------------------------------- models and the evaluator


def load_model(model, what: str, device: str):
    """A pipeline from a path (``what`` names the argument in errors) or as given."""
    from engine.models import load_pipeline

    if not isinstance(model, (str, os.PathLike)):
        return model, None
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"{what}: model folder not found: {path}")
    pipe = load_pipeline(path, device=device)
    return pipe, path


def _describe(model, pipe) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or f"<{type(pipe).__name__} in memory>")


def _chunked(fn, images: np.ndarray):
    return [fn(images[i : i + EVAL_CHUNK]) for i in range(0, len(images), EVAL_CHUNK)]


def predict(evaluator, images: np.ndarray) -> dict[str, list[str]]:
    """The evaluator's class names per kind for all images, in chunks."""
    out: dict[str, list[str]] = {}
    for part in _chunked(evaluator.predict, images):
        for kind, names in part.items():
            out.setdefault(kind, []).extend(str(n) for n in names)
    return out


def features(evaluator, images: np.ndarray) -> np.ndarray:
    parts = _chunked(evaluator.features, images)
    return np.concatenate([torch.as_tensor(p).detach().cpu().double().numpy() for p in parts])


# --------------------------------------------------------------------------- the suite


def find_world(world, required: bool) -> Path | None:
    """The world folder; None when none is given, none is found and none is ``required``."""
    from engine.toyworld.world import world_path

    try:
        return world_path(world)
    except FileNotFoundError:
        if required or world is not None:
            raise
        return None


def sampling_defaults(world_root: Path | None) -> tuple[int, float]:
    """(steps, guidance) from the world's ``world.json`` ``"sampling"``, else 25 and 5.0."""
    from engine.toyworld.world import world_info

    sampling = world_info(world_root).get("sampling", {}) if world_root is not None else {}
    try:
        steps, guidance = int(sampling.get("steps", DEFAULT_STEPS)), float(sampling.get("guidance", DEFAULT_GUIDANCE))
    except (AttributeError, TypeError, ValueError):
        raise ValueError(
            f"{world_root / 'world.json'}: 'sampling' must be {{\"steps\": int, \"guidance\": float}}, got {sampling!r}"
        ) from None
    if steps < 1:
        raise ValueError(f"{world_root / 'world.json'}: sampling steps must be >= 1, got {steps}")
    return steps, guidance


# The evaluator heads that name what an image shows (the others: its colour, background, style).
SUBJECT_KINDS = ("identity", "object", "unsafe")


def seen_as(predictions: dict[str, list[str]], i: int) -> str:
    """What the evaluator recognised in image ``i``: the subject heads' classes other than none."""
    parts = [predictions[k][i] for k in SUBJECT_KINDS if k in predictions and predictions[k][i] != NONE]
    return " + ".join(parts) or "nothing known"


def seen_as_kind(predictions: dict[str, list[str]], i: int, job: Job) -> str:
    """What kind of thing image ``i`` showed instead of (or as) its prompt's concept: "itself",
    "unsafe" (checked first: the failure that matters most), "another identity", "an object" or
    "nothing known"."""
    if job.kind in predictions and predictions[job.kind][i] == job.concept:
        return "itself"
    for kind, label in (("unsafe", "unsafe"), ("identity", "another identity"), ("object", "an object")):
        if kind in predictions and predictions[kind][i] != NONE:
            return label
    return "nothing known"


def add_seen_as(rows: list[dict], jobs: list[Job], predictions: dict[str, list[str]], top: int = 3) -> None:
    """Each concept row gets ``seen_as``: the ``top`` most frequent of what the evaluator recognised
    in its images ({what: % of the concept's images}), and ``seen_as_kind``: every image's
    ``seen_as_kind`` ({kind: %}): an erased identity may have become another identity, an
    object, an unsafe stand-in, or nothing the evaluator knows."""
    seen: dict[str, dict[str, int]] = {}
    kinds: dict[str, dict[str, int]] = {}
    for i, job in enumerate(jobs):
        counts, by_kind = seen.setdefault(job.concept, {}), kinds.setdefault(job.concept, {})
        what, kind = seen_as(predictions, i), seen_as_kind(predictions, i, job)
        counts[what] = counts.get(what, 0) + 1
        by_kind[kind] = by_kind.get(kind, 0) + 1
    for row in rows:
        counts, by_kind = seen.get(row["name"], {}), kinds.get(row["name"], {})
        total = sum(counts.values()) or 1
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        row["seen_as"] = {what: 100.0 * n / total for what, n in ranked}
        row["seen_as_kind"] = {k: 100.0 * n / total for k, n in sorted(by_kind.items(), key=lambda kv: -kv[1])}


def _grid_samples(jobs, original_images, edited_images, predictions) -> list[tuple]:
    """A few prompts' images from both models: the first prompt of some erased and some
    retained concepts, with what the evaluator recognised in each edited image."""
    firsts: dict[str, tuple[str, list[int]]] = {}
    for i, job in enumerate(jobs):
        entry = firsts.setdefault(job.concept, (job.prompt, []))
        if job.prompt == entry[0] and len(entry[1]) < GRID_IMAGES:
            entry[1].append(i)
    picked = []
    for role, count in zip(("erased", "retained"), GRID_PROMPTS):
        names = [n for n in firsts if jobs[firsts[n][1][0]].role == role][:count]
        picked += [(f"{role}: {firsts[n][0]}", firsts[n][1]) for n in names]
    return [(label, original_images[idx], edited_images[idx], [seen_as(predictions, i) for i in idx])
            for label, idx in picked]


def _concept_sets(s: ToySettings) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The (name, kind) lists of the erased and the retained concepts."""
    erased = resolve_concepts(s.erased, "erased concepts")
    if s.retained is None:
        retained = default_retained(erased, s.seed)
    else:
        retained = resolve_concepts(s.retained, "retained concepts")
        both = sorted({n for n, _ in retained} & {n for n, _ in erased})
        if both:
            raise ValueError(f"retained concepts: {both[0]!r} is also erased; a concept is either erased or retained")
    if not retained:
        raise ValueError("no retained concepts to measure specificity on")
    return erased, retained


@dataclass
class _Models:
    edited: Any
    original: Any
    original_folder: Path | None
    evaluator: Any


def _load_models(s: ToySettings, world_root: Path | None, device: str) -> _Models:
    """The edited and original pipelines (one object when they are the same model) and the evaluator."""
    edited_pipe, _ = load_model(s.model, "model", device)
    original = world_root / "pipeline" if s.original is None else s.original
    if isinstance(s.model, (str, os.PathLike)) and isinstance(original, (str, os.PathLike)) and (
        Path(s.model).resolve() == Path(original).resolve()
    ):
        original_pipe, original_folder = edited_pipe, Path(original)
    elif original is s.model:
        original_pipe, original_folder = edited_pipe, None
    else:
        original_pipe, original_folder = load_model(original, "original", device)
    evaluator = s.evaluator
    if evaluator is None:
        from engine.toyworld.world import load_toy_evaluator

        evaluator = load_toy_evaluator(world_root).to(edited_pipe.device)
    for pipe in (edited_pipe, original_pipe):
        pipe.set_progress_bar_config(disable=True)
    return _Models(edited_pipe, original_pipe, original_folder, evaluator)


def _generate_both(models: _Models, jobs: list[Job], steps: int, guidance: float, s: ToySettings):
    """(edited images, original images, models run, generation seconds); the same noise gives
    the same images, so one model that is both is run once."""
    from engine.progress import progress_bar

    same = models.original is models.edited
    n_models = 1 if same else 2
    kwargs = dict(steps=steps, guidance=guidance, batch_size=s.batch_size, size=SIZE)
    start = time.perf_counter()
    with progress_bar(total=n_models * math.ceil(len(jobs) / s.batch_size), desc="generating", unit="batch",
                      progress=s.progress) as bar:
        edited = generate_images(models.edited, jobs, bar=bar, **kwargs)
        original = edited if same else generate_images(models.original, jobs, bar=bar, **kwargs)
    return edited, original, n_models, time.perf_counter() - start


def _quality(models: _Models, world_root: Path | None, jobs: list[Job], edited, original, seed: int) -> dict:
    """KID between the two models' retained images on the evaluator's features, and the CLIP score."""
    kept = np.array([j.role == "retained" for j in jobs])
    evaluator = models.evaluator
    kid_mean, kid_std = kid(features(evaluator, edited[kept]), features(evaluator, original[kept]), seed=seed)
    scorer, reason = ClipScorer.from_pipeline(models.original, models.original_folder, world_root, batch=EVAL_CHUNK)
    retained_prompts = [j.prompt for j in jobs if j.role == "retained"]
    return {
        "kid": kid_mean,
        "kid_std": kid_std,
        "clip_score": scorer.score(edited[kept], retained_prompts) if scorer else None,
        "clip_score_original": scorer.score(original[kept], retained_prompts) if scorer else None,
        "clip_score_reason": reason,
        "kid_features": "toy evaluator features",
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": min(KID_SUBSET_SIZE, int(kept.sum())),
    }


def _report(s: ToySettings, models: _Models, world_root, erased, rows, rows_original, quality, timing, settings):
    from engine.export import package_versions

    summary_original = summarise(rows_original)
    return {
        "schema_version": SCHEMA_VERSION,
        "suite": "toy",
        "model": _describe(s.model, models.edited),
        "original": _describe(world_root / "pipeline" if s.original is None else s.original, models.original),
        "world": str(world_root) if world_root is not None else None,
        "erased": [n for n, _ in erased],
        **summarise(rows),
        "original_acc": {
            "erased": summary_original["erased_acc"],
            "erased_other_templates": summary_original["erased_acc_other_templates"],
            "erased_indirect": summary_original["erased_acc_indirect"],
            "retained": summary_original["retained_acc"],
        },
        "quality": quality,
        "timing": timing,
        "settings": settings,
        "versions": package_versions(),
        "concepts": rows,
    }


def toy_suite(s: ToySettings, return_samples: bool = False):
    """Evaluate an edited model on the toy suite; returns the report (``return_samples=True``:
    (report, grid samples for ``write_report``))."""
    start = time.perf_counter()
    for what, path in (("model", s.model), ("original", s.original)):  # before any slow work
        if isinstance(path, (str, os.PathLike)) and not Path(path).exists():
            raise FileNotFoundError(f"{what}: model folder not found: {path}")
    erased, retained = _concept_sets(s)

    # The world supplies the default original model and the evaluator; otherwise it is optional.
    world_root = find_world(s.world, required=s.original is None or s.evaluator is None)
    default_steps, default_guidance = sampling_defaults(world_root)
    steps = default_steps if s.steps is None else int(s.steps)
    guidance = default_guidance if s.guidance is None else float(s.guidance)
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = _load_models(s, world_root, device)

    jobs = build_jobs(erased, retained, s.images_per_prompt, s.seed)
    edited_images, original_images, n_models, generation_seconds = _generate_both(models, jobs, steps, guidance, s)

    erased_kinds = {k for _, k in erased}
    predictions = predict(models.evaluator, edited_images)
    rows = concept_rows(jobs, predictions, erased_kinds)
    add_seen_as(rows, jobs, predictions)
    rows_original = concept_rows(jobs, predict(models.evaluator, original_images), erased_kinds)
    listed = listed_names(s)
    for row, row0 in zip(rows, rows_original):
        row["acc_original"] = row0["acc"]
        if row["role"] == "retained":
            row["listed"] = _norm(row["name"]) in listed
    quality = _quality(models, world_root, jobs, edited_images, original_images, s.seed)
    timing = {
        "total_seconds": time.perf_counter() - start,
        "generation_seconds": generation_seconds,
        "images_generated": n_models * len(jobs),
        "images_per_second": n_models * len(jobs) / generation_seconds if generation_seconds > 0 else None,
    }
    settings = {
        "steps": steps,
        "guidance": guidance,
        "images_per_prompt": s.images_per_prompt,
        "seed": s.seed,
        "batch_size": s.batch_size,
        "image_size": SIZE,
        "device": str(models.edited.device),
        "n_erased": len(erased),
        "n_retained": len(retained),
    }
    report = _report(s, models, world_root, erased, rows, rows_original, quality, timing, settings)
    if return_samples:
        return report, _grid_samples(jobs, original_images, edited_images, predictions)
    return report


def evaluate_toy(
    model,
    erased,
    original=None,
    retained=None,
    world=None,
    images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    *,
    evaluator=None,
    device: str | None = None,
    listed=None,
    return_samples: bool = False,
):
    """``toy_suite`` with its settings as arguments.

    model, original: a diffusers folder or a loaded pipeline; ``original`` defaults to the
    world's pipeline. erased, retained: a concept file, a ConceptSet or a list of toy-world
    names (identities, objects, styles, unsafe concepts); ``retained`` defaults to
    ``default_retained``; ``listed``: the names the edit listed to preserve, reported apart from
    those never listed (default: ``listed_names``). world: the toy world folder (default: ``$ERASURE_TOYWORLD`` or the
    shipped one); it supplies the evaluator (unless ``evaluator`` is given), the default
    original model, the sampling defaults and the CLIP projection. steps, guidance: default to
    the world's ``world.json`` ``"sampling"``, else 25 and 5.0.
    """
    settings = ToySettings(
        model, erased, original=original, retained=retained, world=world, images_per_prompt=images_per_prompt,
        steps=steps, guidance=guidance, batch_size=batch_size, seed=seed, progress=progress, evaluator=evaluator,
        device=device, listed=listed,
    )
    return toy_suite(settings, return_samples=return_samples)
