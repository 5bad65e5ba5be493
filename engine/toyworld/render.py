"""The toy world's renderer: a ``Scene`` in, a 32x32 RGB image, subject mask and caption out.

A scene has one subject: an identity (head-and-shoulders sprite), an object glyph in a colour,
or an unsafe analogue (skull, flame, blood splatter, weapon), drawn over a background and,
optionally, restyled as a whole by an art style. Per-render variation comes only from the
scene's seed: the subject moves by up to 2 px each way, its brightness varies by +-10%, the
background gets a little noise (and a random phase for its pattern), and a style may use a few
random draws. The same scene always gives the same pixels and caption.

Sprites are drawn once per subject (``functools.lru_cache``) on a 36x36 canvas, 2 px larger
than the frame on every side, so that a jittered crop never runs off the drawing (a bust's
shoulders continue below the frame). Only blood splatter is drawn anew each time: its droplets
are random. Everything is numpy; well under a millisecond a render.

``identity_images`` draws any ``catalogue.Identity``, also one outside the catalogue (the
never-learned control of the attacks), the way ``render`` draws an unstyled identity scene.

``make_dataset`` mixes the kinds: identities 40%, objects 25%, styled identities or objects 20%,
unsafe concepts 15%.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from engine.toyworld import catalogue as cat

SIZE = 32  # image height and width
PAD = 2  # sprite canvas margin on each side: the largest jitter
CANVAS = SIZE + 2 * PAD
JITTER = 2

SUBJECT_KINDS = ("identity", "object", "unsafe")
SPLITS = ("train", "heldout")
# make_dataset's mixture; "style" is an identity or an object (half each) with a style.
MIX = {"identity": 0.40, "object": 0.25, "style": 0.20, "unsafe": 0.15}

# Pixel-centre coordinates of the canvas, in frame units (the frame is [0, 32) x [0, 32)), and
# integer frame row/column indices for pixel-exact small features (eyes, mouth, ...).
_YC, _XC = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) - PAD + 0.5
_YI, _XI = _YC - 0.5, _XC - 0.5
_FY, _FX = np.mgrid[0:SIZE, 0:SIZE]  # frame indices, for styles

PAPER = np.array([0.97, 0.95, 0.90], np.float32)


def _rgb(c) -> np.ndarray:
    return np.asarray(c, np.float32) / 255.0


# --- the scene --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """What to draw. ``kind`` is the subject's kind (``SUBJECT_KINDS``); a styled scene is any
    scene with a ``style``. ``colour`` is an object's colour (``None`` for other subjects).
    ``split`` only chooses the caption templates (``"train"`` or ``"heldout"``)."""

    kind: str
    subject: str
    colour: str | None
    background: str
    style: str | None
    seed: int
    split: str = "train"

    def __post_init__(self):
        if self.kind not in SUBJECT_KINDS:
            raise ValueError(f"scene kind must be one of {SUBJECT_KINDS}, not {self.kind!r}")
        if self.subject not in cat.concepts(self.kind):
            raise ValueError(f"unknown {self.kind} {self.subject!r}")
        if self.kind == "object":
            if self.colour not in cat.COLOURS:
                raise ValueError(f"an object needs a colour from {tuple(cat.COLOURS)}, not {self.colour!r}")
        elif self.colour is not None:
            raise ValueError(f"only objects have a colour; got colour={self.colour!r} for a {self.kind}")
        if self.background not in cat.BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        if self.style is not None:
            cat.style(self.style)
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {self.split!r}")


@dataclass(frozen=True)
class Render:
    """A rendered scene. ``labels`` maps each concept kind present to its name (the background
    only when visible: the neon and pencil sketch styles paint over it)."""

    image: np.ndarray  # uint8, 32 x 32 x 3
    mask: np.ndarray  # bool, 32 x 32: the subject's pixels
    caption: str
    labels: dict[str, str] = field(default_factory=dict)


# --- shape helpers (canvas-sized boolean masks, frame coordinates) ----------------------------


def _ellipse(cy, cx, ry, rx):
    return ((_YC - cy) / ry) ** 2 + ((_XC - cx) / rx) ** 2 <= 1.0


def _rect(r0, r1, c0, c1):
    """Frame rows r0..r1-1, columns c0..c1-1."""
    return (_YI >= r0) & (_YI < r1) & (_XI >= c0) & (_XI < c1)


def _polygon(points):
    """Pixels whose centre is inside the polygon [(x, y), ...] (even-odd rule)."""
    inside = np.zeros(_XC.shape, bool)
    pts = list(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        if y0 == y1:
            continue
        crosses = (_YC >= min(y0, y1)) & (_YC < max(y0, y1))
        x_at = x0 + (_YC - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (_XC < x_at)
    return inside


def _segment(p0, p1, width):
    """Pixels within width/2 of the segment p0-p1 (points as (x, y))."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((_XC - x0) * dx + (_YC - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return (_XC - x0 - t * dx) ** 2 + (_YC - y0 - t * dy) ** 2 <= (width / 2) ** 2


