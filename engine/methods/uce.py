"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024), on the shared
closed-form solve (engine/closed_form.py).

* ``uce``: the published code's edit (trainscripts/uce_sd_erase.py): one row per concept, its
  last token before [EoT] -> the guide's last token before [EoT] (the start token for guide
  ""), erase and preserve scales 1, lambda 0.5 on the identity term; with the bare concept string
  as the prompt (the concept files' default template "{}") and guide "" (the default anchor) it
  gives UCE's weights.
* ``uce-plus``: the engine's preset of the same solve, safe with a names file alone: every
  concept token and the [EoT] (what the concept's context reaches);
  besides what the concept file lists, it preserves the generic prior of engine/prior.py (the
  empty prompt, shipped generic captions, the model's frequent words) and each erased name's
  neighbours, skips edit rows a preserved prompt shares, and chooses the preservation weight
  from the data (``preserve_weight="auto"``: the largest that still moves every concept at
  least 80% of its way to the anchor); ridge 0.1. It refuses (nothing written) an edit that
  would move the generic prior's keys/values by more than ``PRIOR_DRIFT_LIMIT`` (0.1): on the
  toy world, past that point erasing more concepts costs most of the rest (100 identities at
  once: 0.145, 60% of the other concepts kept).
"""

from engine.closed_form import PRIOR_DRIFT_LIMIT, ClosedFormConfig
from engine.methods.base import ClosedFormMethod

UCE = ClosedFormMethod(
    name="uce",
    defaults=ClosedFormConfig(tokens="last", erase_weight=1.0, preserve_weight=1.0, ridge=0.5),
    summary="UCE, the published edit: last concept token -> the guide's (Gandikota et al., WACV 2024)",
)

UCE_PLUS = ClosedFormMethod(
    name="uce-plus",
    defaults=ClosedFormConfig(tokens="concept", erase_weight=1.0, preserve_weight="auto", ridge=0.1, prior="generic",
                              neighbours=4, skip_shared_rows=True, max_prior_drift=PRIOR_DRIFT_LIMIT),
    summary="UCE's solve on every concept token and the [EoT], keeping a generic prior and the names' "
            "neighbours, with the preservation weight chosen from the data",
)
