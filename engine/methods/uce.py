"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024), on the shared
closed-form solve (engine/closed_form.py).

* ``uce``: the published code's edit (trainscripts/uce_sd_erase.py): one row per concept, its
  last token before [EoT] -> the guide's last token before [EoT] (the start token for guide
  ""), erase and preserve scales 1, lambda 0.5 on the identity term; with the bare concept string
  as the prompt (the concept files' default template "{}") and guide "" (the default anchor) it
  gives UCE's weights.
* ``uce-plus``: the engine's richer row choice on the same solve: every concept token and the
  [EoT] (what the concept's context reaches), preservation max(0.1, 1/#prompts), ridge 0.1.
"""

from engine.closed_form import ClosedFormConfig
from engine.methods.base import ClosedFormMethod

UCE = ClosedFormMethod(
    name="uce",
    defaults=ClosedFormConfig(tokens="last", erase_weight=1.0, preserve_weight=1.0, ridge=0.5),
    summary="UCE, the published edit: last concept token -> the guide's (Gandikota et al., WACV 2024)",
)

UCE_PLUS = ClosedFormMethod(
    name="uce-plus",
    defaults=ClosedFormConfig(tokens="concept", erase_weight=1.0, preserve_weight=None, ridge=0.1),
    summary="UCE's solve on every concept token and the [EoT], preservation max(0.1, 1/n)",
)
