"""erasure-engine: fast concept erasure for Stable Diffusion models.

The public, stable API is what `__all__` lists; see engine/api.py for usage.
"""

import logging


class _DropMessage(logging.Filter):
    """Drops a third-party log line that says nothing to this project's users."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# DeepSpeed, imported by transformers whenever it is installed, warns on machines without a GPU.
logging.getLogger("DeepSpeed").addFilter(_DropMessage("Setting accelerator to CPU"))

from engine.api import Result, apply_delta, erase, erase_with_adapters, method_config
from engine.closed_form import ClosedFormConfig
from engine.finetune.adapters import load_concept_adapters
from engine.methods import Method, available_methods, get_method, register_method
from engine.concepts import Concept, ConceptFileError, ConceptSet, concepts_from_names, load_concepts
from engine.models import load_pipeline

__version__ = "0.1.0"

__all__ = [
    "erase",
    "erase_with_adapters",
    "load_concept_adapters",
    "apply_delta",
    "method_config",
    "Result",
    "Method",
    "available_methods",
    "get_method",
    "register_method",
    "ClosedFormConfig",
    "Concept",
    "ConceptSet",
    "ConceptFileError",
    "load_concepts",
    "concepts_from_names",
    "load_pipeline",
]
