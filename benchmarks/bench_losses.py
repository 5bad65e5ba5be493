"""The fused fine-tuning losses against eager torch (and torch.compile): time, bytes, bandwidth.

    python -m benchmarks.bench_losses [--device cuda] [--quick]

Forward + backward of each loss, per shape:

* ``guidance_loss`` (ESD / Co-Erasing: K = 2 frozen predictions; Bi-Erasing: K = 2 with a mask),
  against the eager formula ``((pred - (u - eta (e - u))) ** 2 * mask).mean(1)`` and its
  ``torch.compile``d version;
* ``contrastive_hinge`` (TRCE stage 2) against its eager formula, likewise.

Shapes: SD1.5 latents (4 x 64 x 64) and SDXL latents (4 x 128 x 128), batch 1 and 8. Every
repetition uses a different set of random inputs (rotated, so caches do not flatter anyone);
times are medians after warm-up (CUDA events on a GPU). "Bytes" counts what one fused pass must
move at least: every input read once and the gradient written once; the achieved bandwidth is
that over the measured time, and the device's copy bandwidth (measured here with a large
``copy_``) is the roof. The Triton kernels run only on a GPU: the CPU interpreter is a
correctness tool, not a performance path, so on a CPU the table compares eager and compiled
torch (the engine's dispatch uses the torch reference there).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._common import (
    add_device_argument,
    add_out_argument,
    argument_parser,
    report_header,
    result_path,
    timed,
    write_report,
)
from engine.kernels import contrastive_hinge, guidance_loss
from engine.kernels._dispatch import triton_can_run

SHAPES = {"sd15": 4 * 64 * 64, "sdxl": 4 * 128 * 128}


def eager_guidance(pred, frozen, coeffs, mask):
    target = (coeffs[:, :, None] * frozen).sum(1)
    sq = (pred - target) ** 2
    return (sq * mask).mean(1) if mask is not None else sq.mean(1)


def eager_hinge(anchor, safe, unsafe, beta=1.0, delta=0.01):
    return (beta * ((anchor - safe).pow(2).mean(1) - (anchor - unsafe).pow(2).mean(1) + delta)).clamp(min=0)


def measure(fn, inputs: list, device, warmup: int, reps: int) -> float:
    """Median seconds of fn(*inputs[i]) forward + backward, rotating through the input sets."""

    def once(i):
        args = inputs[i % len(inputs)]
        pred = args[0].detach().requires_grad_(True)
        fn(pred, *args[1:]).sum().backward()

    for i in range(warmup):
        once(i)
    times = []
    for i in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once(i)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            once(i)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int = 1 << 28) -> float:
    """Bytes per second of a large device copy (read + write counted): the memory roof."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = [timed(device, lambda: dst.copy_(src))[1] for _ in range(7)]
    return 2 * nbytes / statistics.median(times[2:])


def run(device, quick: bool) -> list[dict]:
    results = []
    reps, warmup, rotate = (5, 2, 3) if quick else (30, 5, 4)
    batches = (1, 4) if quick else (1, 8)
    fused_ok = triton_can_run(torch.empty(0, device=device)) and device.type == "cuda"
    for arch, n in SHAPES.items():
        for b in batches:
            for case, k, masked in (("esd", 2, False), ("bi-erasing branch (mask)", 2, True)):
                gen = torch.Generator().manual_seed(b * 7 + k)

                def rnd(*shape):
                    return torch.randn(*shape, generator=gen).to(device)

                inputs = [(rnd(b, n), rnd(b, k, n), rnd(b, k), (rnd(b, n) > 0).float() if masked else None)
                          for _ in range(rotate)]
                elem = 4
                bytes_moved = elem * b * n * (1 + k + (1 if masked else 0) + 1)  # reads + gradient write
                row = {"loss": "guidance_loss", "case": case, "arch": arch, "batch": b, "elements": b * n,
                       "bytes_min": bytes_moved}
                row["eager_s"] = measure(eager_guidance, inputs, device, warmup, reps)
                compiled = torch.compile(eager_guidance, dynamic=False)
                row["compile_s"] = measure(compiled, inputs, device, warmup, reps)
                if fused_ok:
                    row["fused_s"] = measure(lambda p, f, c, m: guidance_loss(p, f, c, m, backend="triton"),
                                             inputs, device, warmup, reps)
                results.append(row)
            gen = torch.Generator().manual_seed(b)
            inputs = [tuple(torch.randn(b, n, generator=gen).to(device) for _ in range(3)) for _ in range(rotate)]
            row = {"loss": "contrastive_hinge", "case": "trce", "arch": arch, "batch": b, "elements": b * n,
                   "bytes_min": 4 * b * n * 4}
            row["eager_s"] = measure(eager_hinge, inputs, device, warmup, reps)
            row["compile_s"] = measure(torch.compile(eager_hinge, dynamic=False), inputs, device, warmup, reps)
            if fused_ok:
                row["fused_s"] = measure(lambda a, s, u: contrastive_hinge(a, s, u, backend="triton"), inputs, device,
                                         warmup, reps)
            results.append(row)
    return results


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    add_device_argument(parser)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shapes (CPU minutes)")
    add_out_argument(parser, "losses_<device>.json")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    device = torch.device(args.device)
    header = report_header("losses", device)  # at launch: the code that runs is this sha's
    roof = copy_bandwidth(device, 1 << 26 if args.quick else 1 << 28)
    results = run(device, args.quick)
    for r in results:
        for impl in ("eager", "compile", "fused"):
            if f"{impl}_s" in r:
                r[f"{impl}_GBps"] = r["bytes_min"] / r[f"{impl}_s"] / 1e9
                r[f"{impl}_roof_fraction"] = r["bytes_min"] / r[f"{impl}_s"] / roof
        best = r.get("fused_s", r["compile_s"])
        r["speedup_vs_eager"] = r["eager_s"] / best
    report = {**header, "copy_bandwidth_GBps": roof / 1e9, "quick": args.quick,
              "results": results}
    out = result_path(args.out, f"losses_{device.type}.json")
    write_report(out, report)
    fused = any("fused_s" in r for r in results)
    print(f"| loss | case | arch | batch | eager ms (GB/s) | compile ms (GB/s) |{' fused ms (GB/s) |' if fused else ''} "
          "best vs eager |")
    print("| --- | --- | --- | --- | --- | --- |" + (" --- |" if fused else "") + " --- |")
    for r in results:
        cell = lambda impl: f"{r[f'{impl}_s'] * 1e3:.2f} ({r[f'{impl}_GBps']:.1f})"  # noqa: E731
        print(f"| {r['loss']} | {r['case']} | {r['arch']} | {r['batch']} | {cell('eager')} | {cell('compile')} |"
              + (f" {cell('fused')} |" if fused else "") + f" {r['speedup_vs_eager']:.2f}x |")
    print(f"device: {report['device']}; copy bandwidth {roof / 1e9:.1f} GB/s; wrote {out}")


if __name__ == "__main__":
    main()
