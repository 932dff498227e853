"""Same job, different worker counts (1, 2, an elastic pool) → byte-identical cubes; the driver never holds a
cube; pools the cluster cannot hold are clear errors."""

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


@pytest.mark.parametrize("statistics", ["global", "tile"])
def test_cubes_identical_whatever_the_number_of_actors(tmp_path, ray_local, statistics) -> None:  # type: ignore[no-untyped-def]
    """Both ways a tiled image travels: one row per image, its statistics gathered on the actor that takes it
    (``global``), and per-image batches of windows spread over the pool (``tile``)."""
    from pipeline.execution import run_job

    rng = np.random.default_rng(3)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.fromarray(sample_image(rng, 40 + 8 * i, 36 + 4 * i)).save(src / f"im{i}.png")
    digests = []
    pools = {"1": {"actors": 1}, "2": {"actors": 2}, "elastic": {"min_actors": 1, "max_actors": 2}}
    for name, pool in pools.items():
        spec = JobSpec.from_dict(
            {
                "inputs": [str(src)],
                "output": str(tmp_path / f"out{name}"),
                "tiling": {"max_tile_pixels": 1600, "tile_core": 16, "halo": 8, "statistics": statistics},
                "output_options": {"chunk": 16},
                "ray": pool | {"num_cpus_per_actor": 0.5, "batch_size": 3, "max_images_in_flight": 3},
            }
        )
        summary = run_job(spec)
        assert summary.ok == 5 and summary.failed == 0
        assert (summary.pool["min_size"], summary.pool["max_size"]) == spec.ray.pool_size
        digests.append(_chunk_digests(tmp_path / f"out{name}" / "cubes.zarr"))
    assert len(digests[0]) > 5 * 2  # chunks of every image, tiled ones have several
    assert digests[0] == digests[1] == digests[2]


def test_too_many_actors_for_the_cluster_is_a_clear_error(tmp_path, ray_local) -> None:  # type: ignore[no-untyped-def]
    from pipeline.errors import ConfigError
    from pipeline.execution import run_job

    spec = JobSpec.from_dict(
        {"inputs": [str(tmp_path)], "output": str(tmp_path / "o"), "ray": {"actors": 2, "num_cpus_per_actor": 1}}
    )
    with pytest.raises(ConfigError, match="ray.actors"):
        run_job(spec)


def test_gpu_actors_on_a_cluster_without_gpus_wait_then_fail_clearly(tmp_path, ray_local, capsys) -> None:  # type: ignore[no-untyped-def]
    """A spec that asks for GPU actors on this CPU-only cluster waits ray.gpu_wait_s for a GPU (the
    autoscaler is asked for one), then fails with one clear line and exit status 1; nothing is written
    (at most the empty folder the released lease was taken in) and it never falls back to CPU actors."""
    import time

    from pipeline.cli import main
    from pipeline.sample import make_sample

    make_sample(tmp_path / "in", count=1)
    t0 = time.monotonic()
    rc = main(
        ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress",
         "--set", "ray.num_gpus_per_actor=1", "--set", "ray.gpu_wait_s=2"]
    )  # fmt: skip
    waited = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert err[-1] == (
        "drcr-pipeline: error: ConfigError: ray.num_gpus_per_actor = 1: the cluster has no GPU after waiting 2 s "
        "(ray.gpu_wait_s); add GPU nodes, raise ray.gpu_wait_s, or set ray.num_gpus_per_actor = 0 for CPU actors"
    ), err
    assert waited >= 2.0
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # the released lease leaves no file
