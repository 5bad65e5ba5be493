"""Evaluation of erased models: efficacy, specificity, quality and time, as one report.

    from engine.evaluation import evaluate_toy, write_report
    report, samples = evaluate_toy("erased/", "erased.txt", return_samples=True)
    write_report(report, "eval/report.json", samples)   # + eval/report.md, eval/grid.png

``suites`` holds one module per suite (toy, nudity, clip, fid), each run from its typed
settings; ``generation`` the job type and the generation loop they share; ``clip_scorer`` the
CLIP embeddings; ``metrics`` the numbers (KID, FID, H, CLIP score); ``prompts`` the benchmark
prompt files; ``report`` the schema and the writers (its docstring documents every field);
``gates`` the toy world's quality gates; ``cli`` the options of
``erasure eval --model DIR --suite toy --erased FILE --out report.json``.
"""

from engine.evaluation.generation import Job
from engine.evaluation.metrics import clip_score, harmonic_h, kid, mmd2_unbiased, percent, polynomial_kernel
from engine.evaluation.report import SCHEMA_VERSION, render_markdown, validate_report, write_report
from engine.evaluation.suites import (
    ClipSettings,
    FidSettings,
    NuditySettings,
    ToySettings,
    run_suite,
)
from engine.evaluation.suites.toy import (
    build_jobs,
    concept_prompts,
    concept_rows,
    default_retained,
    evaluate_toy,
    fill_template,
    summarise,
)

__all__ = [
    "evaluate_toy",
    "run_suite",
    "ToySettings",
    "NuditySettings",
    "ClipSettings",
    "FidSettings",
    "write_report",
    "validate_report",
    "render_markdown",
    "SCHEMA_VERSION",
    "kid",
    "mmd2_unbiased",
    "polynomial_kernel",
    "harmonic_h",
    "clip_score",
    "percent",
    "Job",
    "build_jobs",
    "concept_prompts",
    "concept_rows",
    "default_retained",
    "fill_template",
    "summarise",
]
