"""Lazy imports of heavy optional dependencies, with an error naming the extra to install."""

from __future__ import annotations

import importlib

EXTRAS = {"deepspeed": "distributed", "bitsandbytes": "bnb", "xformers": "xformers"}


def require(module: str):
    """Import an optional dependency or raise an ImportError telling how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRAS.get(module)
        hint = f"pip install 'erasure-engine[{extra}]'" if extra else f"pip install {module}"
        raise ImportError(f"{module} is needed for this feature but is not installed: {hint}") from err
