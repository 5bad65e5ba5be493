"""Every erasure method on the toy world, measured by the evaluation harness.

    python -m benchmarks.toy_methods [--methods uce,esd,co-erasing,bi-erasing,trce]
        [--scenarios identity,unsafe,identities10] [--world DIR] [--iterations N]
        [--set KEY=VALUE ...]

Scenarios (concepts from the toy world's catalogue):

* ``identity``: erase one identity (the first of the catalogue), anchor "a person";
* ``unsafe``: erase one unsafe stand-in ("skull"), anchor "a tree"; its synonyms and
  paraphrases (never seen in the erasure's prompts) are measured too;
* ``identities10``: erase the first 10 identities at once, anchor "a person".

For each (method, scenario): erase with the method's defaults plus its ``toy`` preset (a 32x32
world trains in seconds per hundred steps on a CPU), then ``evaluate_toy`` against the
original: erased-concept recognition (training templates, held-out templates, indirect
prompts), retained accuracy, H, KID to the original and the time of each part. Writes
``benchmarks/results/toy_methods.json`` and prints a Markdown table.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import (add_out_argument, argument_parser, device_name, git_sha, now, previous_results,
                                result_path, write_report)
from engine.api import erase
from engine.cli import parse_sets
from engine.concepts import concepts_from_names
from engine.evaluation import evaluate_toy
from engine.export import package_versions
from engine.methods import get_method
from engine.toyworld import TEMPLATES, concepts
from engine.toyworld.world import pipeline_path, verify_world, world_name

# Fine-tuning settings for the toy world: each method's ``toy`` preset (engine/methods/<method>.py,
# e.g. `erasure erase --preset toy`; the published settings are for SD's 860M-parameter UNet, this
# one has 6M parameters and 8x8 latents), without checkpoints, for the steps of the scenario.
TOY_PRESET = "toy"
TOY_RUN = {"checkpoint_every": 0}
# Steps per scenario: ten concepts share one run, so it gets more steps (about 100 per concept).
TOY_ITERATIONS = {"identity": 300, "unsafe": 300, "identities10": 1000}


def scenario(name: str):
    """(concept set, erased names). The preservation set, used by the closed-form edits (uce and
    trce's stage 1), is the demo's: every identity not erased and 300 captions of the world,
    less those that show an erased concept (by name, synonym or paraphrase)."""
    from engine.demo import demo_concepts, preservation_captions
    from engine.toyworld import make_dataset

    if name in ("identity", "identities10"):
        concept_set, names, _ = demo_concepts(1 if name == "identity" else 10)
        return concept_set, names
    if name == "unsafe":
        from engine.toyworld.catalogue import unsafe_concept

        skull = unsafe_concept("skull")
        words = ["skull", *skull.synonyms, *skull.paraphrases, *skull.heldout_paraphrases]
        templates = [t.replace("{concept}", "{}") for t in TEMPLATES["unsafe"]["train"]]
        captions = preservation_captions(make_dataset(300, seed=12345)["captions"], words)
        return concepts_from_names(["skull"], anchor="a tree", templates=templates, preserve=concepts("identity"),
                                   captions=captions), ["skull"]
    raise ValueError(f"unknown scenario {name!r}")


def method_settings(method: str, scenario_name: str, iterations: int | None = None,
                    overrides: dict | None = None) -> dict:
    if not get_method(method).trains:  # closed form: no fine-tuning settings
        return {}
    settings = {**get_method(method).preset(TOY_PRESET), **TOY_RUN, "iterations": TOY_ITERATIONS[scenario_name]}
    if iterations is not None:
        settings["iterations"] = iterations
    settings.update(overrides or {})
    return settings


def parse_arguments(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--methods", default="uce,esd,co-erasing,bi-erasing,trce")
    parser.add_argument("--scenarios", default="identity,unsafe,identities10")
    parser.add_argument("--world", help="toy world folder, or a shipped world by name: v1, v2 (default: v2)")
    parser.add_argument("--iterations", type=int, help="fine-tuning steps (default: TOY_ITERATIONS per scenario)")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a fine-tuning setting of every method run, as erasure erase --set")
    add_out_argument(parser, "toy_methods.json")
    return parser.parse_args(argv)


def erase_and_evaluate(method: str, scen: str, concept_set, names: list[str], settings: dict, model, world,
                       images_per_prompt: int, sha: str) -> dict:
    """Erase scenario `scen`'s concepts from `model` with `method` and evaluate the result: one results row."""
    work = Path(tempfile.mkdtemp(prefix="toy-methods-"))
    try:
        start = time.perf_counter()
        result = erase(str(model), concept_set, method=method, progress=False, **settings)
        result.save(work / "erased", save_pipeline=True)
        erase_s = time.perf_counter() - start
        report = evaluate_toy(work / "erased", names, original=model, world=world,
                              images_per_prompt=images_per_prompt, progress=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"method": method, "scenario": scen, "settings": settings, "erase_seconds": erase_s,
            "erased_acc": report["erased_acc"], "erased_acc_other_templates": report["erased_acc_other_templates"],
            "erased_acc_indirect": report["erased_acc_indirect"], "retained_acc": report["retained_acc"],
            "original": report["original_acc"], "H": report["H"], "kid": report["quality"]["kid"],
            "eval_seconds": report["timing"]["total_seconds"], "training": result.manifest.get("training"),
            "git_sha": sha}


def print_table(results: list[dict]) -> None:
    pct = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    print("| scenario | method | erased (train / held-out / indirect templates) % | retained % | H | KID | erase s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['scenario']} | {r['method']} | {pct(r['erased_acc'])} / {pct(r['erased_acc_other_templates'])} / "
              f"{pct(r['erased_acc_indirect'])} | {pct(r['retained_acc'])} | {pct(r['H'])} | {r['kid']:.4f} | "
              f"{r['erase_seconds']:.0f} |")


def main(argv=None):
    args = parse_arguments(argv)
    sha = git_sha()  # at launch: the code that runs is this sha's
    world = verify_world(args.world)
    model = pipeline_path(world)
    out = result_path(args.out, "toy_methods.json")
    results = previous_results(out, world_name(world))
    for scen in args.scenarios.split(","):
        concept_set, names = scenario(scen)
        for method in args.methods.split(","):
            settings = method_settings(method, scen, args.iterations, parse_sets(args.set))
            print(f"== {method} on {scen}: {settings}", flush=True)
            row = erase_and_evaluate(method, scen, concept_set, names, settings, model, world, args.images_per_prompt,
                                     sha)
            results = [r for r in results if (r["method"], r["scenario"]) != (method, scen)] + [row]
            print(json.dumps(row), flush=True)
            write_report(out, {"benchmark": "toy_methods", "device": device_name(torch.device("cpu")),
                               "world": world_name(world), "versions": package_versions(), "git_sha": sha,
                               "date": now(), "results": results})
    print_table(results)


if __name__ == "__main__":
    main()
