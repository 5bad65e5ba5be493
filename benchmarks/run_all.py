"""Every benchmark in one command: one summary table and one JSON.

    python -m benchmarks.run_all [--mode quick|full] [--device cpu|cuda]

``quick`` (the default without a GPU) uses small settings that finish in minutes on a CPU;
``full`` (the default on a GPU) the headline sizes. The suite first measures the device's own
roofs (matmul rate, copy bandwidth and memory size, below), then runs each benchmark module in
its own process (``python -m benchmarks.<name>``), each writing its JSON, and reads them back:

* ``bench_closed_form``: the shared-solve closed-form editor vs the per-layer reference
  algorithm (same run); end-to-end seconds include text encoding, the floor of closed-form
  erasure, so the roof is text-encoding time / end-to-end time, its prompts per second and
  its MFU (the encoders run in fp32: against the fp32 matmul rate);
* ``bench_losses``: the fused loss kernels (GPU) or ``torch.compile`` (CPU) vs eager torch;
  roof: achieved / measured copy bandwidth (the losses are memory-bound);
* ``bench_finetune``: ESD with cached targets vs on-policy ESD, time per erased concept at
  equal iterations; roof: achieved FLOP/s / measured matmul rate (MFU); full mode also on SDXL
  (``finetune_sdxl``: ESD both ways and TRCE stage 2, batch 1); the peak memory of a
  full-UNet step per optimizer, as a fraction of the device's memory;
* ``bench_finetune --variants`` (``finetune_variants``): ESD's cached-target step with the
  trained UNet channels-last and (full) compiled vs eager;
* ``profile_finetune``: where that step's time goes (kinds of work; the Python and dispatch
  share on a CPU, the GPU's busy fraction on a GPU);
* ``bench_adapters``: N per-concept adapters in one batched run vs N sequential runs; roof: MFU
  of the batched run;
* ``plan_distributed``: the computed memory and throughput plan for 1-8 GPUs.

Headlines: closed-form erasure of 100 and 1,000 concepts end to end on SD1.5 (and, full,
SDXL); 100 concepts by fine-tuning projected from the measured step time (ESD's 1,000
iterations of batch 1 per concept); the per-GPU memory of full-UNet fine-tuning per optimizer
and ZeRO stage (computed). Writes ``benchmarks/results/<device>/<date>-<sha>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import (
    ROOT,
    add_device_argument,
    add_out_argument,
    argument_parser,
    device_name,
    report_header,
    result_path,
    timed,
    write_report,
)
from benchmarks.bench_losses import copy_bandwidth
from benchmarks.plan_distributed import SAMPLES_PER_CONCEPT
from engine.export import file_slug


# benchmark: (module under benchmarks/, arguments by mode); a benchmark without a mode's arguments is not run in it
SUITE = {
    "closed_form": ("bench_closed_form", {"quick": ["--archs", "sd15", "--concepts", "100,1000"],
                                             "full": ["--archs", "sd15,sdxl", "--concepts", "1,10,100,1000"]}),
    "losses": ("bench_losses", {"quick": ["--quick"], "full": []}),
    "finetune": ("bench_finetune", {"quick": ["--model", "toy", "--steps", "5", "--cases", "esd cached,esd on-policy"],
                                       "full": ["--model", "sd15", "--steps", "20", "--memory-models", "sd15,sdxl"]}),
    "finetune_sdxl": ("bench_finetune", {"full": ["--model", "sdxl", "--steps", "10", "--batch", "1",
                                                     "--cases", "esd cached,esd on-policy,trce stage 2",
                                                     "--memory-models", "none"]}),
    "finetune_variants": ("bench_finetune", {
        "quick": ["--model", "toy", "--steps", "20", "--cases", "esd cached", "--variants", "eager,channels-last",
                  "--memory-models", "none"],
        "full": ["--model", "sd15", "--steps", "20", "--cases", "esd cached", "--variants", "eager,channels-last,compile",
                 "--memory-models", "none"]}),
    "profile_finetune": ("profile_finetune", {"quick": ["--model", "toy", "--steps", "5"],
                                                 "full": ["--model", "sd15", "--steps", "5"]}),
    "adapters": ("bench_adapters", {"quick": ["--model", "toy", "--concepts", "4", "--steps", "10"],
                                       "full": ["--model", "sd15", "--concepts", "16", "--steps", "20"]}),
    "plan_distributed": ("plan_distributed", {"quick": [], "full": []}),
}


def matmul_rate(device, dtype, n: int, reps: int = 7) -> float:
    """FLOP/s of an n x n x n matmul, median over reps, rotating through 3 random input pairs."""
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(n, n, generator=gen).to(device, dtype), torch.randn(n, n, generator=gen).to(device, dtype))
             for _ in range(3)]
    for a, b in pairs:  # warm-up
        a @ b
    times = []
    for i in range(reps):
        a, b = pairs[i % 3]
        times.append(timed(device, lambda: a @ b)[1])
    return 2 * n**3 / statistics.median(times)


def device_roofs(device, mode: str) -> dict:
    n = 2048 if device.type == "cpu" else 8192
    roofs = {"matmul_fp32_tflops": matmul_rate(device, torch.float32, n) / 1e12,
             "copy_bandwidth_GBps": copy_bandwidth(device, 1 << 26 if mode == "quick" else 1 << 28) / 1e9,
             "matmul_n": n, "label": "measured"}
    if device.type == "cuda":
        roofs["matmul_bf16_tflops"] = matmul_rate(device, torch.bfloat16, n) / 1e12
        roofs["memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        roofs["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return roofs


def benchmark_arguments(name: str, mode: str, device, out: Path) -> list[str]:
    _, args = SUITE[name]
    return [*args[mode], "--out", str(out)] + ([] if name == "plan_distributed" else ["--device", device.type])


def check_arguments(name: str, mode: str, device) -> str | None:
    """Why `name`'s arguments in `mode` are refused by its own parser, or None: checked before any run."""
    module = importlib.import_module(f"benchmarks.{SUITE[name][0]}")
    try:
        module.parse_arguments(benchmark_arguments(name, mode, device, Path("unused.json")))
    except SystemExit:  # argparse has printed the reason
        return f"{name}: its {mode}-mode arguments {SUITE[name][1][mode]} are refused (see above)"
    return None


