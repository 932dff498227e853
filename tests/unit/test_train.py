"""Training: the authors' recipe pieces, config files, overfitting a tiny set, exact resume."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from drcr_model.datasets import Pair
from drcr_model.train import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    Trainer,
    _loss_fn,
    main,
    make_dataset,
    mrae_loss,
    poly_lr,
    rmse_loss,
)

REPO = Path(__file__).resolve().parents[2]
KEYS_TSV = Path(__file__).parent / "data" / "drcr_state_dict_keys.tsv"


def _tiny_pairs(n: int = 2, size: int = 16) -> list[Pair]:
    from drcr_model.camera import simulate_rgb
    from drcr_model.scenes import SceneConfig, make_scene

    cfg = SceneConfig(height=size, width=size, regions=(2, 3))
    pairs = []
    for i in range(n):
        cube = make_scene(i, cfg)
        pairs.append(Pair(f"s{i}", simulate_rgb(cube), cube))
    return pairs


def _tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        model=ModelConfig(channels=8, n_blocks=1),
        data=DataConfig(n_scenes=2, scene_size=16, patch_size=8, stride=8),
        lr=1e-2,
        max_iter=400,
        batch_size=4,
        out_dir=str(tmp_path / "run"),
        checkpoint_every=3,
        log_every=3,
    )
    return TrainConfig(**(base | kw))


def test_defaults_are_the_authors_recipe() -> None:
    c = TrainConfig()
    assert (c.loss, c.lr, c.betas, c.eps, c.lr_power, c.max_iter, c.batch_size) == (
        "mrae",
        1e-4,
        (0.9, 0.999),
        1e-8,
        1.5,
        300_000,
        16,
    )
    assert (c.data.patch_size, c.data.stride, c.data.flips) == (128, 64, False)
    assert dataclasses.asdict(c.model) == {"in_channels": 3, "out_channels": 31, "channels": 100, "n_blocks": 10}


def test_poly_lr_matches_the_authors_formula() -> None:
    assert poly_lr(1e-4, 0, 300_000, 1.5) == 1e-4
    assert poly_lr(1e-4, 150_000, 300_000, 1.5) == pytest.approx(1e-4 * 0.5**1.5)
    assert poly_lr(1e-4, 300_000, 300_000, 1.5) == 0.0
    assert poly_lr(1e-4, 400_000, 300_000, 1.5) == 0.0


def test_mrae_loss_has_no_epsilon() -> None:
    out, gt = torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.25])
    assert float(mrae_loss(out, gt)) == pytest.approx(0.2)


def test_mixed_loss_adds_weighted_rmse_to_mrae() -> None:
    out, gt = torch.tensor([0.6, 0.2]), torch.tensor([0.5, 0.25])
    rmse = ((0.1**2 + 0.05**2) / 2) ** 0.5
    assert float(rmse_loss(out, gt)) == pytest.approx(rmse)
    assert float(_loss_fn("mrae+rmse", 3.0)(out, gt)) == pytest.approx(0.2 + 3.0 * rmse)
    assert float(_loss_fn("mrae+rmse", 0.0)(out, gt)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="rmse_weight"):
        TrainConfig(loss="mrae+rmse", rmse_weight=-1.0)


def test_config_toml_roundtrip_and_errors(tmp_path) -> None:
    c = _tiny_config(tmp_path)
    assert TrainConfig.from_dict(tomllib.loads(c.to_toml())) == c
    for job in ("train_synthetic.toml", "default_weights.toml", "default_weights_finetune.toml"):
        TrainConfig.from_toml(REPO / "jobs" / job)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match=r"data\.patch_size"):
        DataConfig(patch_size=30)
    with pytest.raises(ValueError, match="num_workers"):
        TrainConfig(batch_size=3, num_workers=2)


def test_a_tiny_model_overfits_a_tiny_dataset(tmp_path) -> None:
    torch.set_num_threads(1)
    cfg = _tiny_config(tmp_path, data=DataConfig(n_scenes=1, scene_size=16, patch_size=16, stride=16), batch_size=1)
    trainer = Trainer(cfg, make_dataset(cfg, _tiny_pairs(1)))
    losses = trainer.run(150)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first / 4, (first, last)  # the MRAE loss falls by at least 4× on one 16×16 scene


def test_resume_reaches_exactly_the_same_state(tmp_path) -> None:
    torch.set_num_threads(1)
    cfg = _tiny_config(tmp_path, data=DataConfig(n_scenes=2, scene_size=16, patch_size=8, stride=8, flips=True))
    pairs = _tiny_pairs(2)  # 8 patches, batch 4 → 2 iterations per epoch: resuming crosses an epoch
    straight = Trainer(cfg, make_dataset(cfg, pairs))
    straight.run(7)

    first = Trainer(cfg, make_dataset(cfg, pairs))
    first.run(3)
    first.save(tmp_path / "ckpt.pth")
    rng_at_save = torch.get_rng_state()
    resumed = Trainer(cfg, make_dataset(cfg, pairs))
    torch.manual_seed(12345)  # disturb the RNG: the checkpoint must restore it
    resumed.load(tmp_path / "ckpt.pth")
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    assert resumed.iteration == 3 and resumed.epoch == 1
    resumed.run(7)

    for (k, a), (_, b) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    sa, sb = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][i][key], sb["state"][i][key])


def test_checkpoint_is_the_authors_format_with_drcr_names(tmp_path) -> None:
    cfg = _tiny_config(tmp_path)
    t = Trainer(cfg, make_dataset(cfg, _tiny_pairs(2)))
    t.run(1)
    t.save(tmp_path / "c.pth")
    obj = torch.load(tmp_path / "c.pth", map_location="cpu", weights_only=True)
    assert {"epoch", "iter", "state_dict", "optimizer"} <= set(obj)
    assert obj["iter"] == 1 and obj["epoch"] == 0
    expected = [line.split("\t")[0] for line in KEYS_TSV.read_text().splitlines() if line.strip()]
    names = list(obj["state_dict"])
    # The 100/10 listing has 10 blocks; the tiny model has 1, so compare the non-block keys and block 0.
    assert [k for k in names if not k.startswith("backbone.")] == [k for k in expected if not k.startswith("backbone.")]
    assert [k for k in names if k.startswith("backbone.0.")] == [k for k in expected if k.startswith("backbone.0.")]


def test_cli_trains_and_resumes(tmp_path) -> None:
    cfg = _tiny_config(tmp_path, iterations=2, checkpoint_every=2)
    spec = tmp_path / "job.toml"
    spec.write_text(cfg.to_toml())
    assert main(["--config", str(spec)]) == 0
    out = Path(cfg.out_dir)
    assert (out / "checkpoint_00000002.pth").exists() and (out / "last.pth").exists()
    assert main(["--config", str(spec), "--resume", str(out / "last.pth"), "--iterations", "4"]) == 0
    assert torch.load(out / "last.pth", weights_only=True)["iter"] == 4
    bad = tmp_path / "bad.toml"
    bad.write_text("batch = 3\n")
    assert main(["--config", str(bad)]) == 2


def test_init_weights_starts_from_a_checkpoint(tmp_path) -> None:
    cfg = _tiny_config(tmp_path)
    pairs = _tiny_pairs(2)
    a = Trainer(cfg, make_dataset(cfg, pairs))
    a.run(2)
    torch.save({"state_dict": {"module." + k: v for k, v in a.net.state_dict().items()}}, tmp_path / "w.pth")
    b = Trainer(dataclasses.replace(cfg, init_weights=str(tmp_path / "w.pth"), seed=99), make_dataset(cfg, pairs))
    assert b.iteration == 0
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k]), k
