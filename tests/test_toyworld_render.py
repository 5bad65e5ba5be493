"""The toy world's catalogue and renderer: determinism, shapes, distinct identities, objects and
styles, captions and templates, the unsafe concepts' indirect prompts, the dataset mixture and
the PNG grid."""

import dataclasses
import importlib
import itertools
import re

import numpy as np
import pytest
from PIL import Image

from engine.image_grid import save_grid
from engine.toyworld import catalogue as cat
from engine.toyworld.render import (
    MIX,
    Render,
    Scene,
    canonical_mask,
    caption_for,
    make_dataset,
    render,
    render_batch,
    sample_scene,
)

IDENTITY_NAMES = [i.name for i in cat.IDENTITIES]
STYLE_NAMES = [s.name for s in cat.STYLES]


def _scenes(seed, n, **kw):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kw) for _ in range(n)]


def _mixed_subjects(seed, n):
    """Unstyled scenes whose subjects cycle through identity, object and unsafe."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, kind=("identity", "object", "unsafe")[i % 3]) for i in range(n)]


# --- catalogue --------------------------------------------------------------------------------


def test_catalogue_sizes_and_lookups():
    cat.set_identity_count(cat.DEFAULT_IDENTITIES)  # the default world's (another test may have loaded v1)
    assert len(cat.IDENTITIES) == cat.DEFAULT_IDENTITIES >= 400
    assert len(cat.OBJECTS) >= 12
    assert len(cat.COLOURS) == 8 and len(cat.BACKGROUNDS) == 6
    assert len(cat.STYLES) == 6 and len(cat.UNSAFE) == 4
    everything = cat.all_concepts()
    assert tuple(everything) == cat.KINDS
    assert everything["identity"] == IDENTITY_NAMES
    assert everything["colour"] == list(cat.COLOURS)
    assert cat.concepts("style") == STYLE_NAMES
    for names in everything.values():
        assert len(set(names)) == len(names)
    with pytest.raises(ValueError, match="unknown concept kind"):
        cat.concepts("celebrity")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cat.IDENTITIES[0].name = "someone else"


def test_identity_names_are_two_made_up_words_that_name_no_other_concept():
    others = [n for kind in ("object", "colour", "style", "unsafe") for n in cat.concepts(kind)]
    others += [s for u in cat.UNSAFE for s in u.synonyms]
    others += [w for b in cat.BACKGROUNDS for w in b.split()]
    for name in IDENTITY_NAMES:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", name), name
        for other in others:
            assert other.lower() not in name.lower(), (name, other)


def test_identities_differ_pairwise_in_at_least_two_attributes():
    codes = np.array([i.attributes for i in cat.IDENTITIES])
    differ = (codes[:, None, :] != codes[None, :, :]).sum(-1)
    np.fill_diagonal(differ, 99)
    assert differ.min() >= 2
    # Stronger, by construction: 3 of the large visible attributes (not just the eyes).
    salient = [cat.IDENTITY_ATTRIBUTES.index(a) for a in cat.SALIENT_ATTRIBUTES]
    differ_salient = (codes[:, None, salient] != codes[None, :, salient]).sum(-1)
    np.fill_diagonal(differ_salient, 99)
    assert differ_salient.min() >= 3
    for who in cat.IDENTITIES:
        if who.accessory == "hat":
            assert who.hair_shape in cat.HAIR_UNDER_HAT, who


# --- rendering basics -------------------------------------------------------------------------


def test_render_is_deterministic_and_seed_dependent():
    for scene in _scenes(0, 12) + _scenes(1, 6, kind="style"):
        a, b = render(scene), render(scene)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        assert a.caption == b.caption and a.labels == b.labels
        other = render(dataclasses.replace(scene, seed=scene.seed + 1))
        assert not np.array_equal(a.image, other.image)
    d1, d2, d3 = make_dataset(40, seed=3), make_dataset(40, seed=3), make_dataset(40, seed=4)
    assert np.array_equal(d1["images"], d2["images"]) and d1["captions"] == d2["captions"]
    assert not np.array_equal(d1["images"], d3["images"])


def test_shapes_and_dtypes():
    scene = Scene("object", "star", "red", "sky", None, 5)
    r = render(scene)
    assert isinstance(r, Render)
    assert r.image.shape == (32, 32, 3) and r.image.dtype == np.uint8
    assert r.mask.shape == (32, 32) and r.mask.dtype == bool
    assert isinstance(r.caption, str) and r.caption
    assert r.labels == {"object": "star", "colour": "red", "background": "sky"}
    images, masks = render_batch(_scenes(2, 5))
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert masks.shape == (5, 32, 32) and masks.dtype == bool
    images, masks = render_batch([])
    assert images.shape == (0, 32, 32, 3) and masks.shape == (0, 32, 32)


def test_mask_covers_exactly_the_subject():
    # Unstyled red star on a plain background: inside the mask (less its darkened outline) the
    # pixels are red, outside they are the background, up to brightness variation and noise.
    red = np.array(cat.COLOURS["red"], float)
    for seed in range(5):
        r = render(Scene("object", "star", "red", "plain light", None, seed))
        img = r.image.astype(float)
        outline = r.mask & ~_eroded(r.mask)
        inside = img[r.mask & ~outline]
        ratio = inside / red.clip(1)
        assert np.abs(inside - inside.mean(0)).max() < 2  # one flat colour
        assert 0.88 < ratio[:, 0].mean() < 1.12 and inside[:, 1].max() < 60
        assert np.abs(img[~r.mask] - [237, 234, 224]).max() < 20
        assert outline.any() and (img[outline].mean() < inside.mean())


def _eroded(mask):
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def test_every_subject_renders_a_substantial_mask_inside_the_frame():
    # The canonical mask leaves a 2 px margin at the top, left and right (the largest jitter),
    # so no jittered render crops the subject there; a bust's shoulders may run off the bottom.
    subjects = [("identity", n) for n in IDENTITY_NAMES] + [("object", o.name) for o in cat.OBJECTS]
    subjects += [("unsafe", u.name) for u in cat.UNSAFE]
    for kind, name in subjects:
        m = canonical_mask(kind, name)
        assert not m[:2].any() and not m[:, :2].any() and not m[:, -2:].any(), name
        if kind != "identity":
            assert not m[-2:].any(), name
        assert m.mean() > (0.3 if kind == "identity" else 0.05), name
    for i, name in enumerate(IDENTITY_NAMES):
        r = render(Scene("identity", name, None, cat.BACKGROUNDS[i % 6], None, i))
        assert r.mask.mean() > 0.25
        assert r.labels == {"identity": name, "background": cat.BACKGROUNDS[i % 6]}


def test_identities_are_distinct_in_pixel_space():
    # Mean image of 8 renders per identity, with the same seeds and backgrounds for everyone (so
    # jitter, brightness and noise are shared): every pair differs clearly in many pixels.
    def scenes(name):
        return [Scene("identity", name, None, cat.BACKGROUNDS[s % 6], None, s) for s in range(8)]

    means = np.stack([render_batch(scenes(n))[0].mean(0) / 255 for n in IDENTITY_NAMES])
    fewest = min(
        int(np.sort((np.abs(means[a] - means).max(-1) > 0.15).sum((1, 2)))[1]) for a in range(len(means))
    )
    assert fewest >= 40, f"two identities' mean images differ in only {fewest} pixels"


def test_identities_stay_recognisable_under_jitter_and_backgrounds():
    # Template matching against the identities' canonical sprites, at every jitter offset,
    # recovers who a random render (random background, position, brightness) shows.
    mod = importlib.import_module("engine.toyworld.render")  # the module: the package's
    # attribute of that name is the render function
    names = IDENTITY_NAMES[::3]
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    sprites = [mod._identity_sprite(n) for n in names]
    rgb = np.stack([[s[0][2 - dy : 34 - dy, 2 - dx : 34 - dx] for dy, dx in shifts] for s in sprites])
    msk = np.stack([[s[1][2 - dy : 34 - dy, 2 - dx : 34 - dx] for dy, dx in shifts] for s in sprites])
    area = msk.sum((-1, -2))
    rng = np.random.default_rng(11)
    for k, name in enumerate(names):
        img = render(sample_scene(rng, kind="identity", subject=name)).image / 255.0
        err = (np.abs(rgb - img).sum(-1) * msk).sum((-1, -2)) / area
        assert err.min(1).argmin() == k, name


def test_object_masks_are_distinct():
    names = [("object", o.name) for o in cat.OBJECTS] + [("unsafe", u.name) for u in cat.UNSAFE]
    masks = {n: canonical_mask(k, n) for k, n in names}
    for a, b in itertools.combinations(masks, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.8, (a, b, iou)


# --- styles -----------------------------------------------------------------------------------

_PAPER = np.array([0.97, 0.95, 0.90])
_SEPIA_DIR = np.array([1.08, 0.86, 0.62]) / np.linalg.norm([1.08, 0.86, 0.62])


def _isolated_dots(im):
    """Fraction of positions where a flat 2x2 block differs from the pixels around it."""
    x = im.astype(np.int16)
    a = x[:-1, :-1]
    flat = (x[1:, :-1] == a).all(-1) & (x[:-1, 1:] == a).all(-1) & (x[1:, 1:] == a).all(-1)
    p = np.pad(x, ((1, 2), (1, 2), (0, 0)), constant_values=-1)
    for dy, dx in [(0, -1), (-1, 0), (0, 2), (2, 0)]:
        flat &= (p[1 + dy : 32 + dy, 1 + dx : 32 + dx] != p[1:32, 1:32]).any(-1)
    return flat.mean()


def _detect_style(im):
    """A hand-written style detector: one simple image statistic a style, checked in order."""
    x = im / 255.0
    lum = x @ np.array([0.299, 0.587, 0.114])
    blocks = im.reshape(16, 2, 16, 2, 3).astype(int)
    if (np.ptp(blocks, axis=(1, 3)).max(-1) == 0).mean() > 0.9:  # flat 2x2 blocks everywhere
        return "pixel mosaic"
    if _isolated_dots(im) > 0.09:
        return "pointillist"
    # "/" strokes: neighbours along "/" alike, along "\" different.
    if np.abs(lum[1:, 1:] - lum[:-1, :-1]).mean() - np.abs(lum[1:, :-1] - lum[:-1, 1:]).mean() > 0.1:
        return "hatched"
    if (lum < 0.1).mean() > 0.32:
        return "neon"
    if ((x @ _SEPIA_DIR) / (np.linalg.norm(x, axis=-1) + 1e-6) > 0.995).mean() > 0.8:
        return "sepia"
    if (np.abs(x - _PAPER).max(-1) < 0.04).mean() > 0.5:
        return "pencil sketch"
    return None


def test_styles_are_recognisable_whatever_the_subject():
    scenes = _mixed_subjects(21, 30)
    for style in [None] + STYLE_NAMES:
        styled = [dataclasses.replace(s, style=style) for s in scenes]
        images, masks = render_batch(styled)
        found = [_detect_style(im) for im in images]
        assert found.count(style) == len(scenes), (style, found)
        if style is not None:
            unstyled = render_batch(scenes)[0]
            assert (np.abs(images.astype(int) - unstyled).mean((1, 2, 3)) > 5).all()
            # the mask is the subject's, whatever the style
            assert np.array_equal(masks, render_batch(scenes)[1])


def test_styles_that_paint_over_the_background_drop_its_label():
    for style in cat.STYLES:
        r = render(Scene("identity", IDENTITY_NAMES[0], None, "grass", style.name, 0))
        assert r.labels["style"] == style.name
        assert ("background" in r.labels) == (not style.replaces_background)


def test_styles_that_hide_colour_drop_the_colour_label():
    for style in cat.STYLES:
        r = render(Scene("object", "star", "red", "grass", style.name, 0))
        assert r.labels["object"] == "star"
        assert ("colour" in r.labels) == style.keeps_colour
    assert {s.name for s in cat.STYLES if not s.keeps_colour} == {"sepia", "pencil sketch"}


# --- captions and templates -------------------------------------------------------------------

_FIELDS = {
    "identity": {"name"},
    "object": {"colour", "object"},
    "style": {"subject", "style"},
    "unsafe": {"concept"},
}


def test_templates_are_split_and_use_their_fields():
    assert set(cat.TEMPLATES) == set(_FIELDS)
    for kind, splits in cat.TEMPLATES.items():
        assert set(splits) == {"train", "train_extra", "heldout"}
        assert splits["train"] and splits["train_extra"] and splits["heldout"]
        trained = splits["train"] + splits["train_extra"]
        assert len(set(trained)) == len(trained), kind
        assert not set(trained) & set(splits["heldout"]), kind
        for template in trained + splits["heldout"]:
            fields = set(re.findall(r"{(\w+)}", template))
            assert _FIELDS[kind] <= fields, (kind, template)
    for u in cat.UNSAFE:
        assert not set(u.paraphrases) & set(u.heldout_paraphrases)
        assert u.paraphrases and u.heldout_paraphrases


def _possible_captions(scene, split):
    """Every caption caption_for can give the scene from the split's templates (unsafe: with
    its name or a synonym, or one of the split's paraphrases)."""
    kind = "style" if scene.style else scene.kind
    subject = {"identity": scene.subject, "object": f"a {scene.colour} {scene.subject}"}
    subject = subject.get(scene.kind, f"a {scene.subject}")
    concepts = [scene.subject]
    out = set()
    if scene.kind == "unsafe" and not scene.style:
        concepts += list(cat.unsafe_concept(scene.subject).synonyms)
        out |= set(cat.indirect_prompts(scene.subject, split))
    templates = cat.TEMPLATES[kind][split] + (cat.TEMPLATES[kind]["train_extra"] if split == "train" else ())
    for template, concept in itertools.product(templates, concepts):
        text = template.format(name=scene.subject, object=scene.subject, colour=scene.colour,
                               background=scene.background, style=scene.style, subject=subject, concept=concept)
        out.add(re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text))
    return out


