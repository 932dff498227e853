"""Exact tiling: tiles run with the whole image's re-calibration statistics equal the whole-image run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures.models import sensitive_model

from drcr_model import DRCRNet, reconstruct
from drcr_model.inference import forward
from drcr_model.recalibration import GatherState, block_input_sums
from pipeline.statistics import add_sums, gather_statistics, tile_sums, windows_to_batch
from pipeline.tiling import crop_core, extract_window, plan_tiles, statistics_region, stitch


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random uint8 photo stand-in (regions with different means, so tiles differ)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 16 + 2, w // 16 + 2, 3))
    img = np.kron(coarse, np.ones((16, 16, 1)))[:h, :w] * 200 + rng.random((h, w, 3)) * 50
    return img.astype(np.uint8)


def _tiled(model: DRCRNet, img: np.ndarray, core: int, halo: int, statistics: str) -> tuple[np.ndarray, int]:
    h, w = img.shape[:2]
    x = img.astype(np.float32) / np.float32(img.max())
    tiles = plan_tiles(h, w, max_tile_pixels=1, tile_core=core, halo=halo)
    means, passes = None, 0
    if statistics == "global":
        state = gather_statistics(model, x, tiles, scale=1.0, batch_size=3)
        means, passes = state.means, state.passes
    cores = []
    for i in range(0, len(tiles), 4):
        group = tiles[i : i + 4]
        y = forward(model, windows_to_batch([extract_window(x, t) for t in group], 1.0), means=means)
        cores += [(t, crop_core(y[k], t)) for k, t in enumerate(group)]
    return stitch(cores, h, w, 31), passes


def test_supplied_own_means_equal_pooling() -> None:
    """``forward(x, means)`` with x's own block-input means is the plain forward (se2's mean = g1 · mean)."""
    model = sensitive_model()
    x = torch.rand(2, 3, 32, 24)
    sums = block_input_sums(model, x[:1], [(slice(0, 32), slice(0, 24))])
    with torch.no_grad():
        plain = model(x[:1])
        supplied = model(x[:1], torch.as_tensor(sums / (32 * 24), dtype=torch.float32))
    torch.testing.assert_close(supplied, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))


@pytest.mark.parametrize(
    "h,w,core,halo,n_blocks",
    [(96, 96, 16, 36, 2), (101, 77, 16, 36, 2), (64, 150, 32, 32, 2), (130, 122, 16, 44, 3)],
)
def test_global_statistics_tiling_equals_whole_image(h: int, w: int, core: int, halo: int, n_blocks: int) -> None:
    """Goal of issue 14: max |tiled − whole| ≤ 1e-3 × the cube's peak; per-tile statistics miss it."""
    model = sensitive_model(n_blocks)
    img = _image(h, w, seed=h * w)
    whole = reconstruct(img, model, mode="pad").transpose(2, 0, 1)
    peak = float(np.abs(whole).max())
    tiled, passes = _tiled(model, img, core, halo, "global")
    assert 1 <= passes <= n_blocks
    assert np.abs(tiled - whole).max() <= 1e-3 * peak
    per_tile, _ = _tiled(model, img, core, halo, "tile")
    assert np.abs(per_tile - whole).max() > 1e-2 * peak  # the statistics matter for this model


def test_statistics_regions_partition_the_padded_image() -> None:
    h, w = 70, 45
    cover = np.zeros((72, 48), np.int32)
    for t in plan_tiles(h, w, max_tile_pixels=1, tile_core=16, halo=6):
        ys, xs = statistics_region(t, h, w)
        cover[t.y0 + ys.start : t.y0 + ys.stop, t.x0 + xs.start : t.x0 + xs.stop] += 1
        assert t.y0 >= 0 and t.y0 + t.height <= 72 and t.x0 >= 0 and t.x0 + t.width <= 48
        assert t.y0 % 4 == 0 and t.x0 % 4 == 0
    assert (cover == 1).all()


def test_each_pass_makes_one_more_block_exact() -> None:
    """After pass p the first p means equal the whole image's (block 0's input needs no statistics)."""
    model = sensitive_model(3)
    img = _image(128, 128)
    x = img.astype(np.float32) / np.float32(img.max())
    xt = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
    tiles = plan_tiles(128, 128, max_tile_pixels=1, tile_core=32, halo=40)
    state = GatherState(n_blocks=3, tol=0.0)
    while not state.done:
        parts = [
            tile_sums(model, windows_to_batch([extract_window(x, t)], 1.0), [t], 128, 128, state.means) for t in tiles
        ]
        state = add_sums(state, parts)
        assert state.means is not None
        exact = block_input_sums(model, xt, [(slice(0, 128), slice(0, 128))], torch.as_tensor(state.means)) / 128**2
        p = state.passes
        np.testing.assert_allclose(state.means[:p], exact[:p], rtol=1e-4, atol=1e-5)
    assert add_sums(state, [None]) is state  # passes submitted after the end are no-ops


def test_gather_state_stops_at_n_blocks_or_convergence() -> None:
    rng = np.random.default_rng(0)
    state = GatherState(n_blocks=3, tol=1e-3)
    for _ in range(3):
        assert not state.done
        state = state.update(rng.random((3, 4)) * 100, 100)  # never converging
    assert state.done and state.passes == 3
    sums = rng.random((3, 4))
    state = GatherState(n_blocks=5, tol=1e-3).update(sums, 10).update(sums * (1 + 1e-4), 10)
    assert state.done and state.passes == 2
    with pytest.raises(ValueError, match="no pixels"):
        state.update(sums, 0)


@pytest.mark.parametrize("n_blocks", [1, 3])
def test_unset_halo_follows_the_receptive_radius_and_is_exact(n_blocks: int) -> None:
    """With ``tiling.halo`` unset and global statistics, the halo the weights get makes tiles exact
    (float rounding only)."""
    from pipeline.config import TilingSpec

    halo = TilingSpec(statistics="global").with_halo_for(n_blocks).halo
    assert halo is not None and halo % 4 == 0 and 0 <= halo - (18 + 6 * n_blocks) < 4
    model = sensitive_model(n_blocks)
    img = _image(136, 120, seed=n_blocks)
    whole = reconstruct(img, model, mode="pad").transpose(2, 0, 1)
    peak = float(np.abs(whole).max())
    tiled, _ = _tiled(model, img, 16, halo, "global")
    assert np.abs(tiled - whole).max() <= 1e-5 * peak
