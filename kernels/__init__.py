"""Triton kernels for the erasure engine, one op per file.

Each op module holds its `@triton.jit` kernel(s), a launcher that checks its inputs, a
`torch.autograd.Function`, one functional entry point, and the pure-torch reference beside it.
The entry points pick Triton where it can run (CUDA tensors, or CPU tensors under
`TRITON_INTERPRET=1`) and the reference otherwise; `backend=` forces either.
"""

from .contrastive_hinge import contrastive_hinge, contrastive_hinge_reference
from .gram import weighted_gram, weighted_gram_reference
from .guidance_loss import guidance_loss, guidance_loss_reference, guidance_target
from .kv_update import stacked_transform, stacked_transform_reference, transform_each

__all__ = [
    "contrastive_hinge",
    "contrastive_hinge_reference",
    "guidance_loss",
    "guidance_loss_reference",
    "guidance_target",
    "weighted_gram",
    "weighted_gram_reference",
    "stacked_transform",
    "stacked_transform_reference",
    "transform_each",
]
