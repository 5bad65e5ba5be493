"""The fine-tuning trainer: one loop for every method's objective, stepped locally or by DeepSpeed.

A method (engine/methods/) supplies an ``Objective``: it builds its frozen targets when
constructed (or takes them back from a resumed run's cache) and returns a step's loss. It trains
the UNet unless it names another pipeline component (``Objective.component``, e.g. the text
encoder). The trainer owns everything else: the trainable set (``params``), the optimizer,
autocast, checkpoints, resume, the progress bar and the DeepSpeed ZeRO path (``engine.distributed``):
data-parallel, every rank builds the same targets and draws the same batches, each trains on its
share (``Objective.part``), and every rank ends with the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.concepts import ConceptSet
from engine.finetune import checkpoint as ckpt
from engine.finetune.config import TrainConfig
from engine.finetune.frozen import sdxl_conditioning
from engine.finetune.params import add_lora, lora_parameters, merge_lora, start_training, trainable_parameters
from engine.progress import progress_bar


class Objective:
    """A fine-tuning method's loss (subclassed in engine/methods/).

    ``__init__(pipe, concepts, cfg, cache)`` builds the frozen targets, or reuses ``cache`` (the
    targets a resumed run saved); ``self.cache`` is what the trainer saves for a resume (None:
    nothing). ``loss(unet, gen, step)`` draws a batch from ``gen`` and returns its loss; in a
    distributed run it keeps ``self.part`` of each drawn batch.
    """

    name = "objective"
    sdxl = True  # whether SDXL pipelines are supported
    part = slice(None)  # this rank's share of every drawn batch (distributed runs)
    cache: dict | None = None
    component = "unet"  # the pipeline component trained and handed to ``loss`` (e.g. "text_encoder")

    def loss(self, unet, gen, step: int) -> torch.Tensor:
        raise NotImplementedError

    def trainable(self, module, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
        """The parameters of ``module`` (the pipeline's ``component``) the run trains, by state-dict
        key: the UNet's parameter set ``cfg.params`` unless the objective trains something else."""
        return trainable_parameters(module, cfg.params)

    def state(self) -> dict:
        """What a checkpoint keeps of the objective itself for an exact resume, beside the trained
        tensors and the generator (nested dicts / lists of tensors, numbers, strings, None)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Take back what ``state`` returned, from a resumed run's checkpoint."""

    @property
    def extra_changed(self) -> dict[str, torch.Tensor]:
        """Tensors the objective changed itself, outside the trained set (TRCE's stage-1 edit)."""
        return {}

    def finish(self) -> None:
        """Undo what the objective put into the pipeline for training (an IP-Adapter)."""

    def moved(self, unet) -> float | None:
        """After training (``unet`` trained, ``finish`` done): how far the erased concepts'
        predictions moved from the frozen model's toward the objective's target, as a fraction
        (0: not at all, 1: the target reached), measured cheaply on a few fixed samples of the
        frozen targets; None where the objective does not measure it."""
        return None


# Below this fraction of the way to the target (Objective.moved) a run is reported as having
# likely erased nothing. Measured with ESD on the toy world's first identity
# (benchmarks/results/toy_moved.json): runs that moved 0.05, 0.23 and 0.41 left it recognised in
# every image of the training templates; the one that erased it moved 0.72. Not measured on real
# SD models.
MOVED_WARNING = 0.5


def warn_if_unmoved(moved: float | None, method: str, steps: int) -> None:
    if moved is not None and moved < MOVED_WARNING:
        warnings.warn(f"{method}: after {steps} steps the erased concepts' predictions moved only {moved:.1%} of the "
                      "way to the objective's target, so the concepts are likely not erased; train longer (iterations), "
                      "at a higher lr, or on the toy world use --preset toy", stacklevel=3)


def track_loss(losses: list[float], value: float, step: int, bar) -> None:
    """Record a step's loss (stopping on inf / nan) and show the recent mean on the progress bar."""
    losses.append(value)
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss became {value} at step {step}; lower the learning rate")
    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4g}")
    bar.update()


def run_steps(cfg: TrainConfig, first: int, step_loss, update, save, desc: str, show: bool,
              value=lambda loss: loss.item()) -> list[float]:
    """The training loop every trainer shares: steps ``first`` .. ``cfg.iterations - 1``, each
    ``update(step_loss(step))``, the loss tracked (``value`` of it), ``save(done)`` when a
    checkpoint is due (``save=None``: never). Returns the losses."""
    losses = []
    with progress_bar(total=cfg.iterations, initial=first, desc=desc, progress=show) as bar:
        for step in range(first, cfg.iterations):
            loss = step_loss(step)
            update(loss)
            track_loss(losses, value(loss), step, bar)
            if save is not None and ckpt.checkpoint_due(cfg, step + 1):
                save(step + 1)
    return losses