def run_benchmark(name: str, mode: str, device, folder: Path) -> tuple[dict | None, float, str]:
    out = folder / f"{name}.json"
    cmd = [sys.executable, "-m", f"benchmarks.{SUITE[name][0]}", *benchmark_arguments(name, mode, device, out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return None, seconds, (proc.stderr or proc.stdout)[-2000:]
    return json.loads(out.read_text()), seconds, ""


def closed_form_rows(cf: dict, roofs: dict) -> list[dict]:
    rows = []
    for r in cf["results"]:
        end_to_end = r["text_encoding_s"] + r["engine_total_s"]
        rows.append({"scenario": f"closed-form erase {r['concepts']} concepts, {r['arch']} (end to end)",
                     "measured": f"{end_to_end:.2f} s", "baseline": f"per-layer solve {r['per_layer_total_s']:.2f} s "
                     "(editing phases only)", "ratio": r["speedup"],
                     "roof": f"text encoding is {r['text_encoding_s'] / end_to_end:.0%} of it "
                             f"({r['text_encoder_prompts_per_s']:.0f} prompts/s, "
                             f"MFU {r['text_encoding_tflops'] / roofs['matmul_fp32_tflops']:.0%})"})
    return rows


def losses_rows(losses: dict) -> list[dict]:
    """The best and the worst case against eager."""
    best = max(losses["results"], key=lambda r: r["speedup_vs_eager"])
    impl = "fused" if "fused_s" in best else "compile"
    worst = min(losses["results"], key=lambda r: r["speedup_vs_eager"])
    return [{"scenario": f"loss {r['loss']} ({r['case']}, {r['arch']}, batch {r['batch']}): {which} case",
             "measured": f"{r[f'{impl}_s'] * 1e3:.3f} ms ({impl})", "baseline": f"eager {r['eager_s'] * 1e3:.3f} ms",
             "ratio": r["speedup_vs_eager"], "roof": f"{r[f'{impl}_roof_fraction']:.0%} of copy bandwidth"}
            for which, r in (("best", best), ("worst", worst))]


def optimizer_memory_row(m: dict, roofs: dict) -> dict:
    if "skipped" in m:
        measured, roof = f"skipped: {m['skipped']}", "-"
    else:
        peak_bytes, kind = ((m["peak_allocated_bytes"], "allocated") if "peak_allocated_bytes" in m
                            else (m["peak_rss_bytes"], "resident"))
        measured = (f"{peak_bytes / 2**30:.2f} GiB peak {kind}, "
                    f"optimizer state {m['optimizer_state_bytes'] / 2**30:.2f} GiB")
        roof = f"{peak_bytes / roofs['memory_bytes']:.0%} of the device's memory"
    return {"scenario": f"full-UNet training step, {m['model']}, {m['optimizer']} (batch 1)",
            "measured": measured, "baseline": "-", "ratio": None, "roof": roof}


def finetune_rows(ft: dict, roofs: dict, rate: float) -> list[dict]:
    """ESD per concept both ways, 100 concepts projected, and the optimizer-memory steps."""
    rows = []
    steps = {r["case"]: r for r in ft["steps"] if r.get("variant", "eager") == "eager"}
    cached, on_policy = steps.get("esd cached"), steps.get("esd on-policy")
    if cached and on_policy:
        per_concept = lambda r: r["prepare_s"] / r["concepts"] + SAMPLES_PER_CONCEPT / r["samples_per_s"]  # noqa: E731
        rows.append({"scenario": f"ESD per concept, {ft['model']} (cached targets, 1,000 samples)",
                     "measured": f"{per_concept(cached):.1f} s", "baseline": f"on-policy ESD {per_concept(on_policy):.1f} s",
                     "ratio": per_concept(on_policy) / per_concept(cached),
                     "roof": f"MFU {cached['tflops'] / rate:.1%}"})
    if cached:
        hours = 100 * SAMPLES_PER_CONCEPT / cached["samples_per_s"] / 3600
        rows.append({"scenario": f"erase 100 concepts by fine-tuning, {ft['model']} (projected from the step time)",
                     "measured": f"{hours:.2f} {ft['device_type']}-hours", "baseline": "-", "ratio": None,
                     "roof": f"MFU {cached['tflops'] / rate:.1%}"})
    return rows + [optimizer_memory_row(m, roofs) for m in ft.get("optimizer_memory", [])]


def variants_rows(variants: dict, rate: float) -> list[dict]:
    rows = []
    eager = {r["case"]: r for r in variants["steps"] if r["variant"] == "eager"}
    for r in variants["steps"]:
        base = eager.get(r["case"])
        if r["variant"] == "eager" or base is None:
            continue
        rows.append({"scenario": f"{r['case']} step, {variants['model']}, {r['variant']} (batch {r['batch']})",
                     "measured": f"{r['step_s'] * 1e3:.1f} ms (warm-up {r['warmup_s']:.1f} s)",
                     "baseline": f"eager {base['step_s'] * 1e3:.1f} ms", "ratio": base["step_s"] / r["step_s"],
                     "roof": f"MFU {r['tflops'] / rate:.1%}"})
    return rows


def profile_rows(prof: dict) -> list[dict]:
    kinds = {}
    for phase in prof["phases"].values():
        for kind, ms in phase["ops_ms"].items():
            kinds[kind] = kinds.get(kind, 0.0) + ms
    shares = ", ".join(f"{k} {v / prof['step_ms']:.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    if "device_busy_fraction" in prof:
        roof = f"GPU busy {prof['device_busy_fraction']:.0%} of the step"
    else:
        framework = sum(p["framework_ms"] for p in prof["phases"].values())
        roof = f"Python and dispatch {framework / prof['step_ms']:.0%} of the step"
    return [{"scenario": f"where the {prof['case']} step goes, {prof['model']} (batch {prof['batch']})",
             "measured": shares, "baseline": "-", "ratio": None, "roof": roof}]


def adapters_rows(ad: dict, rate: float) -> list[dict]:
    r = ad["result"]
    return [{"scenario": f"{r['concepts']} per-concept adapters, {r['model']} ({r['steps']} steps)",
             "measured": f"{r['batched_train_s']:.2f} s batched", "baseline": f"{r['sequential_train_s']:.2f} s sequential",
             "ratio": r["speedup_train"], "roof": f"MFU {r['batched_tflops'] / rate:.1%}"}]


def plan_rows(plan: dict) -> list[dict]:
    """One GPU without ZeRO, then 8 GPUs with each stage (8-bit: ZeRO-3 only)."""
    rows = []
    for row in plan["rows"]:
        if (row["gpus"], row["zero"]) not in ((1, 0), (8, 2), (8, 3)):
            continue
        if row["optimizer"] == "adamw8bit" and row["zero"] != 3:
            continue
        setting = "data parallel" if row["zero"] == 0 else f"ZeRO-{row['zero']}"
        rows.append({"scenario": f"full-UNet fine-tuning memory, {row['arch']}, {row['optimizer']}, {setting}, "
                                 f"{row['gpus']} GPU(s)",
                     "measured": f"{row['memory']['bytes'] / 2**30:.1f} GiB per GPU (computed)", "baseline": "-",
                     "ratio": None, "roof": "-"})
    return rows


def summarise(reports: dict, roofs: dict) -> list[dict]:
    """One row per headline: what was measured, against which baseline, and the roof fraction."""
    rate = roofs.get("matmul_bf16_tflops", roofs["matmul_fp32_tflops"])
    summaries = [  # in the order of the table
        ("closed_form", lambda r: closed_form_rows(r, roofs)),
        ("losses", losses_rows),
        ("finetune", lambda r: finetune_rows(r, roofs, rate)),
        ("finetune_sdxl", lambda r: finetune_rows(r, roofs, rate)),
        ("finetune_variants", lambda r: variants_rows(r, rate)),
        ("profile_finetune", profile_rows),
        ("adapters", lambda r: adapters_rows(r, rate)),
        ("plan_distributed", plan_rows),
    ]
    return [row for name, rows_of in summaries if reports.get(name) for row in rows_of(reports[name])]


def parse_arguments(argv=None) -> argparse.Namespace:
    """The options, with ``mode`` resolved and ``names`` the benchmarks to run in it; every
    benchmark's own arguments are checked before anything runs."""
    parser = argument_parser(__doc__)
    parser.add_argument("--mode", choices=("quick", "full"))
    add_device_argument(parser)
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: all): " + ", ".join(SUITE))
    add_out_argument(parser, "<device>/<date>-<sha>.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.mode = args.mode or ("full" if device.type == "cuda" else "quick")
    names = args.only.split(",") if args.only else list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {', '.join(SUITE)}")
    args.names = [n for n in names if args.mode in SUITE[n][1]]
    if not args.names:
        parser.error(f"none of those benchmarks runs in {args.mode} mode")
    refused = [why for n in args.names if (why := check_arguments(n, args.mode, device))]
    if refused:
        parser.error("; ".join(refused))
    return args


def run_suite(names: list[str], mode: str, device) -> tuple[dict, dict, dict]:
    """(reports, seconds, failures) by benchmark name, each run in its own process."""
    from tqdm.auto import tqdm

    reports, seconds, failures = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp, tqdm(names, desc="benchmarks", unit="benchmark") as bar:
        for name in bar:
            bar.set_postfix_str(name)
            report, seconds[name], error = run_benchmark(name, mode, device, Path(tmp))
            if report is None:
                failures[name] = error
            else:
                reports[name] = report
    return reports, seconds, failures


def print_summary(result: dict, out: Path) -> None:
    roofs = result["roofs"]
    print(f"device: {result['device']} ({result['mode']} mode); measured roofs: matmul fp32 "
          f"{roofs['matmul_fp32_tflops']:.3f} TFLOP/s"
          + (f", bf16 {roofs['matmul_bf16_tflops']:.1f} TFLOP/s" if "matmul_bf16_tflops" in roofs else "")
          + f", copy {roofs['copy_bandwidth_GBps']:.1f} GB/s, memory {roofs['memory_bytes'] / 2**30:.1f} GiB")
    print("| scenario | measured | baseline | ratio | distance to the roof |")
    print("| --- | --- | --- | --- | --- |")
    for r in result["summary"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"| {r['scenario']} | {r['measured']} | {r['baseline']} | {ratio} | {r['roof']} |")
    for name, error in result["failures"].items():
        print(f"FAILED {name}:\n{error}")
    print(f"wrote {out} ({sum(result['seconds'].values()):.0f} s)")


def main(argv=None) -> int:
    args = parse_arguments(argv)
    device = torch.device(args.device)
    header = report_header("run_all", device)  # at launch: the code that runs is this sha's
    roofs = device_roofs(device, args.mode)
    reports, seconds, failures = run_suite(args.names, args.mode, device)
    rows = summarise(reports, roofs)
    result = {**header, "mode": args.mode, "roofs": roofs, "seconds": seconds, "summary": rows,
              "failures": failures, "reports": reports}
    out = result_path(args.out, f"{file_slug(device_name(device))}/{time.strftime('%Y-%m-%d')}-{result['git_sha'][:8]}.json")
    write_report(out, result)
    print_summary(result, out)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
