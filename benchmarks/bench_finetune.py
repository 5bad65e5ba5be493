"""Fine-tuning step cost per method and mode, FLOPs, and optimizer memory (AdamW vs AdamW8bit).

    python -m benchmarks.bench_finetune [--model toy|tiny|tiny-sdxl|sd15|sdxl] [--device cuda] [--steps 20]
        [--batch 4] [--sample-steps 25] [--trajectories 2] [--gradient-checkpointing]

For each method (ESD with cached targets, ESD on-policy, TRCE stage 2, Co-Erasing, Bi-Erasing;
the image methods need the toy world's IP-Adapter) on the chosen model:

* ``prepare_s``: building the cached targets (trajectories, images, frozen predictions);
* ``step_s``: the median training step after two warm-up steps (CUDA-synchronised on a GPU),
  ``samples_per_s`` at the batch size used; the step is the trainer's: bf16 autocast on GPUs
  that support it (``precision`` auto), fp32 on the CPU;
* ``flops_per_step``: counted by ``torch.utils.flop_counter.FlopCounterMode`` on one step
  (forward and backward; sampling x_t on-policy included), and the achieved TFLOP/s.

``--variants`` times each case with the trained UNet run in other ways too, each against eager
in the same run: ``channels-last`` (NHWC weights and activations), ``compile``
(``torch.compile``; ``warmup_s``, the two warm-up steps, includes the compilation).

``--sample-steps`` and ``--trajectories`` set the DDIM steps and the trajectories per prompt the
cached targets (and on-policy sampling) use; TRCE steers the first 13/25 of those steps.

Then full-UNet training with AdamW and with bitsandbytes' AdamW8bit, one step at batch 1: the
optimizer state's bytes after the step (summed from the state tensors) and the peak memory: on
a GPU the peak allocated memory, on the CPU the peak resident memory of a fresh process that
builds the UNet and takes the step (``peak_rss_bytes``; ``rss_before_bytes`` is that process
before the UNet exists). A model whose weights, gradients and optimizer state alone exceed the
CPU's available memory is recorded as skipped, with the bytes it needs. ``--memory-models``
measures other architectures too (``sdxl``: SDXL's UNet with its pooled-text and time-id
conditioning).
``--model sd15`` / ``sdxl`` build the whole pipeline with random weights (UNets of 860M and 2.6B
parameters; SDXL's takes the pooled text embedding and time ids as the trainer gives them):
GPU jobs, which a CPU runs only with small sampling settings (``--sample-steps 10
--trajectories 1``, and ``--gradient-checkpointing`` for SDXL). Prints a table and writes
``benchmarks/results/finetune_<model>_<device>.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.autograd.profiler import record_function

from benchmarks._common import (
    add_device_argument,
    add_out_argument,
    argument_parser,
    report_header,
    result_path,
    timed,
    write_report,
)
from engine.concepts import concepts_from_names
from engine.finetune.config import TrainConfig
from engine.finetune.frozen import sdxl_conditioning
from engine.finetune.params import make_optimizer, start_training, trainable_parameters
from engine.finetune.trainer import training_autocast
from engine.methods import get_method

CASES = {  # name: (method, config overrides)
    "esd cached": ("esd", {"xt_source": "cached"}),
    "esd on-policy": ("esd", {"xt_source": "on-policy"}),
    "trce stage 2": ("trce", {}),  # early_steps: 13/25 of sample_steps, below
    "co-erasing": ("co-erasing", {}),
    "bi-erasing": ("bi-erasing", {}),
}


def load_model(name: str, device):
    if name == "toy":
        from engine.toyworld.world import load_toy_pipeline, world_path

        return load_toy_pipeline(device=str(device)), str(world_path() / "ip_adapter" / "ip_adapter.safetensors")
    from engine.tiny import build_pipeline

    return build_pipeline(name, seed=0).to(device), None


@dataclass
class PreparedCase:
    """One case ready to train: its objective (targets cached), the UNet and the optimizer."""

    method: str
    cfg: TrainConfig
    concepts: int
    prepare_s: float
    objective: object
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trained_parameters: int
    gen: torch.Generator

    def step(self, i: int, ranges: bool = False) -> None:
        """Training step ``i`` as the trainer takes it; ``ranges`` marks its phases for the profiler."""
        mark = record_function if ranges else (lambda name: nullcontext())
        with mark("loss: rest"), training_autocast(self.cfg.precision, self.unet.device):
            loss = self.objective.loss(self.unet, self.gen, i)
        self.optimizer.zero_grad(set_to_none=True)
        with mark("backward"):
            loss.backward()
        with mark("optimizer"):
            self.optimizer.step()


@contextmanager
def prepared_case(model: str, device, case: str, batch: int, sample_steps: int = 25, trajectories: int = 2,
                  gradient_checkpointing: bool = False):
    """``case`` on ``model`` with two concepts, or None where the model has no IP-Adapter for it.
    While open, an SDXL UNet takes the trainer's conditions (``sdxl_conditioning``)."""
    method, overrides = CASES[case]
    pipe, ip_adapter = load_model(model, device)
    if method in ("co-erasing", "bi-erasing") and ip_adapter is None:
        yield None
        return
    if method == "trce":
        overrides = {**overrides, "early_steps": max(1, sample_steps * 13 // 25)}
    if ip_adapter is not None and hasattr(get_method(method).defaults, "ip_adapter"):
        overrides = {**overrides, "concept_images": 4, "ip_adapter": ip_adapter}
    cfg = get_method(method).defaults.replace(batch_size=batch, sample_steps=sample_steps, trajectories=trajectories,
                                              progress=False, gradient_checkpointing=gradient_checkpointing, **overrides)
    concepts = concepts_from_names(["Aldric Corrance", "skull"], anchor="a person", templates=["a photo of {}"])
    with sdxl_conditioning(pipe):
        objective, prepare = timed(device, lambda: get_method(method).objective(pipe, concepts, cfg, None))
        unet = pipe.unet
        unet.requires_grad_(False)
        trained = trainable_parameters(unet, cfg.params)
        optimizer = start_training(unet, trained, cfg)
        yield PreparedCase(method, cfg, len(concepts.concepts), prepare, objective, unet, optimizer,
                           sum(p.numel() for p in trained.values()), torch.Generator().manual_seed(0))


MODELS = ("toy", "tiny", "tiny-sdxl", "sd15", "sdxl")

# Ways to run the trained UNet, compared in one run (``--variants``): kept only where they pay.
VARIANTS = {
    "eager": lambda unet: unet,
    "channels-last": lambda unet: unet.to(memory_format=torch.channels_last),
    "compile": torch.compile,
}


def bench_case(model: str, device, case: str, steps: int, batch: int, sample_steps: int = 25,
               trajectories: int = 2, gradient_checkpointing: bool = False, variant: str = "eager") -> dict | None:
    with prepared_case(model, device, case, batch, sample_steps, trajectories, gradient_checkpointing) as run:
        return None if run is None else _time_steps(run, device, case, steps, batch, variant)


def _time_steps(run: PreparedCase, device, case: str, steps: int, batch: int, variant: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # eager: the variants do the same arithmetic
        run.step(0)
    flops = counter.get_total_flops()
    run.unet = VARIANTS[variant](run.unet)

    def warm_up():  # compilation included
        for i in range(2):
            run.step(1 + i)

    _, warmup = timed(device, warm_up)
    times = [timed(device, lambda: run.step(3 + i))[1] for i in range(steps)]
    step_s = statistics.median(times)
    return {"case": case, "variant": variant, "method": run.method, "params": run.cfg.params, "batch": batch,
            "concepts": run.concepts, "sample_steps": run.cfg.sample_steps, "trajectories": run.cfg.trajectories,
            "gradient_checkpointing": run.cfg.gradient_checkpointing, "prepare_s": run.prepare_s, "warmup_s": warmup,
            "step_s": step_s, "samples_per_s": batch / step_s, "flops_per_step": flops,
            "tflops": flops / step_s / 1e12, "trained_parameters": run.trained_parameters}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def optimizer_memory(model: str, device, optimizer: str) -> dict:
    """One full-UNet training step of ``model`` with ``optimizer``, measured on a GPU in this
    process, on the CPU in a fresh one (its peak resident memory is the step's alone)."""
    if device.type == "cuda":
        return _optimizer_step(model, device, optimizer)
    from engine.tiny import build_unet

    if model != "toy":
        with torch.device("meta"):
            params = sum(p.numel() for p in build_unet(model).parameters())
        from benchmarks.plan_distributed import STATE_BYTES

        needed = int(params * (4 + 4 + STATE_BYTES[optimizer]))  # fp32 weights, gradients, state
        if needed > _available_bytes():
            return {"model": model, "optimizer": optimizer, "parameters": params,
                    "skipped": f"weights, gradients and optimizer state alone need {needed / 2**30:.1f} GiB; "
                               f"{_available_bytes() / 2**30:.1f} GiB available"}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_optimizer_step, model, device, optimizer).result()


def _optimizer_step(model: str, device, optimizer: str) -> dict:
    """One full-UNet training step of ``model`` (random weights but for the toy world's) with
    ``optimizer``: the optimizer state's bytes and the peak memory (see the module doc)."""
    from engine.tiny import build_unet, unet_example_inputs

    rss_before = _rss_bytes()
    if model == "toy":
        unet = load_model(model, device)[0].unet
    else:
        with torch.device(device):
            unet = build_unet(model)
    unet.train()
    params = list(trainable_parameters(unet, "full").values())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    opt = make_optimizer(optimizer, params, 1e-5)
    with torch.device(device):
        args, kwargs = unet_example_inputs(unet.config)
    with training_autocast("auto", device):  # bf16 activations where the trainer would use them
        loss = unet(*args, **kwargs).sample.float().pow(2).mean()
    loss.backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    out = {"model": model, "optimizer": optimizer, "parameters": sum(p.numel() for p in params),
           "param_bytes": sum(p.numel() * p.element_size() for p in params), "optimizer_state_bytes": state}
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is in KiB on Linux
        out.update(rss_before_bytes=rss_before, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


def add_case_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options that set up a case's steps (shared with profile_finetune)."""
    parser.add_argument("--model", default="toy", choices=MODELS)
    add_device_argument(parser)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--trajectories", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")


def parse_arguments(argv=None) -> argparse.Namespace:
    """The options, checked before any work starts (a typo must not cost a GPU hour)."""
    parser = argument_parser(__doc__)
    add_case_arguments(parser, steps=20)
    add_out_argument(parser, "finetune_<model>_<device>.json")
    parser.add_argument("--memory-models", help=f"models of the optimizer-memory step, comma-separated: "
                        f"{', '.join(MODELS)}, or none (default: --model; SDXL's full UNet is a GPU job)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--variants", default="eager", help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1")
    for option, given, known in (("--cases", args.cases, CASES), ("--variants", args.variants, VARIANTS),
                                 ("--memory-models", args.memory_models or "none", (*MODELS, "none"))):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            parser.error(f"unknown {option} {sorted(unknown)}; choose from {', '.join(known)}")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    device = torch.device(args.device)
    header = report_header("finetune", device)  # at launch: the code that runs is this sha's
    # Memory first: on the CPU its fresh processes then share the machine with a lean parent.
    memory_models = [] if args.memory_models == "none" else (args.memory_models or args.model).split(",")
    memory = [optimizer_memory(m, device, opt) for m in memory_models for opt in ("adamw", "adamw8bit")]
    rows = [r for case in args.cases.split(",") for variant in args.variants.split(",")
            if (r := bench_case(args.model, device, case, args.steps, args.batch, args.sample_steps, args.trajectories,
                                args.gradient_checkpointing, variant))]
    report = {**header, "model": args.model, "steps": rows, "optimizer_memory": memory}
    out = result_path(args.out, f"finetune_{args.model}_{device.type}.json")
    write_report(out, report)
    print("| case | variant | params | batch | prepare s | warm-up s | step ms | samples/s | GFLOP/step | TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['variant']} | {r['params']} | {r['batch']} | {r['prepare_s']:.1f} | "
              f"{r['warmup_s']:.1f} | {r['step_s'] * 1e3:.1f} | {r['samples_per_s']:.1f} | "
              f"{r['flops_per_step'] / 1e9:.2f} | {r['tflops']:.3f} |")
    for m in memory:
        head = f"full UNet of {m['model']}, {m['optimizer']}: {m['parameters'] / 1e6:.1f}M parameters"
        if "skipped" in m:
            print(f"{head}: skipped ({m['skipped']})")
            continue
        peak = m.get("peak_allocated_bytes", m.get("peak_rss_bytes"))
        print(f"{head}, optimizer state {m['optimizer_state_bytes'] / 2**20:.1f} MiB, peak {peak / 2**30:.2f} GiB")
    print(f"device: {report['device']}; wrote {out}")


if __name__ == "__main__":
    main()
