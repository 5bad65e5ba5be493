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
