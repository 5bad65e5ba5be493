"""The engine's stable Python surface for tools that embed it.

    import engine
    result = engine.erase("path/to/sd15", "celebrities.txt", anchor="a person")  # the default method
    result.save("out/erased", export_lora=True)
    result.pipeline  # the edited diffusers pipeline, ready to generate

Everything listed in `__all__` of `engine/__init__.py` is the public API; other modules may change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.closed_form import ClosedFormEdit
from engine.concepts import ConceptFileError, ConceptSet, concepts_from_names, load_concepts
from engine.export import (
    DELTA_NAME,
    LORA_DIR,
    LORA_NAME,
    MANIFEST_NAME,
    atomic_output_dir,
    link_tree,
    lora_from_delta,
    package_versions,
    save_delta,
    sha256_file,
    sha256_tree,
    shareable_source,
    tensors_fingerprint,
    write_json,
)
from engine.export import apply_delta as _apply_delta_to_pipe
from engine.finetune.params import trainable_parameters
from engine.methods import DEFAULT_METHOD, get_method, training_summary
from engine.models import PromptTooLongError, check_pipeline, load_pipeline, pipeline_folder, text_encoder_fingerprint


@dataclass
class Result:
    """An erased pipeline, the changed tensors and the manifest describing the run."""

    pipeline: object
    delta: dict[str, torch.Tensor]  # state-dict key of `component` -> edited tensor
    original: dict[str, torch.Tensor]  # the same keys -> tensor before the edit
    manifest: dict
    edit: ClosedFormEdit | None = field(default=None, repr=False)
    component: str = "unet"  # the pipeline component the method changed ("unet" or "text_encoder")

    def save(
        self,
        out_dir: str | os.PathLike,
        *,
        export_lora: bool = False,
        lora_rank: int | None = None,
        save_pipeline: bool = True,
        overwrite: bool = False,
        link_unchanged: bool = True,
        staged=None,
    ) -> Path:
        """Write the pipeline, delta.safetensors, optional LoRA and manifest.json atomically.

        When the model came from a local diffusers folder (with no pickled weights) only the
        component the erasure changed (``component``: the UNet, or the text encoder) is written;
        every other file is hard-linked from that folder (copied where a link cannot be made): the
        files are shared, so a tool that rewrote one in place would change the source too.
        ``link_unchanged=False`` writes the whole pipeline. ``staged``
        (``engine.staged_unet.staged_unet``, started before the edit) supplies a copy of the source
        UNet file to patch instead of writing the UNet again. In a distributed run only rank 0
        writes (every rank holds the same result)."""
        from engine.distributed import is_main

        if not is_main():
            return Path(out_dir)
        start = time.perf_counter()
        manifest = dict(self.manifest)
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            save_delta(tmp / DELTA_NAME, self.delta, self.original, component=self.component)
            if export_lora:
                not_matrices = [k for k, v in self.delta.items()
                                if v.dim() != 2 or v.shape != self.original[k].shape]  # text-gate widens them
                if not_matrices:
                    raise ValueError(f"export_lora: the edit changed tensors that are not linear weights of the same shape (e.g. "
                                     f"{not_matrices[0]}); a LoRA cannot express it (use the delta or the pipeline)")
                state, info = lora_from_delta(self.delta, self.original, lora_rank, prefix=self.component)
                (tmp / LORA_DIR).mkdir()
                save_file(state, str(tmp / LORA_DIR / LORA_NAME))
                manifest["lora"] = info
            if save_pipeline:
                manifest["pipeline_files"] = self._save_pipeline(tmp, link_unchanged, staged)
            manifest["timings"] = dict(manifest.get("timings", {}), save=time.perf_counter() - start)
            start = time.perf_counter()
            manifest["outputs"] = sha256_tree(tmp, "sha256 outputs", progress=manifest["config"].get("progress", True))
            manifest["timings"]["hash_outputs"] = time.perf_counter() - start
            write_json(tmp / MANIFEST_NAME, manifest)
        self.manifest = manifest
        return Path(out_dir)

    def _save_pipeline(self, out: Path, link_unchanged: bool, staged) -> dict:
        """The pipeline into ``out``: the changed component written (the UNet: or its staged copy
        patched) and the rest linked from the source folder where there is one (``save``), else
        every component written. Returns what was done."""
        name = self.component
        source = shareable_source(self.manifest.get("inputs", {}).get("model"), name) if link_unchanged else None
        if source is None:
            self.pipeline.save_pretrained(out, safe_serialization=True)
            return {"written": "all"}
        done = {"written": [name], "source": str(source)}
        not_patched = "no staged copy" if name == "unet" else None
        if name == "unet" and staged is not None and staged.source.parent == source / "unet":
            not_patched = staged.finish(self.pipeline.unet, self.delta, out / "unet")
        if name == "unet" and not_patched is None:
            done[name] = f"the source's {staged.source.name} with the {len(self.delta)} changed tensors rewritten"
        else:
            getattr(self.pipeline, name).save_pretrained(out / name, safe_serialization=True)
            done[name] = f"written in full ({not_patched})" if not_patched else "written in full"
        return {**done, **link_tree(source, out, skip={name})}


def _resolve_model(model, *, model_config=None, allow_pickle=False):
    if isinstance(model, (str, os.PathLike)):
        # A toy world folder stands for its pipeline/: the manifest hashes and the saved pipeline's
        # linked files are the pipeline's.
        return load_pipeline(model, config=model_config, allow_pickle=allow_pickle), str(pipeline_folder(model))
    if not hasattr(model, "unet") or not hasattr(model, "tokenizer"):
        raise TypeError(f"model must be a diffusers Stable Diffusion pipeline or a path, got {type(model).__name__}")
    check_pipeline(model, "passed in")  # load_pipeline checks the ones it loads
    return model, None


@contextlib.contextmanager
def _naming_prompts(concept_set: ConceptSet):
    """A prompt over 77 tokens, reported with the concept file and entry it comes from."""
    try:
        yield
    except PromptTooLongError as err:
        entry, field_name = concept_set.locate(err.prompt)
        raise ConceptFileError(concept_set.source, entry, field_name, f"{err}; shorten it") from None


def _resolve_concepts(concepts, anchor, templates) -> tuple[ConceptSet, str | None]:
    if isinstance(concepts, ConceptSet):
        return concepts, None
    if isinstance(concepts, (str, os.PathLike)):
        return load_concepts(concepts, anchor=anchor, templates=templates), str(concepts)
    if isinstance(concepts, (list, tuple)) and all(isinstance(c, str) for c in concepts):
        return concepts_from_names(concepts, anchor=anchor or "", templates=templates), None
    raise TypeError("concepts must be a ConceptSet, a concept file path or a list of names")


def method_config(method: str, config=None, preset: str | None = None, **overrides):
    """The named method's published defaults, then its `preset` (a name; `erasure methods` lists
    them), then `config` (a dict or settings), then overrides: the method's settings dataclass
    (ClosedFormConfig for closed-form methods, e.g. ESDConfig for fine-tuning ones)."""
    chosen = get_method(method)
    base = chosen.defaults
    if preset is not None:
        if isinstance(config, type(base)):
            raise ValueError(f"preset {preset!r} applies over the defaults: pass config as a dict, not "
                             f"{type(base).__name__} settings")
        base = base.replace(**_checked_types(type(base), chosen.preset(preset)))
    if isinstance(config, type(base)):
        base = config
    elif isinstance(config, dict):
        base = base.replace(**_checked_types(type(base), config))
    elif config is not None:
        raise TypeError(f"config must be a {type(base).__name__}, a dict or None")
    return base.replace(**_checked_types(type(base), overrides))


def _checked_types(cls, values: dict) -> dict:
    """Refuse a config value of the wrong type (e.g. --set seed=abc) before it reaches the run,
    where it would fail deep inside torch; an int is accepted where a float is expected."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in names:
            continue  # the config's own replace() reports unknown fields
        allowed = typing.get_args(hints[name]) or (hints[name],)
        ok = (value is None and type(None) in allowed) or any(
            isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in allowed if t is not type(None)
        ) or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"config field {name!r} must be {kinds}, got {type(value).__name__} {str(value)[:80]!r}")
    return values


