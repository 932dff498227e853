"""Readers (ARAD_1K layout paired by name, zarr) and the authors' patch grid."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from drcr_model.datasets import Augment, Pair, PatchDataset, patch_grid, read_arad, read_paired_zarr, write_paired_zarr


def _write_scene(root, name: str, cube: np.ndarray, rgb: np.ndarray) -> None:
    (root / "Train_spectral").mkdir(exist_ok=True)
    (root / "Train_RGB").mkdir(exist_ok=True)
    with h5py.File(root / "Train_spectral" / f"{name}.mat", "w") as f:
        # MATLAB v7.3 stores the H×W×31 array column-major: h5py sees 31×W×H.
        f.create_dataset("cube", data=cube.T)
    Image.fromarray(rgb).save(root / "Train_RGB" / f"{name}.png")


def _scene(value: float, h: int = 6, w: int = 8) -> tuple[np.ndarray, np.ndarray]:
    cube = np.full((h, w, 31), value, dtype=np.float32)
    cube[0, 0, 0] = value + 0.01  # marks the corner and the first band
    rgb = np.full((h, w, 3), int(value * 200), dtype=np.uint8)
    return cube, rgb


def test_arad_reader_pairs_by_name_and_restores_axis_order(tmp_path) -> None:
    for name, v in [("ARAD_1K_0001", 0.1), ("ARAD_1K_0002", 0.2), ("ARAD_1K_0003", 0.3)]:
        _write_scene(tmp_path, name, *_scene(v))
    # Remove one RGB: pairing by sorted position would give scene 3's RGB to scene 2.
    (tmp_path / "Train_RGB" / "ARAD_1K_0002.png").unlink()
    pairs = read_arad(str(tmp_path))
    assert [p.name for p in pairs] == ["ARAD_1K_0001", "ARAD_1K_0003"]
    for p, v in zip(pairs, (0.1, 0.3), strict=True):
        assert p.cube.shape == (6, 8, 31)
        assert p.cube[0, 0, 0] == pytest.approx(v + 0.01) and p.cube[0, 1, 0] == pytest.approx(v)
        assert p.rgb[0, 0, 0] == int(v * 200)


def test_arad_reader_names_must_exist_and_nonpositive_scenes_are_skipped(tmp_path) -> None:
    _write_scene(tmp_path, "a", *_scene(0.1))
    cube, rgb = _scene(0.2)
    cube[1, 1, 1] = 0.0
    _write_scene(tmp_path, "b", cube, rgb)
    assert [p.name for p in read_arad(str(tmp_path))] == ["a"]
    assert [p.name for p in read_arad(str(tmp_path), skip_nonpositive=False)] == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="missing"):
        read_arad(str(tmp_path), names=["missing"])


def test_arad_reader_accepts_fsspec_urls(tmp_path) -> None:
    _write_scene(tmp_path, "a", *_scene(0.1))
    assert [p.name for p in read_arad(f"file://{tmp_path}")] == ["a"]


def test_paired_zarr_roundtrip(tmp_path) -> None:
    pairs = [Pair(n, *reversed(_scene(v))) for n, v in [("x", 0.1), ("y", 0.4)]]
    write_paired_zarr(str(tmp_path / "d.zarr"), pairs, bands=range(400, 701, 10))
    back = read_paired_zarr(str(tmp_path / "d.zarr"))
    assert [p.name for p in back] == ["x", "y"]
    np.testing.assert_array_equal(back[1].cube, pairs[1].cube)
    np.testing.assert_array_equal(back[1].rgb, pairs[1].rgb)


def test_patch_grid_is_the_authors() -> None:
    grid = patch_grid(482, 512)
    assert len(grid) == 42  # rows 0..320 (6) × cols 0..384 (7), spec §5
    assert grid[0] == (0, 0) and grid[-1] == (320, 384)


def test_patch_dataset_divides_by_the_whole_image_max_and_augments_deterministically() -> None:
    rng = np.random.default_rng(0)
    cube = rng.uniform(0.1, 1, (16, 16, 31)).astype(np.float32)
    rgb = rng.integers(0, 200, (16, 16, 3)).astype(np.uint8)
    rgb[15, 15] = 250  # the max lies outside the first patch
    ds = PatchDataset([Pair("s", rgb, cube)], patch=8, stride=8)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and y.shape == (31, 8, 8)
    np.testing.assert_allclose(x.numpy(), rgb[:8, :8].transpose(2, 0, 1) / 250.0, rtol=1e-6)
    aug = PatchDataset(
        [Pair("s", rgb, cube)], patch=8, stride=8, augment=Augment(flips=True, npe=100, jpeg_quality=(50, 90)), seed=1
    )
    a1, b1 = aug[2]
    a2, b2 = aug[2]
    np.testing.assert_array_equal(a1.numpy(), a2.numpy())
    aug.set_epoch(1)
    assert not np.array_equal(aug[2][0].numpy(), a1.numpy())
    # Flips move RGB and cube together: the cube patch is still a rotation/flip of the original one.
    orig = cube[8:16, :8]
    variants = [np.rot90(orig, k) for k in range(4)] + [np.rot90(orig, k)[:, ::-1] for k in range(4)]
    assert any(np.array_equal(b1.numpy().transpose(1, 2, 0), v) for v in variants)
