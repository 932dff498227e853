"""Preprocessing and whole-image reconstruction of any size (spec §3.6, §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drcr_model.inference import forward, preprocess, reconstruct, select_device
from drcr_model.net import DRCRNet

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model() -> DRCRNet:
    torch.manual_seed(11)
    return DRCRNet(3, 31, 8, 1).eval()


def rgb_image(h: int, w: int, seed: int = 0, dtype: type = np.uint8) -> np.ndarray:
    hi = 256 if dtype == np.uint8 else 65536
    return np.random.default_rng(seed).integers(0, hi, (h, w, 3)).astype(dtype)


def run(model: DRCRNet, x_chw: np.ndarray) -> np.ndarray:
    """One direct pass of the model: 3×h×w float32 → 31×h×w float32."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_chw))[None])[0].numpy()


# --- preprocess ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_preprocess_divides_by_image_max(dtype: type) -> None:
    rgb = rgb_image(5, 7, dtype=dtype) // 3  # max well below the dtype's range: not a division by 255/65535
    x = preprocess(rgb)
    assert x.dtype == np.float32 and x.shape == rgb.shape
    assert x.max() == 1.0
    np.testing.assert_array_equal(x, rgb.astype(np.float32) / np.float32(rgb.max()))


def test_preprocess_max_is_global_over_channels() -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0], rgb[0, 0, 2] = 50, 200
    x = preprocess(rgb)
    assert x[0, 0, 2] == 1.0 and x[1, 1, 0] == np.float32(0.25)


def test_preprocess_zero_image_stays_zero() -> None:
    x = preprocess(np.zeros((4, 4, 3), np.uint16))
    assert x.dtype == np.float32 and not x.any() and np.isfinite(x).all()


def test_preprocess_float_input() -> None:
    rgb = np.full((2, 3, 3), 0.5, np.float64)
    assert preprocess(rgb).dtype == np.float32 and preprocess(rgb).max() == 1.0


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 4), (3, 4, 4, 3)])
def test_preprocess_rejects_non_rgb(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="H×W×3"):
        preprocess(np.zeros(shape, np.uint8))


# --- reconstruct: shapes for every residue ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["authors", "pad"])
@pytest.mark.parametrize("h", [8, 9, 10, 11])
@pytest.mark.parametrize("w", [8, 9, 10, 11])
def test_reconstruct_any_size(model: DRCRNet, mode: str, h: int, w: int) -> None:
    cube = reconstruct(rgb_image(h, w), model, mode=mode)
    assert cube.shape == (h, w, 31)
    assert cube.dtype == np.float32
    assert cube.flags["C_CONTIGUOUS"]
    assert np.isfinite(cube).all()


def test_reconstruct_multiple_of_4_is_one_plain_pass(model: DRCRNet) -> None:
    rgb = rgb_image(8, 12)
    want = run(model, preprocess(rgb).transpose(2, 0, 1)).transpose(1, 2, 0)
    for mode in ("authors", "pad"):
        np.testing.assert_array_equal(reconstruct(rgb, model, mode=mode), want)


# --- authors mode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [6, 10, 14])
def test_authors_mode_reproduces_two_pass_procedure_bitwise(model: DRCRNet, h: int) -> None:
    """test.py: y1 = model(x[:, :, 0:H-2]), y2 = model(x[:, :, 2:H]); rows 0..H-3 from y1, last 2 from y2."""
    w = 12
    rgb = rgb_image(h, w, seed=h)
    x = preprocess(rgb).transpose(2, 0, 1)
    y1 = run(model, x[:, 0 : h - 2])
    y2 = run(model, x[:, 2:h])
    want = np.concatenate([y1, y2[:, -2:]], axis=1).transpose(1, 2, 0)
    got = reconstruct(rgb, model, mode="authors")
    assert got.shape == (h, w, 31)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("h", "w"), [(9, 8), (11, 8), (8, 10), (8, 11), (10, 9), (11, 11)])
def test_authors_mode_generalised_passes(model: DRCRNet, h: int, w: int) -> None:
    """Rows < H4 (cols < W4) from the pass anchored at 0; the last H%4 rows (W%4 cols) from the pass
    anchored at the end; the corner from the pass anchored at both ends."""
    rgb = rgb_image(h, w, seed=h * 100 + w)
    x = preprocess(rgb).transpose(2, 0, 1)
    h4, w4 = h - h % 4, w - w % 4
    want = np.empty((31, h, w), np.float32)
    for r0 in {0, h - h4}:
        for c0 in {0, w - w4}:
            y = run(model, x[:, r0 : r0 + h4, c0 : c0 + w4])
            rows = slice(0, h4) if r0 == 0 else slice(h4, h)
            cols = slice(0, w4) if c0 == 0 else slice(w4, w)
            want[:, rows, cols] = y[:, rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0]
    np.testing.assert_array_equal(reconstruct(rgb, model, mode="authors"), want.transpose(1, 2, 0))


