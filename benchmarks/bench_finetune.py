"""Fine-tuning step cost per method and mode, FLOPs, and optimizer memory (AdamW vs AdamW8bit).

    python benchmarks/bench_finetune.py [--model toy|tiny|sd15] [--device cuda] [--steps 20]

For each method (ESD with cached targets, ESD on-policy, TRCE stage 2, Co-Erasing, Bi-Erasing;
the image methods need the toy world's IP-Adapter) on the chosen model:

* ``prepare_s``: building the cached targets (trajectories, images, frozen predictions);
* ``step_s``: the median training step after two warm-up steps (CUDA-synchronised on a GPU),
  ``samples_per_s`` at the batch size used;
* ``flops_per_step``: counted by ``torch.utils.flop_counter.FlopCounterMode`` on one step
  (forward and backward; sampling x_t on-policy included), and the achieved TFLOP/s.

Then full-UNet training with AdamW and with bitsandbytes' AdamW8bit: the optimizer state's
bytes after one step (summed from the state tensors) and, on a GPU, the peak allocated memory;
``--memory-models`` measures other architectures too (``sdxl``: SDXL's UNet with its pooled-text
and time-id conditioning).
``--model sd15`` builds SD1.5's UNet with random weights (860M parameters: a GPU job; a CPU
step takes about half a minute). Prints a table and writes
``benchmarks/results/finetune_<model>_<device>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_closed_form import report_header, sync, write_report  # noqa: E402
from engine.concepts import concepts_from_names  # noqa: E402
from engine.finetune import FINETUNE_METHODS, OBJECTIVES, make_optimizer, trainable_parameters  # noqa: E402

CASES = {  # name: (method, config overrides)
    "esd cached": ("esd", {"xt_source": "cached"}),
    "esd on-policy": ("esd", {"xt_source": "on-policy"}),
    "trce stage 2": ("trce", {"early_steps": 13}),
    "co-erasing": ("co-erasing", {}),
    "bi-erasing": ("bi-erasing", {}),
}


def load_model(name: str, device):
    if name == "toy":
        from engine.toyworld.world import load_toy_pipeline, world_path

        return load_toy_pipeline(device=str(device)), str(world_path() / "ip_adapter" / "ip_adapter.safetensors")
    from engine.tiny import build_pipeline

    return build_pipeline("tiny" if name == "tiny" else name, seed=0).to(device), None


def bench_case(model: str, device, case: str, steps: int, batch: int) -> dict | None:
    method, overrides = CASES[case]
    pipe, ip_adapter = load_model(model, device)
    if method in ("co-erasing", "bi-erasing") and ip_adapter is None:
        return None
    cfg = FINETUNE_METHODS[method].replace(batch_size=batch, sample_steps=25, trajectories=2, concept_images=4,
                                           progress=False, ip_adapter=ip_adapter, **overrides)
    concepts = concepts_from_names(["Aldric Corrance", "skull"], anchor="a person", templates=["a photo of {}"])
    sync(device)
    t0 = time.perf_counter()
    objective = OBJECTIVES[method](pipe, concepts, cfg, None)
    sync(device)
    prepare = time.perf_counter() - t0
    unet = pipe.unet
    unet.requires_grad_(False)
    trained = trainable_parameters(unet, cfg.params)
    for p in trained.values():
        p.requires_grad_(True)
    unet.train()
    opt = make_optimizer(cfg.optimizer, trained.values(), cfg.lr)
    gen = torch.Generator().manual_seed(0)

    def step(i):
        loss = objective.loss(unet, gen, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode

    for i in range(2):
        step(i)
    with FlopCounterMode(display=False) as counter:
        step(2)
    flops = counter.get_total_flops()
    times = []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step(3 + i)
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"case": case, "method": method, "params": cfg.params, "batch": batch, "concepts": len(concepts.concepts),
            "prepare_s": prepare,
            "step_s": step_s, "samples_per_s": batch / step_s, "flops_per_step": flops,
            "tflops": flops / step_s / 1e12, "trained_parameters": sum(p.numel() for p in trained.values())}


def optimizer_memory(model: str, device, optimizer: str) -> dict:
    """One full-UNet training step of ``model`` (random weights but for the toy world's) with
    ``optimizer``: the optimizer state's bytes and, on a GPU, the peak allocated memory."""
    from engine.tiny import build_unet, unet_example_inputs

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
    unet(*args, **kwargs).sample.pow(2).mean().backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    out = {"model": model, "optimizer": optimizer, "parameters": sum(p.numel() for p in params),
           "param_bytes": sum(p.numel() * p.element_size() for p in params), "optimizer_state_bytes": state}
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy", choices=("toy", "tiny", "sd15"))
    parser.add_argument("--memory-models", help="models of the optimizer-memory step, comma-separated: toy, tiny, "
                        "tiny-sdxl, sd15, sdxl (default: --model; SDXL's full UNet is a GPU job)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [r for case in args.cases.split(",") if (r := bench_case(args.model, device, case, args.steps, args.batch))]
    memory = [optimizer_memory(m, device, opt) for m in (args.memory_models or args.model).split(",")
              for opt in ("adamw", "adamw8bit")]
    report = {**report_header("finetune", device), "model": args.model, "steps": rows, "optimizer_memory": memory}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"finetune_{args.model}_{device.type}.json"
    write_report(out, report)
    print("| case | params | batch | prepare s | step ms | samples/s | GFLOP/step | TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['params']} | {r['batch']} | {r['prepare_s']:.1f} | {r['step_s'] * 1e3:.1f} | "
              f"{r['samples_per_s']:.1f} | {r['flops_per_step'] / 1e9:.2f} | {r['tflops']:.3f} |")
    for m in memory:
        print(f"full UNet of {m['model']}, {m['optimizer']}: {m['parameters'] / 1e6:.1f}M parameters, optimizer state "
              f"{m['optimizer_state_bytes'] / 2**20:.1f} MiB" + (f", peak {m['peak_allocated_bytes'] / 2**30:.2f} GiB"
                                                                 if "peak_allocated_bytes" in m else ""))
    print(f"device: {report['device']}; wrote {out}")


if __name__ == "__main__":
    main()
