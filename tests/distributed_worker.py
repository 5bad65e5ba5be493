"""Launched by tests/test_distributed.py under torchrun: fine-tunes the tiny SD pipeline with
DeepSpeed ZeRO once per requested run and, on rank 0, saves what each run changed.

    torchrun --nproc_per_node 2 tests/distributed_worker.py --model DIR --out DIR --runs 2:adamw,3:adamw8bit
        [--checkpoint-dir DIR] [--resume] [--die-at-step N]

``--die-at-step N`` ends every rank abruptly (``os._exit``) when step N starts: a killed run.
"""

import argparse
import json
import os
from pathlib import Path

from safetensors.torch import save_file

from engine.concepts import concepts_from_names
from engine.methods.esd import ESDConfig

CONCEPTS = concepts_from_names(["Van Gogh", "a red car"], templates=["{}", "a painting of {}"])


def config(**kw) -> ESDConfig:
    """The runs' settings (shared with the single-process reference runs of the tests)."""
    base = dict(params="full", iterations=4, lr=1e-3, batch_size=4, sample_steps=4, trajectories=1,
                progress=False, checkpoint_every=0, seed=5)
    return ESDConfig(**{**base, **kw})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", required=True, help="comma-separated STAGE:OPTIMIZER")
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--die-at-step", type=int)
    args = ap.parse_args()

    from engine import distributed
    from engine.methods import finetune
    from engine.models import load_pipeline

    if args.die_at_step is not None:
        real_step, calls = distributed.DeepSpeedTrainer.step, {"n": 0}

        def step_or_die(self, loss):
            calls["n"] += 1
            if calls["n"] == args.die_at_step:
                os._exit(3)
            real_step(self, loss)

        distributed.DeepSpeedTrainer.step = step_or_die

    out = Path(args.out)
    for run in args.runs.split(","):
        stage, optimizer = run.split(":")
        cfg = config(distributed="deepspeed", zero_stage=int(stage), optimizer=optimizer,
                     checkpoint_every=2 if args.checkpoint_dir else 0)
        result = finetune(load_pipeline(args.model), CONCEPTS, cfg, checkpoint_dir=args.checkpoint_dir,
                          resume=args.resume)
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in result.changed.items()}, str(out / f"zero{stage}-{optimizer}.safetensors"))
            (out / f"zero{stage}-{optimizer}.json").write_text(json.dumps(
                {"losses": result.losses, "resumed_from": result.resumed_from, "ranks": distributed.world_size()}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