def _model_fingerprint(pipe, inputs: dict) -> str | None:
    """The model's fingerprint for checkpoints and caches, from the hashes the manifest already
    holds (the model's files and text encoders, the trained tensors) so the model is not hashed
    twice; None for a pipeline passed in memory (``finetune`` then hashes its weights)."""
    if "model_files" not in inputs:
        return None
    parts = [inputs["model_files"], inputs["text_encoder_fingerprint"]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _check_cache_dir(cfg) -> None:
    """A cache folder set in the config must be writable: found now, not after the text encoding."""
    folder = getattr(cfg, "cache_dir", None)
    if not folder:
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"config field 'cache_dir': cannot write to {folder} ({err.strerror}); "
                         "choose a writable folder or leave cache_dir unset") from None


def _inputs(pipe, model_path, concept_path, original, progress, fingerprint_key) -> dict:
    inputs = {
        "model": model_path,
        "text_encoder_fingerprint": text_encoder_fingerprint(pipe),
        fingerprint_key: tensors_fingerprint(original),  # the changed tensors before the run
    }
    if model_path and Path(model_path).exists():
        inputs["model_files"] = (
            sha256_tree(model_path, "sha256 model", progress=progress)
            if Path(model_path).is_dir()
            else {Path(model_path).name: sha256_file(model_path)}
        )
    if concept_path:
        inputs["concepts_file"] = {"path": concept_path, "sha256": sha256_file(concept_path)}
    return inputs


