"""Previews of a cube: an sRGB rendering of its spectra, made tile by tile, as a small multiscale pyramid.

Rendering: each pixel's spectrum is taken as a reflectance lit by CIE illuminant D65 and seen by the
CIE 1931 2° standard observer (``XYZ = Σ c(λ)·D65(λ)·x̄ȳz̄(λ) / Σ D65(λ)·ȳ(λ)``, 10 nm steps), then
IEC 61966-2-1 sRGB (linear matrix, D65 white, clipped, gamma-encoded to 8 bits). The tables ship as
``pipeline/data/cie1931_2deg_d65_400_700_10nm.csv`` (written once from colour-science by
``scripts/make_colour_tables.py``). The mapping is fixed, without auto-exposure, so every tile renders
alone and a preview's pixels mean the same thing in every cube.

Storage: ``<group>/preview/`` holds arrays ``0``, ``1``, ``2`` (3 × H/2^k × W/2^k uint8, levels averaged
in linear light; OME-NGFF-style ``multiscales`` attribute) and ``input`` (the model's input RGB at the
coarsest level, for side-by-side views). Each level's chunks are the cube's chunk / 2^k, so a tile core
(a whole number of cube chunks) writes whole chunks at every level and no two writers share one.
Dimension names differ per level (``y_1``, …) so ``xarray.open_datatree`` opens the tree.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.abc.store import Store

__all__ = [
    "LEVELS",
    "PREVIEW",
    "colour_tables",
    "render_srgb",
    "downsample",
    "create_preview",
    "write_preview_regions",
    "thumbnail_png",
]

LEVELS = 3
"""Pyramid levels: factors 1, 2, 4 (the cube's chunk, a multiple of 4, divides into every level)."""

PREVIEW = "preview"
"""The child group of a cube group holding its preview."""

ILLUMINANT = "D65"
OBSERVER = "CIE 1931 2 degree standard observer"

_XYZ_TO_SRGB = np.array(
    [[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560], [0.0556434, -0.2040259, 1.0572252]]
)
"""IEC 61966-2-1 XYZ (D65) → linear sRGB."""


@functools.cache
def colour_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wavelengths (31,) nm, colour matching functions (31, 3) and D65 (31,) from the shipped CSV."""
    text = resources.files("pipeline").joinpath("data", "cie1931_2deg_d65_400_700_10nm.csv").read_text("utf-8")
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    table = np.loadtxt(rows[1:], delimiter=",", dtype=np.float64)
    return table[:, 0], table[:, 1:4], table[:, 4]


@functools.cache
def _render_matrix(bands: tuple[float, ...]) -> np.ndarray:
    """(3, bands) float32: spectrum → linear sRGB under D65."""
    wl, cmf, d65 = colour_tables()
    b = np.asarray(bands, dtype=np.float64)
    if b.min() < wl[0] or b.max() > wl[-1]:
        raise ValueError(f"preview tables cover {wl[0]:g}–{wl[-1]:g} nm, the cube's bands are {b.min():g}–{b.max():g}")
    cmf_b = np.stack([np.interp(b, wl, cmf[:, i]) for i in range(3)], axis=1)
    d65_b = np.interp(b, wl, d65)
    to_xyz = (cmf_b * d65_b[:, None]).T / float(np.dot(d65_b, cmf_b[:, 1]))  # 3 × bands, white Y = 1
    return (_XYZ_TO_SRGB @ to_xyz).astype(np.float32)


def render_linear(cube: np.ndarray, bands: Sequence[float]) -> np.ndarray:
    """bands × h × w spectra → 3 × h × w linear sRGB float32 (non-finite values render black)."""
    c = np.nan_to_num(np.asarray(cube, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    m = _render_matrix(tuple(float(v) for v in bands))
    return np.tensordot(m, c, axes=1)


def encode_srgb(linear: np.ndarray) -> np.ndarray:
    """Linear sRGB (any shape, float) → 8-bit sRGB (IEC 61966-2-1 transfer function, clipped to [0, 1])."""
    x = np.clip(linear, 0.0, 1.0)
    v = np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)
    return np.round(v * 255.0).astype(np.uint8)


def render_srgb(cube: np.ndarray, bands: Sequence[float]) -> np.ndarray:
    """bands × h × w spectra → 3 × h × w uint8 sRGB."""
    return encode_srgb(render_linear(cube, bands))


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Block means of a C × h × w array over ``factor``² blocks (a partial last block: the mean of what it
    has), C × ceil(h/f) × ceil(w/f) float32."""
    if factor == 1:
        return image.astype(np.float32, copy=False)
    _, h, w = image.shape
    ys, xs = np.arange(0, h, factor), np.arange(0, w, factor)
    s = np.add.reduceat(np.add.reduceat(image.astype(np.float32), ys, axis=1), xs, axis=2)
    ny = np.diff(np.append(ys, h)).astype(np.float32)
    nx = np.diff(np.append(xs, w)).astype(np.float32)
    return s / (ny[:, None] * nx[None, :])


def _level_shape(height: int, width: int, k: int) -> tuple[int, int]:
    f = 2**k
    return -(-height // f), -(-width // f)


def _create_level(pv: zarr.Group, name: str, k: int, *, height: int, width: int, chunk: int) -> None:
    """One uint8 RGB array of pyramid level ``k`` (``2**k`` times coarser than the cube)."""
    h, w = _level_shape(height, width, k)
    c = max(1, chunk // 2**k)
    pv.create_array(
        name,
        shape=(3, h, w),
        chunks=(3, min(c, h), min(c, w)),
        dtype="uint8",
        fill_value=0,
        compressors=[zarr.codecs.ZstdCodec(level=3)],
        dimension_names=("rgb", f"y_{k}", f"x_{k}"),
    )


def create_preview(group: zarr.Group, *, height: int, width: int, chunk: int) -> None:
    """Create ``<group>/preview`` and its level arrays (filled with 0: black until written)."""
    pv = group.create_group(PREVIEW, overwrite=True)
    datasets: list[Any] = []
    for k in range(LEVELS):
        _create_level(pv, str(k), k, height=height, width=width, chunk=chunk)
        datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1, 2**k, 2**k]}]})
    _create_level(pv, "input", LEVELS - 1, height=height, width=width, chunk=chunk)
    pv.attrs.put(
        {
            "title": "sRGB rendering of the cube's spectra",
            "comment": f"spectra as reflectance under CIE {ILLUMINANT}, {OBSERVER}, IEC 61966-2-1 sRGB, 8 bit; "
            "'input': the model's input RGB at the coarsest level",
            "illuminant": ILLUMINANT,
            "observer": OBSERVER,
            "multiscales": [
                {
                    "version": "0.5",
                    "name": "preview",
                    "axes": [
                        {"name": "c", "type": "channel"},
                        {"name": "y", "type": "space"},
                        {"name": "x", "type": "space"},
                    ],
                    "datasets": datasets,
                }
            ],
        }
    )


