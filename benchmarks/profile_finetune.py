"""Where a fine-tuning step's time goes: phases and kinds of work, from torch's profiler.

    python -m benchmarks.profile_finetune [--model toy|tiny|tiny-sdxl|sd15|sdxl] [--case "esd cached"]
        [--device cuda] [--steps 5] [--batch 4] [--gradient-checkpointing] [--trace trace.json]

Prepares one case of ``bench_finetune`` (same settings), takes two warm-up steps, then profiles
``--steps`` steps. Each step is split into phases by profiler ranges: ``UNet forward`` (every
call of the trained UNet, on-policy sampling included), ``loss: rest`` (drawing x_t and the
cached targets, the loss kernel), ``backward`` and ``optimizer``; ``step: rest`` is what lies
between them. Per phase:

* ``wall_ms``: the range's wall time on the host, per step;
* ``ops_ms``: time inside operators, by kind (``matmul/conv``, ``attention``, ``normalization``,
  ``elementwise/other``, ``copy/data``): on a GPU the kernels' device time, on the CPU the
  operators' own host time;
* ``framework_ms`` (CPU only): wall time not inside any operator (Python and dispatch).

On a GPU, ``device_busy_fraction`` is the kernels' device time over the steps' wall time: what
is left is the GPU waiting on the host. The ten most expensive operators are listed too.
Prints a table and writes ``benchmarks/results/profile_finetune_<model>_<device>.json``;
``--trace`` also writes a Chrome trace.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from benchmarks._common import add_out_argument, argument_parser, report_header, result_path, timed, write_report
from benchmarks.bench_finetune import CASES, add_case_arguments, prepared_case

PHASES = ("UNet forward", "loss: rest", "backward", "optimizer")
KINDS = {  # kind: substrings of operator names, first match wins (attention before matmul)
    "attention": ("attention", "softmax", "flash", "efficient_attention", "cudnn_attention"),
    "matmul/conv": ("mm", "matmul", "linear", "conv", "gemm", "cutlass"),
    "normalization": ("norm",),
    "copy/data": ("copy", "index", "to_copy", "cat", "stack", "clone", "contiguous", "memcpy", "gather"),
}


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS.items():
        if any(k in low for k in keys):
            return kind
    return "elementwise/other"


class _ForwardRange:
    """Marks every forward of a module as the profiler range ``UNet forward``."""

    def __init__(self, module):
        self.open = []
        self.handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def _enter(self, *_):
        self.open.append(record_function("UNet forward").__enter__())

    def _exit(self, *_):
        self.open.pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


def phase_of(event) -> str:
    node = event.cpu_parent
    while node is not None:
        if node.name in PHASES:
            return node.name
        if node.name.startswith("autograd::engine::"):  # on a GPU the backward runs on its own thread
            return "backward"
        node = node.cpu_parent
    return "step: rest"


def summarise(prof, steps: int, wall_s: float, on_gpu: bool) -> dict:
    phases = {p: {"wall_ms": 0.0, "ops_ms": defaultdict(float)} for p in (*PHASES, "step: rest")}
    ops = defaultdict(float)
    for e in prof.events():
        if e.name in PHASES:
            # A forward on-policy sampling runs inside the loss range: count time once, innermost.
            phases[e.name]["wall_ms"] += e.cpu_time_total / 1e3
            continue
        if e.device_type != DeviceType.CPU:  # kernels are counted through the operators that launch them
            continue
        own = (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / 1e3
        if own <= 0:
            continue
        phases[phase_of(e)]["ops_ms"][kind_of(e.name)] += own
        ops[e.name] += own
    # Nested ranges: the loss range contains UNet forwards; report the loss's own remainder.
    phases["loss: rest"]["wall_ms"] -= phases["UNet forward"]["wall_ms"]
    step_ms = wall_s * 1e3
    phases["step: rest"]["wall_ms"] = step_ms - sum(phases[p]["wall_ms"] for p in PHASES)
    out = {}
    for name, p in phases.items():
        row = {"wall_ms": p["wall_ms"] / steps, "ops_ms": {k: v / steps for k, v in sorted(p["ops_ms"].items())}}
        if not on_gpu:
            row["framework_ms"] = row["wall_ms"] - sum(row["ops_ms"].values())
        out[name] = row
    result = {"step_ms": step_ms / steps, "phases": out,
              "top_ops_ms": {k: v / steps for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:10]}}
    if on_gpu:
        result["device_busy_fraction"] = sum(ops.values()) / step_ms
    return result


def profile_case(model: str, device, case: str, steps: int, batch: int, sample_steps: int, trajectories: int,
                 trace: str | None = None, gradient_checkpointing: bool = False) -> dict:
    with prepared_case(model, device, case, batch, sample_steps, trajectories, gradient_checkpointing) as run:
        if run is None:
            raise ValueError(f"{case!r} needs an IP-Adapter; model {model!r} has none (use --model toy)")
        for i in range(2):
            run.step(i)

        def profiled_steps():
            for i in range(steps):
                run.step(2 + i, ranges=True)

        hook = _ForwardRange(run.unet)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        try:
            with profile(activities=activities) as prof:
                _, wall = timed(device, profiled_steps)
        finally:
            hook.remove()
    if trace:
        prof.export_chrome_trace(trace)
    return {"case": case, "method": run.method, "params": run.cfg.params, "batch": batch, "steps": steps,
            "sample_steps": run.cfg.sample_steps, "gradient_checkpointing": gradient_checkpointing,
            **summarise(prof, steps, wall, device.type == "cuda")}


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    add_case_arguments(parser, steps=5)
    add_out_argument(parser, "profile_finetune_<model>_<device>.json")
    parser.add_argument("--case", default="esd cached", choices=tuple(CASES))
    parser.add_argument("--trace", help="also write a Chrome trace to this path")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    device = torch.device(args.device)
    header = report_header("profile_finetune", device)  # at launch: the code that runs is this sha's
    result = profile_case(args.model, device, args.case, args.steps, args.batch, args.sample_steps,
                          args.trajectories, args.trace, args.gradient_checkpointing)
    report = {**header, "model": args.model, **result}
    out = result_path(args.out, f"profile_finetune_{args.model}_{device.type}.json")
    write_report(out, report)
    kinds = sorted({k for p in result["phases"].values() for k in p["ops_ms"]})
    extra = [] if device.type == "cuda" else ["framework"]
    print(f"{args.case} on {args.model}, batch {args.batch}: {result['step_ms']:.1f} ms per step (ms per step below)")
    print("| phase | wall | " + " | ".join(kinds + extra) + " |")
    print("| --- " * (2 + len(kinds) + len(extra)) + "|")
    for name, p in result["phases"].items():
        cells = [f"{p['ops_ms'].get(k, 0.0):.1f}" for k in kinds] + [f"{p['framework_ms']:.1f}" for _ in extra]
        print(f"| {name} | {p['wall_ms']:.1f} | " + " | ".join(cells) + " |")
    if "device_busy_fraction" in result:
        print(f"GPU busy {result['device_busy_fraction']:.0%} of the step's wall time")
    print(f"device: {report['device']}; wrote {out}")


if __name__ == "__main__":
    main()
