"""Training DRCR Net, by default exactly at the authors' recipe (spec §5).

Defaults (``train/main.py`` of github.com/jojolee6513/DRCR-net): MRAE loss without epsilon; Adam lr 1e-4,
betas (0.9, 0.999), eps 1e-8, no weight decay; before step t the lr is ``lr · (1 − t/max_iter)^1.5``
(``max_iter`` 300k, held at 0 afterwards); batch 16, shuffled, last partial batch dropped; 128×128
patches at stride 64; no augmentation; default PyTorch initialisation.

Everything is configurable through :class:`TrainConfig` (frozen, keyword-only, loadable from and
written to TOML). Checkpoints use the authors' format, a dict with ``epoch``, ``iter``, ``state_dict``
(the DRCRNet names of spec §2, never a ``module.`` prefix) and ``optimizer``, plus ``rng`` (torch RNG
state) and ``config``. A resumed run continues in exactly the same state: the data order of each epoch
and every augmentation draw are pure functions of ``(seed, epoch, index)``, and the lr is a function of
the iteration, so nothing else needs restoring.

CLI: ``python -m drcr_model.train --config jobs/train_synthetic.toml [--resume CKPT] [--iterations N]``.
With ``num_workers > 0`` training runs data-parallel through Ray Train (see :mod:`drcr_model.distributed`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch

from drcr_model.camera import DEFAULT_BANDS, simulate_rgb
from drcr_model.checkpoint import CheckpointError, extract_state_dict, infer_config, load_state_dict
from drcr_model.datasets import Augment, Pair, PatchDataset, read_arad, read_paired_zarr
from drcr_model.net import DRCRNet

__all__ = [
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "Trainer",
    "build_pairs",
    "make_dataset",
    "poly_lr",
    "mrae_loss",
    "rmse_loss",
    "train",
    "save_checkpoint",
    "main",
]

log = logging.getLogger(__name__)

LOSSES = ("mrae", "mrae+l1", "l1", "mrae+rmse")
SOURCES = ("synthetic", "arad", "zarr")


def _check(cond: bool, field: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{field}={value!r}: {why}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """DRCRNet constructor arguments (the authors' NTIRE 2022 entry: 3, 31, 100, 10)."""

    in_channels: int = 3
    out_channels: int = 31
    channels: int = 100
    n_blocks: int = 10

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            _check(isinstance(v, int) and v >= 1, f"model.{f.name}", v, "must be a positive integer")
        _check(self.channels >= 8, "model.channels", self.channels, "must be ≥ 8 (CRM hidden width is channels // 8)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the training pairs come from and how they are cut into patches.

    Args:
        source: ``"synthetic"`` (scenes from :mod:`drcr_model.scenes`), ``"arad"`` or ``"zarr"``.
        url: folder / fsspec URL for ``arad`` and ``zarr``.
        split: ARAD split folder prefix.
        n_scenes: number of synthetic scenes.
        scene_size: height and width of synthetic scenes, pixels.
        seed: seed of the synthetic data set (scene i uses ``scene_seed(seed, i)``).
        degraded_fraction: fraction of synthetic scenes whose RGB gets shot noise and JPEG.
        npe: shot-noise level for degraded synthetic scenes (challenge sample value 750).
        jpeg_quality: JPEG quality for degraded synthetic scenes (challenge sample value 65).
        patch_size: training patch side (authors: 128).
        stride: patch grid stride (authors: 64).
        flips: flip/rot90 augmentation (authors: none).
    """

    source: str = "synthetic"
    url: str = ""
    split: str = "Train"
    n_scenes: int = 256
    scene_size: int = 128
    seed: int = 0
    degraded_fraction: float = 0.0
    npe: float = 750.0
    jpeg_quality: int = 65
    patch_size: int = 128
    stride: int = 64
    flips: bool = False

    def __post_init__(self) -> None:
        _check(self.source in SOURCES, "data.source", self.source, f"must be one of {SOURCES}")
        _check(self.source == "synthetic" or bool(self.url), "data.url", self.url, "is required for arad/zarr")
        _check(self.n_scenes >= 1, "data.n_scenes", self.n_scenes, "must be ≥ 1")
        _check(
            0.0 <= self.degraded_fraction <= 1.0, "data.degraded_fraction", self.degraded_fraction, "must be in [0, 1]"
        )
        _check(
            self.patch_size >= 4 and self.patch_size % 4 == 0,
            "data.patch_size",
            self.patch_size,
            "must be a multiple of 4",
        )
        _check(self.stride >= 1, "data.stride", self.stride, "must be ≥ 1")
        _check(
            self.source != "synthetic" or self.scene_size >= self.patch_size,
            "data.scene_size",
            self.scene_size,
            "must be ≥ data.patch_size",
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training job. Defaults are the authors' recipe (spec §5).

    Args:
        model: network configuration.
        data: training data.
        loss: ``"mrae"`` (authors), ``"l1"``, ``"mrae+l1"`` (sum of both) or ``"mrae+rmse"``
            (MRAE + ``rmse_weight`` × RMSE: MRAE alone weighs dark bands 1/gt and trades bright values,
            hence RMSE, for them).
        rmse_weight: weight of the RMSE term of ``"mrae+rmse"``.
        lr: initial Adam learning rate.
        betas: Adam betas.
        eps: Adam eps.
        lr_power: exponent of the polynomial decay.
        max_iter: iteration at which the lr reaches 0.
        iterations: stop after this many iterations (default: ``max_iter``).
        batch_size: global batch size (split evenly across Ray workers).
        seed: model initialisation and data-order seed.
        out_dir: checkpoints and ``loss.csv`` go here.
        checkpoint_every: write a checkpoint every this many iterations (and at the end).
        log_every: log and record the mean loss every this many iterations.
        threads: torch intra-op threads per process (0: leave torch's default).
        num_workers: Ray Train workers; 0 trains in this process without Ray.
        init_weights: optional checkpoint (path or URL, e.g. the authors' ``model.pth``) to start from
            instead of random initialisation; the optimizer starts fresh. A resumed run reads it too (then
            loads the resumed checkpoint over it), so it must still exist.
        deepen: let ``init_weights`` have fewer blocks than ``model``: the blocks it lacks are appended so
            that the network starts out computing exactly what the checkpoint does
            (:func:`drcr_model.grow.load_deepened`); without it a different depth is an error.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: str = "mrae"
    rmse_weight: float = 1.0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_power: float = 1.5
    max_iter: int = 300_000
    iterations: int = 0
    batch_size: int = 16
    seed: int = 0
    out_dir: str = "runs/train"
    checkpoint_every: int = 1000
    log_every: int = 50
    threads: int = 0
    num_workers: int = 0
    init_weights: str = ""
    deepen: bool = False

    def __post_init__(self) -> None:
        _check(self.loss in LOSSES, "loss", self.loss, f"must be one of {LOSSES}")
        _check(self.rmse_weight >= 0, "rmse_weight", self.rmse_weight, "must be ≥ 0")
        _check(self.lr > 0, "lr", self.lr, "must be positive")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            self.betas,
            "must be two values in [0, 1)",
        )
        _check(self.max_iter >= 1, "max_iter", self.max_iter, "must be ≥ 1")
        _check(self.iterations >= 0, "iterations", self.iterations, "must be ≥ 0 (0 means max_iter)")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be ≥ 1")
        _check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "must be ≥ 1")
        _check(self.log_every >= 1, "log_every", self.log_every, "must be ≥ 1")
        _check(not self.deepen or bool(self.init_weights), "deepen", self.deepen, "needs init_weights")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "must be ≥ 0")
        _check(
            self.num_workers == 0 or self.batch_size % self.num_workers == 0,
            "batch_size",
            self.batch_size,
            f"must be divisible by num_workers={self.num_workers}",
        )

    @property
    def total_iterations(self) -> int:
        return self.iterations or self.max_iter

    # --- TOML round trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        d = dict(d)
        sections = {"model": ModelConfig, "data": DataConfig}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value, key)
            else:
                kwargs[key] = value
        _reject_unknown(cls, kwargs, "")
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _reject_unknown(cls: type, d: Mapping[str, Any], prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + u for u in unknown]}; known: {sorted(known)}")


def _build(cls: type, d: Mapping[str, Any], section: str) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"[{section}] must be a table, got {d!r}")
    _reject_unknown(cls, d, f"{section}.")
    return cls(**d)


# --- pieces of the recipe ------------------------------------------------------------------------


def poly_lr(base_lr: float, iteration: int, max_iter: int, power: float) -> float:
    """The authors' polynomial decay: lr before step ``iteration`` (0-based); 0 from ``max_iter`` on."""
    return base_lr * (1.0 - min(iteration, max_iter) / max_iter) ** power


def mrae_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all elements of |output − target| / target, no epsilon (the authors' loss)."""
    return torch.mean(torch.abs(output - target) / target)


def rmse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root of the mean over all elements of (output − target)², the batch's RMSE."""
    return torch.sqrt(torch.mean((output - target) ** 2))


def _loss_fn(name: str, rmse_weight: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "mrae":
        return mrae_loss
    if name == "l1":
        return lambda o, t: torch.mean(torch.abs(o - t))
    if name == "mrae+rmse":
        return lambda o, t: mrae_loss(o, t) + rmse_weight * rmse_loss(o, t)
    return lambda o, t: mrae_loss(o, t) + torch.mean(torch.abs(o - t))


def build_pairs(data: DataConfig, bands: np.ndarray = DEFAULT_BANDS) -> list[Pair]:
    """The training pairs a :class:`DataConfig` describes, in memory (synthetic scenes are generated)."""
    if data.source == "arad":
        return read_arad(data.url, data.split)
    if data.source == "zarr":
        return read_paired_zarr(data.url)
    from drcr_model.scenes import SceneConfig, make_scene, scene_seed

    scene_cfg = SceneConfig(height=data.scene_size, width=data.scene_size)
    n_degraded = round(data.degraded_fraction * data.n_scenes)
    pairs = []
    for i in range(data.n_scenes):
        s = scene_seed(data.seed, i)
        cube = make_scene(s, scene_cfg, bands)
        # Degrade every k-th scene rather than a prefix, so subsets keep the same mix.
        degraded = n_degraded > 0 and (i * n_degraded) // data.n_scenes != ((i + 1) * n_degraded) // data.n_scenes
        if degraded:
            rgb = simulate_rgb(cube, bands, npe=data.npe, jpeg_quality=data.jpeg_quality, seed=s)
        else:
            rgb = simulate_rgb(cube, bands)
        pairs.append(Pair(f"synthetic_{data.seed}_{i:05d}", rgb, cube))
    return pairs


def _refuse_other_depth(have: Mapping[str, int], config: TrainConfig) -> None:
    """A checkpoint that differs from ``[model]`` only in depth: say how to grow it, not just that it differs."""
    want = dataclasses.asdict(config.model)
    if have["n_blocks"] < want["n_blocks"] and all(have[k] == want[k] for k in want if k != "n_blocks"):
        raise CheckpointError(
            f"{config.init_weights}: {have['n_blocks']} blocks, [model] has {want['n_blocks']}; "
            "set deepen = true to start from it with the missing blocks appended"
        )


def save_checkpoint(
    path: str | Path,
    *,
    epoch: int,
    iteration: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig | None = None,
) -> None:
    """Write the authors' checkpoint dict atomically (temp file, then rename)."""
    state_dict = {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {
        "epoch": epoch,
        "iter": iteration,
        "state_dict": state_dict,
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "config": config.to_dict() if config else None,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class Trainer:
    """The training state (model, optimizer, iteration) and the step loop.

    Args:
        config: the job.
        dataset: training patches.
        rank: this worker's index (data shard) when training data-parallel.
        world_size: number of workers.
        wrap: optional function applied to the model before training (e.g. Ray's ``prepare_model``).
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: PatchDataset,
        *,
        rank: int = 0,
        world_size: int = 1,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> None:
        self.config, self.dataset, self.rank, self.world_size = config, dataset, rank, world_size
        torch.manual_seed(config.seed)
        net = DRCRNet(**dataclasses.asdict(config.model))
        self.net = net
        self.model = wrap(net) if wrap else net
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr, betas=config.betas, eps=config.eps)
        self.loss_fn = _loss_fn(config.loss, config.rmse_weight)
        self.iteration = 0
        if config.init_weights:
            from drcr_model.checkpoint import read_checkpoint

            obj, _ = read_checkpoint(config.init_weights)
            sd = extract_state_dict(obj, source=config.init_weights)
            if config.deepen:
                from drcr_model.grow import load_deepened

                appended = load_deepened(self.net, sd, source=config.init_weights)
                log.info("%s: %d blocks appended (deepen)", config.init_weights, appended)
            else:
                _refuse_other_depth(infer_config(sd, source=config.init_weights), config)
                load_state_dict(self.net, sd, source=config.init_weights)
        self.local_batch = config.batch_size // world_size
        usable = len(dataset) // world_size * world_size
        self.iters_per_epoch = usable // world_size // self.local_batch
        if self.iters_per_epoch == 0:
            raise ValueError(
                f"batch_size={config.batch_size} is larger than the {len(dataset)} patches available"
                f" (per worker: {usable // world_size}); use more scenes or a smaller batch"
            )

    @property
    def epoch(self) -> int:
        return self.iteration // self.iters_per_epoch

    def batch_indices(self, iteration: int) -> np.ndarray:
        """Patch indices of this worker's batch at ``iteration`` (shuffled per epoch, last batch dropped)."""
        epoch, j = divmod(iteration, self.iters_per_epoch)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.dataset))
        usable = len(order) // self.world_size * self.world_size
        shard = order[:usable][self.rank :: self.world_size]
        return shard[j * self.local_batch : (j + 1) * self.local_batch]

    def step(self) -> float:
        """One optimisation step; returns the batch loss."""
        cfg = self.config
        self.dataset.set_epoch(self.epoch)
        items = [self.dataset[int(i)] for i in self.batch_indices(self.iteration)]
        rgb = torch.stack([x for x, _ in items])
        cube = torch.stack([y for _, y in items])
        lr = poly_lr(cfg.lr, self.iteration, cfg.max_iter, cfg.lr_power)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(rgb), cube)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return float(loss.detach())

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "iteration": self.iteration, "model": self.net, "optimizer": self.optimizer}

    def save(self, path: str | Path) -> None:
        save_checkpoint(
            path,
            epoch=self.epoch,
            iteration=self.iteration,
            model=self.net,
            optimizer=self.optimizer,
            config=self.config,
        )

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint written by :meth:`save` (model, optimizer, iteration, torch RNG)."""
        obj = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"iter", "state_dict", "optimizer"} - set(obj)
        if missing:
            raise ValueError(f"{path}: not a training checkpoint (missing {sorted(missing)})")
        # The shared loader also accepts the authors' files (``module.`` prefixes, positional names).
        load_state_dict(self.net, extract_state_dict(obj, source=str(path)), source=str(path))
        self.optimizer.load_state_dict(obj["optimizer"])
        self.iteration = int(obj["iter"])
        if obj.get("rng") is not None:
            torch.set_rng_state(obj["rng"])

    def run(
        self,
        until: int | None = None,
        *,
        on_log: Callable[[dict[str, float]], None] | None = None,
        checkpoint: Callable[[Trainer], None] | None = None,
    ) -> list[float]:
        """Train until iteration ``until`` (default: the config's total); returns every step's loss."""
        cfg = self.config
        until = cfg.total_iterations if until is None else until
        losses: list[float] = []
        window: list[float] = []
        t0 = time.perf_counter()
        while self.iteration < until:
            loss = self.step()
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss} at iteration {self.iteration}; check for gt ≤ 0 or lower lr"
                )
            losses.append(loss)
            window.append(loss)
            if self.iteration % cfg.log_every == 0 or self.iteration == until:
                rec = {
                    "iter": self.iteration,
                    "epoch": self.epoch,
                    "lr": poly_lr(cfg.lr, self.iteration, cfg.max_iter, cfg.lr_power),
                    "loss": float(np.mean(window)),
                    "seconds": time.perf_counter() - t0,
                }
                window = []
                log.info(
                    "iter %d epoch %d lr %.3g loss %.4f (%.1f s)",
                    rec["iter"],
                    rec["epoch"],
                    rec["lr"],
                    rec["loss"],
                    rec["seconds"],
                )
                if on_log:
                    on_log(rec)
            if checkpoint and (self.iteration % cfg.checkpoint_every == 0 or self.iteration == until):
                checkpoint(self)
        return losses


def _csv_logger(path: Path) -> Callable[[dict[str, float]], None]:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(rec: dict[str, float]) -> None:
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rec))
            if new:
                w.writeheader()
            w.writerow(rec)

    return write


def make_dataset(config: TrainConfig, pairs: Sequence[Pair] | None = None) -> PatchDataset:
    data = config.data
    return PatchDataset(
        pairs if pairs is not None else build_pairs(data),
        patch=data.patch_size,
        stride=data.stride,
        augment=Augment(flips=data.flips),
        seed=config.seed,
    )


def train(config: TrainConfig, *, resume: str | Path | None = None, pairs: Sequence[Pair] | None = None) -> Trainer:
    """Run a training job in this process; checkpoints go to ``{out_dir}/checkpoint_{iter:08d}.pth``
    and ``{out_dir}/last.pth``, losses to ``{out_dir}/loss.csv``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(config.to_toml())
    trainer = Trainer(config, make_dataset(config, pairs))
    if resume:
        trainer.load(resume)
        log.info("resumed from %s at iteration %d", resume, trainer.iteration)

    def checkpoint(t: Trainer) -> None:
        t.save(out / f"checkpoint_{t.iteration:08d}.pth")
        t.save(out / "last.pth")

    trainer.run(on_log=_csv_logger(out / "loss.csv"), checkpoint=checkpoint)
    return trainer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drcr_model.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training job spec (TOML), e.g. jobs/train_synthetic.toml")
    parser.add_argument("--resume", help="checkpoint to resume from")
    parser.add_argument("--iterations", type=int, help="override the config's iterations")
    parser.add_argument("--out-dir", help="override the config's out_dir")
    parser.add_argument("--num-workers", type=int, help="override num_workers (Ray Train workers; 0: no Ray)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = TrainConfig.from_toml(args.config)
        overrides = {
            k: v
            for k, v in {
                "iterations": args.iterations,
                "out_dir": args.out_dir,
                "num_workers": args.num_workers,
            }.items()
            if v is not None
        }
        config = dataclasses.replace(config, **overrides)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
        log.error("bad config %s: %s", args.config, e)
        return 2
    if config.num_workers > 0:
        from drcr_model.distributed import train_with_ray

        train_with_ray(config, resume=args.resume)
    else:
        train(config, resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
