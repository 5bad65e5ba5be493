"""Independent per-concept LoRA adapters, trained concurrently in one batched run.

``train_concept_adapters(pipe, concepts, cfg)`` trains one rank-``lora_rank`` LoRA adapter per
concept on the cross-attention projections (``engine.finetune.params.LORA_TARGETS``) with ESD's loss
(cached targets). Each step draws ``batch_size`` samples of EVERY concept, from that concept's
own generator and its own trajectory cache, and runs them through the UNet in one forward: each
sample goes through its own concept's adapter (``BatchedLoRALinear``). The loss is the sum over
concepts of each concept's mean loss, so adapter k gets exactly the gradient a separate
single-concept run with the same seed would compute, and Adam/AdamW (element-wise) make the
same update: every adapter equals what its own run produces, up to float summation order.
(bitsandbytes' 8-bit optimizer quantises blocks that would span adapters, so it is refused.)

``ConceptAdapters.save(out)`` writes one diffusers-format LoRA file per concept
(``adapters/NNN-<slug>.safetensors``, loadable with ``pipe.load_lora_weights``), an index
(``adapters/index.json``: concept -> file, sha256) and ``manifest.json``; ``load_concept_adapters``
loads any subset into a pipeline so a tool can switch erasures on and off at inference.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.concepts import ConceptSet
from engine.export import file_slug
from engine.finetune.checkpoint import (checkpoint_lock, checkpoint_signature, load_checkpoint, restore_checkpoint,
                                        save_checkpoint)
from engine.finetune.frozen import Prompts, build_trajectory_cache, cached_guidance_batch, sdxl_conditioning
from engine.finetune.params import (LORA_SEED_OFFSET, LoRALinear, lora_parameters, start_training, unwrap_lora_targets,
                                    wrap_lora_targets)
from engine.finetune.trainer import local_update, run_steps
from engine.kernels import guidance_loss
from engine.progress import progress_bar

ADAPTER_METHOD = "esd"  # the registered method whose settings and loss the adapters train with
ADAPTER_DIR = "adapters"
INDEX_NAME = "index.json"
INDEX_FORMAT = "erasure-engine/concept-adapters-v1"
OPTIMIZERS = ("adam", "adamw")


class BatchedLoRALinear(torch.nn.Module):
    """``base(x)`` plus, for sample i of the batch, adapter ``route[i]``'s ``x A^T B^T``.
    ``lora_A`` is (N, r, in), ``lora_B`` (N, out, r); set ``route`` (B,) before each forward."""

    def __init__(self, base: torch.nn.Linear, rank: int, generators: list[torch.Generator]):
        super().__init__()
        self.base = base
        # Adapter k starts as LoRALinear would with generator k: a separate run's initial adapter.
        a = torch.stack([LoRALinear.initial_A(base, rank, g) for g in generators])
        self.lora_A = torch.nn.Parameter(a)
        self.lora_B = torch.nn.Parameter(torch.zeros(len(generators), base.out_features, rank, device=a.device,
                                                     dtype=a.dtype))
        self.route: torch.Tensor | None = None

    def forward(self, x):
        if self.route is None or len(self.route) != x.shape[0]:
            raise RuntimeError("BatchedLoRALinear: set route (one adapter index per sample) before the forward")
        h = x.reshape(x.shape[0], -1, x.shape[-1])  # B x tokens x in
        low = torch.bmm(h, self.lora_A[self.route].transpose(1, 2))  # B x tokens x r
        delta = torch.bmm(low, self.lora_B[self.route].transpose(1, 2))  # B x tokens x out
        return self.base(x) + delta.reshape(*x.shape[:-1], -1)


def _wrap(unet, n: int, rank: int, seed: int) -> dict[str, BatchedLoRALinear]:
    # One generator per adapter, seeded and drawn in add_lora's order: each starts as its own run.
    generators = [torch.Generator().manual_seed(seed + LORA_SEED_OFFSET) for _ in range(n)]
    return wrap_lora_targets(unet, lambda base: BatchedLoRALinear(base, rank, generators))


@dataclass
class ConceptAdapters:
    """One trained LoRA per concept (diffusers PEFT keys) and how the run went."""

    concepts: list[str]
    adapters: list[dict[str, torch.Tensor]]  # per concept: "unet.<module>.lora_A.weight" / "lora_B.weight"
    rank: int
    losses: list[float]
    timings: dict[str, float]
    steps_run: int
    resumed_from: int
    manifest: dict

    def files(self) -> list[str]:
        return [f"{i:03d}-{file_slug(name, 'concept')}.safetensors" for i, name in enumerate(self.concepts)]

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``adapters/`` (one LoRA file per concept and ``index.json``) and ``manifest.json``,
        atomically; in a distributed run only rank 0 writes."""
        from safetensors.torch import save_file

        from engine.distributed import is_main
        from engine.export import MANIFEST_NAME, atomic_output_dir, check_finite, sha256_file, write_json

        if not is_main():
            return Path(out_dir)
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            (tmp / ADAPTER_DIR).mkdir()
            entries = []
            for name, file, state in zip(self.concepts, self.files(), self.adapters):
                check_finite(state, f"the adapter of {name!r}")
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_DIR / file))
                entries.append({"concept": name, "file": file, "sha256": sha256_file(tmp / ADAPTER_DIR / file)})
            write_json(tmp / ADAPTER_DIR / INDEX_NAME, {"format": INDEX_FORMAT, "rank": self.rank, "adapters": entries})
            write_json(tmp / MANIFEST_NAME, self.manifest)
        return Path(out_dir)


