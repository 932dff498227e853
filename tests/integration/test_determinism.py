"""Same job, different worker counts → byte-identical cubes; the driver never holds a cube."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import JobSpec
from pipeline.sample import sample_image

pytestmark = pytest.mark.integration


def _chunk_digests(root: Path) -> dict[str, str]:
    """sha256 of every cube chunk and array metadata file (group attrs carry timestamps; left out)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and "/cube/" in f"/{rel}":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_cubes_identical_whatever_the_number_of_actors(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    from pipeline.execution import run_job

    rng = np.random.default_rng(3)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.fromarray(sample_image(rng, 40 + 8 * i, 36 + 4 * i)).save(src / f"im{i}.png")
    digests = []
    for actors in (1, 2):
        spec = JobSpec.from_dict(
            {
                "inputs": [str(src)],
                "output": str(tmp_path / f"out{actors}"),
                "tiling": {"max_tile_pixels": 1600, "tile_core": 16, "halo": 8},
                "output_options": {"chunk": 16},
                "ray": {"actors": actors, "num_cpus_per_actor": 0.5, "batch_size": 3, "max_images_in_flight": 3},
            }
        )
        summary = run_job(spec)
        assert summary.ok == 5 and summary.failed == 0
        digests.append(_chunk_digests(tmp_path / f"out{actors}" / "cubes.zarr"))
    assert len(digests[0]) > 5 * 2  # chunks of every image, tiled ones have several
    assert digests[0] == digests[1]


def test_too_many_actors_for_the_cluster_is_a_clear_error(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    from pipeline.errors import ConfigError
    from pipeline.execution import run_job

    spec = JobSpec.from_dict({"inputs": [str(tmp_path)], "output": str(tmp_path / "o"), "ray": {"actors": 2, "num_cpus_per_actor": 1}})
    with pytest.raises(ConfigError, match="ray.actors"):
        run_job(spec)
