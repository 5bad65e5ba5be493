"""Tiling images into one PNG: the sample sheets of the toy world and the evaluation reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_grid(images, path, cols: int = 8, scale: int = 1) -> Path:
    """Tile images (N x H x W x 3 uint8) into one PNG, ``cols`` a row, each pixel ``scale`` x
    ``scale``; empty cells are black. The PNG is (ceil(N / cols) * H * scale) x (cols * W * scale)."""
    from PIL import Image

    images = np.asarray(images, np.uint8)
    n, h, w, _ = images.shape
    rows = max(1, -(-n // cols))
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    path = Path(path)
    Image.fromarray(grid).save(path, format="PNG")
    return path


def save_labelled_grid(rows, path, headings: tuple[str, str] = ("original", "edited"), scale: int = 1,
                       font_size: int = 14, captions=None) -> Path:
    """A before/after sheet: for each (label, left images, right images) of ``rows`` the label on a
    line of its own, then the left images, a gap and the right images (each N x H x W x 3 uint8,
    all the same H x W, each pixel ``scale`` x ``scale``); ``headings`` above the two halves.
    ``captions`` (optional, per row: a list of short strings for the right images) are written
    under those images, e.g. what an evaluator recognised in them."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [(str(label), np.asarray(a, np.uint8), np.asarray(b, np.uint8)) for label, a, b in rows]
    if not rows:
        raise ValueError("no rows to draw")
    h, w = rows[0][1].shape[1:3]
    for _, a, b in rows:
        for part in (a, b):
            if part.ndim != 4 or part.shape[1:] != (h, w, 3):
                raise ValueError(f"grid images must all be {h} x {w} x 3, got {part.shape[1:]}")
    ch, cw = h * scale, w * scale
    per = max(max(len(a), len(b)) for _, a, b in rows)
    gap, pad, line = cw // 2, 6, font_size + 6
    caption_h = line if captions else 0
    width = 2 * pad + 2 * per * cw + gap
    height = pad + line + len(rows) * (line + ch + caption_h + pad)
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=font_size)
    small = ImageFont.load_default(size=max(8, font_size - 3))
    right = pad + per * cw + gap

    def text(x, y, s, f, limit):  # cut to fit: a long prompt must not run into the next half
        while s and draw.textlength(s, font=f) > limit:
            s = s[:-2] + "…" if len(s) > 2 else ""
        draw.text((x, y), s, fill=(235, 235, 235), font=f)

    text(pad, pad, headings[0], font, per * cw)
    text(right, pad, headings[1], font, per * cw)
    y = pad + line
    for r, (label, a, b) in enumerate(rows):
        text(pad, y, label, font, width - 2 * pad)
        y += line
        for x0, part in ((pad, a), (right, b)):
            for i, im in enumerate(part):
                tile = Image.fromarray(im).resize((cw, ch), Image.NEAREST)
                sheet.paste(tile, (x0 + i * cw, y))
        if captions:
            for i, caption in enumerate(captions[r][: len(b)]):
                text(right + i * cw + 2, y + ch + 2, str(caption), small, cw - 4)
        y += ch + caption_h + pad
    path = Path(path)
    sheet.save(path, format="PNG")
    return path
