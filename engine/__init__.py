"""erasure-engine: fast concept erasure for Stable Diffusion models.

The public, stable API is what `__all__` lists; see engine/api.py for usage.
"""

import logging


class _DropHubKernelProbe(logging.Filter):
    # bitsandbytes' CPU backend probes Hugging Face's `kernels` package at import; this project's
    # top-level `kernels` package answers instead and the probe logs a failure that means nothing
    # here (the probed 4-bit CPU kernel is optional and unused).
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelProbe())

from engine.api import Result, apply_delta, erase, method_config
from engine.closed_form import METHODS, ClosedFormConfig
from engine.concepts import Concept, ConceptFileError, ConceptSet, concepts_from_names, load_concepts
from engine.models import load_pipeline

__version__ = "0.1.0"

__all__ = [
    "erase",
    "apply_delta",
    "method_config",
    "Result",
    "METHODS",
    "ClosedFormConfig",
    "Concept",
    "ConceptSet",
    "ConceptFileError",
    "load_concepts",
    "concepts_from_names",
    "load_pipeline",
]