def write_preview_regions(
    store: Store,
    group: str,
    regions: Sequence[tuple[int, int, np.ndarray, np.ndarray]],
    bands: Sequence[float],
) -> None:
    """Render and write the preview of tile cores.

    Args:
        store: the cubes' store.
        group: the cube group's path.
        regions: ``(y0, x0, core, rgb)``: the core's top-left in the image (multiples of the cube's chunk
            unless the core is the whole image), its spectra (bands × h × w) and the model's input there
            (3 × h × w float in [0, 1]).
        bands: the band centres, nm.
    """
    pv = zarr.open_group(store, path=f"{group}/{PREVIEW}", mode="r+")
    arrays = [pv[str(k)] for k in range(LEVELS)]
    inp = pv["input"]
    for y0, x0, core, rgb in regions:
        linear = render_linear(core, bands)
        for k, arr in enumerate(arrays):
            f = 2**k
            level = encode_srgb(downsample(linear, f))
            arr[:, y0 // f : y0 // f + level.shape[1], x0 // f : x0 // f + level.shape[2]] = level  # type: ignore[index]
        f = 2 ** (LEVELS - 1)
        small = np.round(np.clip(downsample(np.asarray(rgb), f), 0, 1) * 255).astype(np.uint8)
        inp[:, y0 // f : y0 // f + small.shape[1], x0 // f : x0 // f + small.shape[2]] = small  # type: ignore[index]


THUMBNAIL_OVERSAMPLE = 4
"""A preview array wider or taller than this × ``max_side`` is first reduced by block means, strip by strip,
to about that size: the coarsest level of a 1 GP cube is 8000² (190 MB, 250 MB more as a Pillow image), and
the thumbnail is made where the run finishes, beside the other images' work."""


def thumbnail_png(store: Store, group: str, *, array: str = str(LEVELS - 1), max_side: int = 256) -> bytes:
    """A PNG (at most ``max_side`` px a side) of a preview array (the coarsest level by default; ``input``
    for the model's input), resampled by Lanczos from the array, or from its block means
    (:data:`THUMBNAIL_OVERSAMPLE`) when it is large: memory stays a few strips of the array."""
    from PIL import Image

    arr = zarr.open_array(store, path=f"{group}/{PREVIEW}/{array}", mode="r")
    img = Image.fromarray(np.ascontiguousarray(_reduced(arr, max_side).transpose(1, 2, 0)), mode="RGB")
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _reduced(arr: zarr.Array, max_side: int) -> np.ndarray:
    """A 3 × h × w uint8 preview array, whole if at most ``THUMBNAIL_OVERSAMPLE × max_side`` a side, else its
    ``f``² block means (``f`` the smallest factor that brings it there), read a strip of whole blocks and
    chunks at a time."""
    _, h, w = arr.shape
    f = -(-max(h, w) // (THUMBNAIL_OVERSAMPLE * max_side))
    if f <= 1:
        return np.asarray(arr[:])
    step = f * max(1, -(-int(arr.chunks[1]) // f))  # whole blocks, at least one chunk row
    strips = [downsample(np.asarray(arr[:, y0 : y0 + step, :]), f) for y0 in range(0, h, step)]
    return np.round(np.concatenate(strips, axis=1)).astype(np.uint8)


def describe() -> dict[str, Any]:
    """What the rendering is, for provenance."""
    return {"illuminant": ILLUMINANT, "observer": OBSERVER, "levels": LEVELS, "space": "sRGB (IEC 61966-2-1)"}


THUMBNAILS_DIR = "previews"
"""``<output>/previews/<group>.png`` (the rendering) and ``<group>.input.png`` (the model's input)."""


def thumbnail_paths(output: str, group: str) -> tuple[str, str]:
    """URLs of a cube's two thumbnails (rendering, input)."""
    from pipeline import storage

    base = storage.join(output, THUMBNAILS_DIR, group)
    return base + ".png", base + ".input.png"


def write_thumbnails(store: Store, output: str, group: str, storage_options: Any = None) -> tuple[str, str]:
    """Write a cube's two PNG thumbnails (from its preview's coarsest level); returns their URLs."""
    from pipeline import storage

    urls = thumbnail_paths(output, group)
    for url, array in zip(urls, (str(LEVELS - 1), "input")):
        fs, path = storage.open_fs(url, storage_options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, thumbnail_png(store, group, array=array))
    return urls
