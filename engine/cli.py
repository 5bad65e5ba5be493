"""Command line: `erasure <command>` (also `python -m engine <command>`).

    erasure erase --model DIR --concepts FILE --method uce --out OUT [--export-lora]
    erasure apply --model DIR --delta OUT/delta.safetensors --out DIR2
    erasure tiny-model --arch tiny --out DIR
    erasure methods
    erasure demo --out build/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _parse_sets(pairs: list[str]) -> dict:
    """`--set key=value` pairs; values parsed as YAML scalars (numbers, null, true/false)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def _load_config_file(path: str | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())  # JSON is valid YAML
    except yaml.YAMLError as err:
        raise ValueError(f"{p}: invalid YAML/JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def cmd_erase(args) -> int:
    from engine.api import erase

    config = {**_load_config_file(args.config), **_parse_sets(args.set)}
    if args.quiet:
        config["progress"] = False
    result = erase(
        args.model,
        args.concepts,
        method=args.method,
        config=config or None,
        anchor=args.anchor,
        templates=args.template or None,
        model_config=args.model_config,
        allow_pickle=args.allow_pickle,
    )
    out = result.save(args.out, export_lora=args.export_lora, lora_rank=args.lora_rank, save_pipeline=not args.no_pipeline)
    solve = result.manifest["solve"]
    residuals = list(solve["concept_residual"].values())
    print(
        f"erased {len(residuals)} concept(s) with {args.method}: {solve['layers_changed']} K/V matrices, "
        f"solver {solve['solver']}, max concept residual {max(residuals):.3g}"
        + (f", preservation drift {solve['preserve_drift']:.3g}" if solve["rows"]["preserve"] else "")
    )
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.manifest["timings"].items()))
    print(f"wrote {out}")
    return 0


def cmd_apply(args) -> int:
    from engine.api import apply_delta
    from engine.export import atomic_output_dir

    pipe = apply_delta(args.model, args.delta, model_config=args.model_config, allow_pickle=args.allow_pickle)
    with atomic_output_dir(args.out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    print(f"wrote {args.out}")
    return 0


def cmd_tiny_model(args) -> int:
    from engine.tiny import write_tiny_model

    out = write_tiny_model(args.arch, args.out, seed=args.seed)
    print(f"wrote a random-weight {args.arch} pipeline to {out}")
    return 0


def cmd_methods(args) -> int:
    from engine.closed_form import METHODS

    for name, cfg in METHODS.items():
        print(f"{name}: {json.dumps(cfg.to_dict())}")
    return 0


def cmd_demo(args) -> int:
    """Erase 110 made-up identities from a random-weight tiny SD pipeline, keep 10, and report."""
    from engine.api import erase
    from engine.concepts import concepts_from_names, load_concepts
    from engine.tiny import write_tiny_model

    out = Path(args.out)
    model = out / "model"
    if not (model / "model_index.json").exists():
        write_tiny_model("tiny", model, seed=0)
    print(
        "demo: the shipped toy world is not available yet, so this runs on a RANDOM-WEIGHT tiny "
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
    result = erase(str(model), concepts, method="uce", progress=not args.quiet)
    erased = out / "erased"
    result.save(erased, export_lora=True, overwrite=True)
    seconds = time.perf_counter() - start
    solve = result.manifest["solve"]
    before = result.edit.concept_residual_before
    after = solve["concept_residual"]
    print(f"\nK/V projections of each erased concept vs its anchor's, relative distance over all layers:")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erasure", description="Concept erasure for Stable Diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", required=True, help="diffusers folder, or a single-file .safetensors checkpoint")
        p.add_argument("--model-config", help="diffusers folder with the configs for a single-file checkpoint")
        p.add_argument("--allow-pickle", action="store_true", help="accept pickled .ckpt/.bin checkpoints (loaded weights-only)")

    p = sub.add_parser("erase", help="erase concepts with a closed-form method")
    model_args(p)
    p.add_argument("--concepts", required=True, help="concept file: .yaml/.yml/.json, or .txt/.csv list of names")
    p.add_argument("--method", default="uce", help="uce | trce-stage1 (see `erasure methods`)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
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
    p.set_defaults(func=cmd_apply)

    from engine.tiny import ARCHS

    p = sub.add_parser("tiny-model", help="write a random-weight pipeline of a real architecture")
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("methods", help="list methods and their default hyper-parameters")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="erase 110 identities from a tiny model, keep 10, and report")
    p.add_argument("--out", default="build/demo")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # optional-backend notices are noise for CLI users
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, FloatingPointError) as err:
        print(f"erasure: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
