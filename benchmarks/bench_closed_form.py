"""Closed-form multi-concept erasure: the engine vs a per-layer implementation of the same equations.

    python -m benchmarks.bench_closed_form [--archs sd15,sdxl] [--concepts 1,10,100,1000] [--device cuda]
        [--sequential-max 1000]

For each architecture (random weights, real shapes) and each number of concepts N, both
implementations start from the same selected token embeddings (text encoding is shared and
timed once; its prompts per second are the floor of closed-form erasure, and its FLOPs are
counted in a second, untimed pass), then:

* engine: one fused Gram/cross-Gram accumulation, one fp64 Cholesky solve of a D x D system,
  one stacked `W T` update of every K/V matrix (engine.closed_form);
* per-layer: the way published reference code does it: for every K/V matrix, project the
  targets through that layer, accumulate its two sums and invert its own D x D system;
* published-style end to end: the published UCE code's whole pipeline, every prompt encoded
  one at a time at 77 positions, then the per-layer solve (`--sequential-max` bounds the
  concept counts it runs for: it is the slow baseline).

The engine's fit report (per-concept residuals, preservation drift: `engine.closed_form.kv_gram`
and `fit_report`) is timed on the same rows, and its share of the engine's end-to-end run
(text encoding, sums, solve, update, report) is reported.

Reports time per phase, the speed-up, and the maximum relative difference between the edited
weights. Prints a table and writes JSON (device, versions, git sha) to benchmarks/results/.
Only the UNet's cross-attention K/V matrices are materialized (the rest of the UNet is built on
the meta device): the closed-form edit reads and writes nothing else.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import (
    ROOT,
    add_device_argument,
    add_out_argument,
    argument_parser,
    report_header,
    result_path,
    timed,
    write_report,
)
from engine.closed_form import (
    accumulate,
    apply_transform,
    caption_gram,
    collect_rows,
    cross_attention_kv,
    fit_report,
    kv_gram,
    solve_transform,
)
from engine.concepts import concepts_from_names
from engine.kernels._dispatch import BACKENDS
from engine.methods import get_method
from engine.models import encode_prompts
from engine.tiny import ARCHS, build_pipeline, text_encoder_configs

CAPTIONS = [line.strip() for line in (ROOT / "examples" / "captions.txt").read_text().splitlines() if line.strip()]


def per_layer_reference(rows, kv, ridge, dtype=torch.float32):
    """One solve per K/V matrix, as the published UCE/MACE code does. Returns key -> W' and timings."""
    dev = rows.table.device
    S_rows = rows.table[rows.src_index].to(dtype)  # (N, D)
    T_rows = rows.table[rows.tgt_index].to(dtype)
    w = rows.weight[:, None].to(dtype)
    D = S_rows.shape[1]
    eye = torch.eye(D, device=dev, dtype=dtype)
    P = torch.zeros(D, D, device=dev, dtype=dtype)
    if rows.caption_gram is not None:
        P = rows.caption_gram.to(dev, dtype) * rows.preserve_weight
    out, t_gram, t_solve, t_update = {}, 0.0, 0.0, 0.0
    for key, module in kv:
        W = module.weight.detach().to(dtype)
        (mat1, mat2), dt = timed(dev, lambda: (
            ridge * W + ((T_rows @ W.T) * w).T @ S_rows + W @ P,  # sum w (W e') e^T + lam W P + mu W
            ridge * eye + (S_rows * w).T @ S_rows + P,
        ))
        t_gram += dt
        inv, dt = timed(dev, lambda: torch.inverse(mat2))
        t_solve += dt
        out[key], dt = timed(dev, lambda: mat1 @ inv)
        t_update += dt
    return out, {"gram": t_gram, "solve": t_solve, "weight_update": t_update}


