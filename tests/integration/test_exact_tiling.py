"""Exact tiling through the Ray pipeline: with ``tiling.statistics = "global"`` a tiled image's cube equals
the whole-image run's (issue 14: max |tiled − whole| ≤ 1e-3 × the cube's peak)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from drcr_model import reconstruct
from drcr_model.checkpoint import sha256_of
from pipeline.config import JobSpec

pytestmark = pytest.mark.integration

SIZES = {"a.png": (100, 90), "b.png": (68, 136)}


def _model_and_weights(tmp_path: Path) -> tuple[torch.nn.Module, str, str]:
    """A seeded tiny DRCR whose gates depend strongly on the statistics, saved as a state_dict."""
    from fixtures.models import sensitive_model

    model = sensitive_model()
    path = tmp_path / "sensitive.pt"
    torch.save(model.state_dict(), path)
    return model, str(path), sha256_of(path.read_bytes())


def _run(tmp_path: Path, src: Path, weights: str, sha: str, statistics: str, halo: int | None) -> dict[str, np.ndarray]:
    import zarr

    from pipeline import cubes
    from pipeline.execution import run_job

    out = tmp_path / f"out-{statistics}"
    spec = JobSpec.from_dict(
        {
            "inputs": [str(src)],
            "output": str(out),
            "weights": {"path": weights, "sha256": sha},
            "tiling": {"max_tile_pixels": 1024, "tile_core": 16, "statistics": statistics}
            | ({} if halo is None else {"halo": halo}),
            "output_options": {"chunk": 16, "dtype": "float32"},
            "ray": {"actors": 2, "num_cpus_per_actor": 0.5, "batch_size": 3, "max_images_in_flight": 2},
        }
    )
    summary = run_job(spec)
    assert summary.ok == len(SIZES) and summary.failed == 0
    # The passes ran on the inference actors (their results carry the time), not in prepare tasks.
    assert (summary.compute["statistics_s"] > 0) == (statistics == "global"), summary.compute
    rows = pq.read_table(out / "manifest" / "manifest.parquet").to_pylist()
    store = cubes.open_cubes(str(out), {})
    got = {}
    for r in rows:
        attrs = cubes.read_status(store, r["group"]) or {}  # the provenance record decoded
        assert attrs[cubes.ATTR]["tiling"]["statistics"] == statistics
        assert attrs[cubes.ATTR]["tiling"]["tiles"] > 1
        # Unset, the halo follows the weights: 2 blocks, receptive radius 30 → 32.
        assert attrs[cubes.ATTR]["tiling"]["halo"] == (32 if halo is None else halo)
        got[Path(r["source"]).name] = np.asarray(zarr.open_array(store, path=f"{r['group']}/cube", mode="r")[:])
    return got


def test_global_statistics_cubes_equal_the_whole_image_run(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    model, weights, sha = _model_and_weights(tmp_path)
    rng = np.random.default_rng(5)
    src = tmp_path / "in"
    src.mkdir()
    wholes = {}
    for name, (h, w) in SIZES.items():
        coarse = rng.random((h // 16 + 2, w // 16 + 2, 3))
        img = (np.kron(coarse, np.ones((16, 16, 1)))[:h, :w] * 200 + rng.random((h, w, 3)) * 50).astype(np.uint8)
        Image.fromarray(img).save(src / name)
        wholes[name] = reconstruct(img, model, mode="pad").transpose(2, 0, 1)
    exact = _run(tmp_path, src, weights, sha, "global", None)
    per_tile = _run(tmp_path, src, weights, sha, "tile", 36)
    for name, whole in wholes.items():
        peak = float(np.abs(whole).max())
        assert np.abs(exact[name] - whole).max() <= 1e-3 * peak, name
        assert np.abs(per_tile[name] - whole).max() > 1e-2 * peak, name  # the statistics matter here
