"""``erasure attack``: try to bring an erased concept back, and say how often it came back."""

from __future__ import annotations

import argparse

from engine.attacks.inversion import InversionSettings
from engine.attacks.runner import ATTACKS, JUDGE_CLASSES, AttackSettings
from engine.attacks.unlearndiff import UnlearnDiffSettings


def add_attack_parser(sub) -> None:
    p = sub.add_parser("attack", help="attack an erased concept: concept inversion, UnlearnDiffAtk, Ring-A-Bell; "
                                      "report how often it comes back")
    p.add_argument("--model", required=True, help="the attacked (erased) model: a diffusers folder")
    p.add_argument("--concept", required=True, help="the concept to bring back (a toy-world name, or any text "
                                                    "with --clip-model)")
    p.add_argument("--attack", default=",".join(ATTACKS),
                   help=f"comma-separated attacks (default: all): {', '.join(ATTACKS)}")
    p.add_argument("--original", help="the unedited model: it draws the concept's target images and the transfer "
                                      "rows learn on it (default: the toy world's pipeline)")
    p.add_argument("--no-transfer", action="store_true", help="skip replaying what was learned on the original")
    p.add_argument("--world", help="toy world folder, or a shipped world by name: v1, v2 (default: $ERASURE_TOYWORLD or v2)")
    p.add_argument("--clip-model", help="local CLIP folder: judge a concept that is not the toy world's, zero-shot")
    p.add_argument("--judge-class", action="append", metavar="TEXT",
                   help=f"another zero-shot class for the CLIP judge (repeatable; default {list(JUDGE_CLASSES)})")
    p.add_argument("--images", type=int, default=32, help="images judged per attack row (default 32)")
    p.add_argument("--prompts", type=int, default=4, help="prompts attacked by UnlearnDiffAtk (default 4)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the world's, else 25)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the world's, else 5.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output folder: report.json, report.md and the learned tokens")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a non-empty folder")
    add_budget_args(p)
    p.set_defaults(func=cmd_attack)


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """Each attack's budget options (``erasure attack`` and ``erasure eval --attack`` share them)."""
    d = InversionSettings()
    g = p.add_argument_group("concept inversion (defaults: Pham et al.'s recipe)")
    g.add_argument("--ti-tokens", type=int, default=d.tokens, help=f"tokens learned (default {d.tokens})")
    g.add_argument("--ti-steps", type=int, default=d.steps, help=f"optimisation steps (default {d.steps})")
    g.add_argument("--ti-batch", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    g.add_argument("--ti-lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    g.add_argument("--ti-images", type=int, default=d.images, help=f"concept images learned from (default {d.images})")
    g.add_argument("--init-word", help="word the tokens start from (default: person / object / art by kind)")
    u = UnlearnDiffSettings()
    g = p.add_argument_group("UnlearnDiffAtk (defaults: the official configs)")
    g.add_argument("--udiff-tokens", type=int, help="adversarial tokens prepended (default 3 objects/styles, else 5)")
    g.add_argument("--udiff-timesteps", type=int, default=u.timesteps, help=f"timesteps visited (default {u.timesteps})")
    g.add_argument("--udiff-iterations", type=int, default=u.iterations,
                   help=f"steps per timestep (default {u.iterations})")
    g = p.add_argument_group("Ring-A-Bell (defaults: the official notebook's, K and eta by the concept's kind)")
    g.add_argument("--rab-length", type=int, help="K: tokens of the searched prompt (default 16)")
    g.add_argument("--rab-strength", type=float, help="eta: weight of the concept vector (default 3, unsafe 5.5)")
    g.add_argument("--rab-generations", type=int, help="generations of the genetic search (default 3000)")
    g.add_argument("--rab-population", type=int, help="candidates per generation (default 200)")


def settings_from_args(args: argparse.Namespace) -> AttackSettings:
    """The ``erasure attack`` command's settings."""
    return attack_settings(args, model=args.model, concept=args.concept, attacks=args.attack, original=args.original,
                           world=args.world, clip_model=args.clip_model, judge_classes=args.judge_class,
                           images=args.images, prompts=args.prompts, transfer=not args.no_transfer,
                           progress=not args.quiet)


def attack_settings(args: argparse.Namespace, *, model, concept: str, attacks: str, judge_classes=None,
                    **fields) -> AttackSettings:
    """AttackSettings for ``model`` and ``concept`` with the budgets of ``add_budget_args`` and the
    sampling options (steps, guidance, seed, device) of ``args``; ``fields`` set the rest."""
    rab = {k: v for k, v in (("length", args.rab_length), ("strength", args.rab_strength),
                             ("generations", args.rab_generations), ("population", args.rab_population)) if v is not None}
    settings = AttackSettings(
        model=model, concept=concept, attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()),
        judge_classes=tuple(judge_classes) if judge_classes else JUDGE_CLASSES, steps=args.steps,
        guidance=args.guidance, seed=args.seed, device=getattr(args, "device", None), **fields,
        inversion=InversionSettings(tokens=args.ti_tokens, steps=args.ti_steps, batch_size=args.ti_batch,
                                    lr=args.ti_lr, images=args.ti_images, init_word=args.init_word, seed=args.seed),
        unlearndiff=UnlearnDiffSettings(tokens=args.udiff_tokens, timesteps=args.udiff_timesteps,
                                        iterations=args.udiff_iterations, seed=args.seed),
    )
    if rab:  # the kind's defaults, with these budgets
        from engine.attacks.runner import ring_a_bell_settings

        settings = settings.replace(ring_a_bell=ring_a_bell_settings(settings).replace(**rab))
    return settings


def render_markdown(report: dict) -> str:
    """The report as a short Markdown table: one row per attack."""
    c = report["concept"]
    lines = [f"# Attacks on {c['name']!r}" + (f" ({c['kind']})" if c["kind"] else ""), "",
             f"Model: `{report['model']}`; judge: {report['judge']}.", "",
             "| attack | concept shown | budget | seconds |", "| --- | --- | --- | --- |",
             f"| none (the concept's own prompts) | {report['plain']['success_rate']:.1f}% of "
             f"{report['plain']['n_images']} images | - | - |"]
    for name, row in report["attacks"].items():
        unit = f"of {row['n_prompts']} prompts" if "n_prompts" in row else f"of {row['n_images']} images"
        budget = ", ".join(f"{k} {v}" for k, v in row["settings"].items() if k != "seed" and v is not None)
        lines.append(f"| {name} | {row['success_rate']:.1f}% {unit} | {budget} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def attack_concepts(args, report: dict) -> dict:
    """``erasure eval --attack``: every chosen attack on the first ``--attack-concepts`` erased
    concepts of a toy report; {concept: {"plain": %, attack: %, ...}} plus each run's report."""
    from engine.attacks.runner import run_attacks

    out = {}
    for name in report["erased"][: args.attack_concepts]:
        settings = attack_settings(args, model=args.model, concept=name, attacks=args.attack, original=args.original,
                                   world=args.world, images=args.attack_images, prompts=args.attack_prompts,
                                   progress=not args.quiet)
        run = run_attacks(settings)
        out[name] = {"plain": run["plain"]["success_rate"],
                     **{attack: row["success_rate"] for attack, row in run["attacks"].items()},
                     "judge": run["judge"], "details": run["attacks"]}
    return out


def cmd_attack(args) -> int:
    from engine.attacks.runner import run_attacks
    from engine.export import atomic_output_dir, reserve_output, write_json

    settings = settings_from_args(args)
    with reserve_output(args.out, overwrite=args.overwrite), atomic_output_dir(args.out, args.overwrite) as tmp:
        report = run_attacks(settings, out=tmp)
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(render_markdown(report))
    print(render_markdown(report))
    return 0
