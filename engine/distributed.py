"""Data-parallel fine-tuning on DeepSpeed ZeRO (stages 2 and 3).

Launch one process per GPU (or, on a CPU machine, per process on the gloo backend) with
``torchrun --nproc_per_node N -m engine erase ... --distributed deepspeed --zero-stage 3`` (the
``deepspeed`` launcher works too). Every rank builds the same frozen targets, draws the same batch
of samples from the same seed and trains on its own contiguous share of that batch; ZeRO averages
the gradients over the ranks, so N ranks take the same optimizer steps as one process with the
same ``batch_size`` (up to the order of floating-point sums). ``batch_size`` must be a multiple
of the number of ranks.

ZeRO-2 shards the optimizer state and the gradients, ZeRO-3 also the parameters. The optimizer
is a client optimizer handed to DeepSpeed: torch ``adam`` / ``adamw``, or bitsandbytes'
``adamw8bit`` (8-bit states), under both stages (DeepSpeed flattens each rank's share of the
trained parameters into fp32 partitions and the client optimizer steps on those). bf16 on GPUs
(``precision`` auto or bf16): DeepSpeed keeps fp32 master weights and trains the bf16 module.

The trained UNet is a copy of the pipeline's, so the pipeline itself never holds partitioned
parameters: after training, every rank gathers the full fp32 values of the trained tensors and
writes them into the pipeline's UNet. Checkpoints are DeepSpeed's (``<checkpoint_dir>/deepspeed``,
one folder per step and a ``latest`` file written after it, so a killed run resumes from the last
complete one); only rank 0 writes the outputs (``engine.api.Result.save``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from unittest import mock

import torch

from engine._optional import require

ZERO_STAGES = (2, 3)
CHECKPOINT_SUBDIR = "deepspeed"
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's rank (0 outside a distributed run)."""
    dist = _dist()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    """Whether this process writes outputs: rank 0, or the only process."""
    return rank() == 0


def init() -> torch.device:
    """Join the launcher's process group (NCCL on GPUs, gloo otherwise); the device to train on."""
    deepspeed = require("deepspeed")
    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if missing and _dist() is None:
        raise RuntimeError(
            "distributed='deepspeed' runs under a launcher: `torchrun --nproc_per_node N -m engine erase ... "
            f"--distributed deepspeed` (or `deepspeed`); missing environment variables: {', '.join(missing)}"
        )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if _dist() is None:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def shard(batch_size: int) -> slice:
    """This rank's contiguous share of a batch of ``batch_size`` samples."""
    n, r = world_size(), rank()
    if batch_size % n:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of ranks ({n}) in a "
                         "distributed run, so that every rank trains on the same number of samples")
    per = batch_size // n
    return slice(r * per, (r + 1) * per)


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank number over all ranks (for logging the global loss)."""
    dist = _dist()
    if dist is None:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def shutdown() -> None:
    """Wait for every rank, then leave the process group (ZeRO-3 may abort at exit otherwise)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()


def deepspeed_config(batch_size: int, zero_stage: int, bf16: bool) -> dict:
    """The DeepSpeed configuration of a fine-tuning run: one micro-batch per rank and step."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // world_size(),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # the client optimizers above
        "bf16": {"enabled": bf16},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _checkpoint_globals() -> list:
    """The classes besides tensors and plain containers that DeepSpeed's checkpoints hold."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.utils.tensor_fragment import fragment_address

    found = [LossScaler, fragment_address]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        found.append(ZeroStageEnum)
    except ImportError:
        pass
    return found


@contextlib.contextmanager
def weights_only_loads():
    """While open, torch.load reads weights-only whatever its caller asks. DeepSpeed's checkpoint
    engine unpickles the files of a checkpoint folder with weights_only off, which would
    run any code a crafted file holds; weights-only unpickling builds only tensors, containers and
    the allow-listed DeepSpeed classes (their data set, none of their code run)."""
    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    with torch.serialization.safe_globals(_checkpoint_globals()), mock.patch.object(torch, "load", load):
        yield


class EngineAsUNet:
    """The DeepSpeed engine seen by the objectives as the UNet they call. Floating-point inputs
    but the timestep are cast to the module's dtype (bf16 under DeepSpeed's bf16 mode, where no
    autocast runs)."""

    def __init__(self, engine, device: torch.device, dtype: torch.dtype):
        self.engine, self.device, self.dtype = engine, device, dtype

    def _cast(self, value):
        if torch.is_tensor(value):
            return value.to(self.dtype) if value.is_floating_point() else value
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v) for v in value)
        if isinstance(value, dict):
            return {k: self._cast(v) for k, v in value.items()}
        return value

    def __call__(self, sample, timestep, *args, **kwargs):
        # The timestep stays as it is: bf16 cannot hold every integer up to 999.
        return self.engine(self._cast(sample), timestep, *self._cast(args), **self._cast(kwargs))

    def train(self, mode: bool = True):
        self.engine.train(mode)
        return self

    def eval(self):
        return self.train(False)


class DeepSpeedTrainer:
    """A ZeRO engine around ``module`` training ``trained`` (name -> parameter) with a client optimizer."""

    def __init__(self, module, trained: dict[str, torch.nn.Parameter], optimizer, batch_size: int, zero_stage: int,
                 bf16: bool):
        deepspeed = require("deepspeed")
        self.trained = trained
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=list(trained.values()), optimizer=optimizer,
            config=deepspeed_config(batch_size, zero_stage, bf16),
        )
        dtype = torch.bfloat16 if bf16 else next(iter(trained.values())).dtype
        self.unet = EngineAsUNet(self.engine, self.engine.device, dtype)

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def save(self, folder: Path, step: int, client_state: dict) -> None:
        """A DeepSpeed checkpoint of every rank's shard (a collective call)."""
        self.engine.save_checkpoint(str(folder / CHECKPOINT_SUBDIR), tag=f"step{step:08d}", client_state=client_state)

    def load(self, folder: Path) -> dict | None:
        """The client state of the last complete checkpoint, after loading it (weights-only: see
        ``weights_only_loads``); None if there is none."""
        if not (folder / CHECKPOINT_SUBDIR / "latest").is_file():
            return None
        with weights_only_loads():
            path, client_state = self.engine.load_checkpoint(str(folder / CHECKPOINT_SUBDIR))
        if path is None:
            raise RuntimeError(f"could not load the DeepSpeed checkpoint in {folder / CHECKPOINT_SUBDIR}")
        return client_state

    def full_values(self) -> dict[str, torch.Tensor]:
        """Every trained tensor's full fp32 value, on the CPU (a collective call under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {k: safe_get_full_fp32_param(p).detach().float().cpu().clone() for k, p in self.trained.items()}

    def close(self) -> None:
        self.engine.destroy()
