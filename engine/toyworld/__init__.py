"""The toy world: a small, real text-to-image world to train and test concept erasure on.

No real Stable Diffusion weights are available offline, so the project ships its own world:
procedurally drawn 32x32 RGB images with captions and subject masks, on which a tiny SD
pipeline and an evaluator classifier are trained. Its concepts mirror real erasure use cases:

* ``identity``: made-up people (celebrity analogue), each with a fixed, distinctive look: 432 in
  the default world (v2), 128 in v1's (``catalogue.IDENTITIES`` follows the world last loaded or
  built; ``catalogue.set_identity_count`` selects one);
* ``object`` (13 glyphs) in a ``colour`` (8) on a ``background`` (6);
* ``style``: 6 art-style analogues that restyle any subject (pixel mosaic, hatched,
  pointillist, neon, sepia, pencil sketch);
* ``unsafe``: harmless stand-ins for harmful content (skull, flame, blood splatter, weapon),
  with synonyms and paraphrases that ask for them without naming them.

``catalogue`` holds the concepts and caption templates (train and held-out); ``render`` draws
scenes and builds datasets. The package re-exports both modules' main names (except the
function ``render.render``, which would hide its module) and ``engine.image_grid.save_grid``.
Deterministic given a seed::

    from engine.toyworld import make_dataset, save_grid
    data = make_dataset(1000, seed=0)         # images, masks, kinds, captions, labels, scenes
    save_grid(data["images"][:64], "grid.png", scale=4)
"""

from engine.image_grid import save_grid
from engine.toyworld.catalogue import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    OBJECTS,
    STYLES,
    TEMPLATES,
    UNSAFE,
    Identity,
    ObjectShape,
    Style,
    UnsafeConcept,
    all_concepts,
    concepts,
    indirect_prompts,
    synonym_prompts,
)
from engine.toyworld.render import (
    MIX,
    Render,
    Scene,
    canonical_mask,
    caption_for,
    make_dataset,
    render_batch,
    sample_scene,
)

__all__ = [
    "KINDS",
    "OBJECTS",
    "COLOURS",
    "BACKGROUNDS",
    "STYLES",
    "UNSAFE",
    "TEMPLATES",
    "Identity",
    "ObjectShape",
    "Style",
    "UnsafeConcept",
    "concepts",
    "all_concepts",
    "indirect_prompts",
    "synonym_prompts",
    "MIX",
    "Scene",
    "Render",
    "sample_scene",
    "caption_for",
    "render_batch",
    "make_dataset",
    "canonical_mask",
    "save_grid",
]
