"""Paired RGB / spectral-cube data: readers, patch sampling and augmentation for training.

Two on-disk layouts are read:

- **ARAD_1K** (NTIRE 2022, spec §5): ``{root}/{split}_spectral/{name}.mat`` (MATLAB v7.3 = HDF5, dataset
  ``cube``) and ``{root}/{split}_RGB/{name}.jpg``. h5py returns ``cube`` with MATLAB's axes reversed
  (bands×W×H), so the array is transposed to H×W×bands. Pairs are matched **by name** (the authors pair
  by sorted position, which silently mispairs when a file is missing).
- **paired zarr**: a group with arrays ``rgb`` (N×H×W×3 uint8) and ``cube`` (N×H×W×bands float32) and
  attributes ``names`` and ``bands``.

Both accept local paths or fsspec URLs. In memory a data set is a list of :class:`Pair`.
Training patches follow the authors: 128×128 on a regular grid with stride 64 from the top-left, the RGB
divided by **its whole image's** maximum (spec §5 step 3). Augmentation is off by default, as theirs.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from drcr_model.camera import decode_image, encode_jpeg
from drcr_model.inference import preprocess

__all__ = [
    "Pair",
    "Augment",
    "read_arad",
    "write_paired_zarr",
    "read_paired_zarr",
    "patch_grid",
    "PatchDataset",
]

log = logging.getLogger(__name__)

RGB_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Pair:
    """One scene: ``rgb`` H×W×3 uint8 as stored, ``cube`` H×W×bands float32 (nominally [0, 1])."""

    name: str
    rgb: np.ndarray
    cube: np.ndarray

    def __post_init__(self) -> None:
        if self.rgb.shape[:2] != self.cube.shape[:2]:
            raise ValueError(f"{self.name}: RGB {self.rgb.shape[:2]} and cube {self.cube.shape[:2]} sizes differ")


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def read_mat_cube(data: bytes | Any) -> np.ndarray:
    """Read ``cube`` from a MATLAB v7.3 (HDF5) file (bytes or file object): H×W×bands float32."""
    import h5py

    with h5py.File(io.BytesIO(data) if isinstance(data, bytes) else data, "r") as f:
        if "cube" not in f:
            raise KeyError(f"no dataset 'cube' in the .mat file (keys: {list(f.keys())})")
        return np.ascontiguousarray(np.asarray(f["cube"], dtype=np.float32).T)


def read_arad(
    root: str,
    split: str = "Train",
    *,
    names: Sequence[str] | None = None,
    skip_nonpositive: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> list[Pair]:
    """Read an ARAD_1K-layout split (``{split}_spectral`` + ``{split}_RGB``) into memory, paired by name.

    Args:
        root: local folder or fsspec URL holding the two split folders.
        split: folder prefix, e.g. ``"Train"`` or ``"Valid"``.
        names: read only these scene names (default: every name present in both folders).
        skip_nonpositive: skip scenes whose cube has a value ≤ 0, as the authors do (MRAE has no epsilon).
        storage_options: passed to fsspec.

    Raises:
        FileNotFoundError: if a requested name lacks its cube or its RGB image, or nothing pairs up.
    """
    fs, base = _fs(root, storage_options)
    spec_dir = f"{base.rstrip('/')}/{split}_spectral"
    rgb_dir = f"{base.rstrip('/')}/{split}_RGB"
    cubes = {PurePosixPath(p).stem: p for p in fs.glob(f"{spec_dir}/*.mat")}
    rgbs = {PurePosixPath(p).stem: p for p in fs.ls(rgb_dir, detail=False) if p.lower().endswith(RGB_SUFFIXES)}
    if names is None:
        unpaired = sorted(set(cubes) ^ set(rgbs))
        if unpaired:
            log.warning("read_arad: %d scenes lack a partner and are skipped: %s", len(unpaired), unpaired[:5])
        wanted = sorted(set(cubes) & set(rgbs))
        if not wanted:
            raise FileNotFoundError(f"no paired scenes under {root!r} ({split}_spectral/*.mat + {split}_RGB/*.jpg)")
    else:
        wanted = list(names)
        missing = [n for n in wanted if n not in cubes or n not in rgbs]
        if missing:
            raise FileNotFoundError(f"read_arad: scenes without both cube and RGB under {root!r}: {missing[:5]}")
    pairs = []
    for name in wanted:
        with fs.open(cubes[name], "rb") as f:
            cube = read_mat_cube(f.read())
        if skip_nonpositive and cube.min() <= 0:
            log.warning("read_arad: skipping %s, its cube has values ≤ 0 (MRAE undefined)", name)
            continue
        rgb = decode_image(fs.cat_file(rgbs[name]))
        pairs.append(Pair(name, rgb, cube))
    return pairs


def write_paired_zarr(
    url: str, pairs: Sequence[Pair], bands: Sequence[float], *, storage_options: dict[str, Any] | None = None
) -> None:
    """Write equally sized pairs as a zarr group (``rgb``, ``cube``, attrs ``names``/``bands``); one chunk per scene."""
    import zarr

    if not pairs:
        raise ValueError("write_paired_zarr: no pairs given")
    h, w, b = pairs[0].cube.shape
    group = zarr.open_group(url, mode="w", storage_options=storage_options)
    rgb = group.create_array("rgb", shape=(len(pairs), h, w, 3), chunks=(1, h, w, 3), dtype="uint8")
    cube = group.create_array("cube", shape=(len(pairs), h, w, b), chunks=(1, h, w, b), dtype="float32")
    for i, p in enumerate(pairs):
        rgb[i] = p.rgb
        cube[i] = p.cube
    group.attrs.update({"names": [p.name for p in pairs], "bands": [float(x) for x in bands]})


def read_paired_zarr(url: str, *, storage_options: dict[str, Any] | None = None) -> list[Pair]:
    """Read a group written by :func:`write_paired_zarr` into memory."""
    import zarr

    group = zarr.open_group(url, mode="r", storage_options=storage_options)
    rgb_arr, cube_arr = group["rgb"], group["cube"]
    if not isinstance(rgb_arr, zarr.Array) or not isinstance(cube_arr, zarr.Array):
        raise ValueError(f"{url}: 'rgb' and 'cube' must be arrays, not groups")
    rgb, cube = np.asarray(rgb_arr[...]), np.asarray(cube_arr[...], dtype=np.float32)
    names = [str(n) for n in group.attrs["names"]]  # type: ignore[union-attr]
    return [Pair(n, rgb[i], cube[i]) for i, n in enumerate(names)]


def patch_grid(height: int, width: int, patch: int = 128, stride: int = 64) -> list[tuple[int, int]]:
    """Top-left corners of the authors' regular patch grid (no padding, no jitter); row-major."""
    if patch > height or patch > width:
        raise ValueError(f"patch {patch} does not fit an image of {height}×{width}")
    return [(r, c) for r in range(0, height - patch + 1, stride) for c in range(0, width - patch + 1, stride)]


