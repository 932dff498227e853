"""Seeded synthetic hyperspectral scenes built from measured spectra, and paired RGB/cube data sets.

A scene is a warped Voronoi partition of the image into regions (hard edges between them). Each region
gets a measured reflectance spectrum, optionally blended across the region with a second one; the
result is lit by a measured illuminant, multiplied by a smooth shading field and a small texture, and
lifted by a small ambient term so that no value falls below ``floor``.

Measured spectra (no downloads, everything ships with installed packages):

- earthlib 1.x: 7,261 field/lab reflectance spectra (soil, vegetation, built materials, non-photosynthetic
  vegetation, burned) in the ENVI spectral library ``earthlib/data/spectra.sli`` (float32, one row per
  spectrum, 180 samples at the wavelengths listed in ``spectra.sli.hdr`` in micrometres; 400–700 nm are
  the first 31). The class of each row is in ``spectra.csv`` (``LEVEL_2``), in the same row order.
  We read the files directly rather than through ``earthlib.read`` to avoid its pandas/spectral imports.
- colour-science: the 24 ColorChecker patches (``ISO 17321-1``) and CIE/ISO illuminants.

Calibration pitfall (``shared/notes/calibration.md``): naive scenes are far darker than ARAD_1K, so
MRAE ends up measuring the floor. Here every cube is scaled so that its 99.5th percentile is
``peak`` (default 0.9) and an ambient term keeps values ≥ ``floor`` (default 0.01).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from drcr_model.camera import DEFAULT_BANDS, encode_jpeg, simulate_rgb

__all__ = [
    "SceneConfig",
    "SpectralLibrary",
    "load_spectral_library",
    "make_scene",
    "iter_scenes",
    "scene_seed",
    "write_paired_dataset",
    "ILLUMINANTS",
]

log = logging.getLogger(__name__)

ILLUMINANTS = (
    "D50", "D55", "D65", "D75", "A", "FL2", "FL7", "FL11", "LED-B3", "LED-BH1", "LED-V1", "HP1",
    "ISO 7589 Studio Tungsten", "ISO 7589 Photographic Daylight",
)  # fmt: skip
"""The 14 colour-science illuminants a scene draws from (daylight, tungsten, fluorescent, LED, HPS)."""

COLOURCHECKER = "ISO 17321-1"


@dataclass(frozen=True, kw_only=True)
class SpectralLibrary:
    """Measured spectra resampled to ``bands``.

    Attributes:
        bands: (B,) wavelengths in nm.
        reflectances: (N, B) float64 reflectances in [0, 1].
        groups: (N,) int group index per reflectance (earthlib ``LEVEL_2`` classes, then ColorChecker).
        group_names: name of each group index.
        illuminants: (M, B) float64 spectral power, each normalised to max 1 over ``bands``.
        illuminant_names: name of each illuminant row.
    """

    bands: np.ndarray
    reflectances: np.ndarray
    groups: np.ndarray
    group_names: tuple[str, ...]
    illuminants: np.ndarray
    illuminant_names: tuple[str, ...]


def _import_colour() -> Any:
    # colour-science warns on import when SciPy is absent; we only use its data, which needs no SciPy.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import colour
    return colour


def _earthlib_spectra(bands: np.ndarray) -> tuple[np.ndarray, list[str]]:
    data = resources.files("earthlib").joinpath("data")
    header = data.joinpath("spectra.sli.hdr").read_text(encoding="utf-8")

    def field(name: str) -> str:
        m = re.search(rf"^{name}\s*=\s*(\{{[^}}]*\}}|[^\n]*)", header, flags=re.MULTILINE)
        if m is None:
            raise RuntimeError(f"earthlib spectra.sli.hdr has no '{name}' field; unsupported earthlib version")
        return m.group(1).strip().strip("{}")

    samples, lines = int(field("samples")), int(field("lines"))
    if int(field("data type")) != 4 or int(field("byte order")) != 0:
        raise RuntimeError("earthlib spectra.sli is not little-endian float32; unsupported earthlib version")
    wl = np.array([float(v) for v in field("wavelength").split(",")])
    if "micro" in field("wavelength units").lower():
        wl = wl * 1000.0
    raw = np.frombuffer(data.joinpath("spectra.sli").read_bytes(), dtype="<f4").reshape(lines, samples)
    spectra = np.stack([np.interp(bands, wl, row) for row in raw.astype(np.float64)])
    rows = data.joinpath("spectra.csv").read_text(encoding="utf-8").strip().splitlines()
    cols = rows[0].split(",")
    level2 = [r.split(",")[cols.index("LEVEL_2")] for r in rows[1:]]
    if len(level2) != lines:
        raise RuntimeError("earthlib spectra.csv and spectra.sli disagree on the number of spectra")
    return spectra, level2


@lru_cache(maxsize=4)
def _library(bands_key: tuple[float, ...]) -> SpectralLibrary:
    bands = np.array(bands_key)
    colour = _import_colour()
    spectra, level2 = _earthlib_spectra(bands)
    cc = colour.SDS_COLOURCHECKERS[COLOURCHECKER]
    cc_spectra = np.stack([np.interp(bands, sd.wavelengths, sd.values) for sd in cc.values()])
    group_names = tuple(sorted(set(level2))) + ("colorchecker",)
    groups = np.array([group_names.index(g) for g in level2] + [len(group_names) - 1] * len(cc_spectra))
    refl = np.clip(np.concatenate([spectra, cc_spectra]), 0.0, 1.0)
    illum = []
    for name in ILLUMINANTS:
        sd = colour.SDS_ILLUMINANTS[name]
        v = np.interp(bands, sd.wavelengths, sd.values)
        illum.append(v / v.max())
    return SpectralLibrary(
        bands=bands,
        reflectances=refl,
        groups=groups,
        group_names=group_names,
        illuminants=np.stack(illum),
        illuminant_names=ILLUMINANTS,
    )


def load_spectral_library(bands: np.ndarray | list[float] = DEFAULT_BANDS) -> SpectralLibrary:
    """The measured reflectances and illuminants resampled (linearly) to ``bands`` nm; cached."""
    return _library(tuple(float(b) for b in np.asarray(bands)))


@dataclass(frozen=True, kw_only=True)
class SceneConfig:
    """How synthetic scenes look.

    Args:
        height: scene height in pixels (a multiple of 4 keeps it usable whole by DRCR Net).
        width: scene width in pixels.
        regions: (min, max) number of Voronoi regions.
        colorchecker_fraction: probability that a region takes a ColorChecker patch instead of earthlib.
        blend_fraction: probability that a region blends two spectra along a linear ramp.
        warp: amplitude of the smooth coordinate warp, as a fraction of the image size.
        shading: (min, max) of the smooth multiplicative shading field.
        texture: standard deviation of the multiplicative per-pixel texture.
        peak: the cube's 99.5th percentile after scaling (values above it are kept, up to 1).
        floor: minimum value of the cube (an ambient term); keeps MRAE meaningful.
    """

    height: int = 128
    width: int = 128
    regions: tuple[int, int] = (6, 24)
    colorchecker_fraction: float = 0.2
    blend_fraction: float = 0.3
    warp: float = 0.08
    shading: tuple[float, float] = (0.35, 1.0)
    texture: float = 0.03
    peak: float = 0.9
    floor: float = 0.01

    def __post_init__(self) -> None:
        if self.height < 4 or self.width < 4:
            raise ValueError(f"height and width must be ≥ 4, got {self.height}×{self.width}")
        if not 1 <= self.regions[0] <= self.regions[1]:
            raise ValueError(f"regions must be (min, max) with 1 ≤ min ≤ max, got {self.regions}")
        if not 0 < self.shading[0] <= self.shading[1]:
            raise ValueError(f"shading must be (min, max) with 0 < min ≤ max, got {self.shading}")
        if not 0 <= self.floor < self.peak <= 1:
            raise ValueError(f"need 0 ≤ floor < peak ≤ 1, got floor={self.floor}, peak={self.peak}")


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """A smooth random field in about [-1, 1]: bilinear upsampling of a cells×cells Gaussian grid."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    y = np.linspace(0, cells, h)
    x = np.linspace(0, cells, w)
    y0 = np.minimum(y.astype(int), cells - 1)
    x0 = np.minimum(x.astype(int), cells - 1)
    fy = (y - y0)[:, None]
    fx = (x - x0)[None, :]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    field = (1 - fy) * ((1 - fx) * g00 + fx * g01) + fy * ((1 - fx) * g10 + fx * g11)
    return field / max(np.abs(field).max(), 1e-12)


