"""The NTIRE 2022 RGB camera and the challenge's RGB simulation from spectral cubes.

Source: the organisers' utilities (github.com/boazarad/NTIRE2022_spectral, ``NTIRE2022Util.py`` and
``Conf.py``), summarised in ``shared/data/README.md``. The camera's quantum efficiency ships as
``drcr_model/data/ntire2022_rgb_camera_qe.csv`` (360–750 nm in 1 nm steps; columns R, G1, G2, B).
"""

from __future__ import annotations

import io
from functools import lru_cache
from importlib import resources

import numpy as np
from PIL import Image

__all__ = [
    "ANALOG_GAIN",
    "TYPICAL_SCENE_REFLECTIVITY",
    "DEFAULT_BANDS",
    "NTIRE2022_NPE",
    "NTIRE2022_JPEG_QUALITY",
    "CAMERAS",
    "ntire2022_camera_response",
    "camera_response",
    "project",
    "simulate_rgb",
    "encode_jpeg",
    "decode_image",
]

ANALOG_GAIN = np.array([2.2933984, 1.0, 1.62308182])
"""Per-channel analog gain applied to the R, G1, B quantum efficiencies (``Conf.ANALOG_CHANNEL_GAIN``)."""

TYPICAL_SCENE_REFLECTIVITY = 0.18
"""The simulated image is scaled so that its mean is this fraction of 255."""

DEFAULT_BANDS = np.arange(400, 701, 10)
"""The 31 ARAD_1K band centres, 400–700 nm in 10 nm steps."""

NTIRE2022_NPE = 750
"""Published sample shot-noise level (photo-electrons); close to, not equal to, the confidential one."""

NTIRE2022_JPEG_QUALITY = 65
"""Published sample JPEG quality; close to, not equal to, the confidential one."""

_QE_CSV = "ntire2022_rgb_camera_qe.csv"


@lru_cache(maxsize=1)
def _qe_table() -> tuple[np.ndarray, np.ndarray]:
    """Wavelengths (nm) and the R, G1, B quantum efficiencies (n×3) from the packaged CSV."""
    text = resources.files("drcr_model").joinpath("data", _QE_CSV).read_text(encoding="utf-8")
    lines = text.strip().splitlines()
    header = [h.strip() for h in lines[0].split(",")]
    table = np.loadtxt(lines[1:], delimiter=",", dtype=np.float64)
    cols = [header.index(name) for name in ("R", "G1", "B")]
    wl = table[:, header.index("Wavelength[nm]")]
    return wl, table[:, cols]


def ntire2022_camera_response(bands: np.ndarray | list[float] = DEFAULT_BANDS) -> np.ndarray:
    """The challenge camera's response at ``bands``: (len(bands), 3) float64, columns R, G, B.

    The R, G1 and B quantum efficiencies are linearly interpolated to ``bands`` (nm) and multiplied by
    :data:`ANALOG_GAIN`, as ``load_rgb_filter`` + ``projectHS`` do in the organisers' code.

    Raises:
        ValueError: if a band lies outside the CSV's 360–750 nm range (the organisers never extrapolate).
    """
    bands = np.asarray(bands, dtype=np.float64)
    wl, qe = _qe_table()
    if bands.ndim != 1 or bands.size == 0:
        raise ValueError(f"bands must be a non-empty 1-D array of wavelengths in nm, got shape {bands.shape}")
    if bands.min() < wl[0] or bands.max() > wl[-1]:
        raise ValueError(f"bands must lie within {wl[0]:g}–{wl[-1]:g} nm, got {bands.min():g}–{bands.max():g}")
    resampled = np.stack([np.interp(bands, wl, qe[:, c]) for c in range(3)], axis=1)
    return resampled * ANALOG_GAIN


CAMERAS = ("ntire2022",)
"""Cameras a weights record may name (``Weights.camera``)."""


def camera_response(camera: str, bands: np.ndarray | list[float] = DEFAULT_BANDS) -> np.ndarray:
    """The spectral response (len(bands), 3) float64 of a camera named in :data:`CAMERAS`."""
    if camera == "ntire2022":
        return ntire2022_camera_response(bands)
    raise ValueError(f"unknown camera {camera!r}; known: {CAMERAS}")


def project(cube: np.ndarray, bands: np.ndarray | list[float] = DEFAULT_BANDS) -> np.ndarray:
    """Project an H×W×bands cube through the camera response: H×W×3 float64, negatives clipped to 0."""
    cube = np.asarray(cube, dtype=np.float64)
    response = ntire2022_camera_response(bands)
    if cube.shape[-1] != response.shape[0]:
        raise ValueError(f"cube has {cube.shape[-1]} bands but {response.shape[0]} band wavelengths were given")
    return np.clip(cube @ response, 0.0, None)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """Encode an H×W×3 uint8 image as JPEG bytes with Pillow at ``quality`` (1–95)."""
    if not 1 <= int(quality) <= 95:
        raise ValueError(f"jpeg_quality must be in 1..95, got {quality}")
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes (JPEG, PNG, …) to an H×W×3 uint8 array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def simulate_rgb(
    cube: np.ndarray,
    bands: np.ndarray | list[float] = DEFAULT_BANDS,
    *,
    npe: float | None = None,
    jpeg_quality: int | None = None,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Simulate the challenge's RGB image of a spectral cube: H×W×3 uint8.

    The four documented steps (``createNoisyRGB`` then ``save_jpg`` in the organisers' code):

    1. project through :func:`ntire2022_camera_response` and clip negatives to 0;
    2. if ``npe`` is given, shot noise ``poisson(signal * npe) / npe`` (challenge sample: 750);
    3. scale so the image mean is ``0.18 * 255``, clip to [0, 255], cast to uint8 (truncation, as
       ``astype`` does);
    4. if ``jpeg_quality`` is given, JPEG-encode with Pillow at that quality and decode again (challenge
       sample: 65; the organisers used OpenCV, whose libjpeg output may differ in the last bits).

    Args:
        cube: H×W×len(bands) spectral radiance/reflectance, nominally [0, 1].
        bands: wavelength of each cube band in nm.
        npe: photo-electrons at signal 1; ``None`` switches noise off.
        jpeg_quality: JPEG quality 1–95; ``None`` switches JPEG off.
        seed: seed or generator for the Poisson noise.

    Raises:
        ValueError: if the projected image is all zero (its mean cannot be scaled).
    """
    rgb = project(cube, bands)
    if npe is not None:
        if npe <= 0:
            raise ValueError(f"npe must be positive or None, got {npe}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        rgb = rng.poisson(rgb * npe) / npe
    mean = rgb.mean()
    if mean <= 0:
        raise ValueError("simulate_rgb: the projected image is all zero; nothing to scale")
    rgb = rgb * (TYPICAL_SCENE_REFLECTIVITY / mean) * 255.0
    out = np.clip(rgb, 0, 255).astype(np.uint8)
    if jpeg_quality is not None:
        out = decode_image(encode_jpeg(out, jpeg_quality))
    return out