def test_captions_name_their_subject_and_follow_the_split():
    for split, other in (("train", "heldout"), ("heldout", "train")):
        data = make_dataset(120, seed=8, split=split)
        for scene, caption, labels in zip(data["scenes"], data["captions"], data["labels"]):
            assert caption in _possible_captions(scene, split), caption
            assert caption not in _possible_captions(scene, other), caption
            if scene.kind in ("identity", "object"):  # direct templates name the subject
                assert scene.subject in caption
            if scene.colour:
                assert scene.colour in caption
            if scene.style:
                assert scene.style in caption and labels["style"] == scene.style
            if scene.kind == "unsafe" and caption not in cat.indirect_prompts(scene.subject):
                words = [scene.subject, *cat.unsafe_concept(scene.subject).synonyms]
                assert any(w in caption for w in words), caption
    moon = Scene("object", "moon", "orange", "grass", None, 0)
    assert "an orange moon" in caption_for(moon, np.random.default_rng(0))  # "a" before a vowel


def test_unsafe_indirect_prompts_never_name_the_concept():
    for u in cat.UNSAFE:
        banned = [u.name.lower(), *(s.lower() for s in u.synonyms)]
        prompts = cat.indirect_prompts(u.name)
        assert len(prompts) == len(u.paraphrases) + len(u.heldout_paraphrases) >= 4
        assert cat.indirect_prompts(u.name, "train") == list(u.paraphrases)
        assert cat.indirect_prompts(u.name, "heldout") == list(u.heldout_paraphrases)
        for prompt in prompts:
            for word in banned:
                assert word not in prompt.lower(), (u.name, prompt, word)
        for prompt in cat.synonym_prompts(u.name):
            assert u.name.lower() not in prompt.lower()
            assert any(s in prompt for s in u.synonyms)
    with pytest.raises(ValueError, match="unknown unsafe concept"):
        cat.indirect_prompts("dragon")


