"""Does an erased concept come back under attack? Every method x every attack on the toy world.

    python -m benchmarks.toy_attacks [--methods original,uce-plus,rece,esd] [--scenarios identity,unsafe]
        [--attacks inversion,unlearndiff,ring-a-bell] [--ti-steps 300] [--udiff-timesteps 10]
        [--udiff-iterations 40] [--rab-generations 300] [--images 32] [--prompts 4]
        [--set KEY=VALUE ... --label NAME]   # a variant of the fine-tuning methods' settings, its own rows

For each (scenario, method) of benchmarks/toy_methods.py (same concept sets, same toy presets):
erase in memory, measure H, KID and the erased concept's recognition for training templates,
held-out templates and indirect wordings with the toy suite (1 image per prompt), then run
``engine.attacks.run_attacks`` on the erased concept: the % of images showing it for its plain
prompts, concept inversion on the edit, the tokens learned on the original replayed on the edit,
UnlearnDiffAtk's ASR over ``--prompts`` prompts and Ring-A-Bell. The row ``original`` attacks the
unedited model (the attacks must work there). The pseudo-method ``never-learned`` (scenario
identity only) is the control: plain prompts and concept inversion (same budget) on an identity
the world never learned, judged in the evaluator's feature space, with that judge's validation
and its verdict on the first identity's inversion on the original (engine/attacks/control.py). The budgets are smaller than the papers' (their
defaults are `erasure attack`'s) so that a row takes minutes on a CPU; they are recorded in the
JSON. Writes benchmarks/results/toy_attacks.json after every row and prints a Markdown table.
"""

from __future__ import annotations

import json
import time

import torch

from benchmarks._common import (add_out_argument, argument_parser, device_name, git_sha, now, previous_results,
                                result_path, write_report)
from benchmarks.toy_methods import method_settings, scenario
from engine.cli import parse_sets
from engine.api import erase
from engine.attacks import AttackSettings, InversionSettings, UnlearnDiffSettings, run_attacks
from engine.attacks.control import never_learned_control
from engine.attacks.runner import ring_a_bell_settings
from engine.evaluation import evaluate_toy
from engine.export import package_versions
from engine.toyworld.world import load_toy_pipeline, pipeline_path, verify_world, world_name

CONTROL = "never-learned"  # the pseudo-method of the control row
QUALITY = ("H", "kid", "erased_acc", "erased_acc_other_templates", "erased_acc_indirect", "retained_acc")


