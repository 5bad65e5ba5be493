"""Memory and throughput plan of full-UNet fine-tuning on 1-8 GPUs: AdamW vs AdamW8bit, no ZeRO
vs ZeRO-2 vs ZeRO-3, for SD1.5 (512 px) and SDXL (1024 px).

    python -m benchmarks.plan_distributed [--micro-batch 4] [--peak-tflops 989] [--mfu 0.35] [--bus-gbps 350]

What is COUNTED here (no GPU needed: the UNets are built on PyTorch's meta device, so shapes flow
through a real forward and backward without weights or arithmetic):

* ``params``: the UNet's parameter count;
* ``activation_bytes_per_sample``: the tensors autograd saves for the backward of one training
  sample, each storage once, parameters excluded, in fp32 with the math attention path (which
  saves the attention probabilities: flash / memory-efficient SDPA kernels on GPUs save far
  less, so this is an upper bound); bf16 halves it;
* ``flops_per_sample``: forward + backward, ``torch.utils.flop_counter.FlopCounterMode``.

What is COMPUTED from those (every number is labelled ``computed``; none is measured on a GPU):

* memory per GPU (bytes), bf16 mixed precision as DeepSpeed runs it: bf16 weights 2P and
  gradients 2P, fp32 master weights 4P, optimizer states 8P (AdamW) or about 2P (bitsandbytes
  8-bit: one byte per moment plus a block scale per 256). No ZeRO: everything on every GPU;
  ZeRO-2 divides gradients, master weights and states by N; ZeRO-3 also the weights (the ZeRO
  paper's model; ZeRO-3's prefetch buffers and allocator fragmentation are not included).
  Activations: ``micro_batch`` samples at bf16.
* throughput: a step on N GPUs takes ``micro_batch * flops / (peak * mfu)`` of compute plus,
  with no overlap assumed (conservative), the collective traffic per GPU divided by the bus
  bandwidth: ZeRO-2 reduce-scatters bf16 gradients and all-gathers bf16 weights
  (2 * 2P * (N-1)/N bytes), ZeRO-3 also all-gathers the weights again for the backward
  (3 * 2P * (N-1)/N); plain data parallelism all-reduces gradients (2 * 2P * (N-1)/N). ESD
  trains 1,000 samples per concept (1,000 iterations of batch 1), so concepts per hour =
  3600 * N * micro_batch / step_seconds / 1000.

The peak, MFU and bus bandwidth are assumptions (defaults: H100 SXM dense bf16 989 TFLOP/s, 35%
MFU, 350 GB/s NVLink bus bandwidth), written into the JSON with the results:
``benchmarks/results/plan_distributed.json``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._common import add_out_argument, argument_parser, git_sha, result_path, write_report
from engine.export import package_versions
from engine.methods import get_method
from engine.tiny import unet_config, unet_example_inputs

ARCHS = {"sd15": 512, "sdxl": 1024}  # arch: image size (latents are 1/8)
GPUS = (1, 2, 4, 8)
# ESD's published run per concept: 1,000 iterations of batch 1.
SAMPLES_PER_CONCEPT = get_method("esd").defaults.iterations * get_method("esd").defaults.batch_size
STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 2 * 4 / 256}  # per parameter


def count(arch: str) -> dict:
    """Parameters, saved-activation bytes and FLOPs of one training sample, on the meta device."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet_config(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
        inputs, extra = unet_example_inputs(cfg)
    seen = {p.untyped_storage()._cdata for p in unet.parameters()}
    saved = 0

    def pack(tensor):
        nonlocal saved
        storage = tensor.untyped_storage()
        if storage._cdata not in seen:  # each storage once; parameters are counted as weights
            seen.add(storage._cdata)
            saved += storage.nbytes()
        return tensor

    flops = FlopCounterMode(display=False)
    with flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(*inputs, **extra).sample.float().pow(2).mean().backward()
    return {"params": sum(p.numel() for p in unet.parameters()), "activation_bytes_per_sample_fp32": saved,
            "flops_per_sample": flops.get_total_flops()}


def memory_per_gpu(params: int, act_fp32: int, optimizer: str, zero: int, n: int, micro_batch: int) -> dict:
    weights, grads, master, states = 2.0 * params, 2.0 * params, 4.0 * params, STATE_BYTES[optimizer] * params
    if zero >= 2:
        grads, master, states = grads / n, master / n, states / n
    if zero >= 3:
        weights /= n
    activations = micro_batch * act_fp32 / 2
    parts = {"weights": weights, "grads": grads, "master": master, "optimizer_states": states, "activations": activations}
    return {"bytes": sum(parts.values()), "parts": parts, "label": "computed"}