def local_update(opt):
    def update(loss):
        opt.zero_grad(set_to_none=True)  # every step (TRCE's released code never zeroes them)
        loss.backward()
        opt.step()

    return update


def training_autocast(precision: str, device: torch.device):
    """bf16 autocast for the trainee's forward where it pays (weights and optimizer stay fp32)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("precision='bf16' needs a CUDA device; use 'auto' or 'fp32' on the CPU")
    if precision == "bf16" or (precision == "auto" and cuda_bf16):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class FinetuneRun:
    """What a run changed and how it went."""

    changed: dict[str, torch.Tensor]  # state-dict key -> new tensor (detached, on the UNet's device)
    losses: list[float]
    timings: dict[str, float]
    steps_run: int
    resumed_from: int
    moved: float | None = None  # Objective.moved: the fraction of the way to the target the predictions moved


def train(pipe, concepts: ConceptSet, cfg: TrainConfig, objective: type[Objective], method: str,
          checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
          model_fingerprint: str | None = None) -> FinetuneRun:
    """Train ``pipe.unet`` (or the pipeline component ``objective.component`` names) in place with
    ``objective`` (the method named ``method``; it keys the checkpoints) to erase ``concepts``.

    SD1.x / SD2.x and SDXL pipelines (where the objective supports it; see
    ``sdxl_conditioning``). With ``checkpoint_dir`` the run checkpoints every
    ``cfg.checkpoint_every`` steps; ``resume=True`` continues from its last checkpoint.
    ``cfg.distributed == "deepspeed"``: data-parallel ZeRO training under a launcher; every rank
    calls this function and gets the same result. ``model_fingerprint`` keys the checkpoints to the
    model (default: ``engine.models.weights_fingerprint(pipe)``, computed when there is a
    checkpoint folder).
    """
    from engine.models import pipeline_family

    if pipeline_family(pipe) == "sdxl" and not objective.sdxl:
        raise NotImplementedError(f"{method} needs an SD1.x / SD2.x pipeline with its IP-Adapter; "
                                  "on SDXL use esd or trce")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to continue")
    with sdxl_conditioning(pipe), ckpt.checkpoint_lock(checkpoint_dir, cfg):
        return _train(pipe, concepts, cfg, objective, method, checkpoint_dir, resume, model_fingerprint)


class _Run:
    """One run's moving parts between setup and the loop."""

    def __init__(self, pipe, cfg: TrainConfig, folder: Path | None, signature: dict | None):
        self.pipe, self.cfg, self.folder, self.signature = pipe, cfg, folder, signature
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.first = 0  # the step a resumed run starts from
        self.lora: dict | None = None  # params="lora": the adapters by module name
        self.trained: dict[str, torch.nn.Parameter] = {}


def _train(pipe, concepts, cfg, objective_cls, method, checkpoint_dir, resume, model_fingerprint) -> FinetuneRun:
    deepspeed = cfg.distributed == "deepspeed"
    if deepspeed:
        from engine import distributed

        device = distributed.init()
        pipe.to(device)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    signature = ckpt.checkpoint_signature(pipe, method, cfg, concepts, folder, model_fingerprint,
                                          ranks=distributed.world_size() if deepspeed else 1)
    if resume:
        ckpt.refuse_legacy(folder)
    state = ckpt.load_checkpoint(folder, signature) if resume and not deepspeed else None
    cache = ckpt.load_cache(folder, signature) if resume else None

    start = time.perf_counter()
    objective = objective_cls(pipe, concepts, cfg, cache)
    if deepspeed:
        objective.part = distributed.shard(cfg.batch_size)
    timings = {"targets": time.perf_counter() - start}
    main = not deepspeed or distributed.is_main()
    if main and folder is not None and cfg.checkpoint_every and cache is None and objective.cache is not None:
        ckpt.save_cache(folder, objective.cache, signature)

    run = _Run(pipe, cfg, folder, signature)
    module = getattr(pipe, objective.component)  # the UNet, or the component the objective trains
    pipe.unet.requires_grad_(False)
    module.requires_grad_(False)
    if deepspeed and objective.component != "unet":
        raise ValueError(f"{method}: distributed runs train the UNet, this objective trains the {objective.component}")
    # A distributed run trains a copy: ZeRO-3 partitions the parameters of the module it trains.
    trainee = copy.deepcopy(module) if deepspeed else module
    lora = cfg.params == "lora" and objective.component == "unet"
    run.lora = add_lora(trainee, cfg.lora_rank, cfg.seed) if lora else None
    run.trained = lora_parameters(run.lora) if run.lora is not None else objective.trainable(trainee, cfg)
    opt = start_training(trainee, run.trained, cfg)
    stepper = (_DeepSpeedStepper(run, trainee, opt, resume) if deepspeed
               else _LocalStepper(run, trainee, opt, state, objective))

    start = time.perf_counter()

    def step_loss(step):
        with stepper.autocast:
            return objective.loss(stepper.model, run.gen, step)

    losses = run_steps(cfg, run.first, step_loss, stepper.update, stepper.save if folder is not None else None,
                       objective.name, cfg.progress and main, stepper.loss_value)
    timings["train"] = time.perf_counter() - start
    tuned = stepper.finish(objective)
    changed = {**objective.extra_changed, **tuned}
    moved = objective.moved(pipe.unet)
    if main:  # every rank holds the same weights: one warning
        warn_if_unmoved(moved, method, cfg.iterations)
    return FinetuneRun(changed=changed, losses=losses, timings=timings, steps_run=cfg.iterations - run.first,
                       resumed_from=run.first, moved=moved)


