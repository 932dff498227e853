"""Test-time ensemble (flips/transposes): inverse views, equivariant models, tiles, provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drcr_model import DRCRNet, reconstruct
from drcr_model.inference import ENSEMBLE_TRANSFORMS, forward, transform, untransform


def _symmetric(model: DRCRNet) -> DRCRNet:
    """Make every 3×3 kernel invariant under the dihedral group, so the network is flip/transpose-equivariant
    (pads, 2×2/4×4 pooling, bilinear upsampling and the CRMs' global means already are)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4 and p.shape[-1] == 3:
                views = [untransform(p, k) for k in range(8)]
                p.copy_(torch.stack(views).mean(0))
    return model


def test_transform_round_trip_and_distinct_views() -> None:
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    seen = set()
    for k in range(len(ENSEMBLE_TRANSFORMS)):
        torch.testing.assert_close(untransform(transform(x, k), k), x, rtol=0, atol=0)
        seen.add(transform(x, k).flatten().numpy().tobytes())
    assert len(seen) == 8


@pytest.mark.parametrize("ensemble", [2, 4, 8])
def test_ensemble_equals_plain_model_when_the_model_is_equivariant(ensemble: int) -> None:
    torch.manual_seed(0)
    model = _symmetric(DRCRNet(channels=8, n_blocks=2).eval())
    x = torch.rand(2, 3, 16, 24).numpy()
    plain = forward(model, x)
    np.testing.assert_allclose(forward(model, x, ensemble=ensemble), plain, rtol=1e-4, atol=1e-5 * np.abs(plain).max())


def test_ensemble_differs_for_an_ordinary_model() -> None:
    torch.manual_seed(0)
    model = DRCRNet(channels=8, n_blocks=2).eval()
    x = torch.rand(1, 3, 16, 16).numpy()
    plain = forward(model, x)
    assert np.abs(forward(model, x, ensemble=8) - plain).max() > 1e-3 * np.abs(plain).max()
    with pytest.raises(ValueError, match="ensemble"):
        forward(model, x, ensemble=3)


def test_ensemble_tiles_with_global_statistics_equal_the_whole_image_ensemble() -> None:
    """Each member sees a flipped image with its own block-input means; gathered per member, tiles stay exact."""
    from fixtures.models import sensitive_model
    from test_recalibration import _image  # tests/unit is on sys.path (pytest prepend)

    from pipeline.statistics import gather_statistics, windows_to_batch
    from pipeline.tiling import crop_core, extract_window, plan_tiles, stitch

    model = sensitive_model(2)
    img = _image(96, 88, seed=2)
    whole = reconstruct(img, model, mode="pad", ensemble=4).transpose(2, 0, 1)
    x = img.astype(np.float32) / np.float32(img.max())
    tiles = plan_tiles(96, 88, max_tile_pixels=1, tile_core=16, halo=36)
    state = gather_statistics(model, x, tiles, scale=1.0, ensemble=4)
    assert state.means is not None and state.means.shape[0] == 4
    cores = []
    for t in tiles:
        y = forward(model, windows_to_batch([extract_window(x, t)], 1.0), means=state.means, ensemble=4)[0]
        cores.append((t, crop_core(y, t)))
    tiled = stitch(cores, 96, 88, 31)
    assert np.abs(tiled - whole).max() <= 1e-3 * np.abs(whole).max()


def test_ensemble_is_recorded_in_provenance() -> None:
    from drcr_model import default_weights
    from pipeline.config import JobSpec
    from pipeline.sources import ImageRef
    from pipeline.work import ImageMeta, JobContext, _provenance

    spec = JobSpec.from_dict({"inputs": ["x"], "output": "out", "inference": {"ensemble": 8}})
    w = default_weights().to_record()
    ctx = JobContext(spec=spec, weights=w, fingerprint=spec.fingerprint(w["sha256"]), run_id="r")
    meta = ImageMeta(ref=ImageRef(source="x.png", member=None, kind="file"), group="g")
    assert _provenance(ctx, meta, None)["inference"]["ensemble"] == 8
    plain = JobSpec.from_dict({"inputs": ["x"], "output": "out"})
    assert plain.fingerprint(w["sha256"]) != spec.fingerprint(w["sha256"])  # resume sees the change