def step_seconds(counts: dict, zero: int, n: int, micro_batch: int, peak: float, mfu: float, bus: float) -> dict:
    compute = micro_batch * counts["flops_per_sample"] / (peak * mfu)
    passes = 3 if zero == 3 else 2  # weights and gradient collectives per step (see the docstring)
    traffic = passes * 2.0 * counts["params"] * (n - 1) / n
    comm = traffic / bus
    total = compute + comm
    return {"compute_s": compute, "comm_bytes_per_gpu": traffic, "comm_s": comm, "step_s": total,
            "concepts_per_hour": 3600 * n * micro_batch / total / SAMPLES_PER_CONCEPT, "label": "computed"}


def parse_arguments(argv=None) -> argparse.Namespace:
    ap = argument_parser(__doc__)
    ap.add_argument("--micro-batch", type=int, default=4, help="samples per GPU and step (default 4)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (default: H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation (default 0.35)")
    ap.add_argument("--bus-gbps", type=float, default=350.0, help="assumed collective bus bandwidth, GB/s (default 350)")
    add_out_argument(ap, "plan_distributed.json")
    args = ap.parse_args(argv)
    if args.micro_batch < 1 or args.peak_tflops <= 0 or not 0 < args.mfu <= 1 or args.bus_gbps <= 0:
        ap.error("--micro-batch >= 1, --peak-tflops > 0, 0 < --mfu <= 1 and --bus-gbps > 0")
    return args


def main(argv=None) -> int:
    args = parse_arguments(argv)
    peak, bus = args.peak_tflops * 1e12, args.bus_gbps * 1e9
    rows, counted = [], {}
    for arch, image in ARCHS.items():
        start = time.perf_counter()
        counted[arch] = {**count(arch), "image_size": image, "label": "counted", "seconds": time.perf_counter() - start}
        c = counted[arch]
        for optimizer in STATE_BYTES:
            for zero in (0, 2, 3):
                for n in GPUS:
                    rows.append({"arch": arch, "optimizer": optimizer, "zero": zero, "gpus": n,
                                 "micro_batch": args.micro_batch,
                                 "memory": memory_per_gpu(c["params"], c["activation_bytes_per_sample_fp32"], optimizer,
                                                          zero, n, args.micro_batch),
                                 "throughput": step_seconds(c, zero, n, args.micro_batch, peak, args.mfu, bus)})
    result = {
        "benchmark": "plan_distributed",
        "device": "none (counted on the meta device; memory and throughput computed)",
        "git_sha": git_sha(),
        "versions": package_versions(),
        "assumptions": {"peak_tflops": args.peak_tflops, "mfu": args.mfu, "bus_gbps": args.bus_gbps,
                        "micro_batch": args.micro_batch, "precision": "bf16 mixed (fp32 master weights)",
                        "samples_per_concept": SAMPLES_PER_CONCEPT, "comm_compute_overlap": False},
        "counted": counted,
        "rows": rows,
    }
    out = result_path(args.out, "plan_distributed.json")
    write_report(out, result)

    gib = 2**30
    for arch, c in counted.items():
        print(f"{arch}: {c['params'] / 1e6:.0f}M parameters, {c['flops_per_sample'] / 1e12:.2f} TFLOP per training "
              f"sample, {c['activation_bytes_per_sample_fp32'] / gib:.2f} GiB saved activations per sample (fp32, math attention)")
    print(f"\nper-GPU memory, GiB (computed; micro-batch {args.micro_batch}, bf16 mixed precision)")
    print("| model | optimizer | setting | " + " | ".join(f"{n} GPU" for n in GPUS) + " |")
    print("| --- | --- | --- |" + " --- |" * len(GPUS))
    for arch in ARCHS:
        for optimizer in STATE_BYTES:
            for zero in (0, 2, 3):
                cells = [r["memory"]["bytes"] / gib for r in rows
                         if (r["arch"], r["optimizer"], r["zero"]) == (arch, optimizer, zero)]
                name = "data parallel" if zero == 0 else f"ZeRO-{zero}"
                print(f"| {arch} | {optimizer} | {name} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    print(f"\nESD concepts per hour (computed: {args.peak_tflops:g} TFLOP/s x {args.mfu:g} MFU, "
          f"{args.bus_gbps:g} GB/s bus, no overlap)")
    print("| model | setting | " + " | ".join(f"{n} GPU" for n in GPUS) + " |")
    print("| --- | --- |" + " --- |" * len(GPUS))
    for arch in ARCHS:
        for zero in (0, 2, 3):
            cells = [r["throughput"]["concepts_per_hour"] for r in rows
                     if (r["arch"], r["optimizer"], r["zero"]) == (arch, "adamw", zero)]
            name = "data parallel" if zero == 0 else f"ZeRO-{zero}"
            print(f"| {arch} | {name} | " + " | ".join(f"{v:.0f}" for v in cells) + " |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
