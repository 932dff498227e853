"""Data-parallel training through Ray Train (``TorchTrainer``); the only module of drcr_model that imports Ray.

Each worker builds the same in-memory data set (synthetic scenes are seeded, so this is deterministic),
trains on its shard of every epoch's permutation (``Trainer.batch_indices`` with its rank) with
``batch_size / num_workers`` patches, and gradients are averaged by DDP (gloo on CPU). Rank 0 writes the
checkpoints, in the same authors' format as single-process training, to ``out_dir`` and reports them to Ray.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from drcr_model.train import TrainConfig, Trainer, make_dataset

__all__ = ["train_with_ray"]

log = logging.getLogger(__name__)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    config = TrainConfig.from_dict(loop_config["config"])
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    trainer = Trainer(
        config,
        make_dataset(config),
        rank=rank,
        world_size=world,
        # CPU workers: no device move; DDP over gloo averages the gradients. The NPM's conv4_33/conv4_11
        # never take part in the forward pass (spec §3.2), so DDP must be told to expect unused parameters.
        wrap=lambda m: ray.train.torch.prepare_model(
            m, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True}
        ),
    )
    if loop_config.get("resume"):
        trainer.load(loop_config["resume"])
    out = Path(config.out_dir)
    until = config.total_iterations
    while trainer.iteration < until:
        stop = min(until, (trainer.iteration // config.checkpoint_every + 1) * config.checkpoint_every)
        losses = trainer.run(stop)
        metrics = {"iter": trainer.iteration, "epoch": trainer.epoch, "loss": float(sum(losses) / max(len(losses), 1))}
        if rank == 0:
            path = out / f"checkpoint_{trainer.iteration:08d}.pth"
            trainer.save(path)
            trainer.save(out / "last.pth")
            with tempfile.TemporaryDirectory() as tmp:
                trainer.save(Path(tmp) / "checkpoint.pth")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def train_with_ray(config: TrainConfig, *, resume: str | Path | None = None, storage_path: str | None = None) -> Any:
    """Train ``config`` on ``config.num_workers`` CPU workers with Ray Train; returns Ray's ``Result``.

    Uses the running Ray instance, or starts a local one (``ray.init`` is left to the caller otherwise).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if config.num_workers < 1:
        raise ValueError(f"num_workers={config.num_workers}: Ray training needs at least 1 worker")
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    out = Path(config.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(config.to_toml())
    # Workers may run in other directories: give them absolute paths.
    loop_config = {
        "config": {**config.to_dict(), "out_dir": str(out)},
        "resume": str(Path(resume).resolve()) if resume else None,
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="drcr_train", storage_path=storage_path or str(out / "ray")),
    )
    result = trainer.fit()
    log.info("Ray training finished: %s", result.metrics)
    return result
