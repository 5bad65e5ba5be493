"""The toy world's evaluator: a small CNN, trained only on renders, that names what an image shows.

It judges a diffusion model's generations (did the erased identity, style or unsafe concept
disappear? did the rest survive?) and gives the features for KID. It never sees a generated
image in training, so a generation is judged against what the world really draws.

Heads (``heads()``), one per concept kind in ``catalogue.KINDS`` order, each over that kind's
concept names plus a final ``"none"`` class for images that do not show the kind (the identity
head on an object render; the background head when the neon or pencil sketch style paints the
background over, as ``render.labels_for`` says).

Architecture: a shared trunk of seven 3x3 conv + BatchNorm + ReLU layers at 32, 16 (x2), 8 (x2)
and 4 (x2) pixels (the first layer of each smaller size has stride 2), ``width // 2``, ``width``,
``2 * width`` and ``4 * width`` channels, global average pooling, then a linear layer to
``feature_dim`` features (ReLU; ``features`` returns these) and one linear head per kind. With
the default width 48 it has 0.75M parameters (3 MB in fp32).

Training (``train_evaluator``) sees every render once an epoch and each styled render several
times: styles are a fifth of the renders but the hard part. The hardest, identities drawn as
pencil sketches (outlines only) or in sepia (no hue), also get extra renders of their own.
Auxiliary heads, used in training only, predict the identity's attributes (hair shape, shirt
colour, ...), so that what the trunk learns about one identity carries over to the others that
share an attribute (in a pencil sketch, the eye shape is often what tells two people apart).

Augmentation in training: Gaussian noise on 75% of images (per-image sigma up to 0.05, 0.025
on average), a blur of random width (sigma about 0.7 to 1.4 px) on 40% of images, and a random shift of
up to 1 px each way (edges replicated). Generations pass through a small VAE and a diffusion
model, which leave slight noise, softened edges and off-by-one placement; training on these
keeps the evaluator's verdicts about content rather than about render-perfect pixels. There is no colour or hue
jitter: colour is a class (object colours, hair, skin and shirt colours tell identities apart).

A pencil sketch keeps no colour and sepia maps red, blue and purple to nearly the same brown, so
``render.labels_for`` gives no colour label for those styles (the colour head says ``"none"``).
``heldout_accuracy_by_style`` shows the accuracy per style.

Files (``save`` / ``load``), in one folder:

* ``config.json``: format, width, feature_dim and the heads' class names;
* ``model.safetensors``: the weights (fp32).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.toyworld import catalogue as cat
from engine.toyworld.render import SIZE, make_dataset

NONE = "none"


def heads() -> dict[str, list[str]]:
    """The classes of each head: the selected world's concepts of each kind, then ``"none"``."""
    return {kind: cat.concepts(kind) + [NONE] for kind in cat.KINDS}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "toyworld-evaluator/1"