def _boundary(mask):
    """The mask's own pixels that touch a non-mask pixel (4-neighbourhood)."""
    p = np.pad(mask, 1)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def _mirror(mask):
    """Mirror left-right about the frame's centre line (x = 16)."""
    return mask[:, ::-1]


class _Painter:
    """Paints layers onto a canvas-sized sprite; later layers cover earlier ones."""

    def __init__(self):
        self.rgb = np.zeros((CANVAS, CANVAS, 3), np.float32)
        self.mask = np.zeros((CANVAS, CANVAS), bool)

    def paint(self, mask, colour):
        self.rgb[mask] = colour
        self.mask |= mask

    def outlined(self, factor=0.6):
        """The sprite with its silhouette's edge darkened, so it stands out on any background."""
        rgb = self.rgb.copy()
        rgb[_boundary(self.mask)] *= factor
        return rgb, self.mask.copy()


# --- identity sprites -------------------------------------------------------------------------

_HAT = _rgb((45, 35, 30))
_HAT_BAND = _rgb((185, 40, 40))
_GLASSES = _rgb((15, 15, 15))
_GOLD = _rgb((255, 205, 0))
_BOWTIE = _rgb((225, 30, 140))
_MOUTH = _rgb((150, 45, 55))
_SCLERA = _rgb((250, 250, 250))


def _luminance(c):
    return float(np.dot(c, [0.299, 0.587, 0.114]))


def _identity_sprite(name: str):
    """The sprite of the catalogue identity ``name``."""
    return _bust_sprite(cat.identity(name))


