"""The engine's `uce` against the published UCE code's own output, on the same model.

    git clone https://github.com/rohitgandikota/unified-concept-editing /tmp/uce
    python -m benchmarks.compare_uce_published --uce-repo /tmp/uce [--arch sd15] [--concepts 10]

Runs `UCE()` of the published `trainscripts/uce_sd_erase.py` (not part of this project: give a
checkout of it) and `engine.erase(..., method="uce")` on the same random-weight pipeline with
the real architecture's K/V shapes (`bench_closed_form.build_for_bench`), erasing N made-up names
towards guide "" and preserving five others, all with the published defaults. Both are compared
with an exact fp64 evaluation of UCE's equation on the same rows (the per-layer reference of
bench_closed_form in float64): the published code inverts in fp32, so its own output is only
about 1e-3 from the exact solution at SD1.5's width. Reports the largest relative difference of
the K/V deltas, ||dW_a - dW_b|| / ||dW_b||, over all matrices, and writes JSON to
benchmarks/results/uce_published_<arch>_<device>.json.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks._common import add_out_argument, argument_parser, report_header, result_path, write_report
from benchmarks.bench_closed_form import build_for_bench, per_layer_reference
from engine.api import erase
from engine.closed_form import collect_rows, cross_attention_kv
from engine.concepts import concepts_from_names
from engine.methods import get_method


def load_published_uce(repo: Path):
    """The published module, with the globals its `__main__` block would set."""
    path = repo / "trainscripts" / "uce_sd_erase.py"
    if not path.is_file():
        raise SystemExit(f"--uce-repo: {path} not found; give a checkout of the published UCE code")
    spec = importlib.util.spec_from_file_location("uce_sd_erase", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.device, module.torch_dtype = "cpu", torch.float32
    return module


def delta_diff(a: dict, b: dict, original: dict) -> float:
    """max over keys of ||(a - W) - (b - W)|| / ||b - W|| in float64."""
    return max(float((a[k].double() - b[k].double()).norm() / (b[k].double() - original[k]).norm()) for k in b)


def main(argv=None):
    parser = argument_parser(__doc__)
    parser.add_argument("--uce-repo", required=True, type=Path, help="checkout of the published UCE code")
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sd21"])
    parser.add_argument("--concepts", type=int, default=10)
    add_out_argument(parser, "uce_published_<arch>_cpu.json")
    args = parser.parse_args(argv)
    published = load_published_uce(args.uce_repo)
    device = torch.device("cpu")
    header = report_header("uce_published", device)
    pipe = build_for_bench(args.arch, device)
    kv = cross_attention_kv(pipe.unet)
    original = {k: m.weight.detach().double().clone() for k, m in kv}
    names = [f"Person{i} Example" for i in range(args.concepts)]
    keep = [f"Keeper{i} Sample" for i in range(5)]

    with tempfile.TemporaryDirectory() as tmp:  # the published code edits copies and saves them
        published.UCE(pipe, names, [""] * len(names), keep, 1.0, 1.0, 0.5, tmp, "uce")
        theirs = load_file(str(Path(tmp) / "uce.safetensors"))
    theirs = {k: v for k, v in theirs.items() if k in original}
    assert len(theirs) == len(original), "the published code edited other matrices than the engine's K/V"

    concepts = concepts_from_names(names, preserve=keep)  # bare strings, guide "": the published defaults
    with torch.no_grad():
        rows = collect_rows(pipe, concepts, get_method("uce").defaults.replace(progress=False))
        exact, _ = per_layer_reference(rows, kv, get_method("uce").defaults.ridge, torch.float64)
    ours = erase(pipe, concepts, method="uce", progress=False).delta
    result = {
        "arch": args.arch, "concepts": args.concepts, "preserved": len(keep), "kv_matrices": len(kv),
        "max_rel_delta_diff_engine_vs_exact_fp64": delta_diff(ours, exact, original),
        "max_rel_delta_diff_published_vs_exact_fp64": delta_diff(theirs, exact, original),
        "max_rel_delta_diff_engine_vs_published": delta_diff(ours, theirs, original),
    }
    for key, value in result.items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
    out = result_path(args.out, f"uce_published_{args.arch}_cpu.json")
    write_report(out, {**header, "published_code": "rohitgandikota/unified-concept-editing trainscripts/uce_sd_erase.py",
                       "results": [result]})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