def _pick_reflectance(rng: np.random.Generator, lib: SpectralLibrary, cfg: SceneConfig) -> np.ndarray:
    if rng.random() < cfg.colorchecker_fraction:
        group = len(lib.group_names) - 1
    else:
        # Sample a class first so 4,185 soils do not swamp vegetation and built materials.
        group = int(rng.integers(0, len(lib.group_names) - 1))
    candidates = np.flatnonzero(lib.groups == group)
    return lib.reflectances[candidates[rng.integers(0, candidates.size)]]


def make_scene(
    seed: int, config: SceneConfig | None = None, bands: np.ndarray | list[float] = DEFAULT_BANDS
) -> np.ndarray:
    """One synthetic scene: H×W×len(bands) float32 in [floor, 1]; the same seed gives the same array."""
    cfg = config or SceneConfig()
    lib = load_spectral_library(bands)
    rng = np.random.default_rng(seed)
    h, w = cfg.height, cfg.width
    n = int(rng.integers(cfg.regions[0], cfg.regions[1] + 1))

    # Warped Voronoi labels: nearest seed point after a smooth displacement of the pixel grid.
    yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    wy = yy + cfg.warp * _smooth_field(rng, h, w, 3)
    wx = xx + cfg.warp * _smooth_field(rng, h, w, 3)
    pts = rng.random((n, 2))
    d2 = (wy[..., None] - pts[:, 0]) ** 2 + (wx[..., None] - pts[:, 1]) ** 2
    labels = np.argmin(d2, axis=-1)

    cube = np.empty((h, w, lib.bands.size), dtype=np.float64)
    for k in range(n):
        mask = labels == k
        if not mask.any():
            continue
        a = _pick_reflectance(rng, lib, cfg)
        if rng.random() < cfg.blend_fraction:
            b = _pick_reflectance(rng, lib, cfg)
            theta = rng.uniform(0, 2 * np.pi)
            ramp = np.cos(theta) * yy[mask] + np.sin(theta) * xx[mask]
            t = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-12)
            cube[mask] = (1 - t)[:, None] * a + t[:, None] * b
        else:
            cube[mask] = a

    illuminant = lib.illuminants[rng.integers(0, lib.illuminants.shape[0])]
    lo, hi = cfg.shading
    shading = lo + (hi - lo) * (0.5 + 0.5 * _smooth_field(rng, h, w, 2))
    texture = 1.0 + cfg.texture * rng.standard_normal((h, w))
    cube *= (shading * np.clip(texture, 0.5, 1.5))[..., None] * illuminant

    cube *= (cfg.peak - cfg.floor) / max(np.percentile(cube, 99.5), 1e-12)
    cube = np.clip(cube + cfg.floor, cfg.floor, 1.0)
    return cube.astype(np.float32)


