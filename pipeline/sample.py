"""A small seeded sample of RGB photographs-like images, as a .tar, a .zip and loose files, for the demo.

Images are smooth colour fields with edges and noise (not real photographs); with the package's default
weights the demo shows the whole path end to end on a fresh machine.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_sample", "sample_image"]


def sample_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """H×W×3 uint8: a few coloured regions with soft shading and mild noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    centres = rng.uniform(0, 1, (5, 2)) * [height, width]
    colours = rng.uniform(0.1, 0.9, (5, 3))
    d = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 for cy, cx in centres])
    label = d.argmin(0)
    img[:] = colours[label]
    shade = 0.6 + 0.4 * np.sin(xx / width * np.pi)[..., None]
    img = img * shade + rng.normal(0, 0.01, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_sample(dest: str | Path, *, count: int = 6, seed: int = 0) -> list[Path]:
    """Write ``photos.tar`` (JPEG + PNG members), ``photos.zip`` and ``loose/*.png``; returns the paths."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [(96, 128), (130, 97), (64, 64), (120, 160), (99, 101), (128, 128)]
    images = [sample_image(rng, *sizes[i % len(sizes)]) for i in range(count)]
    tar_path, zip_path, loose = dest / "photos.tar", dest / "photos.zip", dest / "loose"
    loose.mkdir(exist_ok=True)
    with tarfile.open(tar_path, "w") as tf:
        for i, img in enumerate(images[: count // 2]):
            data = _encode(img, "JPEG" if i % 2 == 0 else "PNG")
            info = tarfile.TarInfo(f"day1/img_{i:03d}.{'jpg' if i % 2 == 0 else 'png'}")
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(zip_path, "w") as zf:
        for i, img in enumerate(images[count // 2 : count - 1]):
            zf.writestr(zipfile.ZipInfo(f"img_{i:03d}.png", date_time=(2022, 1, 1, 0, 0, 0)), _encode(img, "PNG"))
    (loose / "img_last.png").write_bytes(_encode(images[-1], "PNG"))
    return [tar_path, zip_path, loose / "img_last.png"]
