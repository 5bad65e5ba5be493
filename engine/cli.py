"""Command line: `erasure <command>` (also `python -m engine <command>`).

    erasure erase --model DIR --concepts FILE --method uce --out OUT [--export-lora]
    erasure erase --model DIR --concepts FILE --method esd --set iterations=200 --out OUT [--resume]
    erasure apply --model DIR --delta OUT/delta.safetensors --out DIR2
    erasure tiny-model --arch tiny --out DIR
    erasure methods
    erasure demo --out build/demo
    erasure eval --model DIR --suite toy --erased FILE --out report.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from engine.concepts import load_yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def parse_sets(pairs: list[str]) -> dict:
    """`--set key=value` pairs; values parsed as YAML scalars (numbers, null, true/false)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            parsed = load_yaml(value, f"--set {key.strip()}") if value.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--set {key.strip()}: cannot read the value {value[:80]!r} ({' '.join(str(err).split())})") from None
        if isinstance(parsed, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string; a number is meant
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def _load_config_file(path: str | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = load_yaml(p.read_text(), str(p))  # JSON is valid YAML
    except yaml.YAMLError as err:
        raise ValueError(f"{p}: invalid YAML/JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def _reserve(args):
    """Lock --out and check it can be written before any work (the process that writes it: rank
    0 of a distributed run, whose launcher sets RANK)."""
    import contextlib

    from engine.export import reserve_output

    if getattr(args, "distributed", None) and os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return reserve_output(args.out, overwrite=getattr(args, "overwrite", False))


def cmd_erase(args) -> int:
    config = {**_load_config_file(args.config), **parse_sets(args.set)}
    if args.quiet:
        config["progress"] = False
    with _reserve(args):
        if args.per_concept_adapters:
            return _erase_with_adapters(args, config)
        return _erase(args, config)


def _erase(args, config) -> int:
    from engine.api import erase
    from engine.methods import available_methods, get_method

    trains = get_method(args.method).trains
    if args.distributed:
        if not trains:
            training = ", ".join(name for name, m in available_methods().items() if m.trains)
            raise SystemExit(f"--distributed trains a fine-tuning method ({training}), not {args.method}")
        config.update(distributed=args.distributed, zero_stage=args.zero_stage)
    result = erase(
        args.model,
        args.concepts,
        method=args.method,
        config=config or None,
        anchor=args.anchor,
        templates=args.template or None,
        model_config=args.model_config,
        allow_pickle=args.allow_pickle,
        **({"checkpoint_dir": args.checkpoint_dir or f"{args.out}.checkpoints", "resume": args.resume}
           if trains else {}),
    )
    out = result.save(args.out, export_lora=args.export_lora, lora_rank=args.lora_rank, save_pipeline=not args.no_pipeline,
                      overwrite=args.overwrite)
    if args.distributed:
        from engine import distributed

        main = distributed.is_main()
        distributed.shutdown()  # rank 0 has written the outputs when every rank gets here
        if not main:
            return 0
    print(_erase_summary(args.method, result))
    _print_timings(result.manifest)
    print(f"wrote {out}")
    return 0


def _erase_summary(method: str, result) -> str:
    """One line on what the run did, from the manifest sections its method wrote."""
    manifest = result.manifest
    head = f"erased {len(manifest['concepts']['concepts'])} concept(s) with {method}: "
    if "solve" in manifest:
        solve = manifest["solve"]
        drift = f", preservation drift {solve['preserve_drift']:.3g}" if solve["rows"]["preserve"] else ""
        return (head + f"{solve['layers_changed']} K/V matrices, solver {solve['solver']}, max concept residual "
                f"{max(solve['concept_residual'].values()):.3g}{drift}")
    if "training" in manifest:
        tr = manifest["training"]
        losses = f", loss {tr['first_loss']:.4g} -> {tr['final_loss']:.4g}" if tr["steps_run"] else ""
        return (head + f"{tr['steps_run']} steps (resumed from step {tr['resumed_from']}), "
                f"{tr['parameters_trained']:,} parameters{losses}")
    return head + f"{len(result.delta)} tensors changed"


def _print_timings(manifest: dict) -> None:
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in manifest["timings"].items()))


def _erase_with_adapters(args, config) -> int:
    from engine.api import erase_with_adapters
    from engine.finetune.adapters import ADAPTER_METHOD

    if args.method != ADAPTER_METHOD or args.distributed or args.export_lora or args.no_pipeline:
        raise SystemExit(f"--per-concept-adapters trains {ADAPTER_METHOD} LoRA adapters in one process: use --method "
                         f"{ADAPTER_METHOD}, without --distributed, --export-lora or --no-pipeline")
    run = erase_with_adapters(
        args.model, args.concepts, config=config or None, anchor=args.anchor, templates=args.template or None,
        model_config=args.model_config, allow_pickle=args.allow_pickle,
        checkpoint_dir=args.checkpoint_dir or f"{args.out}.checkpoints", resume=args.resume,
    )
    out = run.save(args.out, overwrite=args.overwrite)
    tr = run.manifest["training"]
    print(f"trained {tr['adapters']} per-concept adapter(s) (rank {tr['rank']}): {tr['steps_run']} steps "
          f"(resumed from step {tr['resumed_from']})")
    _print_timings(run.manifest)
    print(f"wrote {out} (adapters/index.json lists one LoRA file per concept)")
    return 0


def cmd_apply(args) -> int:
    from engine.api import apply_delta
    from engine.export import atomic_output_dir

    with _reserve(args):
        pipe = apply_delta(args.model, args.delta, model_config=args.model_config, allow_pickle=args.allow_pickle,
                           force=args.force)
        with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
    print(f"wrote {args.out}")
    return 0


def cmd_tiny_model(args) -> int:
    from engine.tiny import write_tiny_model

    out = write_tiny_model(args.arch, args.out, seed=args.seed)
    print(f"wrote a random-weight {args.arch} pipeline to {out}")
    return 0


def cmd_methods(args) -> int:
    from engine.methods import available_methods

    for name, method in available_methods().items():
        kind = "fine-tuning" if method.trains else "one pass"
        print(f"{name} ({kind}): {method.summary}")
        print(f"    {type(method.defaults).__name__} {json.dumps(method.defaults.to_dict())}")
    return 0


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
    result = erase(str(model), concepts, method="uce-plus", progress=not args.quiet)
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


def cmd_demo(args) -> int:
    """Erase identities from the toy world with the closed-form method, then measure it."""
    from engine.toyworld.world import SHIPPED, WORLD_FILE

    if args.world is None and not (SHIPPED / WORLD_FILE).is_file():
        return _demo_random_weights(args)
    from engine.api import erase
    from engine.concepts import concepts_from_names
    from engine.evaluation.report import write_report
    from engine.evaluation import evaluate_toy
    from engine.toyworld import TEMPLATES, concepts, make_dataset
    from engine.toyworld.world import pipeline_path, verify_world

    world = verify_world(args.world)
    model = pipeline_path(world)
    identities = concepts("identity")
    erased_names = identities[: args.erase]
    kept = identities[args.erase :]
    # Preserve the identities that stay and general captions of the world (MACE/UCE style).
    captions = sorted(set(make_dataset(300, seed=12345)["captions"]))
    concept_set = concepts_from_names(
        erased_names, anchor="a person", templates=[t.replace("{name}", "{}") for t in TEMPLATES["identity"]["train"]],
        preserve=kept, captions=captions,
    )
    out = Path(args.out)
    print(f"demo: erasing {len(erased_names)} identities from the toy world ({model}) with uce-plus; "
          f"preserving {len(kept)} identities and {len(captions)} captions")
    start = time.perf_counter()
    result = erase(str(model), concept_set, method="uce-plus", progress=not args.quiet)
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
    spread = "" if q["kid_std"] is None else f" +- {q['kid_std']:.4f}"
    print(f"H {report['H']:.1f}; KID to the original {q['kid']:.4f}{spread}")
    print(f"{report['timing']['images_generated']} images in {report['timing']['generation_seconds']:.0f} s")
    print("wrote " + ", ".join(str(p) for p in written.values()) + f", and the erased pipeline in {erased_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from engine.methods import DEFAULT_METHOD

    parser = argparse.ArgumentParser(prog="erasure", description="Concept erasure for Stable Diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", required=True, help="diffusers folder, or a single-file .safetensors checkpoint")
        p.add_argument("--model-config", help="diffusers folder with the configs for a single-file checkpoint")
        p.add_argument("--allow-pickle", action="store_true", help="accept pickled .ckpt/.bin checkpoints (loaded weights-only)")

    p = sub.add_parser("erase", help="erase concepts (closed-form or fine-tuning)")
    model_args(p)
    p.add_argument("--concepts", required=True, help="concept file: .yaml/.yml/.json, or .txt/.csv list of names")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"a registered method (default {DEFAULT_METHOD}); `erasure methods` lists them")
    p.add_argument("--checkpoint-dir", help="fine-tuning checkpoints (default: OUT.checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue a killed fine-tuning run from its checkpoint")
    p.add_argument("--distributed", choices=["deepspeed"],
                   help="data-parallel fine-tuning with DeepSpeed ZeRO; launch with torchrun --nproc_per_node N")
    p.add_argument("--per-concept-adapters", action="store_true",
                   help="esd: one LoRA adapter per concept, trained together in one batched run (adapters/ + index)")
    p.add_argument("--zero-stage", type=int, choices=[2, 3], default=2, help="ZeRO stage with --distributed (default 2)")
    p.add_argument("--out", required=True, help="output folder (written atomically, locked while the run lasts)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a non-empty folder")
    p.add_argument("--config", help="YAML/JSON file of hyper-parameters")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one hyper-parameter")
    p.add_argument("--anchor", help="anchor for concepts that set none (e.g. 'a person')")
    p.add_argument("--template", action="append", help="prompt template with {} (repeatable)")
    p.add_argument("--export-lora", action="store_true", help="also write lora/ loadable with load_lora_weights")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default: exact rank of the edit)")
    p.add_argument("--no-pipeline", action="store_true", help="write only the delta, LoRA and manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("apply", help="apply a saved delta.safetensors to a model")
    model_args(p)
    p.add_argument("--delta", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a non-empty folder")
    p.add_argument("--force", action="store_true",
                   help="apply a delta made for other base weights, without a checksum, or with an implausible change "
                        "(a warning each); a checksum mismatch is never overridden")
    p.set_defaults(func=cmd_apply)

    from engine.tiny import ARCHS

    p = sub.add_parser("tiny-model", help="write a random-weight pipeline of a real architecture")
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("methods", help="list the registered methods and their default settings")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="erase toy-world identities with uce-plus and measure the erasure")
    p.add_argument("--out", default="build/demo")
    p.add_argument("--erase", type=int, default=10, help="how many identities to erase (default 10)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--world", help="toy world folder (default: the shipped one)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    from engine.evaluation.cli import add_eval_parser
    from engine.evaluation.gates import measure_gates
    from engine.toyworld.cli import add_toyworld_parser

    add_eval_parser(sub)
    add_toyworld_parser(sub, measure_gates)
    return parser


# Bad input: exit code 2 with one line that says what is wrong (the messages name the file,
# entry or tensor). Other failures of the system (a full disk) exit 1, also in one line.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError,
             ImportError, FloatingPointError)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"erasure: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # optional-backend notices are noise for CLI users
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except BAD_INPUT as err:
        print(f"erasure: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"erasure: error: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    raise SystemExit(main())