def train_concept_adapters(pipe, concepts: ConceptSet, cfg, checkpoint_dir: str | os.PathLike | None = None,
                           resume: bool = False, model_fingerprint: str | None = None) -> ConceptAdapters:
    """Train one LoRA adapter per concept of ``concepts`` in one batched ESD run (module docstring).

    ``cfg``: ESD's settings (``engine.methods.esd.ESDConfig``) with ``params="lora"``; ``batch_size`` samples per concept
    and step. ``pipe`` is left unchanged. Checkpoints, ``resume`` and ``model_fingerprint`` as in
    ``engine.finetune.finetune``.
    """
    if cfg.params != "lora":
        raise ValueError(f"per-concept adapters are LoRA adapters: params must be 'lora', not {cfg.params!r}")
    if cfg.xt_source != "cached":
        raise ValueError("per-concept adapters train on cached trajectories (xt_source='cached')")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"per-concept adapters need an element-wise optimizer ({', '.join(OPTIMIZERS)}); "
                         f"{cfg.optimizer!r} quantises blocks that would span several adapters")
    if cfg.distributed != "none":
        raise ValueError("per-concept adapters run in one process (distributed='none')")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to continue")
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    with checkpoint_lock(folder, cfg):
        return _train(pipe, concepts, cfg, folder, resume, model_fingerprint)


