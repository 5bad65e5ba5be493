"""Does the end-of-run movement check tell an erasure from a run that did nothing?

    python -m benchmarks.toy_moved [--methods esd,co-erasing] [--iterations 25,50,100,300]
        [--settings published,toy]

A fine-tuning run ends by measuring how far the erased concept's noise predictions moved toward
the objective's target on 8 fixed cached samples (0: not at all, 1: reached; the manifest's
``training.moved_to_target``) and warns below ``engine.finetune.trainer.MOVED_WARNING``. This
benchmark erases the toy world's first identity (anchor "a person") with each method at each
number of steps, with the published settings and with the ``toy`` preset, and puts the measured
movement beside the evaluation harness's verdict (erased-concept accuracy on training and held-out
templates, retained accuracy, H): a threshold is right if every run below it still shows the
identity and every run that erased it is above it. Writes benchmarks/results/toy_moved.json.
"""

from __future__ import annotations

import json

import torch

from benchmarks._common import add_out_argument, argument_parser, device_name, git_sha, now, result_path, write_report
from benchmarks.toy_methods import TOY_PRESET, TOY_RUN, erase_and_evaluate, scenario
from engine.export import package_versions
from engine.finetune.trainer import MOVED_WARNING
from engine.methods import get_method
from engine.toyworld.world import pipeline_path, verify_world


def main(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--methods", default="esd,co-erasing")
    parser.add_argument("--iterations", default="25,50,100,300")
    parser.add_argument("--settings", default="published,toy", help="published (the method's defaults) and/or toy")
    parser.add_argument("--world", help="toy world folder, or a shipped world by name: v1, v2 (default: v2)")
    add_out_argument(parser, "toy_moved.json")
    args = parser.parse_args(argv)
    sha, world = git_sha(), verify_world(args.world)
    model = pipeline_path(world)
    concept_set, names = scenario("identity")
    rows = []
    for method in args.methods.split(","):
        for settings_name in args.settings.split(","):
            base = get_method(method).preset(TOY_PRESET) if settings_name == "toy" else {}
            for steps in (int(s) for s in args.iterations.split(",")):
                settings = {**base, **TOY_RUN, "iterations": steps}
                row = erase_and_evaluate(method, "identity", concept_set, names, settings, model, world, 1, sha)
                row.update(settings_name=settings_name, moved_to_target=row.pop("training")["moved_to_target"])
                rows.append(row)
                print(f"{method:<11} {settings_name:<9} {steps:>4} steps: moved {row['moved_to_target']:.3f} | erased "
                      f"{row['erased_acc']:.1f}% / held-out {row['erased_acc_other_templates']:.1f}% recognised | "
                      f"retained {row['retained_acc']:.1f}% | H {row['H']:.1f}", flush=True)
    below = [r for r in rows if r["moved_to_target"] < MOVED_WARNING]
    above = [r for r in rows if r["moved_to_target"] >= MOVED_WARNING]
    summary = {"threshold": MOVED_WARNING,
               "runs_below": len(below), "below_min_erased_acc": min((r["erased_acc"] for r in below), default=None),
               "runs_above": len(above), "above_max_erased_acc": max((r["erased_acc"] for r in above), default=None)}
    print(json.dumps(summary))
    out = result_path(args.out, "toy_moved.json")
    write_report(out, {"benchmark": "toy_moved", "device": device_name(torch.device("cpu")), "world": str(world),
                       "versions": package_versions(), "git_sha": sha, "date": now(), "summary": summary,
                       "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