def engine_edit(rows, kv, cfg, backend, device, concepts=None):
    """The engine's phases after text encoding; with `concepts`, its fit report too (as
    closed_form_edit runs it: the K/V Gram before the update, the residuals after)."""
    (S, C), t_gram = timed(device, lambda: accumulate(rows, backend, cfg.gram_dtype))
    (T, solver, _), t_solve = timed(device, lambda: solve_transform(S, C, cfg.ridge, cfg.max_condition))
    G, t_report = timed(device, lambda: kv_gram(kv)) if concepts is not None else (None, 0.0)
    edited, t_update = timed(device, lambda: apply_transform(kv, T, backend))
    phases = {"gram": t_gram, "solve": t_solve, "weight_update": t_update}
    if concepts is not None:
        _, t_fit = timed(device, lambda: fit_report(rows, T, G, concepts))
        phases["report"] = t_report + t_fit
    return edited, solver, phases


def sequential_77_encoding(pipe, concepts) -> float:
    """Seconds to encode every distinct concept and guide prompt one at a time at 77 positions,
    as the published UCE code does (one encode_prompt call per string)."""
    prompts = dict.fromkeys(p for c in concepts.concepts for _, src, tgt in c.prompt_pairs() for p in (src, tgt))

    def encode_each():
        for prompt in prompts:
            encode_prompts(pipe, [prompt], batch_size=1)  # min_positions defaults to all 77

    return timed(pipe.text_encoder.device, encode_each)[1]


def rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in b)


def build_for_bench(arch: str, device: torch.device):
    """The pipeline with real text encoders and only the UNet's K/V matrices materialized."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):  # sizes only: the UNet and VAE weights are never read here
        pipe = build_pipeline(arch, seed=0)
    torch.manual_seed(0)
    configs = text_encoder_configs(arch)
    pipe.register_modules(text_encoder=CLIPTextModel(configs[0]).eval().to(device))
    if len(configs) > 1:
        pipe.register_modules(text_encoder_2=CLIPTextModelWithProjection(configs[1]).eval().to(device))
    for _, module in cross_attention_kv(pipe.unet):
        module.weight = torch.nn.Parameter(torch.randn(module.out_features, module.in_features, device=device) * 0.02)
    return pipe


def restore(kv, originals):
    with torch.no_grad():
        for key, module in kv:
            module.weight.copy_(originals[key])


def measure_concepts(pipe, kv, originals, concepts, cfg, backend: str, device, warm_up: bool,
                     sequential: bool) -> dict:
    """One concept set's measurements: text encoding (time, and FLOPs in an untimed pass), the
    engine's phases and report, the per-layer solves in fp32 and fp64, the engine with fp32 sums,
    the differences between their edits, the system's condition number and, with `sequential`,
    the published-style encoding."""
    with torch.no_grad():
        rows, t_enc = timed(device, lambda: collect_rows(pipe, concepts, cfg))
        with FlopCounterMode(display=False) as counter:  # an untimed second pass: the counter slows it
            collect_rows(pipe, concepts, cfg)
        if warm_up:  # first calls pay for allocator and kernel set-up
            engine_edit(rows, kv, cfg, backend, device)
            per_layer_reference(rows, kv, cfg.ridge)
        restore(kv, originals)
        edited, solver, engine_t = engine_edit(rows, kv, cfg, backend, device, concepts)
        report_s = engine_t.pop("report")
        restore(kv, originals)
        ref, ref_t = per_layer_reference(rows, kv, cfg.ridge)
        exact, exact_t = per_layer_reference(rows, kv, cfg.ridge, torch.float64)
        # The same engine with fp32 Gram sums: how much the fp64 default buys.
        restore(kv, originals)
        edited32, _, _ = engine_edit(rows, kv, cfg.replace(gram_dtype="float32"), backend, device)
        S, _ = accumulate(rows, "torch", "float64")
        evals = torch.linalg.eigvalsh(S.cpu() + cfg.ridge * torch.eye(S.shape[0], dtype=torch.float64))
        seq_enc = sequential_77_encoding(pipe, concepts) if sequential else None
    return {"rows": rows, "text_encoding_s": t_enc, "text_encoding_flops": counter.get_total_flops(),
            "engine_s": engine_t, "report_s": report_s, "per_layer_fp32_s": ref_t, "per_layer_fp64_s": exact_t,
            "sequential_77_encoding_s": seq_enc, "solver": solver,
            "condition_number": float(evals.max() / evals.min()),
            "max_rel_diff_engine_vs_fp64": rel_diff(edited, exact),
            "max_rel_diff_per_layer_fp32_vs_fp64": rel_diff(ref, exact),
            "max_rel_diff_engine_vs_per_layer_fp32": rel_diff(edited, ref),
            "max_rel_diff_engine_fp32_gram_vs_fp64": rel_diff(edited32, exact)}


def result_row(arch: str, kv, concepts, templates: list[str], m: dict) -> dict:
    """The record of one (architecture, concept count) from `measure_concepts`'s measurements."""
    rows, t_enc, engine_t, ref_t = m["rows"], m["text_encoding_s"], m["engine_s"], m["per_layer_fp32_s"]
    # Distinct prompts the timed encoding runs through the text encoder(s): the concepts'.
    prompts = len({p for c in concepts.concepts for _, src, tgt in c.prompt_pairs() for p in (src, tgt)})
    eng_total, ref_total = sum(engine_t.values()), sum(ref_t.values())
    end_to_end = t_enc + eng_total + m["report_s"]
    seq_enc = m["sequential_77_encoding_s"]
    published = None if seq_enc is None else seq_enc + ref_total
    return {
        "arch": arch, "D": kv[0][1].in_features, "kv_matrices": len(kv), "concepts": len(concepts.concepts),
        "templates": len(templates), "edit_rows": rows.n_edit, "preserve_rows": len(rows.src_index) - rows.n_edit,
        "caption_rows": rows.caption_rows,
        "prompts_encoded": prompts, "text_encoder_prompts_per_s": prompts / t_enc,
        "text_encoding_flops": m["text_encoding_flops"], "text_encoding_tflops": m["text_encoding_flops"] / t_enc / 1e12,
        "text_encoding_s": t_enc, "engine_s": engine_t, "per_layer_fp32_s": ref_t, "per_layer_fp64_s": m["per_layer_fp64_s"],
        "engine_total_s": eng_total, "per_layer_total_s": ref_total, "speedup": ref_total / eng_total,
        "report_s": m["report_s"], "engine_end_to_end_s": end_to_end, "report_share": m["report_s"] / end_to_end,
        "sequential_77_encoding_s": seq_enc, "published_style_end_to_end_s": published,
        "end_to_end_speedup_vs_published_style": None if published is None else published / end_to_end,
        **{k: m[k] for k in ("max_rel_diff_engine_vs_fp64", "max_rel_diff_per_layer_fp32_vs_fp64",
                             "max_rel_diff_engine_vs_per_layer_fp32", "max_rel_diff_engine_fp32_gram_vs_fp64",
                             "condition_number", "solver")},
    }


