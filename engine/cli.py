"""Command line: `erasure <command>` (also `python -m engine <command>`).

    erasure erase --model DIR --concepts FILE [--method NAME] --out OUT [--export-lora]
    erasure erase --model DIR --concepts FILE --method NAME --set iterations=200 --out OUT [--resume]
    erasure apply --model DIR --delta OUT/delta.safetensors --out DIR2
    erasure tiny-model --arch tiny --out DIR
    erasure methods                       (the registered methods: engine/methods/)
    erasure demo --out build/demo
    erasure eval --model DIR --suite toy --erased FILE --out report.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from engine.concepts import load_yaml

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
    from engine.api import method_config
    from engine.methods import available_methods, get_method
    from engine.staged_unet import staged_unet

    chosen = get_method(args.method)
    trains = chosen.trains
    if args.distributed:
        if not trains:
            training = ", ".join(name for name, m in available_methods().items() if m.trains)
            raise SystemExit(f"--distributed trains a fine-tuning method ({training}), not {args.method}")
        config.update(distributed=args.distributed, zero_stage=args.zero_stage)
    # The saved pipeline's UNet is copied from the model folder while the edit runs (I/O beside
    # the text encoder's compute); a distributed run writes from rank 0 only, so it does not stage,
    # and neither does a method that changes another component (the text encoder).
    changes_unet = chosen.component(method_config(args.method, config or None, args.preset)) == "unet"
    wants_stage = changes_unet and not (args.no_pipeline or args.copy_pipeline or args.distributed)
    with staged_unet(args.model if wants_stage else None, args.out) as staged:
        return _erase_and_save(args, config, trains, staged)


def _erase_and_save(args, config, trains: bool, staged) -> int:
    from engine.api import erase

    result = erase(
        args.model,
        args.concepts,
        method=args.method,
        config=config or None,
        anchor=args.anchor,
        templates=args.template or None,
        model_config=args.model_config,
        allow_pickle=args.allow_pickle,
        preset=args.preset,
        **({"checkpoint_dir": _checkpoint_dir(args), "resume": args.resume} if trains else {}),
    )
    out = result.save(args.out, export_lora=args.export_lora, lora_rank=args.lora_rank, save_pipeline=not args.no_pipeline,
                      overwrite=args.overwrite, link_unchanged=not args.copy_pipeline, staged=staged)
    if args.distributed:
        from engine import distributed

        main = distributed.is_main()
        distributed.shutdown()  # rank 0 has written the outputs when every rank gets here
        if not main:
            return 0
    print(_erase_summary(args.method, result))
    _print_timings(result.manifest)
    print(f"wrote {out}")
    if trains:
        _say_where_checkpoints_are(_checkpoint_dir(args))
    return 0


def _checkpoint_dir(args) -> str:
    """Where a fine-tuning run checkpoints: --checkpoint-dir, else OUT.checkpoints."""
    return args.checkpoint_dir or f"{args.out}.checkpoints"


def _say_where_checkpoints_are(folder: str) -> None:
    """A fine-tuning run keeps its checkpoints (a later --resume or a longer run continues from them)."""
    if Path(folder).is_dir():
        print(f"checkpoints kept in {folder} (for --resume; delete the folder when done)")


def _erase_summary(method: str, result) -> str:
    """One line on what the run did, from the manifest sections its method wrote."""
    manifest = result.manifest
    head = f"erased {len(manifest['concepts']['concepts'])} concept(s) with {method}: "
    if "solve" in manifest:
        solve = manifest["solve"]
        drift = f", preservation drift {solve['preserve_drift']:.3g}" if solve["rows"]["preserve"] else ""
        if solve.get("prior_drift") is not None:
            drift += f", generic prior drift {solve['prior_drift']:.3g}"
        return (head + f"{solve['layers_changed']} K/V matrices, solver {solve['solver']}, max concept residual "
                f"{max(solve['concept_residual'].values()):.3g}{drift}")
    if "training" in manifest:
        tr = manifest["training"]
        losses = f", loss {tr['first_loss']:.4g} -> {tr['final_loss']:.4g}" if tr["steps_run"] else ""
        return head + f"{_steps(tr)}, {tr['parameters_trained']:,} parameters{losses}"
    return head + f"{len(result.delta)} tensors changed"


def _steps(training: dict) -> str:
    """"N steps", and where a resumed run started."""
    resumed = training["resumed_from"]
    return f"{training['steps_run']} steps" + (f" (resumed from step {resumed})" if resumed else "")


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
        checkpoint_dir=_checkpoint_dir(args), resume=args.resume, preset=args.preset,
    )
    out = run.save(args.out, overwrite=args.overwrite)
    tr = run.manifest["training"]
    print(f"trained {tr['adapters']} per-concept adapter(s) (rank {tr['rank']}): {_steps(tr)}")
    _print_timings(run.manifest)
    print(f"wrote {out} (adapters/index.json lists one LoRA file per concept)")
    _say_where_checkpoints_are(_checkpoint_dir(args))
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
        for preset, values in method.presets.items():
            print(f"    preset {preset} (--preset {preset}): {json.dumps(values)}")
    return 0


def _model_args(p) -> None:
    p.add_argument("--model", required=True, help="diffusers folder, or a single-file .safetensors checkpoint")
    p.add_argument("--model-config", help="diffusers folder with the configs for a single-file checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled .ckpt/.bin checkpoints (loaded weights-only)")


def _add_erase_parser(sub) -> None:
    from engine.finetune.adapters import ADAPTER_METHOD
    from engine.methods import DEFAULT_METHOD

    p = sub.add_parser("erase", help="erase concepts (closed-form or fine-tuning)")
    _model_args(p)
    p.add_argument("--concepts", required=True, help="concept file: .yaml/.yml/.json, or .txt/.csv list of names")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"a registered method (default {DEFAULT_METHOD}); `erasure methods` lists them")
    p.add_argument("--checkpoint-dir", help="fine-tuning checkpoints (default: OUT.checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue a killed fine-tuning run from its checkpoint")
    p.add_argument("--distributed", choices=["deepspeed"],
                   help="data-parallel fine-tuning with DeepSpeed ZeRO; launch with torchrun --nproc_per_node N")
    p.add_argument("--per-concept-adapters", action="store_true",
                   help=f"{ADAPTER_METHOD}: one LoRA adapter per concept, trained together in one batched run "
                        "(adapters/ + index)")
    p.add_argument("--zero-stage", type=int, choices=[2, 3], default=2, help="ZeRO stage with --distributed (default 2)")
    p.add_argument("--out", required=True, help="output folder (written atomically, locked while the run lasts)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a non-empty folder")
    p.add_argument("--preset", help="named settings of the method applied over its defaults, under --config and "
                                    "--set (e.g. toy: settings that erase on the toy world); `erasure methods` lists them")
    p.add_argument("--config", help="YAML/JSON file of hyper-parameters")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one hyper-parameter")
    p.add_argument("--anchor", help="anchor for concepts that set none (e.g. 'a person')")
    p.add_argument("--template", action="append", help="prompt template with {} (repeatable)")
    p.add_argument("--export-lora", action="store_true", help="also write lora/ loadable with load_lora_weights")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default: exact rank of the edit)")
    p.add_argument("--no-pipeline", action="store_true", help="write only the delta, LoRA and manifest")
    p.add_argument("--copy-pipeline", action="store_true",
                   help="write every pipeline file (default from a diffusers folder: the UNet file copied from "
                        "--model while the edit runs and its changed tensors rewritten, the other files hard-linked)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_erase)


def _add_small_parsers(sub) -> None:
    """apply, tiny-model and methods."""
    from engine.tiny import ARCHS

    p = sub.add_parser("apply", help="apply a saved delta.safetensors to a model")
    _model_args(p)
    p.add_argument("--delta", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a non-empty folder")
    p.add_argument("--force", action="store_true",
                   help="apply a delta made for other base weights, without a checksum, or with an implausible change "
                        "(a warning each); a checksum mismatch is never overridden")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("tiny-model", help="write a random-weight pipeline of a real architecture")
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("methods", help="list the registered methods and their default settings")
    p.set_defaults(func=cmd_methods)


def build_parser() -> argparse.ArgumentParser:
    from engine.attacks.cli import add_attack_parser
    from engine.demo import add_demo_parser
    from engine.evaluation.cli import add_eval_parser
    from engine.evaluation.gates import measure_gates
    from engine.toyworld.cli import add_toyworld_parser

    parser = argparse.ArgumentParser(prog="erasure", description="Concept erasure for Stable Diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_erase_parser(sub)
    _add_small_parsers(sub)
    add_demo_parser(sub)
    add_eval_parser(sub)
    add_attack_parser(sub)
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
    from engine.progress import is_terminal

    if not is_terminal():  # in a log the libraries' loading bars are noise; the engine's own bars redraw rarely
        from diffusers.utils import logging as diffusers_logging

        hf_logging.disable_progress_bar()
        diffusers_logging.disable_progress_bar()
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:  # outputs are written atomically: an interrupted run leaves none
        print("erasure: interrupted", file=sys.stderr)
        return 130
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