def iter_scenes(
    n: int, seed: int, config: SceneConfig | None = None, bands: np.ndarray | list[float] = DEFAULT_BANDS
) -> Iterator[np.ndarray]:
    """``n`` scenes; scene ``i`` uses the seed sequence ``(seed, i)``, so subsets are reproducible."""
    for i in range(n):
        yield make_scene(scene_seed(seed, i), config, bands)


def scene_seed(seed: int, index: int) -> int:
    """Seed of scene ``index`` of a data set seeded with ``seed`` (independent streams per index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_paired_dataset(
    root: str | Path,
    n: int,
    *,
    seed: int,
    config: SceneConfig | None = None,
    bands: np.ndarray | list[float] = DEFAULT_BANDS,
    npe: float | None = None,
    jpeg_quality: int | None = None,
    split: str = "Train",
    prefix: str = "SYN",
) -> list[str]:
    """Write ``n`` scenes in the ARAD_1K layout and return their names.

    Layout (as the challenge's, spec §5): ``{root}/{split}_spectral/{name}.mat`` is HDF5 (MATLAB v7.3
    style) with dataset ``cube`` stored as bands×W×H, i.e. the H×W×bands array transposed as MATLAB
    writes it, plus ``bands`` (nm); ``{root}/{split}_RGB/{name}.jpg`` is the simulated RGB image
    (``.png`` when ``jpeg_quality`` is None, so the clean input stays lossless). Writes are idempotent:
    the same arguments give the same files.
    """
    import h5py

    root = Path(root)
    spec_dir, rgb_dir = root / f"{split}_spectral", root / f"{split}_RGB"
    spec_dir.mkdir(parents=True, exist_ok=True)
    rgb_dir.mkdir(parents=True, exist_ok=True)
    bands_arr = np.asarray(bands, dtype=np.float64)
    names = []
    for i in range(n):
        name = f"{prefix}_{seed}_{i:04d}"
        s_seed = scene_seed(seed, i)
        cube = make_scene(s_seed, config, bands_arr)
        rgb = simulate_rgb(cube, bands_arr, npe=npe, seed=s_seed)
        with h5py.File(spec_dir / f"{name}.mat", "w") as f:
            f.create_dataset("cube", data=cube.T)
            f.create_dataset("bands", data=bands_arr[None, :])
        if jpeg_quality is None:
            from PIL import Image

            Image.fromarray(rgb).save(rgb_dir / f"{name}.png")
        else:
            (rgb_dir / f"{name}.jpg").write_bytes(encode_jpeg(rgb, jpeg_quality))
        names.append(name)
    log.info("wrote %d synthetic scenes to %s", n, root)
    return names


def main(argv: list[str] | None = None) -> int:
    """``python -m drcr_model.scenes OUT --n 16 --seed 0 [--size 256] [--npe 750 --jpeg-quality 65]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m drcr_model.scenes", description="Write synthetic scenes in the ARAD_1K layout."
    )
    p.add_argument("out", help="output folder (gets {split}_spectral/ and {split}_RGB/)")
    p.add_argument("--n", type=int, default=16, help="number of scenes")
    p.add_argument("--seed", type=int, default=0, help="data-set seed")
    p.add_argument("--size", type=int, default=256, help="scene height and width, pixels")
    p.add_argument("--npe", type=float, default=None, help="shot noise (challenge sample: 750); default off")
    p.add_argument("--jpeg-quality", type=int, default=None, help="JPEG quality (challenge sample: 65); default PNG")
    p.add_argument("--split", default="Train", help="split folder prefix")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = SceneConfig(height=args.size, width=args.size)
    except ValueError as e:
        log.error("%s", e)
        return 2
    write_paired_dataset(
        args.out, args.n, seed=args.seed, config=config, npe=args.npe, jpeg_quality=args.jpeg_quality, split=args.split
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
