"""``erasure eval``: its options, and the settings of each suite made from them.

The suites take typed settings (engine.evaluation.suites); this module is the only one that
reads the command line's namespace. Options a suite does not use are ignored by it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.attacks.cli import add_budget_args
from engine.evaluation.suites import REAL_SUITES, run_suite as run_settings
from engine.evaluation.suites.base import DTYPES
from engine.evaluation.suites.clip import CLIP_TEMPLATES, ClipSettings
from engine.evaluation.suites.fid import FidSettings
from engine.evaluation.suites.nudity import NUDITY_CLASSES, NUDITY_THRESHOLD, NuditySettings
from engine.evaluation.suites.toy import DEFAULT_BATCH_SIZE, DEFAULT_IMAGES_PER_PROMPT, ToySettings


def add_eval_parser(sub) -> None:
    """Add ``eval`` to the ``erasure`` parser's sub-parsers."""
    p = sub.add_parser("eval", help="measure an erased model: efficacy, specificity, quality, time")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The options of ``erasure eval``: those every suite shares, then the real-model suites' own."""
    p.add_argument("--model", required=True, help="the edited model (diffusers folder)")
    p.add_argument("--suite", default="toy", help="toy (the toy world), or a real-model suite")
    p.add_argument("--erased", help="concept file of the erased concepts (.yaml/.json/.txt/.csv); required by toy")
    p.add_argument("--original", help="the unedited model (default: the toy world's pipeline)")
    p.add_argument("--retained", help="concept file of concepts that must be kept (default: up to 100, seeded)")
    p.add_argument("--world", help="toy world folder, or a shipped world by name: v1, v2 (default: $ERASURE_TOYWORLD or v2)")
    p.add_argument("--images-per-prompt", type=int, help="images per prompt and model (default 4)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the world's, else 25)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the world's, else 5.0)")
    p.add_argument("--batch-size", type=int, help="prompts per pipeline call (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="report JSON path; report.md and grid.png are written beside it")
    g = p.add_argument_group("attacks (toy suite): does an erased concept come back? (see erasure attack)")
    g.add_argument("--attack", metavar="LIST", help="comma-separated attacks run on erased concepts after the "
                   "suite: inversion, unlearndiff, ring-a-bell; their success rates go into the report")
    g.add_argument("--attack-concepts", type=int, default=1, metavar="N", help="erased concepts attacked (default 1)")
    g.add_argument("--attack-images", type=int, default=32, metavar="N", help="images judged per attack (default 32)")
    g.add_argument("--attack-prompts", type=int, default=4, metavar="N",
                   help="prompts attacked by UnlearnDiffAtk (default 4)")
    add_budget_args(p)
    g = p.add_argument_group("real-model suites (nudity, clip, fid)")
    _add_prompt_and_nudity_args(g)
    _add_clip_fid_and_run_args(g)


def _add_prompt_and_nudity_args(g) -> None:
    g.add_argument(
        "--prompts",
        metavar="FILE",
        help="nudity/fid: prompt file: a benchmark CSV (I2P, UnlearnDiffAtk, Ring-A-Bell, MMA-Diffusion, "
        "or any CSV with a prompt column) or a .txt list, one prompt per line",
    )
    g.add_argument(
        "--prompt-column",
        metavar="NAME",
        help="CSV column holding the prompts (default: the first of prompt, adv_prompt, sensitive prompt, "
        "target_prompt, text)",
    )
    g.add_argument(
        "--category", metavar="NAME", help="keep only the CSV rows of this category (I2P's categories column)"
    )
    g.add_argument("--limit", type=int, metavar="N", help="use only the first N prompts (after --category)")
    g.add_argument(
        "--row-settings",
        choices=("file", "cli"),
        default="file",
        help="file (default): a row's own seed and guidance scale (evaluation_seed, evaluation_guidance, ...) "
        "are used where the file has them; cli: --seed and --guidance for every row",
    )
    g.add_argument(
        "--nudity-threshold",
        type=float,
        default=NUDITY_THRESHOLD,
        metavar="P",
        help=f"nudity: NudeNet score from which a detection counts (default {NUDITY_THRESHOLD})",
    )
    g.add_argument(
        "--nudity-classes",
        metavar="LIST",
        help=f"nudity: comma-separated NudeNet classes that flag an image (default {','.join(NUDITY_CLASSES)})",
    )


def _add_clip_fid_and_run_args(g) -> None:
    g.add_argument(
        "--clip-model",
        metavar="DIR",
        help="clip/fid: local transformers CLIP folder (config.json, weights, tokenizer, preprocessor_config.json)",
    )
    g.add_argument(
        "--anchor-class",
        action="append",
        default=[],
        metavar="NAME",
        help="clip: extra zero-shot class that is no concept, e.g. 'a person' (repeatable)",
    )
    g.add_argument(
        "--clip-template",
        action="append",
        default=[],
        metavar="TEXT",
        help=f"clip: zero-shot text template with {{}} for the class name, ensembled (repeatable; default "
        f"{' | '.join(CLIP_TEMPLATES)})",
    )
    g.add_argument(
        "--eval-template",
        action="append",
        default=[],
        metavar="TEXT",
        help="clip: generation template with {} for the concept name (repeatable; default: each concept's own)",
    )
    g.add_argument(
        "--reference",
        metavar="DIR",
        help="fid: folder of reference images (.png/.jpg/.jpeg/.webp/.bmp, searched recursively)",
    )
    g.add_argument(
        "--inception",
        metavar="FILE",
        help="fid: TorchScript Inception feature model (e.g. inception-2015-12-05.pt), used instead of --clip-model",
    )
    g.add_argument(
        "--save-images", metavar="DIR", help="also write every generated image as PNG under DIR/model and DIR/original"
    )
    g.add_argument("--device", help="torch device for generation and scoring (default: cuda if available, else cpu)")
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="pipeline weights dtype (default auto: float16 on CUDA, float32 on CPU)",
    )