def to_tensor(images) -> torch.Tensor:
    """Images as a float tensor B x 3 x 32 x 32 in [0, 1].

    Accepts a uint8 numpy array N x 32 x 32 x 3 (or one 32 x 32 x 3 image), a list of PIL images
    (RGB, 32 x 32) or of such arrays, or a float tensor B x 3 x 32 x 32 in [0, 1]. Anything else
    raises ValueError.
    """
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            raise ValueError(f"a tensor of images must be float in [0, 1], not {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, SIZE, SIZE):
            raise ValueError(f"a tensor of images must be B x 3 x {SIZE} x {SIZE}, not {tuple(images.shape)}")
        if images.numel() and (images.min() < -0.01 or images.max() > 1.01):
            raise ValueError(
                f"image values must lie in [0, 1]; got [{float(images.min()):.3g}, {float(images.max()):.3g}] "
                "(map [-1, 1] outputs with x / 2 + 0.5)"
            )
        return images.float().clamp(0, 1)
    if isinstance(images, (list, tuple)):
        if not images:
            return torch.zeros(0, 3, SIZE, SIZE)
        # np.asarray reads a PIL image as H x W x channels uint8 (H x W for greyscale).
        arrays = [np.asarray(im) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"images must all be {SIZE} x {SIZE} RGB; got shapes {sorted(shapes)}")
        images = np.stack(arrays)
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
            raise ValueError(
                f"images must be N x {SIZE} x {SIZE} x 3 (RGB, height x width x channels), not {images.shape}"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (0-255), not {images.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(images))  # N x 32 x 32 x 3 uint8
        return x.permute(0, 3, 1, 2).float().div(255.0)  # N x 3 x 32 x 32
    raise ValueError(
        "images must be a uint8 numpy array N x 32 x 32 x 3, a list of 32 x 32 RGB PIL images or a "
        f"float tensor B x 3 x 32 x 32; got {type(images).__name__}"
    )


def labels_to_targets(labels: list[dict]) -> dict[str, torch.Tensor]:
    """Class indices into ``heads()`` for each kind (``"none"`` where a kind is absent)."""
    classes = heads()
    unknown = {k for lab in labels for k in lab} - set(classes)
    if unknown:
        raise ValueError(f"unknown concept kind(s) {sorted(unknown)}; kinds: {', '.join(classes)}")
    index = {kind: {name: i for i, name in enumerate(names)} for kind, names in classes.items()}
    out = {}
    for kind in heads():
        try:
            out[kind] = torch.tensor([index[kind][lab.get(kind, NONE)] for lab in labels], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"unknown {kind} {e.args[0]!r} (not in the catalogue)") from None
    return out


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ToyEvaluator(nn.Module):
    """A shared conv trunk and one linear head per concept kind (see the module docstring)."""

    def __init__(self, width: int = 48, feature_dim: int = 256):
        super().__init__()
        if width < 2 or width % 2 or feature_dim < 1:
            raise ValueError(f"width must be an even number >= 2 and feature_dim >= 1; got {width}, {feature_dim}")
        self.width, self.feature_dim = width, feature_dim
        self.heads_names = {kind: list(names) for kind, names in heads().items()}
        w = width
        self.trunk = nn.Sequential(
            *_conv(3, w // 2),  # 32 x 32
            *_conv(w // 2, w, 2), *_conv(w, w),  # 16 x 16
            *_conv(w, 2 * w, 2), *_conv(2 * w, 2 * w),  # 8 x 8
            *_conv(2 * w, 4 * w, 2), *_conv(4 * w, 4 * w),  # 4 x 4
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({kind: nn.Linear(feature_dim, len(names)) for kind, names in heads().items()})

    def config(self) -> dict:
        return {"format": FORMAT, "width": self.width, "feature_dim": self.feature_dim, "heads": self.heads_names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)  # B x feature_dim
        return {kind: head(f) for kind, head in self.heads.items()}  # kind -> B x classes

    def _batched(self, images, batch_size: int, fn) -> list:
        """``fn`` on each batch of ``images``, in eval mode without gradients (mode restored after)."""
        x = to_tensor(images)  # N x 3 x 32 x 32
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return [fn(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
        finally:
            self.train(was_training)

    def features(self, images, batch_size: int = 512) -> torch.Tensor:
        """Penultimate features (N x feature_dim, on the CPU), e.g. for KID."""
        parts = self._batched(images, batch_size, lambda x: self.trunk(x).cpu())
        return torch.cat(parts) if parts else torch.zeros(0, self.feature_dim)

    def predict_proba(self, images, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Class probabilities per kind: kind -> N x len(heads()[kind]), on the CPU."""
        parts = self._batched(images, batch_size, lambda x: {k: v.softmax(-1).cpu() for k, v in self(x).items()})
        return {
            kind: torch.cat([p[kind] for p in parts]) if parts else torch.zeros(0, len(names))
            for kind, names in self.heads_names.items()
        }

    def predict(self, images, batch_size: int = 512) -> dict[str, list[str]]:
        """The most likely class name per kind and image (``"none"`` included)."""
        proba = self.predict_proba(images, batch_size)
        return {kind: [self.heads_names[kind][i] for i in p.argmax(-1).tolist()] for kind, p in proba.items()}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created if needed).

        Each file is written under a temporary name and then renamed over the old one, so a
        crash never leaves a half-written file behind.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp_weights = folder / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
        tmp_config = folder / f".{CONFIG_NAME}.tmp-{os.getpid()}"
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp_weights))
            tmp_config.write_text(json.dumps(self.config(), indent=2) + "\n")
            os.replace(tmp_weights, folder / WEIGHTS_NAME)
            os.replace(tmp_config, folder / CONFIG_NAME)
        finally:
            tmp_weights.unlink(missing_ok=True)
            tmp_config.unlink(missing_ok=True)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ToyEvaluator":
        """A saved evaluator, in eval mode on the CPU.

        Raises FileNotFoundError naming a missing file, and ValueError when the saved heads differ
        from ``heads()`` (the catalogue changed since it was trained) or the weights do not fit.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"evaluator file {folder / name} is missing; retrain with train_evaluator")
        try:
            config = json.loads((folder / CONFIG_NAME).read_text())
            width, feature_dim, saved = int(config["width"]), int(config["feature_dim"]), dict(config["heads"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / CONFIG_NAME} is not an evaluator config ({e!r})") from None
        expected = heads()
        if saved != expected:
            changed = [k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k)]
            raise ValueError(
                f"evaluator at {folder} was trained for other classes (heads {sorted(changed)} differ from "
                "the catalogue's); retrain it with train_evaluator"
            )
        model = cls(width=width, feature_dim=feature_dim)
        state = load_file(str(folder / WEIGHTS_NAME))
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{folder / WEIGHTS_NAME} does not fit the config: missing {missing}, unexpected {unexpected}"
            )
        wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
                 for k, v in expected.items() if state[k].shape != v.shape]
        if wrong:
            raise ValueError(f"{folder / WEIGHTS_NAME} has tensors of the wrong shape: {'; '.join(wrong[:5])}")
        model.load_state_dict(state)
        return model.eval()


# --- training ---------------------------------------------------------------------------------


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Generation-like damage for a training batch x (B x 3 x 32 x 32 in [0, 1]): a random shift
    of up to 1 px, a blur of random width on 40% of images, Gaussian noise (sigma up to 0.05)
    on 75% of images."""
    b = x.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    # Shift: crop a 32 x 32 window at a random offset from the edge-replicated 34 x 34 image.
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")  # B x 3 x 34 x 34
    offset = torch.randint(0, 3, (b, 2), generator=generator)  # B x 2 (dy, dx)
    rows = offset[:, 0, None] + torch.arange(SIZE)  # B x 32
    cols = offset[:, 1, None] + torch.arange(SIZE)  # B x 32
    x = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # B x 32 x 32 x 3
    x = x.permute(0, 3, 1, 2)  # B x 3 x 32 x 32

    # Blur on 40% of the images: a 3x3 binomial blur applied 1 to 4 times (Gaussian sigma about
    # 0.7 to 1.4 px), the last pass blended in at a random strength. A generation's small VAE
    # softens edges and drops 1-px details (eyes, glasses' frames): identities must be told apart
    # by their large parts (hair, skin, shirt, hat) then, as a person would.
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)  # 3 x 1 x 3 x 3, one per channel
    passes = torch.randint(1, 5, (b,), generator=generator) * (rand(b) < 0.4)  # B: 0 = no blur
    strength = rand(b, 1, 1, 1)
    current = x
    for n in range(1, 5):
        blurred = F.conv2d(F.pad(current, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)  # B x 3 x 32 x 32
        chosen = (passes == n).view(b, 1, 1, 1)
        x = torch.where(chosen, current + strength * (blurred - current), x)
        current = blurred

    # Noise: per-image sigma uniform in [0, 0.05] on 75% of images; the rest stay clean, which
    # keeps fine cues such as the pixel mosaic's quantised colours learnable.
    sigma = 0.05 * rand(b, 1, 1, 1) * (rand(b, 1, 1, 1) < 0.75)  # B x 1 x 1 x 1
    x = x + sigma * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1).contiguous()


# Identity attributes as auxiliary training targets: each attribute value is shared by many
# identities, so the trunk learns "bun hair" or "striped shirt" from all of them at once, which
# carries over to styles where an identity has few examples. Colour attributes are not
# targets on pencil sketches (graphite lines only, no colour to see).
def attribute_values() -> dict[str, list[str]]:
    """Each identity attribute's values among the selected world's identities."""
    return {a: sorted({getattr(i, a) for i in cat.IDENTITIES}) for a in cat.IDENTITY_ATTRIBUTES}


_COLOURLESS_STYLES = ("pencil sketch",)
_COLOUR_ATTRIBUTES = ("skin", "hair_colour", "eye_colour", "shirt_colour")


def _attribute_targets(labels: list[dict]) -> dict[str, torch.Tensor]:
    """Value indices per identity attribute; -100 (ignored) for non-identities and invisible colours."""
    values_of = attribute_values()
    out = {a: torch.full((len(labels),), -100, dtype=torch.long) for a in values_of}
    for n, lab in enumerate(labels):
        if "identity" not in lab:
            continue
        person = cat.identity(lab["identity"])
        for a, values in values_of.items():
            if a in _COLOUR_ATTRIBUTES and lab.get("style") in _COLOURLESS_STYLES:
                continue
            out[a][n] = values.index(getattr(person, a))
    return out


HARD_STYLES = ("pencil sketch", "sepia")


def _hard_renders(n: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """``n`` extra renders (images, labels) of identities in the styles that hide most of them."""
    from engine.toyworld.render import labels_for, render_batch, sample_scene

    if n == 0:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8), []
    rng = np.random.default_rng([seed, 2])
    people = cat.concepts("identity")
    styles = [HARD_STYLES[i % len(HARD_STYLES)] for i in range(n)]
    scenes = [sample_scene(rng, kind="style", subject=people[rng.integers(len(people))], style=s) for s in styles]
    return render_batch(scenes)[0], [labels_for(s) for s in scenes]


def accuracy_by_kind(predicted: dict[str, list[str]], labels: list[dict]) -> tuple[dict, dict]:
    """Percent correct per head: over images showing the kind (NaN if none does), and over all."""
    shown, overall = {}, {}
    for kind in heads():
        truth = [lab.get(kind, NONE) for lab in labels]
        hits = [p == t for p, t in zip(predicted[kind], truth)]
        on = [h for h, t in zip(hits, truth) if t != NONE]
        shown[kind] = 100.0 * sum(on) / len(on) if on else float("nan")
        overall[kind] = 100.0 * sum(hits) / len(hits) if hits else float("nan")
    return shown, overall


def _accuracy_by_style(predicted: dict[str, list[str]], labels: list[dict]) -> dict:
    """Percent correct per style (``"none"``: unstyled) and kind, over images showing the kind."""
    out = {}
    for style in heads()["style"]:
        rows = [i for i, lab in enumerate(labels) if lab.get("style", NONE) == style]
        if rows:
            shown = accuracy_by_kind({k: [v[i] for i in rows] for k, v in predicted.items()}, [labels[i] for i in rows])[0]
            out[style] = {k: v for k, v in shown.items() if not math.isnan(v)}
    return out


def _training_set(n_train: int, seed: int, hard_extra: int, styled_repeats: int):
    """The training renders as a uint8 tensor (N x 3 x 32 x 32), their targets per head and per
    auxiliary attribute, and one epoch's items (each styled render ``styled_repeats`` times)."""
    train = make_dataset(n_train, seed)
    extra_images, extra_labels = _hard_renders(hard_extra, seed)
    labels = train["labels"] + extra_labels
    images = torch.from_numpy(np.concatenate([train["images"], extra_images])).permute(0, 3, 1, 2).contiguous()
    styled = torch.tensor([i for i, lab in enumerate(labels) if "style" in lab], dtype=torch.long)
    epoch_items = torch.cat([torch.arange(len(labels))] + [styled] * (styled_repeats - 1))
    return images, labels_to_targets(labels), _attribute_targets(labels), epoch_items


def _batch_loss(model, aux, x, targets: dict, attributes: dict) -> torch.Tensor:
    """The heads' summed cross-entropy, plus half of each auxiliary attribute head's where the
    batch has targets for it (-100: none)."""
    features = model.trunk(x.contiguous(memory_format=torch.channels_last))  # B x feature_dim
    loss = sum(F.cross_entropy(model.heads[k](features), targets[k]) for k in heads())
    for a, head in aux.items():
        t = attributes[a]
        if (t >= 0).any():
            loss = loss + 0.5 * F.cross_entropy(head(features), t, ignore_index=-100)
    return loss


def _fit(model, aux, data, epochs: int, batch_size: int, lr: float, generator, progress: bool) -> None:
    """AdamW with a one-cycle schedule over ``epochs`` shuffled passes of the epoch items."""
    from engine.progress import progress_bar

    images, targets, attributes, epoch_items = data
    model.train()
    steps_per_epoch = math.ceil(len(epoch_items) / batch_size)
    params = list(model.parameters()) + list(aux.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    bar = progress_bar(total=epochs * steps_per_epoch, desc="train evaluator", unit="batch", progress=progress)
    for _ in range(epochs):
        order = epoch_items[torch.randperm(len(epoch_items), generator=generator)]  # M
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]  # B
            x = augment(images[idx].float().div_(255.0), generator)  # B x 3 x 32 x 32
            loss = _batch_loss(model, aux, x, {k: v[idx] for k, v in targets.items()},
                               {a: v[idx] for a, v in attributes.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()


def train_evaluator(
    n_train: int = 80000,
    n_heldout: int = 5000,
    seed: int = 0,
    epochs: int = 3,
    batch_size: int = 256,
    lr: float = 3e-3,
    progress: bool = True,
    width: int = 48,
    styled_repeats: int = 3,
    hard_extra: int = 8000,
) -> tuple[ToyEvaluator, dict]:
    """Train an evaluator on ``n_train`` fresh renders; measure it on ``n_heldout`` others.

    The training renders are ``make_dataset(n_train, seed)`` plus ``hard_extra`` identities in
    ``HARD_STYLES``; the held-out ones ``make_dataset(n_heldout, seed + 1_000_003, "heldout")``.
    AdamW with a one-cycle schedule; the loss is the heads' summed cross-entropy plus auxiliary
    identity-attribute heads (training only, not saved); batches are augmented (``augment``).
    An epoch shows every render once and each styled render ``styled_repeats`` times: styles
    are a fifth of the renders but the hardest part, and unstyled scenes are learnt quickly.
    Uses the threads torch is set to use. The defaults take about 5 minutes on 2 CPU cores.

    Returns the model (eval mode, CPU) and metrics: ``heldout_accuracy`` (percent per kind over
    the held-out images that show the kind), ``heldout_accuracy_all`` (over all of them, "none"
    included), ``heldout_accuracy_by_style`` (style or "none" -> kind -> percent over the images
    showing the kind), ``n_train``, ``n_hard_extra``, ``n_heldout`` and ``seconds`` (rendering
    included).
    """
    start = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, targets, attributes, epoch_items = _training_set(n_train, seed, hard_extra, styled_repeats)
    heldout = make_dataset(n_heldout, seed + 1_000_003, split="heldout")

    model = ToyEvaluator(width=width).to(memory_format=torch.channels_last)  # faster convs on CPU
    aux = nn.ModuleDict({a: nn.Linear(model.feature_dim, len(v)) for a, v in attribute_values().items()})
    _fit(model, aux, (images, targets, attributes, epoch_items), epochs, batch_size, lr, generator, progress)

    model = model.to(memory_format=torch.contiguous_format).eval()
    predicted = model.predict(heldout["images"])
    shown, overall = accuracy_by_kind(predicted, heldout["labels"])
    metrics = {
        "heldout_accuracy": shown,
        "heldout_accuracy_all": overall,
        "heldout_accuracy_by_style": _accuracy_by_style(predicted, heldout["labels"]),
        "n_train": n_train,
        "n_hard_extra": hard_extra,
        "n_heldout": n_heldout,
        "seconds": time.time() - start,
    }
    return model, metrics

