"""`erasure demo`: erase identities from the shipped toy world with the closed-form method and
measure the erasure (without a toy world: a random-weight tiny pipeline and the edit's fit)."""

from __future__ import annotations

import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO_METHOD = "uce-plus"


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help=f"erase toy-world identities with {DEMO_METHOD} and measure the erasure")
    p.add_argument("--out", default="build/demo")
    p.add_argument("--erase", type=int, default=10, help="how many identities to erase (default 10)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--world", help="toy world folder, or a shipped world by name: v1, v2 (default: v2)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_demo)


def _demo_random_weights(args) -> int:
    """Without a toy world: erase 110 made-up names from a random-weight tiny SD pipeline, keep 10,
    and report the fit of the edit at the cross-attention projections."""
    from engine.api import erase
    from engine.concepts import concepts_from_names, load_concepts
    from engine.tiny import write_tiny_model

    out = Path(args.out)
    model = out / "model"
    if not (model / "model_index.json").exists():
        write_tiny_model("tiny", model, seed=0)
    print(
        "demo: no toy world is shipped with this installation (pass --world DIR from `erasure toyworld "
        "build`), so this runs on a RANDOM-WEIGHT tiny "
        f"Stable Diffusion pipeline ({model}); the numbers show the edit's fit at the cross-attention "
        "projections, not image-level erasure."
    )
    names = load_concepts(EXAMPLES / "identities.txt").names()
    captions = [c for c in (EXAMPLES / "captions.txt").read_text().splitlines() if c.strip()]
    concepts = concepts_from_names(
        names[:110],
        anchor="a person",
        templates=["a photo of {}", "a portrait of {}", "{} smiling"],
        preserve=names[110:],
        captions=captions,
    )
    start = time.perf_counter()
    result = erase(str(model), concepts, method=DEMO_METHOD, progress=not args.quiet)
    erased = out / "erased"
    result.save(erased, export_lora=True, overwrite=True)
    seconds = time.perf_counter() - start
    solve = result.manifest["solve"]
    before = result.edit.concept_residual_before
    after = solve["concept_residual"]
    print("\nK/V projections of each erased concept vs its anchor's, relative distance over all layers:")
    print(f"{'concept':<24} {'before':>8} {'after':>8}")
    for name in list(after)[:8]:
        print(f"{name:<24} {before[name]:>8.3f} {after[name]:>8.3f}")
    print(f"... {len(after)} concepts in total")
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    print(f"mean distance to the anchor: before {mean(before):.3f}, after {mean(after):.3f}")
    print(
        f"retained ({len(names) - 110} identities, {len(captions)} captions): relative drift of their "
        f"projections {solve['preserve_drift']:.4f}"
    )
    print(f"solver {solve['solver']} (condition {solve['condition']:.3g}); {seconds:.1f} s in all")
    print(f"wrote {erased} (pipeline, delta.safetensors, lora/, manifest.json)")
    return 0


def demo_concepts(count: int):
    """The demo's edit of the selected toy world: (ConceptSet, erased names, names preserved).
    The first ``count`` identities are erased toward "a person" with the identity templates; the
    other identities and the world's captions that name none of the erased ones are preserved
    (MACE/UCE style)."""
    from engine.concepts import concepts_from_names
    from engine.toyworld import TEMPLATES, concepts, make_dataset

    identities = concepts("identity")
    erased, kept = identities[:count], identities[count:]
    captions = preservation_captions(make_dataset(300, seed=12345)["captions"], erased)
    concept_set = concepts_from_names(
        erased, anchor="a person", templates=[t.replace("{name}", "{}") for t in TEMPLATES["identity"]["train"]],
        preserve=kept, captions=captions,
    )
    return concept_set, erased, kept


def preservation_captions(captions: list[str], erased: list[str]) -> list[str]:
    """The distinct ``captions`` (sorted) that name none of the ``erased`` concepts: a caption that
    names one would ask the edit to keep what it erases."""
    names = [n.lower() for n in erased]
    return sorted({c for c in captions if not any(n in c.lower() for n in names)})


def _seen_as_summary(rows: list[dict]) -> str:
    """What the erased concepts' images showed, over all erased rows (each row's ``seen_as_kind``
    shares weighted by its image count), most frequent first."""
    total, seen = 0, {}
    for row in rows:
        if row["role"] != "erased":
            continue
        total += row["n_images"]
        for kind, share in (row.get("seen_as_kind") or {}).items():
            seen[kind] = seen.get(kind, 0.0) + share * row["n_images"] / 100
    ranked = sorted(seen.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{kind} {100 * n / max(total, 1):.0f}%" for kind, n in ranked)


def run_demo(args) -> int:
    """Erase identities from the toy world with the closed-form method, then measure it."""
    from engine.toyworld.world import SHIPPED, WORLD_FILE

    if args.world is None and not (SHIPPED / WORLD_FILE).is_file():
        return _demo_random_weights(args)
    from engine.api import erase
    from engine.evaluation.report import describe_kid, write_report
    from engine.evaluation import evaluate_toy
    from engine.toyworld.world import pipeline_path, verify_world

    world = verify_world(args.world)
    model = pipeline_path(world)
    concept_set, erased_names, kept = demo_concepts(args.erase)
    out = Path(args.out)
    print(f"demo: erasing {len(erased_names)} identities from the toy world ({model}) with {DEMO_METHOD}; "
          f"preserving {len(kept)} identities and {len(concept_set.preserve_captions)} captions")
    start = time.perf_counter()
    result = erase(str(model), concept_set, method=DEMO_METHOD, progress=not args.quiet)
    erased_dir = out / "erased"
    result.save(erased_dir, overwrite=True)
    erase_seconds = time.perf_counter() - start
    print(f"erased in {erase_seconds:.1f} s; evaluating the edited model against the original")
    report, samples = evaluate_toy(
        erased_dir, erased_names, original=model, world=world, images_per_prompt=args.images_per_prompt,
        seed=0, progress=not args.quiet, return_samples=True,
    )
    written = write_report(report, out / "report.json", samples)
    pct = lambda v: "n/a" if v is None else f"{v:5.1f}%"  # noqa: E731
    before = report["original_acc"]
    print(f"\n{'':<44} {'original':>9} {'erased':>9}")
    print(f"{'erased identities recognised (train templates)':<44} {pct(before['erased']):>9} {pct(report['erased_acc']):>9}")
    print(f"{'erased identities recognised (held-out)':<44} {pct(before['erased_other_templates']):>9} "
          f"{pct(report['erased_acc_other_templates']):>9}")
    print(f"{'retained concepts recognised':<44} {pct(before['retained']):>9} {pct(report['retained_acc']):>9}")
    print(f"{'  close (other identities)':<44} {'':>9} {pct(report['retained_acc_close']):>9}")
    print(f"{'  other kinds':<44} {'':>9} {pct(report['retained_acc_other']):>9}")
    q = report["quality"]
    if q["clip_score"] is not None:
        score = lambda v: "n/a" if v is None else f"{v:5.1f}"  # noqa: E731
        print(f"{'CLIP score (image-prompt agreement)':<44} {score(q['clip_score_original']):>9} "
              f"{score(q['clip_score']):>9}")
    print("what the erased identities' prompts drew, as the evaluator saw it: " + _seen_as_summary(report["concepts"]))
    print(f"H {report['H']:.1f} (harmonic mean of 100 - erased recognised and retained recognised; higher is better)")
    print(describe_kid(q))
    print(f"{report['timing']['images_generated']} images in {report['timing']['generation_seconds']:.0f} s")
    print("wrote " + ", ".join(str(p) for p in written.values()) + f", and the erased pipeline in {erased_dir}")
    return 0
