"""Deepening a trained network: the deeper one starts out computing what the checkpoint does, then learns."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_train import _tiny_config, _tiny_pairs  # tests/unit is on sys.path (pytest prepend)

from drcr_model.checkpoint import CheckpointError
from drcr_model.grow import load_deepened
from drcr_model.net import DRCRNet
from drcr_model.recalibration import block_input_sums
from drcr_model.train import ModelConfig, TrainConfig, Trainer, make_dataset


def _trained_like(channels: int, n_blocks: int, seed: int) -> DRCRNet:
    """Random weights moved off PyTorch's initialisation, so no gate or PReLU sits at a special value."""
    torch.manual_seed(seed)
    net = DRCRNet(3, 31, channels, n_blocks)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize(("channels", "have", "want", "size"), [(8, 1, 3, (20, 28)), (16, 2, 4, (32, 32))])
def test_the_deepened_network_outputs_what_the_checkpoint_does(channels, have, want, size) -> None:
    small = _trained_like(channels, have, seed=have)
    torch.manual_seed(7)
    big = DRCRNet(3, 31, channels, want)
    assert load_deepened(big, {"module." + k: v for k, v in small.state_dict().items()}) == want - have
    big.eval()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        expected, got = small(x), big(x)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    # The appended blocks keep their seeded initialisation apart from the zeroed tensors.
    assert torch.count_nonzero(big.backbone[have].conv1.conv2d.weight) > 0
    assert torch.count_nonzero(big.backbone[have].conv6.conv2d.weight) == 0


def test_tiles_of_the_deepened_network_take_the_whole_image_means() -> None:
    small = _trained_like(8, 1, seed=3)
    big = DRCRNet(3, 31, 8, 2)
    load_deepened(big, small.state_dict())
    big.eval()
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        sums = block_input_sums(big, x, [(slice(None), slice(None))])
        means = torch.from_numpy(sums / (24 * 24)).float()
        assert torch.allclose(big(x, means), small(x), atol=1e-6)


def test_only_depth_may_differ_and_only_upwards() -> None:
    small = _trained_like(8, 2, seed=0)
    with pytest.raises(CheckpointError, match=r"'channels': 'checkpoint 8, model 16'.*only n_blocks may"):
        load_deepened(DRCRNet(3, 31, 16, 3), small.state_dict(), source="w.pth")
    with pytest.raises(CheckpointError, match="w.pth: .*more blocks"):
        load_deepened(DRCRNet(3, 31, 8, 1), small.state_dict(), source="w.pth")
    same = DRCRNet(3, 31, 8, 2)
    assert load_deepened(same, small.state_dict()) == 0
    for k, v in small.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k


def _deepening_job(tmp_path: Path, seed: int, lr: float) -> tuple[DRCRNet, TrainConfig]:
    """A 1-block checkpoint saved as ``w.pth``, and a tiny 2-block job that starts from it deepened."""
    small = _trained_like(8, 1, seed=seed)
    torch.save({"state_dict": small.state_dict()}, tmp_path / "w.pth")
    cfg = _tiny_config(
        tmp_path,
        model=ModelConfig(channels=8, n_blocks=2),
        lr=lr,
        max_iter=10,
        init_weights=str(tmp_path / "w.pth"),
        deepen=True,
    )
    return small, cfg


def test_training_from_a_shallower_checkpoint_starts_at_its_loss_and_moves_the_new_blocks(tmp_path) -> None:
    small, cfg = _deepening_job(tmp_path, seed=5, lr=1e-3)
    pairs = _tiny_pairs(2)
    with pytest.raises(CheckpointError, match="w.pth: 1 blocks, .model. has 2; set deepen = true"):
        Trainer(dataclasses.replace(cfg, deepen=False), make_dataset(cfg, pairs))
    trainer = Trainer(cfg, make_dataset(cfg, pairs))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(trainer.net.eval()(x), small(x), atol=1e-6)
    trainer.net.train()
    trainer.run(3)
    assert torch.count_nonzero(trainer.net.backbone[1].conv6.conv2d.weight) > 0
    assert torch.count_nonzero(trainer.net.backbone[1].se1.fc[4].weight) > 0


def test_deepen_needs_init_weights() -> None:
    with pytest.raises(ValueError, match="deepen=True: needs init_weights"):
        TrainConfig(deepen=True)


def test_a_deepening_run_resumes_bit_for_bit(tmp_path) -> None:
    _, cfg = _deepening_job(tmp_path, seed=6, lr=1e-4)
    pairs = _tiny_pairs(2)
    straight = Trainer(cfg, make_dataset(cfg, pairs))
    straight.run(4)
    first = Trainer(cfg, make_dataset(cfg, pairs))
    first.run(2)
    first.save(tmp_path / "half.pth")
    resumed = Trainer(cfg, make_dataset(cfg, pairs))
    resumed.load(tmp_path / "half.pth")
    resumed.run(4)
    for k, v in straight.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