def _manifest_head(method: str, cfg, concept_set: ConceptSet, pipe, preset: str | None,
                   component: str = "unet") -> dict:
    return {
        "engine": "erasure-engine",
        "method": method,
        "preset": preset,
        "component": component,  # the pipeline component the run changed (delta.safetensors holds its tensors)
        "config": cfg.to_dict(),
        "concepts": concept_set.to_dict(),
        "versions": package_versions(),
        "device": str(pipe.unet.device),
    }


def erase(
    model,
    concepts,
    method: str = DEFAULT_METHOD,
    *,
    config=None,
    anchor: str | None = None,
    templates: list[str] | None = None,
    model_config: str | None = None,
    allow_pickle: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    preset: str | None = None,
    **overrides,
) -> Result:
    """Erase `concepts` from `model` with the registered method named `method` (engine.methods;
    `erasure methods` lists them with their defaults): a closed-form solve, or fine-tuning. The
    image-branch methods need an IP-Adapter (ip_adapter=PATH; a toy world's is found beside its
    pipeline).

    model: a loaded StableDiffusion(XL)Pipeline (edited in place) or a local path (folder,
    single-file .safetensors with `model_config`). concepts: a ConceptSet, a concept file path
    or a list of names. Hyper-parameters: `config` and keyword overrides of the method's config
    fields (ClosedFormConfig, e.g. ridge=0.5; a fine-tuning method's, e.g. iterations=200),
    applied over the method's `preset` if one is named (e.g. preset="toy": the settings that
    erase on the toy world). Fine-tuning runs checkpoint into `checkpoint_dir` and continue from
    it with resume=True. Every input is checked before the model is loaded.
    """
    chosen = get_method(method)
    cfg = method_config(method, config, preset, **overrides)
    _check_cache_dir(cfg)
    concept_set, concept_path = _resolve_concepts(concepts, anchor, templates)
    start = time.perf_counter()
    pipe, model_path = _resolve_model(model, model_config=model_config, allow_pickle=allow_pickle)
    cfg = chosen.prepare(cfg, model_path)
    load_seconds = time.perf_counter() - start
    component = chosen.component(cfg)
    module = getattr(pipe, component, None)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"method {method!r} changes the pipeline's {component!r}, which this pipeline does not have")
    manifest = _manifest_head(method, cfg, concept_set, pipe, preset, component)
    touched = chosen.touched(module, cfg)
    original = {k: p.detach().clone() for k, p in module.named_parameters() if k in touched}
    start = time.perf_counter()
    manifest["inputs"] = _inputs(pipe, model_path, concept_path, original, cfg.progress, chosen.fingerprint_key)
    hash_seconds = time.perf_counter() - start
    with _naming_prompts(concept_set):
        outcome = chosen.run(pipe, concept_set, cfg, checkpoint_dir=checkpoint_dir, resume=resume,
                             model_fingerprint=_model_fingerprint(pipe, manifest["inputs"]))
    manifest.update(outcome.manifest, timings={"load": load_seconds, "hash_inputs": hash_seconds, **outcome.timings})
    return Result(pipeline=pipe, delta=outcome.changed, original=original, manifest=manifest, edit=outcome.edit,
                  component=component)