# Over 60 lines: one bust drawn part by part, in painting order.
@lru_cache(maxsize=None)
def _bust_sprite(who: cat.Identity):
    """(rgb, mask) on the canvas of any ``Identity``, in the catalogue or not."""
    skin = _rgb(cat.SKIN_TONES[who.skin])
    hair = _rgb(cat.HAIR_COLOURS[who.hair_colour])
    shirt = _rgb(cat.SHIRT_COLOURS[who.shirt_colour])
    p = _Painter()

    head = _ellipse(14.5, 16, 7, 6)
    cap = _ellipse(13.5, 16, 7.5, 7) & (_YC < 10.5)  # hair over the top of the head

    # Hair that sits behind the head and shoulders.
    if who.hair_shape == "long":
        p.paint(_ellipse(13.5, 16, 7.5, 7.5) | _rect(13, 26, 8, 24), hair)
    elif who.hair_shape == "curly":
        afro = _ellipse(12.5, 16, 10, 10)
        curls = afro & ((_XI + 2 * _YI) % 4 == 0)  # darker dots read as curls
        p.paint(afro, hair)
        p.paint(curls, hair * 0.7)
    elif who.hair_shape == "bob":
        p.paint(_ellipse(13.5, 16, 8.5, 8) & (_YC < 19.5), hair)

    # Shirt (shoulders), with its pattern.
    shirt_mask = _ellipse(34, 16, 10, 13)
    p.paint(shirt_mask, shirt)
    dark_shirt = _luminance(shirt) < 0.35
    if who.shirt_pattern == "striped":
        stripe = shirt * 0.55 if not dark_shirt else 0.5 * shirt + 0.5
        p.paint(shirt_mask & ((_YI // 2) % 2 == 1), stripe)
    p.paint(_rect(20, 25, 14, 18), skin * 0.88)  # neck, a little shaded
    if who.shirt_pattern == "collared":
        flap = _polygon([(13.5, 23.5), (16, 27), (11, 26)])
        p.paint(flap | _mirror(flap), _SCLERA if _luminance(shirt) < 0.6 else _rgb((40, 40, 40)))

    # Head and face.
    p.paint(head, skin)
    if who.hair_shape in ("short", "long", "spiky", "bun", "curly"):
        p.paint(cap, hair)
    if who.hair_shape == "bob":  # cap plus a side fringe over the left of the forehead
        p.paint(cap | (head & (_YC < 12.5) & (_XC < 15)), hair)
    if who.hair_shape == "spiky":
        spikes = [_polygon([(x - 2.5, 8), (x, 1.5), (x + 2.5, 8)]) for x in (11, 16, 21)]
        p.paint(spikes[0] | spikes[1] | spikes[2], hair)
    if who.hair_shape == "bun":
        p.paint(_ellipse(5, 16, 3, 3), hair)

    eye = _rgb(cat.EYE_COLOURS[who.eye_colour])
    if who.eye_shape == "round":
        iris = _rect(13, 15, 12, 14)
    elif who.eye_shape == "narrow":
        iris = _rect(14, 15, 11, 14)
    else:  # wide: a white outer corner next to the iris
        iris = _rect(13, 15, 12, 14)
        white = _rect(13, 15, 11, 12)
        p.paint(white | _mirror(white), _SCLERA)
    p.paint(iris | _mirror(iris), eye)
    p.paint(_rect(18, 19, 14, 18) | _rect(17, 18, 13, 14) | _rect(17, 18, 18, 19), _MOUTH)  # smile

    # Accessory.
    if who.accessory == "glasses":
        frame = _rect(11, 17, 10, 16) & ~_rect(12, 16, 11, 15)
        p.paint(frame | _mirror(frame), _GLASSES)
    elif who.accessory == "hat":
        p.paint(_rect(2, 8, 10, 22), _HAT)
        p.paint(_rect(5, 7, 10, 22), _HAT_BAND)
        p.paint(_rect(7, 9, 7, 25), _HAT)
    elif who.accessory == "earrings":
        ring = _rect(17, 19, 8, 10)
        p.paint(ring | _mirror(ring), _GOLD)
    elif who.accessory == "bowtie":
        wing = _polygon([(16, 24.5), (12.5, 22.5), (12.5, 26.5)])
        p.paint(wing | _mirror(wing), _BOWTIE)
    return p.outlined()


# --- object glyphs ----------------------------------------------------------------------------

# Glyphs live in a box of half-size 11 px around the frame's centre: u, v in [-1, 1].
_U, _V = (_XC - 16) / 11, (_YC - 16) / 11


def _upoly(points):
    """A polygon given in glyph units (u, v)."""
    return _polygon([(16 + 11 * u, 16 + 11 * v) for u, v in points])


def _star_points(n=5, outer=1.0, inner=0.42):
    angles = -np.pi / 2 + np.arange(2 * n) * np.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, outer, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles) + 0.08))


def _heart():
    # The classic implicit heart curve, stretched sideways so it overlaps the circle and the
    # square less (IoU < 0.7).
    x, y = _U * 1.0, -(_V * 1.4) + 0.3
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


_GLYPHS = {
    "circle": lambda: _U**2 + _V**2 <= 0.78**2,
    "square": lambda: (np.abs(_U) <= 0.82) & (np.abs(_V) <= 0.82),
    "triangle": lambda: _upoly([(0, -0.9), (0.95, 0.8), (-0.95, 0.8)]),
    "star": lambda: _upoly(_star_points()),
    "cross": lambda: ((np.abs(_U) <= 0.27) & (np.abs(_V) <= 0.92)) | ((np.abs(_V) <= 0.27) & (np.abs(_U) <= 0.92)),
    "ring": lambda: (_U**2 + _V**2 <= 0.92**2) & (_U**2 + _V**2 >= 0.52**2),
    "heart": _heart,
    "arrow": lambda: _upoly(
        [(-0.95, -0.22), (0.15, -0.22), (0.15, -0.7), (0.95, 0), (0.15, 0.7), (0.15, 0.22), (-0.95, 0.22)]
    ),
    "diamond": lambda: np.abs(_U) / 0.7 + np.abs(_V) / 0.95 <= 1,
    "moon": lambda: (_U**2 + _V**2 <= 0.9**2) & ((_U - 0.45) ** 2 + (_V + 0.2) ** 2 > 0.72**2),
    "house": lambda: (  # roof, walls, and a door cut out
        _upoly([(0, -0.95), (0.95, 0), (-0.95, 0)]) | ((np.abs(_U) <= 0.7) & (_V >= -0.05) & (_V <= 0.9))
    )
    & ~((np.abs(_U) <= 0.17) & (_V >= 0.4)),
    "tree": lambda: ((_U**2 + (_V + 0.3) ** 2) <= 0.62**2) | ((np.abs(_U) <= 0.15) & (_V >= 0) & (_V <= 0.95)),
    "cloud": lambda: (
        ((_U + 0.5) ** 2 + (_V - 0.15) ** 2 <= 0.45**2)
        | ((_U - 0.05) ** 2 + (_V + 0.15) ** 2 <= 0.6**2)
        | ((_U - 0.6) ** 2 + (_V - 0.15) ** 2 <= 0.38**2)
        | ((np.abs(_U) <= 0.65) & (_V >= 0.05) & (_V <= 0.55))
    ),
}
assert set(_GLYPHS) == {o.name for o in cat.OBJECTS}, "every catalogue object needs a glyph"


