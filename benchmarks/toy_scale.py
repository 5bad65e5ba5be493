"""Closed-form erasure of many identities on the toy world: what is erased, what is kept.

    python -m benchmarks.toy_scale [--methods uce,uce-plus] [--counts 1,10,100] [--kind identity]
        [--variants names,listed,all] [--images-per-prompt 1] [--set KEY=VALUE ...] [--tag NAME]
        [--templates FILE]

For each method, count N and variant, the first N concepts of the catalogue's ``--kind``
(identity, object or style) are erased from the world's pipeline toward the kind's anchor
("a person", "an object", "a painting": prompts the world draws as that kind, without a
particular one):

* ``names``: the names alone, as `erasure erase --concepts names.txt --anchor "a person"`
  does (template "{}", nothing listed to preserve: only what the method itself preserves);
* ``listed``: the same, with every second concept of the kind not erased listed to preserve;
  ``--templates FILE`` (one template per line, ``{}`` where the name goes) gives the erased
  and listed names these templates instead of "{}", e.g. examples/context_templates.txt;
* ``all`` (identities only): the demo's edit (`erasure demo`): the identity templates, every
  identity not erased and the world's captions that name none of the erased ones listed to
  preserve.

Then ``evaluate_toy`` against the original (default retained set: 100 concepts, three quarters
identities). Retained accuracy is split into identities the edit listed to preserve and those
never listed, and objects / styles / unsafe. An edit the method refuses (uce-plus past its
generic-prior drift limit) is recorded as refused, with the drift, and not evaluated. Writes
``benchmarks/results/toy_scale.json`` (rows keyed by method, count, variant and tag; reruns
replace their rows; a row without ``kind`` erased identities) and prints a table.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from benchmarks._common import (add_out_argument, argument_parser, device_name, git_sha, now, previous_results,
                                result_path, write_report)
from engine.api import erase
from engine.closed_form import EditRefusedError
from engine.cli import parse_sets
from engine.concepts import concepts_from_names
from engine.demo import demo_concepts
from engine.evaluation import evaluate_toy
from engine.evaluation.prompts import read_prompt_txt
from engine.export import package_versions
from engine.models import load_pipeline
from engine.toyworld import concepts
from engine.toyworld.world import pipeline_path, verify_world, world_name

ANCHORS = {"identity": "a person", "object": "an object", "style": "a painting"}  # catalogue.ANCHOR_PROMPTS
VARIANTS = ("names", "listed", "all")


def concept_set(count: int, variant: str, kind: str = "identity", templates: list[str] | None = None):
    """(ConceptSet, erased names, names listed to preserve) of a run; ``templates``: the names'
    templates in the variants names and listed (None: "{}")."""
    if kind not in ANCHORS:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(ANCHORS)}")
    pool = concepts(kind)
    if count > len(pool):
        raise ValueError(f"the world has {len(pool)} concepts of kind {kind}; cannot erase {count}")
    names = pool[:count]
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    if variant == "all":
        if kind != "identity" or templates:
            raise ValueError("the variant 'all' is the demo's edit of identities, with its own templates")
        return demo_concepts(count)
    listed = [n for n in pool if n not in names][::2] if variant == "listed" else []
    return concepts_from_names(names, anchor=ANCHORS[kind], templates=templates, preserve=listed), names, listed


def mean(values):
    return float(np.mean(values)) if values else None


def split_retained(report: dict, listed: list[str]) -> dict:
    """Retained accuracy (training templates) by group: identities listed / never listed, other kinds."""
    rows = [r for r in report["concepts"] if r["role"] == "retained"]
    ident = [r for r in rows if r["kind"] == "identity"]
    out = {"identities_listed": mean([r["acc"]["direct"] for r in ident if r["name"] in listed]),
           "identities_never_listed": mean([r["acc"]["direct"] for r in ident if r["name"] not in listed])}
    for kind in ("object", "style", "unsafe"):
        out[kind] = mean([r["acc"]["direct"] for r in rows if r["kind"] == kind])
    return out


def run_one(pipe, original, world, method: str, count: int, variant: str, settings: dict, images: int,
            kind: str = "identity", templates: list[str] | None = None) -> dict:
    cs, names, listed = concept_set(count, variant, kind, templates)
    start = time.perf_counter()
    try:
        result = erase(pipe, cs, method=method, progress=False, **settings)
    except EditRefusedError as err:  # the model is unchanged: nothing to evaluate
        return {"method": method, "kind": kind, "count": count, "variant": variant, "settings": settings,
                "templates": templates, "erase_seconds": time.perf_counter() - start, "refused": str(err),
                "prior_drift": err.drift}
    erase_s = time.perf_counter() - start
    report = evaluate_toy(pipe, names, original=original, world=world, images_per_prompt=images, progress=False)
    solve = result.manifest.get("solve", {})
    edit = result.edit  # closed-form methods: the share of each concept's way to its anchor left
    ratios = [edit.concept_residual[n] / max(edit.concept_residual_before[n], 1e-300) for n in names] if edit else []
    return {"method": method, "kind": kind, "count": count, "variant": variant, "settings": settings,
            "templates": templates, "erase_seconds": erase_s,
            "erased_acc": report["erased_acc"], "erased_acc_other_templates": report["erased_acc_other_templates"],
            "retained_acc": report["retained_acc"], "retained": split_retained(report, listed),
            "original": report["original_acc"], "H": report["H"], "kid": report["quality"]["kid"],
            "clip_score": report["quality"]["clip_score"], "preserve_weight": solve.get("preserve_weight"),
            "rows": solve.get("rows"), "residual_ratio": {"mean": mean(ratios), "max": max(ratios, default=None)},
            "preserve_weight_search": solve.get("preserve_weight_search"), "prior_drift": solve.get("prior_drift"),
            "eval_seconds": report["timing"]["total_seconds"]}


def print_table(results: list[dict]) -> None:
    pct = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    count = lambda r: f"{r['count']}" + ("" if r.get("kind", "identity") == "identity" else f" {r['kind']}")  # noqa: E731
    print("| method | tag | N | variant | erased (train / held-out) | retained: never listed / listed / objects / "
          "styles / all | H | KID | lam | erase s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "refused" in r:
            print(f"| {r['method']} | {r.get('tag', '')} | {count(r)} | {r['variant']} | refused: generic prior "
                  f"drift {r['prior_drift']:.3g} | - | - | - | - | {r['erase_seconds']:.1f} |")
            continue
        k = r["retained"]
        print(f"| {r['method']} | {r.get('tag', '')} | {count(r)} | {r['variant']} | {pct(r['erased_acc'])} / "
              f"{pct(r['erased_acc_other_templates'])} | {pct(k['identities_never_listed'])} / "
              f"{pct(k['identities_listed'])} / {pct(k['object'])} / {pct(k['style'])} / {pct(r['retained_acc'])} | "
              f"{pct(r['H'])} | {r['kid']:.2f} | {'-' if r['preserve_weight'] is None else format(r['preserve_weight'], '.3g')} | "
              f"{r['erase_seconds']:.1f} |")


def main(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--methods", default="uce,uce-plus")
    parser.add_argument("--counts", default="1,10,100")
    parser.add_argument("--kind", default="identity", choices=tuple(ANCHORS), help="what is erased")
    parser.add_argument("--variants", default="names,listed")
    parser.add_argument("--world", help="toy world folder, or a shipped world by name: v1, v2 (default: v2)")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of every method run, as erasure erase --set")
    parser.add_argument("--tag", default="", help="a label stored with the rows (e.g. the settings tried)")
    parser.add_argument("--templates", help="a text file of templates ({} where the name goes, one a line, "
                                            "# comments) for the names of the variants names and listed "
                                            "(default: {} alone)")
    add_out_argument(parser, "toy_scale.json")
    args = parser.parse_args(argv)
    sha = git_sha()
    world = verify_world(args.world)
    pipe, original = load_pipeline(pipeline_path(world)), load_pipeline(pipeline_path(world))
    snapshot = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    text_encoder = pipe.text_encoder  # text-gate replaces it by a widened copy
    out = result_path(args.out, "toy_scale.json")
    results = previous_results(out, world_name(world))
    settings = parse_sets(args.set)
    templates = [row.prompt for row in read_prompt_txt(args.templates).rows] if args.templates else None
    for method in args.methods.split(","):
        for count in (int(c) for c in args.counts.split(",")):
            for variant in args.variants.split(","):
                row = {**run_one(pipe, original, world, method, count, variant, settings, args.images_per_prompt,
                                 args.kind, templates),
                       "tag": args.tag, "git_sha": sha}
                pipe.unet.load_state_dict(snapshot)  # the next run starts from the original
                pipe.register_modules(text_encoder=text_encoder)
                key = lambda r: (r["method"], r.get("kind", "identity"), r["count"], r["variant"],  # noqa: E731
                                 r.get("tag", ""))
                results = [r for r in results if key(r) != key(row)] + [row]
                print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
                write_report(out, {"benchmark": "toy_scale", "device": device_name(torch.device("cpu")),
                                   "world": world_name(world), "versions": package_versions(), "date": now(),
                                   "images_per_prompt": args.images_per_prompt, "results": results})
    print_table(results)


if __name__ == "__main__":
    main()
