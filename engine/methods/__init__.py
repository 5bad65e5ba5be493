"""The method registry: name -> ``Method`` (engine/methods/base.py), one file per method.

Built in: uce, uce-plus (uce.py), trce-stage1 and trce (trce.py), esd (esd.py), co-erasing
(co_erasing.py), bi-erasing (bi_erasing.py), speed (speed.py), mace (mace.py,
mace_lora.py), rece (rece.py), advunlearn (advunlearn.py, advunlearn_attack.py: it trains the
text encoder, ``Method.component``), stereo (stereo.py), text-gate (text_gate.py: it widens the
text encoder's MLP). Other packages add methods
without forking, either by calling ``register_method(method)`` or through the
``erasure_engine.methods`` entry-point group (a ``Method`` object, or a callable returning one),
which is read the first time the registry is consulted:

    [project.entry-points."erasure_engine.methods"]
    my-method = "my_package.erasure:MY_METHOD"
"""

from __future__ import annotations

import os
import warnings
from importlib import metadata

from engine.concepts import ConceptSet
from engine.methods.advunlearn import ADVUNLEARN, AdvUnlearnConfig
from engine.methods.base import ClosedFormMethod, FineTuningMethod, Method, Outcome, training_summary
from engine.methods.bi_erasing import BI_ERASING, BiErasingConfig
from engine.methods.co_erasing import CO_ERASING, CoErasingConfig
from engine.methods.esd import ESD, ESDConfig
from engine.methods.mace import MACE, MACEConfig
from engine.methods.rece import RECE, RECEConfig
from engine.methods.speed import SPEED, SpeedConfig
from engine.methods.stereo import STEREO, StereoConfig
from engine.methods.text_gate import TEXT_GATE, TextGateConfig
from engine.methods.trce import TRCE, TRCE_STAGE1, TRCEConfig
from engine.methods.uce import UCE, UCE_PLUS

ENTRY_POINT_GROUP = "erasure_engine.methods"
DEFAULT_METHOD = "uce-plus"  # what `erase` and `erasure erase` use when no method is named

_REGISTRY: dict[str, Method] = {m.name: m for m in (UCE, UCE_PLUS, TRCE_STAGE1, ESD, CO_ERASING, BI_ERASING, TRCE,
                                                     SPEED, MACE, RECE, ADVUNLEARN, STEREO, TEXT_GATE)}
_entry_points_read = False


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace=True`` overrides one of the same name)."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes an engine.methods.Method, got {type(method).__name__}")
    if not method.name or method.name != method.name.strip() or " " in method.name:
        raise ValueError(f"a method name is one word, got {method.name!r}")
    if not (callable(getattr(method.defaults, "replace", None)) and callable(getattr(method.defaults, "to_dict", None))):
        raise TypeError(f"method {method.name!r}: its defaults need replace(**changes) and to_dict()")
    if method.name in _REGISTRY and not replace and _REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered (replace=True overrides it)")
    _REGISTRY[method.name] = method
    return method


def _read_entry_points() -> None:
    """Register the methods other installed packages declare; a broken one is skipped with a warning."""
    global _entry_points_read
    _entry_points_read = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            found = entry.load()
            method = found if isinstance(found, Method) else found()
            if method.name != entry.name:
                raise ValueError(f"the entry point is named {entry.name!r} but its method {method.name!r}")
            register_method(method)
        except Exception as err:  # another package's bug must not break the engine
            warnings.warn(f"method entry point {entry.name!r} ({entry.value}) skipped: {err}", stacklevel=2)


def available_methods() -> dict[str, Method]:
    """Every registered method by name (built-in first, then other packages')."""
    if not _entry_points_read:
        _read_entry_points()
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    methods = available_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}")
    return methods[name]


def finetune(pipe, concepts: ConceptSet, cfg, checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
             method: str | None = None, model_fingerprint: str | None = None):
    """Train ``pipe.unet`` (or the component the method trains, ``Method.component``) in place to
    erase ``concepts`` with a fine-tuning method (default: the built-in method whose settings type
    ``cfg`` is); returns the trainer's ``FinetuneRun``."""
    if method is None:
        owners = [m for m in available_methods().values() if m.trains and type(m.defaults) is type(cfg)]
        if len(owners) != 1:
            raise ValueError(f"name the method for {type(cfg).__name__} settings (method=...)")
        method = owners[0].name
    chosen = get_method(method)
    if not isinstance(chosen, FineTuningMethod):
        raise ValueError(f"{method!r} is not a fine-tuning method")
    return chosen.train(pipe, concepts, cfg, checkpoint_dir=checkpoint_dir, resume=resume,
                        model_fingerprint=model_fingerprint)


__all__ = [
    "Method", "ClosedFormMethod", "FineTuningMethod", "Outcome", "training_summary", "register_method",
    "available_methods", "get_method", "finetune", "ENTRY_POINT_GROUP", "DEFAULT_METHOD",
    "ESDConfig", "CoErasingConfig", "BiErasingConfig", "TRCEConfig", "SpeedConfig",
    "MACEConfig", "RECEConfig", "AdvUnlearnConfig", "TextGateConfig",
]