class _LocalStepper:
    """Steps the pipeline's own UNet with a torch / bitsandbytes optimizer."""

    def __init__(self, run: _Run, trainee, opt, state: dict | None, objective: Objective):
        self.run, self.opt, self.objective = run, opt, objective
        self.model, self.autocast = trainee, training_autocast(run.cfg.precision, trainee.device)
        self.update = local_update(opt)
        if state is not None:
            run.first = ckpt.restore_checkpoint(state, run.trained, opt)
            run.gen.set_state(state["rng"]["generator"])
            objective.load_state(state["rng"].get("objective", {}))

    @staticmethod
    def loss_value(loss) -> float:
        return loss.item()

    def save(self, done: int) -> None:
        run = self.run
        # The generator's state and the objective's own (e.g. the latest adversarial tokens).
        rng = {"generator": run.gen.get_state(), "objective": self.objective.state()}
        ckpt.save_checkpoint(run.folder, done, run.trained, self.opt, rng, run.signature)

    def finish(self, objective: Objective) -> dict[str, torch.Tensor]:
        run, module = self.run, getattr(self.run.pipe, objective.component)
        objective.finish()
        module.eval().requires_grad_(False)
        if run.cfg.gradient_checkpointing:
            module.disable_gradient_checkpointing()
        if run.lora is not None:
            return merge_lora(module, run.lora)
        return {k: p.detach() for k, p in run.trained.items()}


class _DeepSpeedStepper:
    """Steps a copy of the UNet under DeepSpeed ZeRO, then writes the gathered values back."""

    def __init__(self, run: _Run, trainee, opt, resume: bool):
        from engine import distributed

        self.run, self.distributed = run, distributed
        bf16 = isinstance(training_autocast(run.cfg.precision, trainee.device), torch.autocast)
        self.trainer = distributed.DeepSpeedTrainer(trainee, run.trained, opt, run.cfg.batch_size, run.cfg.zero_stage,
                                                    bf16)
        self.model, self.autocast = self.trainer.unet, contextlib.nullcontext()  # DeepSpeed casts the module itself
        client = self.trainer.load(run.folder) if resume else None
        if client is not None:
            ckpt.check_signature(f"the DeepSpeed checkpoint in {run.folder}", client.get("signature"), run.signature)
            run.gen.set_state(client["generator"])
            run.first = client["step"]

    def update(self, loss) -> None:
        self.trainer.step(loss)

    def loss_value(self, loss) -> float:
        return self.distributed.mean_over_ranks(loss.item())

    def save(self, done: int) -> None:
        run = self.run
        self.trainer.save(run.folder, done, {"step": done, "generator": run.gen.get_state(), "signature": run.signature})

    def finish(self, objective: Objective) -> dict[str, torch.Tensor]:
        values = self.trainer.full_values()
        self.trainer.close()
        del self.trainer, self.model
        objective.finish()
        unet = self.run.pipe.unet
        unet.eval().requires_grad_(False)
        return write_back(unet, values, self.run.lora)


@torch.no_grad()
def write_back(unet, values: dict[str, torch.Tensor], lora: dict | None) -> dict[str, torch.Tensor]:
    """Put a distributed run's gathered values into the pipeline's UNet (adapters merged as
    W + B A); returns the changed tensors by state-dict key."""
    params = dict(unet.named_parameters())
    if lora is not None:
        values = {f"{name}.weight": params[f"{name}.weight"] + (values[f"{name}.lora_B"] @ values[f"{name}.lora_A"]).to(
                  params[f"{name}.weight"]) for name in lora}
    for key, value in values.items():
        params[key].copy_(value.to(params[key]))
    return {key: params[key].detach() for key in values}