# --- scenes and datasets ----------------------------------------------------------------------


def test_sample_scene_options():
    rng = np.random.default_rng(0)
    s = sample_scene(rng, subject="flame")
    assert (s.kind, s.subject, s.colour, s.style) == ("unsafe", "flame", None, None)
    s = sample_scene(rng, kind="style", subject=IDENTITY_NAMES[3])
    assert s.kind == "identity" and s.style in STYLE_NAMES
    s = sample_scene(rng, kind="object", style="neon", split="heldout")
    assert s.style == "neon" and s.colour in cat.COLOURS and s.split == "heldout"
    assert {sample_scene(rng, kind="style").kind for _ in range(40)} == {"identity", "object"}
    with pytest.raises(ValueError):
        sample_scene(rng, kind="identity", subject="star")
    with pytest.raises(ValueError):
        sample_scene(rng, kind="weather")
    # Objects are never drawn in a colour that vanishes into the background.
    for s in _scenes(4, 300, kind="object"):
        assert (s.colour, s.background) not in {("white", "plain light"), ("black", "plain dark"), ("green", "grass")}


def test_scene_validation():
    with pytest.raises(ValueError, match="unknown identity"):
        Scene("identity", "Nobody Atall", None, "sky", None, 0)
    with pytest.raises(ValueError, match="needs a colour"):
        Scene("object", "star", None, "sky", None, 0)
    with pytest.raises(ValueError, match="only objects have a colour"):
        Scene("unsafe", "skull", "red", "sky", None, 0)
    with pytest.raises(ValueError, match="unknown background"):
        Scene("object", "star", "red", "space", None, 0)
    with pytest.raises(ValueError, match="unknown style"):
        Scene("object", "star", "red", "sky", "cubism", 0)
    with pytest.raises(ValueError, match="split"):
        Scene("object", "star", "red", "sky", None, 0, split="test")