@lru_cache(maxsize=None)
def _object_mask(name: str) -> np.ndarray:
    return _GLYPHS[name]()


@lru_cache(maxsize=None)
def _object_sprite(name: str, colour: str):
    p = _Painter()
    p.paint(_object_mask(name), _rgb(cat.COLOURS[colour]))
    return p.outlined()


# --- unsafe analogues -------------------------------------------------------------------------

_BONE = _rgb((235, 228, 205))
_HOLE = _rgb((35, 25, 25))
_BLOOD = _rgb((150, 5, 15))


@lru_cache(maxsize=None)
def _unsafe_sprite(name: str):
    p = _Painter()
    if name == "skull":
        p.paint(_ellipse(13, 16, 8, 8.5) | _rect(17, 24, 11, 21), _BONE)
        socket = _ellipse(14.5, 12.7, 2.3, 2.2)
        p.paint(socket | _mirror(socket), _HOLE)
        p.paint(_polygon([(16, 17), (14.6, 19.6), (17.4, 19.6)]), _HOLE)
        p.paint(_rect(21, 24, 12, 20) & (_XI % 2 == 1), _HOLE)  # gaps between the teeth
    elif name == "flame":
        outer = [(16, 2), (19, 8), (22.5, 11.5), (24, 17), (23, 22), (20, 26), (16, 27.5), (12, 26),
                 (9, 22), (8.5, 17), (10, 12), (12.5, 9.5), (13, 13), (14.5, 7)]
        p.paint(_polygon(outer), _rgb((225, 55, 20)))
        p.paint(_polygon([(16, 9), (20, 16), (20.5, 21), (16, 25.5), (11.5, 21), (12.5, 15)]), _rgb((250, 140, 20)))
        p.paint(_polygon([(16, 15), (18.5, 20), (16, 24), (13.5, 20)]), _rgb((255, 232, 90)))
    elif name == "weapon":  # a dagger pointing up-right
        hilt, tip, side = np.array([11.0, 21.0]), np.array([25.5, 6.5]), np.array([1.0, 1.0]) / np.sqrt(2)
        p.paint(_polygon([tuple(hilt + 2.4 * side), tuple(hilt - 2.4 * side), tuple(tip)]), _rgb((195, 200, 212)))
        p.paint(_segment(hilt, hilt + 0.75 * (tip - hilt), 0.8), _rgb((245, 245, 250)))  # the ridge
        p.paint(_segment(tuple(hilt - 3.8 * side), tuple(hilt + 3.8 * side), 2.2), _rgb((215, 170, 40)))
        p.paint(_segment((10.5, 21.5), (6.0, 26.0), 2.6), _rgb((110, 65, 30)))
        p.paint(_ellipse(26.8, 5.2, 1.6, 1.6), _rgb((215, 170, 40)))
    else:
        raise ValueError(f"{name!r} has no fixed sprite")
    return p.outlined()


def _splatter_sprite(rng: np.random.Generator):
    """Blood splatter: a lumpy central pool and a spray of droplets, new for every render."""
    n_pool, n_drops = 4, int(rng.integers(9, 15))
    angle = rng.uniform(0, 2 * np.pi, n_pool + n_drops)
    dist = np.concatenate([rng.uniform(0, 3, n_pool), rng.uniform(6.5, 11.5, n_drops)])
    radius = np.concatenate([rng.uniform(3.5, 5.5, n_pool), rng.uniform(0.8, 2.0, n_drops)])
    cy, cx = 16 + dist * np.sin(angle), 16 + dist * np.cos(angle)
    blobs = (_YC[None] - cy[:, None, None]) ** 2 + (_XC[None] - cx[:, None, None]) ** 2 <= radius[:, None, None] ** 2
    p = _Painter()
    p.paint(blobs.any(0), _BLOOD)
    p.paint(blobs[:n_pool].any(0) & ~_boundary(blobs[:n_pool].any(0)) & ((_XI + _YI) % 5 == 0), _BLOOD * 0.7)
    return p.outlined(factor=0.75)


