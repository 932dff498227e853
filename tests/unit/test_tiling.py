"""Tiling/stitching round trips: exact for an identity model and for a local-receptive-field model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.tiling import crop_core, extract_window, plan_tiles, reflect_indices, stitch


@pytest.mark.parametrize("h,w", [(1, 1), (5, 3), (64, 64), (65, 130), (200, 77)])
def test_plan_covers_image_exactly_once(h: int, w: int) -> None:
    tiles = plan_tiles(h, w, max_tile_pixels=16, tile_core=16, halo=4)
    cover = np.zeros((h, w), np.int32)
    for t in tiles:
        ys, xs = t.core_slices
        cover[ys, xs] += 1
        assert (t.height, t.width) == (tiles[0].height, tiles[0].width)  # uniform windows batch together
        assert t.whole or (t.height % 4 == 0 and t.width % 4 == 0)
    assert (cover == 1).all()


def test_small_image_is_one_whole_tile() -> None:
    (t,) = plan_tiles(30, 40, max_tile_pixels=1200, tile_core=16, halo=4)
    assert t.whole and (t.height, t.width, t.core_h, t.core_w) == (30, 40, 30, 40)


@pytest.mark.parametrize("chunk", [8, 16])
def test_cores_align_to_chunks(chunk: int) -> None:
    """Every core starts on a chunk boundary and ends on one or at the border: no chunk has two writers."""
    h, w = 100, 70
    tiles = plan_tiles(h, w, max_tile_pixels=1, tile_core=32, halo=6)
    owner: dict[tuple[int, int], int] = {}
    for t in tiles:
        assert t.core_y0 % chunk == 0 and t.core_x0 % chunk == 0
        assert (t.core_y0 + t.core_h) % chunk == 0 or t.core_y0 + t.core_h == h
        assert (t.core_x0 + t.core_w) % chunk == 0 or t.core_x0 + t.core_w == w
        for cy in range(t.core_y0 // chunk, -(-(t.core_y0 + t.core_h) // chunk)):
            for cx in range(t.core_x0 // chunk, -(-(t.core_x0 + t.core_w) // chunk)):
                assert owner.setdefault((cy, cx), t.index) == t.index


def test_reflect_indices_match_numpy_reflect() -> None:
    for n in (1, 2, 3, 7):
        a = np.arange(n)
        expect = np.pad(a, (9, 11), mode="reflect") if n > 1 else np.zeros(n + 20, int)
        np.testing.assert_array_equal(a[reflect_indices(-9, n + 20, n)], expect)


def _identity(window: np.ndarray) -> np.ndarray:
    return window.transpose(2, 0, 1).astype(np.float32)


def _roundtrip(image: np.ndarray, model, halo: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    h, w = image.shape[:2]
    tiles = plan_tiles(h, w, max_tile_pixels=1, tile_core=16, halo=halo)
    cores = [(t, crop_core(model(extract_window(image, t)), t)) for t in tiles]
    return stitch(cores, h, w, cores[0][1].shape[0], dtype=cores[0][1].dtype)


def test_identity_model_roundtrip_is_exact() -> None:
    img = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    out = _roundtrip(img, _identity, halo=4)
    np.testing.assert_array_equal(out, img.transpose(2, 0, 1).astype(np.float32))


def test_local_model_tiled_equals_whole_image() -> None:
    """A model with a 5x5 receptive field, reflect-padding its input: tiled == whole image exactly (halo >= 2).

    (Padding only the input matters: a stack of reflect-padded layers reflects feature maps at the border,
    which no input-side halo reproduces.)"""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.ReflectionPad2d(2), torch.nn.Conv2d(3, 8, 5), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).double()
    with torch.no_grad():  # small-integer weights and inputs: float64 sums are exact whatever the conv algorithm
        for p in net.parameters():
            p.copy_(torch.round(p * 16))

    def model(window: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(window.transpose(2, 0, 1)[None].astype(np.float64)))[0].numpy()

    img = np.random.default_rng(1).integers(0, 255, (45, 38, 3)).astype(np.float64)
    whole = model(img)
    tiled = _roundtrip(img, model, halo=4)
    np.testing.assert_array_equal(tiled, whole)


def test_stitch_detects_gaps() -> None:
    tiles = plan_tiles(32, 32, max_tile_pixels=1, tile_core=16, halo=2)
    with pytest.raises(ValueError, match="cover"):
        stitch([(t, np.zeros((1, t.core_h, t.core_w))) for t in tiles[:-1]], 32, 32, 1)


class _Recording:
    """A Croppable over an array that records every crop box (and refuses boxes outside the image)."""

    def __init__(self, image: np.ndarray) -> None:
        self.image, self.boxes = image, []  # type: ignore[var-annotated]
        self.shape = image.shape

    def crop(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        h, w = self.shape[:2]
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w, (y0, y1, x0, x1)
        self.boxes.append((y0, y1, x0, x1))
        return self.image[y0:y1, x0:x1].copy()


@pytest.mark.parametrize("h,w,core,halo", [(1, 1, 4, 2), (3, 5, 4, 8), (37, 61, 16, 6), (100, 64, 32, 16)])
def test_windows_from_crops_equal_windows_from_the_array(h: int, w: int, core: int, halo: int) -> None:
    """The decode task cuts windows from crops (only the rows/columns a window uses), reflect-padding
    included; they must equal the windows cut from the whole array, for images smaller than the halo too."""
    image = np.random.default_rng(h * w).integers(0, 65536, (h, w, 3), dtype=np.uint16)
    rec = _Recording(image)
    for t in plan_tiles(h, w, max_tile_pixels=0 if h * w > 1 else 1, tile_core=core, halo=halo):
        got = extract_window(rec, t)
        np.testing.assert_array_equal(got, extract_window(image, t))
        assert got.flags.c_contiguous
        y0, y1, x0, x1 = rec.boxes[-1]
        assert (y1 - y0) <= min(h, t.height) and (x1 - x0) <= min(w, t.width)  # never more than the window needs
