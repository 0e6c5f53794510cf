"""Small dataset writers for tests that must not depend on the synthetic generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fasthpa.labels import CHANNELS


def write_tiny_dataset(
    root: Path, n: int = 12, size: int = 16, seed: int = 0, targets: list[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Write ``n`` random samples in the Kaggle layout; return the Ids and the pixels [N,H,W,4]."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    ids = [f"id{i:04d}" for i in range(n)]
    pixels = rng.integers(0, 256, size=(n, size, size, 4), dtype=np.uint8)
    for i, sample_id in enumerate(ids):
        for c, ch in enumerate(CHANNELS):
            Image.fromarray(pixels[i, ..., c]).save(root / "train" / f"{sample_id}_{ch}.png")
    if targets is None:
        targets = [" ".join(str(x) for x in sorted({i % 28, (i * 7) % 28})) for i in range(n)]
    (root / "train.csv").write_text(
        "Id,Target\n" + "".join(f"{sample_id},{t}\n" for sample_id, t in zip(ids, targets))
    )
    return ids, pixels