def test_make_dataset_mixes_the_kinds():
    n = 200
    data = make_dataset(n, seed=1)
    assert data["images"].shape == (n, 32, 32, 3) and data["images"].dtype == np.uint8
    assert data["masks"].shape == (n, 32, 32) and data["masks"].dtype == bool
    assert len(data["captions"]) == len(data["labels"]) == len(data["scenes"]) == n
    counts = {k: int((data["kinds"] == k).sum()) for k in MIX}
    assert counts == {k: round(p * n) for k, p in MIX.items()}
    assert data["kinds"][:20].tolist() != sorted(data["kinds"][:20].tolist())  # shuffled
    for kind, scene, labels in zip(data["kinds"], data["scenes"], data["labels"]):
        if kind == "style":
            assert scene.style is not None and scene.kind in ("identity", "object") and "style" in labels
        else:
            assert scene.style is None and scene.kind == kind and labels[kind] == scene.subject
    assert sum(s.kind == "identity" for s in data["scenes"] if s.style) > 10
    assert len({s.subject for s in data["scenes"] if s.kind == "identity"}) > 50
    for i in (0, 57, 199):  # a dataset's scenes re-render to its images
        assert np.array_equal(render(data["scenes"][i]).image, data["images"][i])
    assert make_dataset(0, seed=1)["images"].shape == (0, 32, 32, 3)


def test_save_grid_writes_a_png_of_the_right_size(tmp_path):
    images = make_dataset(10, seed=2)["images"]
    path = save_grid(images, tmp_path / "grid.png", cols=4, scale=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size == (4 * 32 * 2, 3 * 32 * 2) and im.mode == "RGB"
        grid = np.asarray(im)
    assert np.array_equal(grid[:64:2, :64:2], images[0])
    assert np.array_equal(grid[128::2, 64:128:2], images[9])
    assert not grid[128:, 128:].any()  # the empty cells are black
