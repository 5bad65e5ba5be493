"""Fine-tuning erasure (DESIGN 2.2): the shared machinery every fine-tuning method runs on.

config.py      ``TrainConfig``: the settings the trainer shares (each method subclasses it)
params.py      which tensors a run trains (``params``), LoRA wrappers, the optimizer
frozen.py      text conditions (SDXL's pooled row), frozen-model trajectories and targets
images.py      concept images and the IP-Adapter of the image-branch methods
checkpoint.py  checkpoints and target caches (safetensors + JSON, keyed by the run's signature)
trainer.py     ``Objective`` and the one training loop, local or DeepSpeed ZeRO
adapters.py    one ESD LoRA adapter per concept, trained together in one batched run

The methods themselves (their settings, defaults and objectives) live in engine/methods/.
"""

from engine.finetune.config import TrainConfig
from engine.finetune.params import trainable_parameters
from engine.finetune.trainer import FinetuneRun, Objective, train

__all__ = ["TrainConfig", "Objective", "FinetuneRun", "train", "trainable_parameters"]
