"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``;
files in /usr/share/datasets/fashion-mnist/), or any folder holding the four IDX ``.gz`` files
(``AUTOQUANT_FMNIST`` or ``--data``). Images become 32x32 RGB (grey replicated, 2 px padding)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def data_dir(path: str | os.PathLike | None = None) -> Path:
    folder = Path(path or os.environ.get("AUTOQUANT_FMNIST", DEFAULT_DIR))
    missing = [f for pair in FILES.values() for f in pair if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder} (missing {missing}). Install it with "
            f"'apt-get install dataset-fashion-mnist' or point AUTOQUANT_FMNIST at the IDX files.")
    return folder


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str, path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])``."""
    folder = data_dir(path)
    images, labels = FILES[split]
    return (torch.from_numpy(_idx(folder / images).copy()),
            torch.from_numpy(_idx(folder / labels).astype(np.int64)))


def to_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 3, 32, 32] in [-1, 1] (the VAE's and the pipeline's range)."""
    x = images_u8.float().div(127.5).sub(1.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def brightness_terciles(images_u8: torch.Tensor) -> torch.Tensor:
    """0 (dark), 1, 2 (light): tercile of each garment's mean intensity over its visible pixels."""
    x = images_u8.float()
    mask = x > 10
    mean = (x * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)
    lo, hi = torch.quantile(mean, torch.tensor([1 / 3, 2 / 3]))
    return (mean > lo).long() + (mean > hi).long()
