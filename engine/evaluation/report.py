"""The evaluation report: its schema and its writers (JSON, Markdown, a before/after PNG grid).

Schema (``schema_version`` 1). Percentages are in 0-100; "macro" means the mean over concepts
of each concept's own percentage, so every concept counts the same whatever its prompt count.
A value that cannot be measured is ``null`` (JSON) / ``None``, never a made-up number::

    schema_version              1
    suite                       "toy" (or the name of a real-model suite)
    model                       the edited model: its path (or the loaded pipeline's name)
    original                    the reference model, same form
    world                       the toy world folder used (evaluator, CLIP projection), or null
    erased                      [names] of the erased concepts
    erased_acc                  macro % of erased-concept images in which the evaluator still
                                recognises the concept, direct prompts (the training templates)
    erased_acc_other_templates  the same on held-out templates
    erased_acc_indirect         the same on synonyms and paraphrases (unsafe concepts only);
                                null when no erased concept has indirect prompts
    retained_acc                macro % of retained-concept images recognised as their concept
    retained_acc_close          over retained concepts of a kind that is erased (null if none)
    retained_acc_other          over the other retained concepts (null if none)
    retained_acc_listed         (toy suite) over retained concepts the edit listed to preserve
                                (its concept file, or neighbours the solve added; null if none)
    retained_acc_never_listed   (toy suite) over retained concepts no preservation list names
    H                           harmonic mean of (100 - erased_acc) and retained_acc; 0 when
                                either is 0
    original_acc                {"erased", "erased_other_templates", "erased_indirect",
                                "retained"}: the same macro percentages for the original model
                                (null when a suite has no original)
    quality                     {"kid": float, "kid_std": float | null (null when every
                                 subset was the whole image set),
                                 "clip_score": float | null, "clip_score_original": float | null,
                                 "clip_score_reason": str | null (why the score is null),
                                 "kid_features": str, "kid_subsets": int, "kid_subset_size": int}
                                KID (unbiased MMD^2, cubic polynomial kernel, mean and std over
                                subsets) between the edited and the original model's images of
                                the retained prompts; CLIP score = mean cosine x 100 between each
                                retained image and its prompt
    timing                      {"total_seconds", "generation_seconds", "images_generated",
                                 "images_per_second"}; images of both models (once when the
                                 original is the edited model itself)
    settings                    {"steps", "guidance", "images_per_prompt", "seed",
                                 "batch_size", ...}: what is needed to rerun it
    versions                    engine.export.package_versions()
    concepts                    one row per concept, erased first:
                                {"name", "kind", "role": "erased" | "retained",
                                 "group": "close" | "other" (retained) | null (erased),
                                 "listed": bool (toy suite, retained: named by the edit's
                                 preservation lists),
                                 "n_images": int,
                                 "acc": {prompt set: %}, "acc_original": {prompt set: %}}
                                prompt sets: "direct", "other_templates", "indirect" (erased
                                concepts; "indirect" for unsafe ones only), "direct" (retained)

``write_report(report, "out/report.json", grid_images)`` writes ``out/report.json``,
``out/report.md`` (the same numbers as tables) and, given samples, ``out/grid.png``: one row
per prompt, its original images, a blank cell, then the edited model's images from the same
noise. All three are written to temporary names first and renamed at the end, so a failure
leaves the previous files (or none), never a half-written one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from engine.export import write_json
from engine.image_grid import save_labelled_grid

SCHEMA_VERSION = 1
REQUIRED_KEYS = (
    "schema_version",
    "suite",
    "model",
    "original",
    "erased",
    "erased_acc",
    "erased_acc_indirect",
    "erased_acc_other_templates",
    "retained_acc",
    "retained_acc_close",
    "retained_acc_other",
    "H",
    "quality",
    "timing",
    "settings",
    "versions",
    "concepts",
)
QUALITY_KEYS = ("kid", "kid_std", "clip_score", "clip_score_original")
CONCEPT_KEYS = ("name", "kind", "role", "group", "n_images", "acc")
MARKDOWN_NAME = "report.md"
GRID_NAME = "grid.png"
GRID_SCALE = 4


def validate_report(report: dict) -> dict:
    """Check a report has the schema's keys; raise ValueError naming the first missing one."""
    if not isinstance(report, dict):
        raise ValueError(f"an evaluation report must be a dict, got {type(report).__name__}")
    for key in REQUIRED_KEYS:
        if key not in report:
            raise ValueError(f"evaluation report is missing the key {key!r}")
    if report["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"evaluation report has schema_version {report['schema_version']!r}, expected {SCHEMA_VERSION}")
    for key in QUALITY_KEYS:
        if key not in report["quality"]:
            raise ValueError(f"evaluation report is missing the key 'quality.{key}'")
    for i, row in enumerate(report["concepts"]):
        for key in CONCEPT_KEYS:
            if key not in row:
                raise ValueError(f"evaluation report concept row {i} is missing the key {key!r}")
    return report


# --------------------------------------------------------------------------- Markdown


def describe_kid(quality: dict) -> str:
    """The report's KID (unscaled, as ``metrics.kid`` returns it) with what it measures and what is good."""
    if quality.get("kid") is None:
        return "KID n/a"
    spread = "" if quality.get("kid_std") is None else f" +- {quality['kid_std']:.2g}"
    against = "the reference images" if quality.get("kid_reference") else "the original model's images"
    features = quality.get("kid_features") or "image features"
    return (f"KID {quality['kid']:.4g}{spread} (squared MMD on {features}; 0 = same distribution as {against}; "
            "lower is better; the estimate is unbiased, so values near 0, negative ones included, mean no "
            "measurable difference)")


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict, grid_labels: list[str] | None = None) -> str:
    """The report as Markdown tables: the headline numbers, quality and time, then per concept."""
    q, t, s = report["quality"], report["timing"], report["settings"]
    orig = report.get("original_acc") or {}
    lines = [
        f"# Erasure evaluation: {report['suite']} suite",
        "",
        f"- model: `{report['model']}`",
        f"- original: `{report['original']}`",
        f"- erased ({len(report['erased'])}): " + ", ".join(report["erased"]),
        "- settings: " + ", ".join(f"{k} {v}" for k, v in s.items()),
        "",
        "| metric (%, 0-100) | edited | original |",
        "| --- | --- | --- |",
        f"| erased concepts recognised, direct prompts (lower is better) | {_pct(report['erased_acc'])} | {_pct(orig.get('erased'))} |",
        f"| erased concepts recognised, held-out templates | {_pct(report['erased_acc_other_templates'])} | {_pct(orig.get('erased_other_templates'))} |",
        f"| erased concepts recognised, indirect prompts | {_pct(report['erased_acc_indirect'])} | {_pct(orig.get('erased_indirect'))} |",
        f"| retained concepts recognised (higher is better) | {_pct(report['retained_acc'])} | {_pct(orig.get('retained'))} |",
        f"| retained, close neighbours (same kind as an erased concept) | {_pct(report['retained_acc_close'])} | |",
        f"| retained, other kinds | {_pct(report['retained_acc_other'])} | |",
        *([f"| retained, listed to preserve by the edit | {_pct(report['retained_acc_listed'])} | |",
           f"| retained, never listed | {_pct(report['retained_acc_never_listed'])} | |"]
          if "retained_acc_never_listed" in report else []),
        f"| H: harmonic mean of (100 - erased) and retained | {_pct(report['H'])} | |",
        "",
        "| quality | value |",
        "| --- | --- |",
        f"| KID vs the original, retained prompts | {_num(q['kid'])} +- {_num(q['kid_std'])} |",
        f"| CLIP score, edited | {_num(q['clip_score'])} |",
        f"| CLIP score, original | {_num(q['clip_score_original'])} |",
    ]
    if q.get("clip_score_reason"):
        lines.append(f"| CLIP score not measured | {_cell(q['clip_score_reason'])} |")
    lines += [
        "",
        "| time | value |",
        "| --- | --- |",
        *(f"| {k.replace('_', ' ')} | {_num(v) if v is None or isinstance(v, float) else v} |" for k, v in t.items()),
        "",
        "## Per concept",
        "",
        "| concept | kind | role | group | images | direct | held-out templates | indirect | original: direct "
        "| seen as (edited model) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["concepts"]:
        acc, acc0 = row["acc"], row.get("acc_original") or {}
        seen = ", ".join(f"{_cell(what)} {share:.0f}%" for what, share in (row.get("seen_as") or {}).items())
        lines.append(
            f"| {_cell(row['name'])} | {row['kind']} | {row['role']} | {row['group'] or ''} | {row['n_images']} "
            f"| {_pct(acc.get('direct'))} | {_pct(acc.get('other_templates'))} | {_pct(acc.get('indirect'))} "
            f"| {_pct(acc0.get('direct'))} | {seen} |"
        )
    lines += _attack_lines(report.get("attacks"))
    if grid_labels:
        lines += ["", "## Samples", "", f"![original (left) vs edited (right), with what the evaluator saw in each "
                  f"edited image]({GRID_NAME})", ""]
        lines += [f"{i + 1}. {_cell(label)}" for i, label in enumerate(grid_labels)]
    return "\n".join(lines) + "\n"


def _attack_lines(attacks: dict | None) -> list[str]:
    """``erasure eval --attack``'s section: each attacked concept's success rate per attack."""
    if not attacks:
        return []
    lines = ["", "## Under attack", "", "% of images (UnlearnDiffAtk: of prompts) showing the erased concept:", "",
             "| concept | attack | concept shown |", "| --- | --- | --- |"]
    return lines + [f"| {_cell(name)} | {attack} | {_pct(rate)} |" for name, rates in attacks.items()
                    for attack, rate in rates.items() if isinstance(rate, float)]


# --------------------------------------------------------------------------- grid


# --------------------------------------------------------------------------- writing


def _temp_beside(path: Path) -> Path:
    # A plain new file (not mkstemp's private 0600 one), so the result gets the usual permissions.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_report(report: dict, out_path: str | os.PathLike, grid_images=None) -> dict[str, Path]:
    """Write the report's JSON at ``out_path``, ``report.md`` beside it and, when ``grid_images``
    (a list of (label, original images, edited images[, captions of the edited images])) is
    given, ``grid.png``: a labelled before/after sheet.

    Validates the report first; every file is written under a temporary name and renamed into
    place only once all are complete. Returns {"json": path, "markdown": path[, "grid": path]}.
    """
    validate_report(report)
    out = Path(out_path)
    if out.is_dir():
        raise FileExistsError(f"report path {out} is a folder; give a file name such as {out / 'report.json'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    targets = {"json": out, "markdown": out.parent / MARKDOWN_NAME}
    if grid_images:
        targets["grid"] = out.parent / GRID_NAME
    temps = {}
    try:
        for key, path in targets.items():
            temps[key] = _temp_beside(path)
        write_json(temps["json"], report)
        labels = [sample[0] for sample in grid_images] if grid_images else None
        temps["markdown"].write_text(render_markdown(report, labels))
        if grid_images:
            captions = [sample[3] for sample in grid_images] if all(len(s) > 3 for s in grid_images) else None
            save_labelled_grid([sample[:3] for sample in grid_images], temps["grid"], headings=("original model",
                               "edited model"), scale=GRID_SCALE, captions=captions)
        for key, path in targets.items():
            os.replace(temps.pop(key), path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return targets