def print_row(r: dict) -> None:
    """One progress line per measured row."""
    end_to_end, published = r["engine_end_to_end_s"], r["published_style_end_to_end_s"]
    print(f"{r['arch']:<6} N={r['concepts']:<5} rows={r['edit_rows']:<6} encode {r['text_encoding_s']:7.2f}s | "
          f"engine {r['engine_total_s']:.4f}s ({', '.join(f'{k} {v:.4f}' for k, v in r['engine_s'].items())}) | "
          f"per-layer fp32 {r['per_layer_total_s']:.4f}s | "
          f"x{r['speedup']:.1f} | vs fp64: engine {r['max_rel_diff_engine_vs_fp64']:.1e}, "
          f"per-layer fp32 {r['max_rel_diff_per_layer_fp32_vs_fp64']:.1e}, engine with fp32 Gram "
          f"{r['max_rel_diff_engine_fp32_gram_vs_fp64']:.1e} | condition {r['condition_number']:.2e} | "
          f"report {r['report_s']:.3f}s ({100 * r['report_share']:.1f}% of {end_to_end:.2f}s end to end)"
          + ("" if published is None else f" | published-style {published:.1f}s: x{published / end_to_end:.1f}"),
          flush=True)


def run(arch: str, n_concepts: list[int], templates: list[str], device: torch.device, backend: str,
        sequential_max: int = 0):
    pipe = build_for_bench(arch, device)
    kv = cross_attention_kv(pipe.unet)
    originals = {k: m.weight.detach().clone() for k, m in kv}
    results = []
    # The rows of earlier records: the concept's tokens and [EoT], the file's preservation only.
    cfg = get_method("uce-plus").defaults.replace(progress=False, backend=backend, batch_size=128, tokens="concept",
                                                  preserve_weight=None, prior="none", neighbours=0,
                                                  skip_shared_rows=False)
    with torch.no_grad():  # the captions' Gram cached before any timing, as on any repeated run
        caption_gram(pipe, CAPTIONS, cfg)
    for n in n_concepts:
        concepts = concepts_from_names(
            [f"Person{i} Example" for i in range(n)], anchor="a person", templates=templates, captions=CAPTIONS
        )
        m = measure_concepts(pipe, kv, originals, concepts, cfg, backend, device, warm_up=not results,
                             sequential=n <= sequential_max)
        results.append(result_row(arch, kv, concepts, templates, m))
        print_row(results[-1])
    return results


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argument_parser(__doc__)
    parser.add_argument("--archs", default="sd15,sdxl", help=f"comma-separated, of {', '.join(ARCHS)}")
    parser.add_argument("--concepts", default="1,10,100,1000", help="numbers of concepts, comma-separated")
    parser.add_argument("--templates", default="a photo of {}|a portrait of {}", help="'|'-separated, each with {}")
    add_device_argument(parser)
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--sequential-max", type=int, default=1000,
                        help="run the published-style baseline (one prompt at a time, 77 positions) up to this many "
                             "concepts (0: never)")
    add_out_argument(parser, "closed_form_<device>.json")
    args = parser.parse_args(argv)
    args.archs = args.archs.split(",")
    unknown = set(args.archs) - set(ARCHS)
    if unknown:
        parser.error(f"unknown --archs {sorted(unknown)}; choose from {', '.join(ARCHS)}")
    try:
        args.concepts = [int(n) for n in args.concepts.split(",")]
    except ValueError:
        parser.error(f"--concepts must be whole numbers, comma-separated, not {args.concepts!r}")
    if min(args.concepts) < 1:
        parser.error("--concepts must be >= 1")
    if args.sequential_max < 0:
        parser.error("--sequential-max must be >= 0")
    args.templates = args.templates.split("|")
    if not all("{}" in t for t in args.templates):
        parser.error("every --templates entry needs a {} where the concept goes")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    device = torch.device(args.device)
    header = report_header("closed_form", device)  # at launch: the code that runs is this sha's
    all_results = []
    for arch in args.archs:
        all_results += run(arch, args.concepts, args.templates, device, args.backend, args.sequential_max)
    report = {**header, "results": all_results}
    out = result_path(args.out, f"closed_form_{device.type}.json")
    write_report(out, report)
    print("\n| arch | N | edit rows | text encoding (s) | engine: gram / solve / update (s) | per-layer fp32: gram / solve / update (s) "
          "| speed-up | max rel. diff. vs fp64 per-layer: engine / per-layer fp32 | report (s, share of the run) "
          "| end to end: engine / published-style (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    published = lambda r: "-" if r["published_style_end_to_end_s"] is None else (  # noqa: E731
        f"{r['published_style_end_to_end_s']:.1f} (x{r['end_to_end_speedup_vs_published_style']:.1f})")
    phases = lambda t: " / ".join(f"{t[k]:.3f}" for k in ("gram", "solve", "weight_update"))  # noqa: E731
    for r in all_results:
        print(f"| {r['arch']} | {r['concepts']} | {r['edit_rows']} | {r['text_encoding_s']:.2f} | {phases(r['engine_s'])} | "
              f"{phases(r['per_layer_fp32_s'])} | {r['speedup']:.1f}x | "
              f"{r['max_rel_diff_engine_vs_fp64']:.1e} / {r['max_rel_diff_per_layer_fp32_vs_fp64']:.1e} | "
              f"{r['report_s']:.3f} ({100 * r['report_share']:.1f}%) | {r['engine_end_to_end_s']:.2f} / {published(r)} |")
    print(f"device: {report['device']}; wrote {out}")


if __name__ == "__main__":
    main()