def test_authors_mode_rejects_tiny_images(model: DRCRNet) -> None:
    with pytest.raises(ValueError, match="mode='pad'"):
        reconstruct(rgb_image(3, 8), model, mode="authors")


# --- pad mode -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(9, 10), (10, 11), (11, 8), (8, 9), (5, 6)])
def test_pad_mode_equals_reflect_pad_and_crop(model: DRCRNet, h: int, w: int) -> None:
    rgb = rgb_image(h, w, seed=3)
    x = preprocess(rgb).transpose(2, 0, 1)
    ph, pw = (-h) % 4, (-w) % 4
    padded = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect")
    # the same padding as torch's reflect pad (mirror without repeating the edge)
    torch_padded = torch.nn.functional.pad(torch.from_numpy(x)[None], (0, pw, 0, ph), mode="reflect")[0].numpy()
    np.testing.assert_array_equal(padded, torch_padded)
    want = run(model, padded)[:, :h, :w].transpose(1, 2, 0)
    np.testing.assert_array_equal(reconstruct(rgb, model, mode="pad"), want)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 3), (3, 3), (1, 9)])
def test_pad_mode_handles_tiny_images(model: DRCRNet, h: int, w: int) -> None:
    cube = reconstruct(rgb_image(h, w), model, mode="pad")
    assert cube.shape == (h, w, 31) and cube.dtype == np.float32 and np.isfinite(cube).all()


# --- options --------------------------------------------------------------------------------------------


def test_preprocessed_flag(model: DRCRNet) -> None:
    rgb = rgb_image(10, 9, dtype=np.uint16)
    np.testing.assert_array_equal(reconstruct(preprocess(rgb), model, preprocessed=True), reconstruct(rgb, model))


def test_uint8_and_uint16_of_same_scene_agree(model: DRCRNet) -> None:
    """Division by the image max makes the result independent of the bit depth's scale."""
    rgb8 = rgb_image(8, 8)
    rgb16 = rgb8.astype(np.uint16) * 257
    np.testing.assert_allclose(reconstruct(rgb8, model), reconstruct(rgb16, model), rtol=1e-5, atol=1e-6)


def test_channels_last_matches_fp32(model: DRCRNet) -> None:
    rgb = rgb_image(10, 12)
    np.testing.assert_allclose(
        reconstruct(rgb, model, channels_last=True), reconstruct(rgb, model), rtol=1e-4, atol=1e-5
    )


def test_forward_batch(model: DRCRNet) -> None:
    batch = np.random.default_rng(0).random((2, 3, 8, 4), dtype=np.float32)
    y = forward(model, batch)
    assert isinstance(y, np.ndarray) and y.shape == (2, 31, 8, 4) and y.dtype == np.float32
    with torch.no_grad():
        np.testing.assert_array_equal(y, model(torch.from_numpy(batch)).numpy())


def test_invalid_options(model: DRCRNet) -> None:
    rgb = rgb_image(8, 8)
    with pytest.raises(ValueError, match="mode must be one of"):
        reconstruct(rgb, model, mode="tile")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision must be one of"):
        reconstruct(rgb, model, precision="int8")


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_refused_on_cpu(model: DRCRNet, precision: str) -> None:
    with pytest.raises(ValueError, match="GPU path"):
        reconstruct(rgb_image(8, 8), model, precision=precision)


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(None).type == ("cuda" if CUDA else "cpu")
    assert select_device("auto") == select_device(None)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_precisions_close_to_cpu_fp32(model: DRCRNet, precision: str, channels_last: bool) -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rgb = rgb_image(10, 12)
    ref = reconstruct(rgb, model)
    gpu_model = DRCRNet(3, 31, 8, 1)
    gpu_model.load_state_dict(model.state_dict())
    gpu_model = gpu_model.cuda().eval()
    got = reconstruct(rgb, gpu_model, precision=precision, channels_last=channels_last)
    tol = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 3e-3}[precision]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=tol * max(1.0, float(np.abs(ref).max())), rtol=0)