@dataclass(frozen=True, kw_only=True)
class Augment:
    """Optional training augmentations (all off by default; the authors used none).

    Args:
        flips: random horizontal/vertical flips and 90° rotations of RGB and cube together.
        npe: if set, Poisson shot noise on the RGB at this many photo-electrons per unit of the
            normalised image (as the challenge's noise step).
        jpeg_quality: if set, (lo, hi) range of JPEG qualities to re-encode the RGB patch with.
        rgb_gain: if set, (lo, hi) range of exposure gains applied to the normalised RGB, clipped at 1
            (saturation); the max-normalised input is otherwise invariant to exposure.
    """

    flips: bool = False
    npe: float | None = None
    jpeg_quality: tuple[int, int] | None = None
    rgb_gain: tuple[float, float] | None = None

    @property
    def enabled(self) -> bool:
        return self.flips or self.npe is not None or self.jpeg_quality is not None or self.rgb_gain is not None


class PatchDataset(torch.utils.data.Dataset):
    """Patches of in-memory pairs: item ``i`` is (rgb 3×p×p, cube bands×p×p) float32 tensors.

    Augmentation randomness is a pure function of ``(seed, epoch, index)``, so a run resumed from a
    checkpoint sees exactly the same patches (call :meth:`set_epoch` before each epoch).
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        patch: int = 128,
        stride: int = 64,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        if not pairs:
            raise ValueError("PatchDataset: no pairs given")
        self.rgb = [preprocess(p.rgb) for p in pairs]  # divided by the whole image's max (spec §5)
        self.cube = [np.asarray(p.cube, dtype=np.float32) for p in pairs]
        self.index = [
            (k, r, c)
            for k, p in enumerate(pairs)
            for r, c in patch_grid(p.cube.shape[0], p.cube.shape[1], patch, stride)
        ]
        self.patch, self.augment, self.seed, self.epoch = patch, augment or Augment(), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, r, c = self.index[i]
        p = self.patch
        rgb = self.rgb[k][r : r + p, c : c + p]
        cube = self.cube[k][r : r + p, c : c + p]
        if self.augment.enabled:
            rgb, cube = self._augment(rgb, cube, np.random.default_rng([self.seed, self.epoch, i]))
        return (
            torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
            torch.from_numpy(np.ascontiguousarray(cube.transpose(2, 0, 1))),
        )

    def _augment(self, rgb: np.ndarray, cube: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        a = self.augment
        if a.flips:
            k = int(rng.integers(0, 4))
            rgb, cube = np.rot90(rgb, k), np.rot90(cube, k)
            if rng.random() < 0.5:
                rgb, cube = rgb[:, ::-1], cube[:, ::-1]
        if a.rgb_gain is not None:
            rgb = np.clip(rgb * rng.uniform(*a.rgb_gain), 0.0, 1.0)
        if a.npe is not None:
            rgb = rng.poisson(np.clip(rgb, 0, None) * a.npe) / a.npe
        if a.jpeg_quality is not None:
            q = int(rng.integers(a.jpeg_quality[0], a.jpeg_quality[1] + 1))
            u8 = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
            rgb = decode_image(encode_jpeg(u8, q)) / 255.0
        return np.asarray(rgb, dtype=np.float32), np.asarray(cube, dtype=np.float32)
