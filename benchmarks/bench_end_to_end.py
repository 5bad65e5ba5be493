"""Closed-form erasure end to end through the CLI, save phase included, on a full-size model.

    python -m benchmarks.bench_end_to_end [--arch sd15] [--model-dir DIR] [--concepts 100]
        [--method uce-plus]

Runs ``erasure erase`` as a user does (one process per case, from a local diffusers folder:
random weights with the real shapes, written once into a temporary folder unless --model-dir
names one) and reads each run's phase timings from its manifest:

* ``cold``: an empty engine cache (the generic-caption Gram and the model files' hashes are
  computed), the default output (delta + pipeline: the UNet file copied from the model folder
  while the edit runs and its changed tensors rewritten, the other files hard-linked);
* ``warm``: the same again with the cache the cold run filled (a second edit of the same model);
* ``full write``: warm, ``--copy-pipeline`` (every pipeline file written, the UNet serialised);
* ``delta only``: warm, ``--no-pipeline``.

For each: process wall time (Python start and imports included), the engine's end to end (the
sum of the manifest's phases: load, hashing, text encoding, solve, save, output hashing) and its
ratio to the run's own text-encoding time, the floor of a closed-form edit. The warm default run's
UNet is compared tensor by tensor with the full write's (they must be equal). Writes JSON (device,
versions, git sha) to benchmarks/results/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, add_out_argument, argument_parser, report_header, result_path, write_report

CASES = {  # name: (fresh cache, extra CLI arguments)
    "cold": (True, []),
    "warm": (False, []),
    "full write": (False, ["--copy-pipeline"]),
    "delta only": (False, ["--no-pipeline"]),
}


def names(n: int) -> list[str]:
    listed = [line.strip() for line in (ROOT / "examples" / "identities.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    if n > len(listed):
        raise SystemExit(f"--concepts {n}: examples/identities.txt has {len(listed)} names")
    return listed[:n]


def run_case(model: Path, concepts: Path, out: Path, cache: Path, method: str, extra: list[str]) -> dict:
    env = dict(os.environ, ERASURE_CACHE=str(cache), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "engine", "erase", "--model", str(model), "--concepts", str(concepts),
               "--anchor", "a person", "--method", method, "--quiet", "--out", str(out), *extra]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    timings = manifest["timings"]
    engine_total = sum(timings.values())
    return {"process_wall_s": wall, "engine_end_to_end_s": engine_total, "timings": timings,
            "ratio_to_text_encoding": engine_total / timings["text_encoding"],
            "process_ratio_to_text_encoding": wall / timings["text_encoding"],
            "pipeline_files": manifest.get("pipeline_files"), "output_bytes_written": written_bytes(out, model)}


def written_bytes(out: Path, model: Path) -> int:
    """Bytes of the output's files that are not hard links of the model's (what the run wrote)."""
    source = {(s.st_dev, s.st_ino) for s in (p.stat() for p in model.rglob("*") if p.is_file())}
    return sum(s.st_size for s in (p.stat() for p in out.rglob("*") if p.is_file()) if (s.st_dev, s.st_ino) not in source)


def same_unet(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    import torch

    name = "unet/diffusion_pytorch_model.safetensors"
    with safe_open(str(a / name), framework="pt") as fa, safe_open(str(b / name), framework="pt") as fb:
        return set(fa.keys()) == set(fb.keys()) and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def main(argv=None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--arch", default="sd15", help="model built when --model-dir is not given (engine.tiny)")
    parser.add_argument("--model-dir", help="an existing local diffusers folder to erase from")
    parser.add_argument("--concepts", type=int, default=100, help="names from examples/identities.txt (<= 120)")
    parser.add_argument("--method", default="uce-plus")
    add_out_argument(parser, "end_to_end_<arch>_cpu.json")
    args = parser.parse_args(argv)

    import torch

    from engine.tiny import write_tiny_model

    with tempfile.TemporaryDirectory(dir=ROOT / "build" if (ROOT / "build").is_dir() else None) as scratch:
        scratch = Path(scratch)
        model = Path(args.model_dir) if args.model_dir else write_tiny_model(args.arch, scratch / "model")
        (scratch / "concepts.txt").write_text("\n".join(names(args.concepts)) + "\n")
        cache = scratch / "cache"
        rows = {}
        for case, (fresh, extra) in CASES.items():
            if fresh:
                cache = scratch / f"cache-{case}"
            rows[case] = run_case(model, scratch / "concepts.txt", scratch / case, cache, args.method, extra)
            r = rows[case]
            print(f"{case:<11} process {r['process_wall_s']:6.1f}s | engine {r['engine_end_to_end_s']:6.1f}s = "
                  f"{r['ratio_to_text_encoding']:.2f} x text encoding ({r['timings']['text_encoding']:.1f}s) | "
                  f"save {r['timings'].get('save', 0):.2f}s + hash {r['timings'].get('hash_outputs', 0):.2f}s | "
                  f"wrote {r['output_bytes_written'] / 1e9:.2f} GB", flush=True)
        identical = same_unet(scratch / "warm", scratch / "full write")
    print(f"patched UNet == fully written UNet: {identical}")
    report = {**report_header("bench_end_to_end", torch.device("cpu")), "arch": args.arch if not args.model_dir else
              str(args.model_dir), "concepts": args.concepts, "method": args.method, "cases": rows,
              "patched_unet_equals_full_write": identical,
              "note": "the model folder was written just before the runs (its files are in the page cache)"}
    path = result_path(args.out, f"end_to_end_{args.arch}_cpu.json")
    write_report(path, report)
    print(f"wrote {path}")
    if not identical:
        raise SystemExit("the patched UNet differs from the fully written one")


if __name__ == "__main__":
    main()