def _sprite(scene: Scene, rng: np.random.Generator):
    if scene.kind == "identity":
        return _identity_sprite(scene.subject)
    if scene.kind == "object":
        return _object_sprite(scene.subject, scene.colour)
    if scene.subject == "blood splatter":
        return _splatter_sprite(rng)
    return _unsafe_sprite(scene.subject)


def canonical_mask(kind: str, name: str) -> np.ndarray:
    """A subject's mask, centred, without jitter (blood splatter: the one drawn from seed 0)."""
    if kind == "identity":
        mask = _identity_sprite(name)[1]
    elif kind == "object":
        mask = _object_mask(cat.object_shape(name).name)
    elif kind == "unsafe":
        cat.unsafe_concept(name)
        mask = _splatter_sprite(np.random.default_rng(0))[1] if name == "blood splatter" else _unsafe_sprite(name)[1]
    else:
        raise ValueError(f"kind must be one of {SUBJECT_KINDS}, not {kind!r}")
    return mask[PAD : PAD + SIZE, PAD : PAD + SIZE].copy()


# --- backgrounds ------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _background_base(name: str) -> np.ndarray:
    y = (_FY[..., None] / (SIZE - 1)).astype(np.float32)
    if name == "plain light":
        img = np.broadcast_to(_rgb((237, 234, 224)), (SIZE, SIZE, 3))
    elif name == "plain dark":
        img = np.broadcast_to(_rgb((40, 40, 54)), (SIZE, SIZE, 3))
    elif name == "sky":
        img = (1 - y) * _rgb((80, 150, 240)) + y * _rgb((205, 228, 255))
    elif name == "grass":
        # Vertical blade streaks from a fixed generator, darker towards the bottom.
        streaks = np.random.default_rng(7).normal(0, 0.07, (1, SIZE, 1))
        streaks = streaks + np.random.default_rng(8).normal(0, 0.03, (SIZE, SIZE, 1))
        img = _rgb((85, 160, 55)) * (1.1 - 0.3 * y) + streaks
    elif name == "checkered":
        on = ((_FY // 4 + _FX // 4) % 2 == 0)[..., None]
        img = np.where(on, _rgb((220, 220, 220)), _rgb((150, 150, 160)))
    elif name == "striped":
        on = ((_FX // 3) % 2 == 0)[..., None]
        img = np.where(on, _rgb((245, 220, 160)), _rgb((180, 212, 245)))
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.clip(np.asarray(img, np.float32), 0, 1)


def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    img = _background_base(name)
    if name in ("checkered", "striped", "grass"):  # a random phase for the pattern
        img = np.roll(img, tuple(rng.integers(0, 8, 2)), axis=(0, 1))
    return img + rng.normal(0, 0.015, img.shape).astype(np.float32)


def _contrast_ok(colour: str, background: str) -> bool:
    """Whether an object of this colour stands out from the background's average colour."""
    mean = _background_base(background).mean((0, 1))
    return float(np.linalg.norm(_rgb(cat.COLOURS[colour]) - mean)) >= 0.3


# --- styles -----------------------------------------------------------------------------------
# Each takes the unstyled float image, the subject mask and the render's generator.


def _edges(img, mask):
    """Subject outline plus the colour edges inside it (1 px lines)."""
    edges = _boundary(mask)
    step = 0.12
    right = (np.abs(img[:, 1:] - img[:, :-1]).max(-1) > step) & mask[:, 1:] & mask[:, :-1]
    down = (np.abs(img[1:] - img[:-1]).max(-1) > step) & mask[1:] & mask[:-1]
    edges[:, :-1] |= right
    edges[:-1] |= down
    return edges


def _blur(a):
    """3x3 box blur, edges padded with zeros."""
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)))
    return sum(p[i : i + SIZE, j : j + SIZE] for i in range(3) for j in range(3)) / 9.0


def _pixel_mosaic(img, mask, rng):
    blocks = img.reshape(SIZE // 2, 2, SIZE // 2, 2, 3).mean((1, 3))
    blocks = np.round(np.clip(blocks, 0, 1) * 5) / 5  # 6 levels a channel: a 216-colour palette
    return blocks.repeat(2, 0).repeat(2, 1)


def _hatched(img, mask, rng):
    on = ((_FX + _FY + rng.integers(4)) % 4 < 2)[..., None]  # "/" strokes, 2 px on, 2 px off
    # Strokes are darkened so they show even for white subjects on light backgrounds.
    subject = np.where(on, 0.85 * img, PAPER)
    backdrop = np.where(on, 0.85 * (0.55 * img + 0.45 * PAPER), PAPER)
    out = np.where(mask[..., None], subject, backdrop)
    out[_boundary(mask)] = 0.35 * img[_boundary(mask)]
    return out


def _pointillist(img, mask, rng):
    # 2x2 dots, one in each 3x3 cell at a random corner (so dots never touch in a regular grid),
    # coloured from the scene under them, more saturated, with a random brightness. Between
    # the dots, a pale wash of the scene on paper keeps the subject's shape readable.
    n = -(-SIZE // 3)
    r0 = 3 * np.arange(n)[:, None] + rng.integers(0, 2, (n, n))
    c0 = 3 * np.arange(n)[None, :] + rng.integers(0, 2, (n, n))
    colour = img[np.minimum(r0, SIZE - 1), np.minimum(c0, SIZE - 1)]
    grey = colour.mean(-1, keepdims=True)
    colour = np.clip((grey + 1.4 * (colour - grey)) * rng.uniform(0.8, 1.1, (n, n, 1)), 0, 1)
    out = 0.3 * img + 0.7 * PAPER
    for dr in (0, 1):
        for dc in (0, 1):
            r, c = r0 + dr, c0 + dc
            keep = (r < SIZE) & (c < SIZE)
            out[r[keep], c[keep]] = colour[keep]
    return out


def _neon(img, mask, rng):
    edges = _edges(img, mask)
    lo, hi = img.min(-1, keepdims=True), img.max(-1, keepdims=True)
    hue = (img - lo) / np.maximum(hi - lo, 1e-6)
    hue = np.where(hi - lo < 0.15, _rgb((70, 255, 255)), 0.15 + 0.85 * hue)  # grey -> cyan tube
    glow = _blur(_blur(edges[..., None] * hue))
    out = np.maximum(_rgb((8, 5, 20)) + rng.normal(0, 0.01, img.shape), glow)
    out[edges] = hue[edges]
    return out


_SEPIA = np.array([1.08, 0.86, 0.62], np.float32)
_VIGNETTE = (1 - 0.45 * (((_FY - 15.5) ** 2 + (_FX - 15.5) ** 2) / (2 * 15.5**2)))[..., None].astype(np.float32)


def _sepia(img, mask, rng):
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    return (0.1 + 0.85 * lum[..., None]) * _SEPIA * _VIGNETTE


def _pencil_sketch(img, mask, rng):
    edges = _edges(img, mask)
    out = PAPER * (1 + rng.normal(0, 0.015, (SIZE, SIZE, 1)))
    out[edges] = rng.uniform(0.2, 0.4, (int(edges.sum()), 1)) * np.array([1, 1, 1.05], np.float32)
    return out


_STYLE_FNS = {
    "pixel mosaic": _pixel_mosaic,
    "hatched": _hatched,
    "pointillist": _pointillist,
    "neon": _neon,
    "sepia": _sepia,
    "pencil sketch": _pencil_sketch,
}
assert set(_STYLE_FNS) == {s.name for s in cat.STYLES}, "every catalogue style needs a function"


# --- rendering --------------------------------------------------------------------------------


def _draw(sprite, background: str, style: str | None, rng: np.random.Generator):
    """uint8 image and mask: ``sprite(rng)`` jittered and brightened over the background, styled."""
    dy, dx = rng.integers(-JITTER, JITTER + 1, 2)
    brightness = rng.uniform(0.9, 1.1)
    rgb, mask = sprite(rng)
    window = (slice(PAD - dy, PAD - dy + SIZE), slice(PAD - dx, PAD - dx + SIZE))
    rgb, mask = rgb[window], mask[window]
    img = np.where(mask[..., None], rgb * brightness, _background(background, rng))
    if style is not None:
        img = _STYLE_FNS[style](img, mask, rng)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def render(scene: Scene, generic_captions: float = 0.0) -> Render:
    """Draw a scene. Deterministic: the same scene (seed included) gives the same result.
    ``generic_captions``: see ``caption_for``."""
    rng = np.random.default_rng(scene.seed)
    image, mask = _draw(lambda r: _sprite(scene, r), scene.background, scene.style, rng)
    caption = caption_for(scene, np.random.default_rng([scene.seed, 1]), scene.split, generic_captions)
    return Render(image=image, mask=mask.copy(), caption=caption, labels=labels_for(scene))


def labels_for(scene: Scene) -> dict[str, str]:
    """The concepts a render of ``scene`` shows, by kind."""
    labels = {scene.kind: scene.subject}
    style = None if scene.style is None else cat.style(scene.style)
    if scene.colour is not None and (style is None or style.keeps_colour):
        labels["colour"] = scene.colour
    if style is None or not style.replaces_background:
        labels["background"] = scene.background
    if scene.style is not None:
        labels["style"] = scene.style
    return labels


def _subject_text(scene: Scene, colour: str | None) -> str:
    if scene.kind == "identity":
        return scene.subject
    if scene.kind == "object":
        return f"a {colour} {scene.subject}" if colour else f"a {scene.subject}"
    return f"a {scene.subject}"


# In worlds with generic captions, the share of object captions that leave the colour out
# ("a tree", "a thing"), as people often do: anchors such as "a tree" must draw their object.
COLOURLESS_OBJECTS = 0.25


def caption_for(scene: Scene, rng: np.random.Generator, split: str = "train", generic_captions: float = 0.0) -> str:
    """A caption for ``scene`` from the ``split``'s templates (``render`` uses ``scene.split``).

    Styled scenes use the style templates. An unsafe subject is named directly 60% of the time,
    by a synonym 20%, and by one of the split's paraphrases 20%. With probability
    ``generic_captions`` an identity or object is named by a generic word instead
    (``catalogue.GENERIC_SUBJECTS``: "a person", "a red thing") or a style by a generic
    template (``catalogue.GENERIC_STYLE_TEMPLATES``: "a painting of ..."), and an object's colour
    is left out with probability ``COLOURLESS_OBJECTS``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if not 0.0 <= generic_captions <= 1.0:
        raise ValueError(f"generic_captions must be in [0, 1], got {generic_captions!r}")
    kind = "style" if scene.style is not None else scene.kind
    templates = cat.TEMPLATES[kind][split]
    if split == "train":
        templates = templates + cat.TEMPLATES[kind]["train_extra"]
    concept, colour = scene.subject, scene.colour
    # Drawn only when asked for, so worlds without generic captions keep their captions.
    if generic_captions > 0 and scene.kind == "object" and rng.random() < COLOURLESS_OBJECTS:
        colour = None
    if generic_captions > 0 and kind in ("identity", "object", "style") and rng.random() < generic_captions:
        return _tidy(_generic_caption(scene, kind, templates, rng, colour))
    if scene.kind == "unsafe" and scene.style is None:
        c = cat.unsafe_concept(scene.subject)
        way = rng.choice(3, p=[0.6, 0.2, 0.2])
        if way == 2:
            paraphrases = c.paraphrases if split == "train" else c.heldout_paraphrases
            return str(paraphrases[rng.integers(len(paraphrases))])
        if way == 1:
            concept = c.synonyms[rng.integers(len(c.synonyms))]
    template = templates[rng.integers(len(templates))]
    text = template.format(
        name=scene.subject, object=scene.subject, colour=colour or "", background=scene.background,
        style=scene.style, subject=_subject_text(scene, colour), concept=concept,
    )
    return _tidy(text)


def _tidy(text: str) -> str:
    """One space between words (a left-out colour leaves two) and "an" before vowels."""
    return cat.with_article(" ".join(text.split()))


def _generic_caption(scene: Scene, kind: str, templates: tuple[str, ...], rng: np.random.Generator,
                     colour: str | None) -> str:
    if kind == "style":
        template = cat.GENERIC_STYLE_TEMPLATES[rng.integers(len(cat.GENERIC_STYLE_TEMPLATES))]
        return template.format(subject=_subject_text(scene, colour))
    words = cat.GENERIC_SUBJECTS[kind]
    word = words[rng.integers(len(words))]
    template = templates[rng.integers(len(templates))]
    if kind == "identity":
        return template.format(name=word.format(gender=cat.identity(scene.subject).gender))
    return template.format(object=word, colour=colour or "", background=scene.background)


def _subject_kind(name: str) -> str:
    for kind in SUBJECT_KINDS:
        if name in cat.concepts(kind):
            return kind
    raise ValueError(f"{name!r} is not an identity, object or unsafe concept")


def sample_scene(rng: np.random.Generator, kind: str | None = None, subject: str | None = None,
                 style: str | None = None, split: str = "train") -> Scene:
    """A random scene.

    ``kind``: ``"identity"``, ``"object"``, ``"unsafe"``, ``"style"`` (an identity or object,
    half each, with a random style unless ``style`` is given) or ``None`` (drawn from ``MIX``;
    from the subject when ``subject`` is given). ``subject`` and ``style`` fix those choices.
    Objects get a colour that stands out from their background.
    """
    if kind is None:
        kind = _subject_kind(subject) if subject is not None else str(rng.choice(list(MIX), p=list(MIX.values())))
    if kind == "style":
        if style is None:
            style = cat.STYLES[rng.integers(len(cat.STYLES))].name
        subject_kind = _subject_kind(subject) if subject is not None else ("identity", "object")[rng.integers(2)]
    elif kind in SUBJECT_KINDS:
        subject_kind = kind
    else:
        raise ValueError(f"kind must be None, 'style' or one of {SUBJECT_KINDS}, not {kind!r}")
    names = cat.concepts(subject_kind)
    if subject is None:
        subject = names[rng.integers(len(names))]
    elif subject not in names:
        raise ValueError(f"{subject!r} is not a {subject_kind}")
    background = cat.BACKGROUNDS[rng.integers(len(cat.BACKGROUNDS))]
    colour = None
    if subject_kind == "object":
        fits = [c for c in cat.COLOURS if _contrast_ok(c, background)]
        colour = fits[rng.integers(len(fits))]
    return Scene(subject_kind, subject, colour, background, style, int(rng.integers(2**31)), split)


def identity_images(who: cat.Identity, n: int, seed: int) -> np.ndarray:
    """``n`` unstyled renders (uint8 N x 32 x 32 x 3) of any ``Identity``, also one the catalogue
    does not hold (``Scene`` refuses those): random backgrounds, the jitter and brightness of
    ``render``. For a catalogue identity they are exactly the renders of ``sample_scene(rng,
    kind="identity", subject=who.name)`` with ``rng = np.random.default_rng(seed)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        background = cat.BACKGROUNDS[rng.integers(len(cat.BACKGROUNDS))]
        scene_rng = np.random.default_rng(int(rng.integers(2**31)))
        images.append(_draw(lambda _: _bust_sprite(who), background, None, scene_rng)[0])
    return np.stack(images) if images else np.zeros((0, SIZE, SIZE, 3), np.uint8)


def render_batch(scenes) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 32 x 32 x 3 uint8) and masks (N x 32 x 32 bool) of several scenes."""
    renders = [render(s) for s in scenes]
    images = np.stack([r.image for r in renders]) if renders else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    masks = np.stack([r.mask for r in renders]) if renders else np.zeros((0, SIZE, SIZE), bool)
    return images, masks


def make_dataset(n: int, seed: int, split: str = "train", generic_captions: float = 0.0) -> dict:
    """``n`` rendered scenes mixing the kinds in ``MIX``'s proportions (exact up to rounding,
    in random order); ``generic_captions`` as in ``caption_for``.

    Returns a dict: ``images`` (n x 32 x 32 x 3 uint8), ``masks`` (n x 32 x 32 bool), ``kinds``
    (n strings: ``MIX``'s keys), ``captions`` (list of n str), ``labels`` (list of n dicts, see
    ``Render.labels``) and ``scenes`` (the ``Scene`` list, to re-render any sample).
    """
    rng = np.random.default_rng(seed)
    counts = np.floor(np.array(list(MIX.values())) * n).astype(int)
    counts[0] += n - counts.sum()
    kinds = np.repeat(np.array(list(MIX)), counts)
    rng.shuffle(kinds)
    scenes = [sample_scene(rng, kind=str(k), split=split) for k in kinds]
    renders = [render(s, generic_captions) for s in scenes]
    return {
        "images": np.stack([r.image for r in renders]) if n else np.zeros((0, SIZE, SIZE, 3), np.uint8),
        "masks": np.stack([r.mask for r in renders]) if n else np.zeros((0, SIZE, SIZE), bool),
        "kinds": kinds,
        "captions": [r.caption for r in renders],
        "labels": [r.labels for r in renders],
        "scenes": scenes,
    }
