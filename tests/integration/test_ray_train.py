"""Data-parallel training through Ray Train on 2 CPU workers for a few steps (local Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drcr_model.train import DataConfig, ModelConfig, TrainConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_two_cpu_workers_train_and_checkpoint(tmp_path: Path, local_ray) -> None:
    from drcr_model.distributed import train_with_ray

    cfg = TrainConfig(
        model=ModelConfig(channels=8, n_blocks=1),
        data=DataConfig(n_scenes=2, scene_size=16, patch_size=8, stride=8),
        lr=1e-3,
        max_iter=100,
        iterations=4,
        batch_size=4,
        checkpoint_every=2,
        log_every=2,
        threads=1,
        num_workers=2,
        out_dir=str(tmp_path / "run"),
    )
    result = train_with_ray(cfg, storage_path=str(tmp_path / "ray"))
    assert result.error is None
    assert result.metrics["iter"] == 4
    obj = torch.load(tmp_path / "run" / "last.pth", map_location="cpu", weights_only=True)
    assert obj["iter"] == 4
    assert not any(k.startswith("module.") for k in obj["state_dict"])  # DDP prefix stripped
    assert result.checkpoint is not None
