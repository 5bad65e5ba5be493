"""Per-concept LoRA adapters: one batched run of N adapters vs N sequential single-concept runs.

    python -m benchmarks.bench_adapters [--model toy|tiny|sd15] [--concepts 8] [--steps 20] [--device cuda]

Both sides train the same adapters on the same data (``engine.finetune.adapters``: adapter k of the
batched run equals its own single-concept run) with ESD's cached targets, ``batch_size`` 1 per
concept; the cached targets are built once per concept on both sides and timed apart from the
training. Reports seconds per concept for the training, the speed-up of the batched run and
its achieved FLOP/s (the FLOPs of one batched step counted with torch's flop counter, as the
difference of a 2-step and a 1-step run, so the cached targets are not counted):
it does the same arithmetic in one UNet call of N samples instead of N calls of one, so its
gain is per-call overhead and better matmul shapes. Prints the result and writes
``benchmarks/results/adapters_<model>_<device>.json``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._common import (
    add_device_argument,
    add_out_argument,
    argument_parser,
    report_header,
    result_path,
    sync,
    timed,
    write_report,
)
from benchmarks.bench_finetune import load_model
from engine.finetune.adapters import train_concept_adapters
from engine.concepts import ConceptSet, concepts_from_names
from engine.methods import finetune
from engine.methods.esd import ESDConfig


def concept_names(n: int) -> list[str]:
    from engine.toyworld import catalogue as cat

    return cat.concepts("identity")[:n]


def run_flops(pipe, concepts: ConceptSet, cfg: ESDConfig) -> int:
    """FLOPs of a whole batched run, cached targets included (``pipe`` is left unchanged)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_concept_adapters(pipe, concepts, cfg)
    return counter.get_total_flops()


def batched_step_flops(pipe, concepts: ConceptSet, cfg: ESDConfig) -> int:
    """FLOPs of one batched training step: a 2-step run minus a 1-step run (the same targets in both)."""
    return run_flops(pipe, concepts, cfg.replace(iterations=2)) - run_flops(pipe, concepts, cfg.replace(iterations=1))


def run(model: str, device, n: int, steps: int) -> dict:
    cfg = ESDConfig(params="lora", lora_rank=4, iterations=steps, lr=1e-4, batch_size=1, sample_steps=10,
                         trajectories=1, progress=False, checkpoint_every=0)
    concepts = concepts_from_names(concept_names(n), anchor="a person", templates=["a photo of {}"])

    pipe, _ = load_model(model, device)
    batched, batched_total = timed(device, lambda: train_concept_adapters(pipe, concepts, cfg))
    flops = batched_step_flops(pipe, concepts, cfg)

    sequential_train, sequential_targets = 0.0, 0.0
    for concept in concepts.concepts:
        pipe, _ = load_model(model, device)
        sync(device)
        run_k = finetune(pipe, ConceptSet(concepts=(concept,)), cfg)
        sync(device)
        sequential_train += run_k.timings["train"]
        sequential_targets += run_k.timings["targets"]
    return {
        "model": model, "concepts": n, "steps": steps, "batch_per_concept": 1,
        "batched_train_s": batched.timings["train"], "batched_targets_s": batched.timings["targets"],
        "batched_total_s": batched_total,
        "sequential_train_s": sequential_train, "sequential_targets_s": sequential_targets,
        "train_s_per_concept": {"batched": batched.timings["train"] / n, "sequential": sequential_train / n},
        "speedup_train": sequential_train / batched.timings["train"],
        "flops_per_step": flops,
        "batched_tflops": flops * steps / batched.timings["train"] / 1e12,
    }


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="toy", choices=("toy", "tiny", "sd15"))
    add_device_argument(parser)
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    add_out_argument(parser, "adapters_<model>_<device>.json")
    args = parser.parse_args(argv)
    if args.concepts < 1 or args.steps < 1:
        parser.error("--concepts and --steps must be >= 1")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    device = torch.device(args.device)
    header = report_header("adapters", device)  # at launch: the code that runs is this sha's
    row = run(args.model, device, args.concepts, args.steps)
    report = {**header, "result": row}
    out = result_path(args.out, f"adapters_{args.model}_{device.type}.json")
    write_report(out, report)
    print(f"{args.concepts} per-concept adapters, {args.steps} steps each, on {args.model}:")
    print(f"  training: batched {row['batched_train_s']:.2f} s vs sequential {row['sequential_train_s']:.2f} s "
          f"({row['speedup_train']:.2f}x); cached targets {row['batched_targets_s']:.2f} s vs "
          f"{row['sequential_targets_s']:.2f} s; batched {row['flops_per_step'] / 1e9:.2f} GFLOP/step, "
          f"{row['batched_tflops']:.3f} TFLOP/s")
    print(f"device: {report['device']}; wrote {out}")


if __name__ == "__main__":
    main()