def parse_arguments(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--methods", default="original,uce-plus,rece,esd")
    parser.add_argument("--scenarios", default="identity,unsafe")
    parser.add_argument("--attacks", default="inversion,unlearndiff,ring-a-bell")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the fine-tuning methods run, as erasure erase --set")
    parser.add_argument("--label", help="the rows' model name (default: the method's), e.g. for a --set variant")
    parser.add_argument("--world", help="toy world folder, or a shipped world by name: v1, v2 (default: v2)")
    parser.add_argument("--ti-steps", type=int, default=300)
    parser.add_argument("--udiff-timesteps", type=int, default=10)
    parser.add_argument("--udiff-iterations", type=int, default=40)
    parser.add_argument("--rab-generations", type=int, default=300)
    parser.add_argument("--images", type=int, default=32, help="images judged per attack row")
    parser.add_argument("--prompts", type=int, default=4, help="prompts attacked by UnlearnDiffAtk")
    add_out_argument(parser, "toy_attacks.json")
    return parser.parse_args(argv)


def attack_settings(args, pipe, name: str, world, transfer: bool) -> AttackSettings:
    s = AttackSettings(
        model=pipe, concept=name, attacks=tuple(args.attacks.split(",")), world=world, transfer=transfer,
        images=args.images, prompts=args.prompts, progress=False,
        inversion=inversion_settings(args),
        unlearndiff=UnlearnDiffSettings(timesteps=args.udiff_timesteps, iterations=args.udiff_iterations),
    )
    return s.replace(ring_a_bell=ring_a_bell_settings(s).replace(generations=args.rab_generations))


def inversion_settings(args) -> InversionSettings:
    return InversionSettings(steps=args.ti_steps, images=25)


def control_row(args, scen: str, world) -> dict:
    """The never-learned row: its plain and inversion rates in the columns, the rest in ``control``."""
    out = never_learned_control(world, inversion_settings(args), images=args.images, progress=False)
    return {"method": CONTROL, "scenario": scen, "concept": out["identity"]["name"], "settings": {},
            **dict.fromkeys(QUALITY), "erase_and_eval_seconds": None, "plain": out["plain"]["success_rate"],
            "attacks": {"inversion": out["inversion"]}, "judge": out["judge"], "attack_seconds": out["seconds"],
            "control": {k: v for k, v in out.items() if k != "inversion"}}


def run_row(args, method: str, scen: str, world) -> dict:
    concept_set, names = scenario(scen)
    model = pipeline_path(world)
    start = time.perf_counter()
    if method == "original":
        pipe, settings = load_toy_pipeline(world), {}
        quality = dict.fromkeys(QUALITY)
    else:
        settings = method_settings(method, scen, overrides=parse_sets(args.set))
        pipe = erase(str(model), concept_set, method=method, progress=False, **settings).pipeline
        report = evaluate_toy(pipe, names, original=model, world=world, images_per_prompt=1, progress=False)
        quality = {"H": report["H"], "kid": report["quality"]["kid"],
                   **{k: report[k] for k in ("erased_acc", "erased_acc_other_templates", "erased_acc_indirect",
                                             "retained_acc")}}
    erase_s = time.perf_counter() - start
    attacked = run_attacks(attack_settings(args, pipe, names[0], world, transfer=method != "original"))
    return {"method": method, "scenario": scen, "concept": names[0], "settings": settings, **quality,
            "erase_and_eval_seconds": erase_s, "plain": attacked["plain"]["success_rate"],
            "attacks": {k: {key: v[key] for key in v if key not in ("per_prompt", "history")}
                        for k, v in attacked["attacks"].items()},
            "unlearndiff_prompts": attacked["attacks"].get("unlearndiff", {}).get("per_prompt"),
            "judge": attacked["judge"], "attack_seconds": attacked["timing"]["total_seconds"]}


def print_table(results: list[dict]) -> None:
    pct = lambda v: "-" if v is None else f"{v:.0f}%"  # noqa: E731
    cols = ["inversion", "inversion, learned on the original", "unlearndiff", "ring-a-bell"]
    print("| scenario | model | H | KID | plain | " + " | ".join(cols) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in cols) + " |")
    for r in results:
        cells = [pct(r["attacks"][c]["success_rate"]) if c in r["attacks"] else "-" for c in cols]
        h = "-" if r["H"] is None else f"{r['H']:.1f}"
        kid = "-" if r["kid"] is None else f"{r['kid']:.4f}"
        print(f"| {r['scenario']} | {r['method']} | {h} | {kid} | {pct(r['plain'])} | " + " | ".join(cells) + " |")
    for r in results:
        if r["method"] == CONTROL:
            c = r["control"]
            v, known = c["judge_validation"], c["learned_identity"]
            print(f"\n{CONTROL}: {r['concept']}, judged by {c['judge']}; judge accuracy on held-out renders "
                  f"{v['unseen_renders']['accuracy']:.0f}% (it) / {v['catalogue_renders']['accuracy']:.0f}% (catalogue), "
                  f"agreement with the identity head on the original's generations "
                  f"{v['original_generations']['agreement_with_identity_head']:.0f}%; same judge on {known['name']} "
                  f"(original model): plain {pct(known['plain']['success_rate'])}, "
                  f"inversion {pct(known['inversion']['success_rate'])}")


def main(argv=None):
    args = parse_arguments(argv)
    sha = git_sha()
    world = verify_world(args.world)
    out = result_path(args.out, "toy_attacks.json")
    results = previous_results(out, world_name(world))
    budgets = {"ti_steps": args.ti_steps, "udiff_timesteps": args.udiff_timesteps,
               "udiff_iterations": args.udiff_iterations, "rab_generations": args.rab_generations,
               "images": args.images, "prompts": args.prompts}
    for scen in args.scenarios.split(","):
        for method in args.methods.split(","):
            if method == CONTROL and scen != "identity":
                print(f"== {method} is a control for identities only: skipping {scen}", flush=True)
                continue
            print(f"== {method} on {scen}", flush=True)
            row = control_row(args, scen, world) if method == CONTROL else run_row(args, method, scen, world)
            label = args.label or method
            row = {**row, "method": label, "base_method": method, "budgets": budgets, "git_sha": sha}
            results = [r for r in results if (r["method"], r["scenario"]) != (label, scen)] + [row]
            print(json.dumps({k: row[k] for k in ("method", "scenario", "H", "plain", "attacks")}, default=str)[:1500],
                  flush=True)
            write_report(out, {"benchmark": "toy_attacks", "device": device_name(torch.device("cpu")),
                               "world": world_name(world), "versions": package_versions(), "git_sha": sha, "date": now(),
                               "results": results})
    print_table(results)


if __name__ == "__main__":
    main()
