"""What a method declares: its name, its settings (with the published defaults), the paper, what
it touches in the UNet and how it runs. The api and the command line only talk to this surface.

Two kinds share it: ``ClosedFormMethod`` (a preset of the shared closed-form solve,
engine/closed_form.py) and ``FineTuningMethod`` (an ``Objective`` on the shared trainer,
engine/finetune/). A method of another kind subclasses ``Method`` and implements ``touched``
and ``run``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.concepts import ConceptSet


@dataclass
class Outcome:
    """What a method's run changed, and what it adds to the manifest."""

    changed: dict[str, torch.Tensor]  # state-dict key of the method's component (the UNet's) -> new tensor
    timings: dict[str, float]
    manifest: dict  # e.g. {"seed": ..., "solve": {...}} or {"seed": ..., "training": {...}}
    edit: object | None = None  # the closed-form solve's ClosedFormEdit, where there is one


@dataclass(frozen=True)
class Method:
    """A named erasure method. ``defaults``: its settings dataclass with the published values
    (``replace(**changes)`` and ``to_dict()`` required); ``summary``: one line and the paper;
    ``presets``: named setting overrides applied over the defaults (e.g. ``toy``: the settings
    that erase on the toy world's small model)."""

    name: str
    defaults: object
    summary: str
    trains: bool = False  # checkpoints, resume, --distributed apply
    fingerprint_key: str = "kv_fingerprint"  # the manifest's name for the changed tensors' fingerprint
    presets: dict[str, dict] = field(default_factory=dict)

    def preset(self, name: str) -> dict:
        """The setting overrides of the preset ``name``; an unknown one is refused naming the others."""
        if name not in self.presets:
            known = ", ".join(sorted(self.presets)) or "none"
            raise ValueError(f"method {self.name!r} has no preset {name!r}; its presets: {known}")
        return dict(self.presets[name])

    def prepare(self, cfg, model_path: str | None):
        """Settings completed from what lies beside the model on disk (default: unchanged)."""
        return cfg

    def component(self, cfg) -> str:
        """The pipeline component whose tensors the run changes: "unet" (the default) or
        "text_encoder" (a method that trains the text encoder). ``touched``, ``Outcome.changed``,
        the delta file and the saved pipeline's written component follow it; the rest of the
        pipeline is left as loaded."""
        return "unet"

    def touched(self, unet, cfg) -> set[str]:
        """State-dict keys of the tensors of ``unet`` (the pipeline's ``component(cfg)``, the UNet
        unless the method says otherwise) the run may change (snapshotted before it)."""
        raise NotImplementedError

    def check_settings(self, cfg) -> None:
        """Refuse settings of another type than ``defaults`` (another method's)."""
        if type(cfg) is not type(self.defaults):
            raise TypeError(f"{self.name} takes {type(self.defaults).__name__} settings, got {type(cfg).__name__}")

    def run(self, pipe, concepts: ConceptSet, cfg, *, checkpoint_dir=None, resume: bool = False,
            model_fingerprint: str | None = None) -> Outcome:
        raise NotImplementedError


@dataclass(frozen=True)
class ClosedFormMethod(Method):
    """A preset of the shared closed-form cross-attention edit (engine/closed_form.py)."""

    def touched(self, unet, cfg) -> set[str]:
        from engine.closed_form import cross_attention_kv

        return {key for key, _ in cross_attention_kv(unet)}

    def run(self, pipe, concepts, cfg, *, checkpoint_dir=None, resume=False, model_fingerprint=None) -> Outcome:
        from engine.closed_form import closed_form_edit

        edit = closed_form_edit(pipe, concepts, cfg)
        solve = {"solver": edit.solver, "condition": edit.condition, "rows": edit.rows,
                 "preserve_weight": edit.preserve_weight, "preserve_drift": edit.preserve_drift,
                 "prior_drift": edit.prior_drift, "max_prior_drift": cfg.max_prior_drift,
                 "concept_residual": edit.concept_residual, "layers_changed": len(edit.changed),
                 "preserved": edit.preserved, "preserve_weight_search": edit.preserve_weight_search}
        # The solve is deterministic: no seed.
        return Outcome(changed=edit.changed, timings=edit.timings, manifest={"seed": None, "solve": solve}, edit=edit)


def training_summary(losses: list[float], steps_run: int, resumed_from: int, **extra) -> dict:
    """Steps, the first loss and the mean of the last tenth of the losses."""
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps_run": steps_run, "resumed_from": resumed_from, "first_loss": losses[0] if losses else None,
            "final_loss": sum(tail) / len(tail) if tail else None, **extra}


@dataclass(frozen=True)
class FineTuningMethod(Method):
    """An ``Objective`` (engine/finetune/trainer.py) trained by the shared trainer."""

    objective: type | None = None
    trains: bool = True
    fingerprint_key: str = "trained_fingerprint"

    def __post_init__(self):
        if self.objective is None:
            raise ValueError(f"fine-tuning method {self.name!r} needs its objective (an engine.finetune.Objective)")

    def touched(self, unet, cfg) -> set[str]:
        from engine.finetune.params import trainable_parameters

        return set(trainable_parameters(unet, cfg.params))

    def train(self, pipe, concepts, cfg, *, checkpoint_dir=None, resume=False, model_fingerprint=None):
        """The trainer's run (``engine.finetune.trainer.FinetuneRun``) of this method's objective."""
        from engine.finetune.trainer import train

        self.check_settings(cfg)
        return train(pipe, concepts, cfg, self.objective, self.name, checkpoint_dir=checkpoint_dir, resume=resume,
                     model_fingerprint=model_fingerprint)

    def run(self, pipe, concepts, cfg, *, checkpoint_dir=None, resume=False, model_fingerprint=None) -> Outcome:
        run = self.train(pipe, concepts, cfg, checkpoint_dir=checkpoint_dir, resume=resume,
                         model_fingerprint=model_fingerprint)
        manifest = {"seed": cfg.seed,
                    "training": training_summary(run.losses, run.steps_run, run.resumed_from,
                                                 parameters_trained=sum(v.numel() for v in run.changed.values()),
                                                 moved_to_target=run.moved)}
        if cfg.distributed != "none":
            from engine import distributed

            manifest["distributed"] = {"backend": cfg.distributed, "zero_stage": cfg.zero_stage,
                                       "ranks": distributed.world_size()}
            manifest["device"] = str(pipe.unet.device)  # the rank's device, where training moved the pipeline
        return Outcome(changed=run.changed, timings=run.timings, manifest=manifest)