def _train(pipe, concepts: ConceptSet, cfg, folder: Path | None, resume: bool,
           model_fingerprint: str | None) -> ConceptAdapters:
    names = [c.name for c in concepts.concepts]
    signature = checkpoint_signature(pipe, "esd-per-concept-adapters", cfg, concepts, folder, model_fingerprint)
    state = load_checkpoint(folder, signature) if resume else None

    with sdxl_conditioning(pipe):  # SDXL: the pooled embedding rides with the text conditions
        start = time.perf_counter()
        quiet = cfg.replace(progress=False)
        targets = []  # per concept: its prompts and its own trajectory cache, as its own run builds them
        for c in progress_bar(concepts.concepts, desc="cached targets", unit="concept", progress=cfg.progress):
            prompts = Prompts(pipe, ConceptSet(concepts=(c,)), False)
            targets.append((prompts, build_trajectory_cache(pipe, prompts, quiet)))
        timings = {"targets": time.perf_counter() - start}

        unet = pipe.unet
        unet.requires_grad_(False)
        wrapped = _wrap(unet, len(names), cfg.lora_rank, cfg.seed)
        try:
            trained = lora_parameters(wrapped)
            opt = start_training(unet, trained, cfg)
            gens = [torch.Generator().manual_seed(cfg.seed) for _ in names]  # each concept: its own run's draws
            first = 0
            if state is not None:
                first = restore_checkpoint(state, trained, opt)
                for g, s in zip(gens, state["rng"]["generators"]):
                    g.set_state(s)
            route = torch.arange(len(names), device=unet.device).repeat_interleave(cfg.batch_size)
            for module in wrapped.values():
                module.route = route

            def step_loss(step):
                parts = [cached_guidance_batch(cache, prompts, cfg.batch_size, cfg.eta, g, unet.device, unet.dtype)
                         for (prompts, cache), g in zip(targets, gens)]
                x, t, cond, frozen, coeffs = (torch.cat(z) for z in zip(*parts))
                pred = unet(x, t, cond).sample
                per_sample = guidance_loss(pred.flatten(1), frozen.flatten(2), coeffs, backend=cfg.loss_backend)
                return per_sample.view(len(names), -1).mean(1).sum()  # each adapter: its own run's mean loss

            def save(done):
                save_checkpoint(folder, done, trained, opt, {"generators": [g.get_state() for g in gens]}, signature)

            start = time.perf_counter()
            losses = run_steps(cfg, first, step_loss, local_update(opt), save if folder is not None else None,
                               "esd adapters", cfg.progress, value=lambda loss: loss.item() / len(names))
            timings["train"] = time.perf_counter() - start
        finally:
            unwrap_lora_targets(unet, wrapped)
            unet.eval().requires_grad_(False)
            if cfg.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
        adapters = [{f"unet.{name}.lora_{p}.weight": getattr(module, f"lora_{p}")[k].detach().clone()
                     for name, module in wrapped.items() for p in ("A", "B")} for k in range(len(names))]
        return ConceptAdapters(concepts=names, adapters=adapters, rank=cfg.lora_rank, losses=losses, timings=timings,
                               steps_run=cfg.iterations - first, resumed_from=first, manifest={})


def load_concept_adapters(pipe, folder: str | os.PathLike, concepts: list[str] | None = None,
                          weights: list[float] | None = None) -> list[str]:
    """Load the adapters of ``concepts`` (default: all) from a ``save``d folder into ``pipe`` and
    activate them (``weights``: per adapter, default 1); returns the adapter names (slugs).
    ``pipe.set_adapters([...])`` / ``pipe.disable_lora()`` switch them afterwards."""
    import json

    root = Path(folder) / ADAPTER_DIR
    index_file = root / INDEX_NAME
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} holds no per-concept adapters ({index_file} is missing)")
    index = json.loads(index_file.read_text())
    by_name = {e["concept"]: e for e in index["adapters"]}
    wanted = list(by_name) if concepts is None else list(concepts)
    unknown = [c for c in wanted if c not in by_name]
    if unknown:
        raise ValueError(f"no adapter for {unknown[:5]} in {folder}; it has {list(by_name)[:10]}")
    if weights is not None and len(weights) != len(wanted):
        raise ValueError(f"weights: one per adapter ({len(wanted)}), got {len(weights)}")
    from engine.export import sha256_file

    for concept in wanted:  # every file checked before any is loaded
        file = by_name[concept].get("file")
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise ValueError(f"{index_file}: the adapter of {concept!r} must be a .safetensors file in {root}, got "
                             f"{str(file)[:80]!r}")
        if not (root / file).is_file() or sha256_file(root / file) != by_name[concept].get("sha256"):
            raise ValueError(f"{root / file} is missing or differs from the sha256 in {index_file}: changed after it "
                             "was written; refusing it")
    loaded = []
    for concept in wanted:
        entry = by_name[concept]
        adapter = entry["file"].removesuffix(".safetensors")
        pipe.load_lora_weights(str(root), weight_name=entry["file"], adapter_name=adapter)
        loaded.append(adapter)
    pipe.set_adapters(loaded, adapter_weights=weights or [1.0] * len(loaded))
    return loaded