# --------------------------------------------------------------------------- namespace -> settings


def _given(args, *names) -> dict:
    """The options among ``names`` that are set (not None), so that unset ones take the settings' defaults."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def toy_settings(args) -> ToySettings:
    if not args.erased:
        raise ValueError("--erased is required for the toy suite: the concept file of the erased concepts")
    if getattr(args, "dtype", None) not in (None, "auto", "float32"):
        raise ValueError(f"--dtype {args.dtype} applies to the real-model suites; the toy suite runs in float32")
    return ToySettings(
        args.model,
        args.erased,
        original=args.original,
        retained=args.retained,
        world=args.world,
        images_per_prompt=DEFAULT_IMAGES_PER_PROMPT if args.images_per_prompt is None else args.images_per_prompt,
        steps=args.steps,
        guidance=args.guidance,
        batch_size=DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
        device=getattr(args, "device", None),
    )


def _real_common(args) -> dict:
    return {
        **_given(args, "model", "original", "erased", "images_per_prompt", "steps", "guidance", "batch_size", "seed",
                 "device", "dtype", "model_config", "save_images"),
        "allow_pickle": bool(getattr(args, "allow_pickle", False)),
        "progress": not getattr(args, "quiet", False),
    }


def _prompt_options(args) -> dict:
    return _given(args, "prompts", "prompt_column", "category", "limit", "row_settings")


def nudity_settings(args) -> NuditySettings:
    text = getattr(args, "nudity_classes", None)
    threshold = getattr(args, "nudity_threshold", None)
    return NuditySettings(
        **_real_common(args),
        **_prompt_options(args),
        threshold=NUDITY_THRESHOLD if threshold is None else threshold,
        classes=tuple(text.split(",")) if text else NUDITY_CLASSES,
    )


def clip_settings(args) -> ClipSettings:
    return ClipSettings(
        **_real_common(args),
        **_given(args, "clip_model", "retained"),
        anchor_classes=tuple(getattr(args, "anchor_class", None) or ()),
        clip_templates=tuple(getattr(args, "clip_template", None) or ()),
        eval_templates=tuple(getattr(args, "eval_template", None) or ()),
    )


def fid_settings(args) -> FidSettings:
    return FidSettings(**_real_common(args), **_prompt_options(args), **_given(args, "reference", "clip_model", "inception"))


SETTINGS_FROM_ARGS = {"toy": toy_settings, "nudity": nudity_settings, "clip": clip_settings, "fid": fid_settings}


def settings_from_args(args):
    """The settings of the suite ``args.suite`` from the eval command's options."""
    suite = getattr(args, "suite", None)
    if suite not in SETTINGS_FROM_ARGS:
        raise ValueError(f"unknown evaluation suite {suite!r}; the real-model suites are {', '.join(REAL_SUITES)}")
    return SETTINGS_FROM_ARGS[suite](args)


def run_suite(args, return_samples: bool = False):
    """Run the suite the eval command's options ask for; see engine.evaluation.suites.run_suite."""
    return run_settings(settings_from_args(args), return_samples=return_samples)


# --------------------------------------------------------------------------- the command


def cmd_eval(args) -> int:
    """Evaluate an edited model; write report.json, report.md and grid.png."""
    from engine.evaluation.report import describe_kid, write_report
    from engine.export import check_writable_parent

    out = Path(args.out)
    if out.is_dir():  # fail before generating anything
        raise FileExistsError(f"--out {out} is a folder; give a file name such as {out / 'report.json'}")
    check_writable_parent(out)
    if args.attack and args.suite != "toy":
        raise ValueError("--attack runs with the toy suite; for a real model use erasure attack --clip-model DIR")
    if args.attack and args.attack_concepts < 1:
        raise ValueError(f"--attack-concepts must be >= 1, got {args.attack_concepts}")
    report, samples = run_suite(args, return_samples=True)
    if args.attack:
        from engine.attacks.cli import attack_concepts

        report["attacks"] = attack_concepts(args, report)
    written = write_report(report, out, samples)
    q, timing = report["quality"], report["timing"]
    num = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731  (a suite may leave any None)
    print(
        f"erased {len(report['erased'])} concept(s): still recognised {num(report['erased_acc'], '.1f')}% (direct), "
        f"{num(report['erased_acc_other_templates'], '.1f')}% (held-out templates), "
        f"{num(report['erased_acc_indirect'], '.1f')}% (indirect); retained {num(report['retained_acc'], '.1f')}%; "
        f"H {num(report['H'], '.1f')}"
    )
    print(
        f"{describe_kid(q)}; CLIP score {num(q['clip_score'], '.2f')} "
        f"(original {num(q['clip_score_original'], '.2f')}; higher is better)"
    )
    print(
        f"generation {num(timing.get('generation_seconds'), '.1f')} s, {num(timing.get('total_seconds'), '.1f')} s in all"
    )
    for name, rates in (report.get("attacks") or {}).items():
        print(f"under attack, {name}: " + ", ".join(f"{k} {v:.0f}%" for k, v in rates.items() if isinstance(v, float)))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0
