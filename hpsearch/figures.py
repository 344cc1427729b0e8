"""Pictures as files: numpy images to PNG (study-level plots live here too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 H×W or H×W×3 image as PNG and return its path."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
