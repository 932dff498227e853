"""QA without ground truth (pipeline.qa), checked where the answer is known: a ground-truth scene cube
scored against its own noise-free RGB is consistent (≈ 0), a corrupted one is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drcr_model.camera import DEFAULT_BANDS, camera_response, simulate_rgb
from drcr_model.inference import preprocess
from drcr_model.scenes import SceneConfig, make_scene
from pipeline import qa
from pipeline.tiling import plan_tiles

RESPONSE = camera_response("ntire2022", DEFAULT_BANDS)


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    """A ground-truth cube (bands × H × W) and the model input its noise-free, JPEG-free RGB gives (3 × H × W)."""
    cube = make_scene(3, SceneConfig(height=96, width=128))  # H × W × bands
    rgb = simulate_rgb(cube, DEFAULT_BANDS, npe=None, jpeg_quality=None)
    return np.ascontiguousarray(cube.transpose(2, 0, 1)), preprocess(rgb).transpose(2, 0, 1)


def _score(cube: np.ndarray, x: np.ndarray, tiles: int = 1, thresholds: dict[str, float] | None = None) -> qa.QAResult:
    _, h, w = cube.shape
    if tiles == 1:
        parts = [qa.tile_stats([x], [cube], RESPONSE)]
    else:
        plan = plan_tiles(h, w, max_tile_pixels=16, tile_core=32, halo=0)
        # one batch per two tiles, as the predictor would send them
        parts = []
        for i in range(0, len(plan), 2):
            ts = plan[i : i + 2]
            ys = [t.core_slices for t in ts]
            parts.append(qa.tile_stats([x[:, a, b] for a, b in ys], [cube[:, a, b] for a, b in ys], RESPONSE))
    return qa.summarize(qa.reduce_stats(parts), thresholds)


def test_ground_truth_cube_is_consistent_with_its_own_rgb(scene: tuple[np.ndarray, np.ndarray]) -> None:
    cube, x = scene
    r = _score(cube, x)
    assert r.backprojection_mrae is not None and r.backprojection_rmse is not None
    assert r.backprojection_mrae < 0.02  # 8-bit truncation only
    assert r.backprojection_rmse < 0.005
    assert r.nonfinite_fraction == 0 and r.flags == []


def test_tiles_reduce_to_the_whole_image(scene: tuple[np.ndarray, np.ndarray]) -> None:
    cube, x = scene
    whole, tiled = _score(cube, x), _score(cube, x, tiles=12)
    assert tiled.backprojection_mrae == pytest.approx(whole.backprojection_mrae, rel=1e-9)
    assert tiled.backprojection_rmse == pytest.approx(whole.backprojection_rmse, rel=1e-6)
    assert tiled.mean_spectrum == pytest.approx(whole.mean_spectrum, rel=1e-6)


def test_exposure_is_fitted_not_penalised(scene: tuple[np.ndarray, np.ndarray]) -> None:
    cube, x = scene
    base = _score(cube, x)
    brighter = _score(cube * 3.7, x)
    assert brighter.backprojection_mrae == pytest.approx(base.backprojection_mrae, abs=1e-3)
    assert brighter.exposure_scale == pytest.approx(base.exposure_scale / 3.7, rel=1e-2)


def test_corrupted_cubes_score_large(scene: tuple[np.ndarray, np.ndarray]) -> None:
    cube, x = scene
    rng = np.random.default_rng(0)
    shuffled = cube[::-1]  # bands reversed: spectra no longer explain the colours
    noisy = cube * rng.uniform(0.2, 1.8, size=cube.shape[1:])
    for bad in (shuffled, noisy, np.zeros_like(cube)):
        r = _score(bad, x)
        assert r.backprojection_mrae is not None and r.backprojection_mrae > 0.15


def test_mrae_matches_a_brute_force_fit(scene: tuple[np.ndarray, np.ndarray]) -> None:
    """The histogram fit equals minimising the MRAE over the scale directly on the values."""
    cube, x = scene
    rng = np.random.default_rng(1)
    bad = cube * rng.uniform(0.5, 1.5, size=cube.shape[1:])
    r = _score(bad, x)
    p = np.tensordot(RESPONSE.T, bad, axes=1).ravel()
    xv = x.ravel()
    keep = xv >= qa.MIN_INPUT
    scales = np.linspace(0.5, 2.0, 3001) * r.exposure_scale
    brute = min(float(np.mean(np.abs(s * p[keep] - xv[keep]) / xv[keep])) for s in scales)
    assert r.backprojection_mrae == pytest.approx(brute, rel=2e-3)


def test_fractions_and_nonfinite_fail(scene: tuple[np.ndarray, np.ndarray]) -> None:
    cube, x = scene
    bad = cube.copy()
    bad[:, :10, :10] = np.nan
    bad[0, 50:60, :] = -0.5
    bad[1, 50:60, :] = 2.0
    r = _score(bad, x)
    n = bad.size
    assert r.nonfinite_fraction == pytest.approx(31 * 100 / n)
    assert r.negative_fraction == pytest.approx(10 * 128 / n)
    assert r.above_one_fraction == pytest.approx((10 * 128 + np.count_nonzero(cube > 1)) / n)
    assert r.backprojection_mrae is not None  # the finite pixels are still scored
    with pytest.raises(qa.QAError, match="not finite") as err:
        qa.check(r, fail_on_flags=False, label="img.png")
    assert "img.png" in str(err.value) and err.value.qa["nonfinite_fraction"] > 0


def test_all_nan_cube_fails_with_no_scores(scene: tuple[np.ndarray, np.ndarray]) -> None:
    cube, x = scene
    r = _score(np.full_like(cube, np.nan), x)
    assert r.nonfinite_fraction == 1.0 and r.backprojection_mrae is None and r.backprojection_rmse is None
    with pytest.raises(qa.QAError):
        qa.check(r, fail_on_flags=False, label="x")


def test_thresholds_flag_or_fail(scene: tuple[np.ndarray, np.ndarray]) -> None:
    cube, x = scene
    r = _score(cube[::-1], x, thresholds={"backprojection_mrae": 0.05, "negative_fraction": 0.5})
    assert len(r.flags) == 1 and r.flags[0].startswith("backprojection_mrae ")
    qa.check(r, fail_on_flags=False, label="x")  # flag only
    with pytest.raises(qa.QAError, match="threshold"):
        qa.check(r, fail_on_flags=True, label="x")
    cols = qa.manifest_columns(r.to_dict())
    assert cols["qa_flags"] == r.flags[0] and cols["qa_backprojection_mrae"] == r.backprojection_mrae


def test_qa_spec_thresholds() -> None:
    from pipeline.config import JobSpec, QASpec
    from pipeline.errors import ConfigError

    assert QASpec().thresholds() == {}
    spec = JobSpec.from_dict(
        {"inputs": ["a.png"], "output": "o", "qa": {"max_backprojection_mrae": 0.3, "on_exceed": "fail"}}
    )
    assert spec.qa.thresholds() == {"backprojection_mrae": 0.3}
    assert JobSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="qa.on_exceed"):
        QASpec(on_exceed="warn")


def test_predictor_with_nan_weights_never_completes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint with NaN weights: the predictor's output is all NaN, finish_image refuses to mark it."""
    from drcr_model import Weights
    from drcr_model.checkpoint import sha256_of
    from drcr_model.net import DRCRNet
    from pipeline import cubes
    from pipeline.config import JobSpec
    from pipeline.errors import InputError
    from pipeline.sources import ImageRef
    from pipeline.work import JobContext, Predictor, finish_image, prepare_image

    torch.manual_seed(0)
    model = DRCRNet(in_channels=3, out_channels=31, channels=8, n_blocks=1)
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "nan.pt"
    torch.save(state, ckpt)
    w = Weights(name="nan", url=str(ckpt), sha256=sha256_of(ckpt.read_bytes()), config=dict(channels=8, n_blocks=1))
    img = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(img)
    # The error-bounded default refuses to store NaN at the write already (the batch fails, naming them):
    spec = JobSpec.from_dict({"inputs": [str(img)], "output": str(tmp_path / "out0")})
    ctx = JobContext(spec=spec, weights=w.to_record(), fingerprint="f", run_id="r")
    items = list(prepare_image(ctx, ImageRef(source=str(img), member=None, kind="file")))
    with pytest.raises(InputError, match="NaN/inf values"):
        Predictor(ctx, device="cpu").run(items[0].group, items[0].scale, items[0].tiles, items[1:])  # type: ignore[union-attr, arg-type]
    # float16 storage writes NaN; QA then refuses the marker.
    spec = JobSpec.from_dict(
        {"inputs": [str(img)], "output": str(tmp_path / "out"), "output_options": {"max_error": 0.0}}
    )
    ctx = JobContext(spec=spec, weights=w.to_record(), fingerprint="f", run_id="r")
    items = list(prepare_image(ctx, ImageRef(source=str(img), member=None, kind="file")))
    meta, windows = items[0], items[1:]
    result = Predictor(ctx, device="cpu").run(meta.group, meta.scale, meta.tiles, windows)  # type: ignore[union-attr, arg-type]
    with pytest.raises(qa.QAError, match="100.00% of the cube's values are not finite"):
        finish_image(ctx, meta, [result])  # type: ignore[arg-type]
    status = cubes.read_status(cubes.open_cubes(spec.output), meta.group)  # type: ignore[union-attr]
    assert status is not None and status["complete"] is False
