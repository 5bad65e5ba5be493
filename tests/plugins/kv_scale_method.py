"""A third-party method as another package would ship it: scales every cross-attention key
projection by ``factor`` (a deliberately simple edit: the test checks the plumbing, not erasure)."""

import dataclasses
import time
from dataclasses import dataclass

import torch

from engine.methods import Method, Outcome


@dataclass(frozen=True)
class KVScaleConfig:
    factor: float = 0.5
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.factor, (int, float)) or not 0 < self.factor:
            raise ValueError(f"config field 'factor' must be > 0, got {self.factor!r}")

    def replace(self, **changes):
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown kv-scale option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class KVScale(Method):
    def touched(self, unet, cfg):
        return {k for k, _ in unet.named_parameters() if k.endswith("attn2.to_k.weight")}

    def run(self, pipe, concepts, cfg, *, checkpoint_dir=None, resume=False, model_fingerprint=None):
        start = time.perf_counter()
        params = dict(pipe.unet.named_parameters())
        changed = {}
        with torch.no_grad():
            for key in sorted(self.touched(pipe.unet, cfg)):
                params[key].mul_(cfg.factor)
                changed[key] = params[key].detach()
        return Outcome(changed=changed, timings={"edit": time.perf_counter() - start},
                       manifest={"seed": None, "kv_scale": {"factor": cfg.factor, "layers": len(changed)}})


KV_SCALE = KVScale(name="kv-scale", defaults=KVScaleConfig(), summary="scales the cross-attention keys (test plug-in)")


def make_broken():
    raise RuntimeError("this plug-in is broken on purpose")