def erase_with_adapters(
    model,
    concepts,
    *,
    config=None,
    anchor: str | None = None,
    templates: list[str] | None = None,
    model_config: str | None = None,
    allow_pickle: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    preset: str | None = None,
    **overrides,
):
    """Train one ESD LoRA adapter per concept, concurrently in one batched run
    (``engine.finetune.adapters``); returns a ``ConceptAdapters`` whose ``save(out)`` writes one
    loadable LoRA per concept and an index. The model is left unchanged. Hyper-parameters as
    ``erase``'s for ESD, with ``params="lora"`` (the default here)."""
    from engine.finetune.adapters import ADAPTER_METHOD, train_concept_adapters

    explicit = "params" in overrides or (isinstance(config, dict) and "params" in config)
    cfg = method_config(ADAPTER_METHOD, config, preset, **overrides)
    if not explicit and not isinstance(config, type(cfg)):
        cfg = cfg.replace(params="lora")
    _check_cache_dir(cfg)
    concept_set, concept_path = _resolve_concepts(concepts, anchor, templates)
    start = time.perf_counter()
    pipe, model_path = _resolve_model(model, model_config=model_config, allow_pickle=allow_pickle)
    load_seconds = time.perf_counter() - start
    base = {k: p.detach() for k, p in trainable_parameters(pipe.unet, "lora").items()}  # what the adapters add to
    inputs = _inputs(pipe, model_path, concept_path, base, cfg.progress, "base_fingerprint")
    with _naming_prompts(concept_set):
        run = train_concept_adapters(pipe, concept_set, cfg, checkpoint_dir=checkpoint_dir, resume=resume,
                                     model_fingerprint=_model_fingerprint(pipe, inputs))
    run.manifest = {
        **_manifest_head(ADAPTER_METHOD, cfg, concept_set, pipe, preset),
        "per_concept_adapters": True,
        "inputs": inputs,
        "seed": cfg.seed,
        "training": training_summary(run.losses, run.steps_run, run.resumed_from, adapters=len(run.adapters),
                                      rank=run.rank),
        "timings": {"load": load_seconds, **run.timings},
    }
    return run


def apply_delta(model, delta_path, *, model_config=None, allow_pickle=False, force=False):
    """Load `model` (path or pipeline), apply a saved delta.safetensors, return the pipeline.
    The delta is verified first (``engine.export.apply_delta``); ``force=True`` applies one made
    for other base weights, with a warning."""
    pipe, _ = _resolve_model(model, model_config=model_config, allow_pickle=allow_pickle)
    _apply_delta_to_pipe(pipe, delta_path, force=force)
    return pipe
