"""``erasure toyworld ...``: build the toy world, say where it is, list its concepts, check it,
measure its gates.

The gates are measured by the evaluation side (``engine.evaluation.gates.measure_gates``), which
the ``erasure`` parser passes in: the toy world does not import the evaluation package.
"""

from __future__ import annotations

import json
from functools import partial


def cmd_build(args, measure_gates) -> int:
    from engine.toyworld.build import BuildConfig, build_world

    config = BuildConfig.quick(args.seed, args.world) if args.quick else BuildConfig.for_world(args.world, args.seed)
    out = build_world(args.out, config, progress=not args.quiet)
    if not args.skip_gates:
        gates = measure_gates(out, progress=not args.quiet)
        print(json.dumps(gates["summary"], indent=2))
    print(f"wrote the toy world to {out}")
    return 0


def cmd_path(args) -> int:
    from engine.toyworld.world import pipeline_path, world_path

    root = world_path(args.world)
    print(pipeline_path(root) if args.pipeline else root)
    return 0


# The kinds a user erases (colours and backgrounds are attributes of the scenes).
CONCEPT_KINDS = ("identity", "object", "style", "unsafe")


def concepts_text(kinds: tuple[str, ...] = CONCEPT_KINDS) -> str:
    """The concept names of ``kinds``, one per line under a ``# kind`` heading: a names file
    (``.txt``, ``#`` lines are comments) that ``erasure erase --concepts`` reads."""
    from engine.toyworld.catalogue import concepts

    blocks = []
    for kind in kinds:
        names = concepts(kind)
        blocks.append("\n".join([f"# {kind} ({len(names)})", *names]))
    return "\n\n".join(blocks) + "\n"


def cmd_concepts(args) -> int:
    from engine.toyworld.world import world_path

    if args.world is not None:
        world_path(args.world)  # a folder that is not a world is an error, not the catalogue
    text = concepts_text((args.kind,) if args.kind else CONCEPT_KINDS)
    if args.out is None:
        print(text, end="")
        return 0
    from pathlib import Path

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    count = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    print(f"wrote {count} concept names to {out} (use it as --concepts)")
    return 0


def cmd_verify(args) -> int:
    from engine.toyworld.world import verify_world, world_info

    root = verify_world(args.world)
    print(f"{root}: {len(world_info(root)['files'])} files, all sha256 match")
    return 0


def cmd_gates(args, measure_gates) -> int:
    gates = measure_gates(args.world, images_per_prompt=args.images_per_prompt, progress=not args.quiet,
                          write=not args.no_write)
    print(json.dumps(gates["summary"], indent=2))
    return 0 if gates["summary"]["all_pass"] else 1


def add_toyworld_parser(sub, measure_gates) -> None:
    """Add ``toyworld`` and its sub-commands to the ``erasure`` parser's sub-parsers;
    ``measure_gates(world, images_per_prompt=..., progress=..., write=...)`` measures and records
    a world's quality gates (``engine.evaluation.gates.measure_gates``)."""
    p = sub.add_parser("toyworld", help="the embedded toy world: build, path, concepts, verify, gates")
    tsub = p.add_subparsers(dest="toyworld_command", required=True)

    b = tsub.add_parser("build", help="train the toy world from a seed (about 90 minutes on 2 CPU cores)")
    b.add_argument("--out", required=True, help="output folder; rerun the same command to resume")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--world", choices=("v1", "v2"), default="v2",
                   help="v2 (the default world): 432 identities, SD1.5's text width 768 and generic captions "
                        "('a person'), about 90 minutes on 2 CPU cores; v1: 128 identities, text width 96")
    b.add_argument("--quick", action="store_true", help="a few steps per stage: tests the machinery only")
    b.add_argument("--skip-gates", action="store_true", help="do not measure the quality gates afterwards")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=partial(cmd_build, measure_gates=measure_gates))

    w = tsub.add_parser("path", help="print the toy world's folder (the shipped one by default)")
    w.add_argument("--world", help="a world folder, or a shipped world by name: v1, v2 (default: $ERASURE_TOYWORLD or v2)")
    w.add_argument("--pipeline", action="store_true", help="print its diffusers pipeline folder instead")
    w.set_defaults(func=cmd_path)

    c = tsub.add_parser("concepts", help="list the world's concept names by kind (or write a names file)")
    c.add_argument("--world", help="a world folder, or a shipped world by name: v1, v2 (default: $ERASURE_TOYWORLD or v2)")
    c.add_argument("--kind", choices=CONCEPT_KINDS, help="only this kind (default: all four)")
    c.add_argument("--out", metavar="FILE", help="write the names to FILE (a .txt usable as `erasure erase --concepts`)")
    c.set_defaults(func=cmd_concepts)

    v = tsub.add_parser("verify", help="check every file of the world against its sha256")
    v.add_argument("--world")
    v.set_defaults(func=cmd_verify)

    g = tsub.add_parser("gates", help="measure the quality gates and write them to world.json and README.md")
    g.add_argument("--world")
    g.add_argument("--images-per-prompt", type=int, default=4, help="generated images per held-out prompt (default 4)")
    g.add_argument("--no-write", action="store_true", help="only print the results")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=partial(cmd_gates, measure_gates=measure_gates))
