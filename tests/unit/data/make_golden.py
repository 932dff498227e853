"""Regenerate ``golden_tiny.npz``: a seeded tiny DRCRNet and its fp32 CPU output on a fixed input.

The file guards against regressions in ``drcr_model.net`` (any change to the forward pass, the
module registration order or the parameter initialisation order changes the numbers). Regenerate
only when such a change is intended, and say why in the commit:

    .venv/bin/python tests/unit/data/make_golden.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from drcr_model.net import DRCRNet

SEED = 1234
CONFIG = {"in_channels": 3, "out_channels": 31, "channels": 8, "n_blocks": 1}
SHAPE = (2, 3, 8, 12)  # B, C, H, W; H != W so a transposed axis would show
OUT = Path(__file__).with_name("golden_tiny.npz")


def make_model() -> DRCRNet:
    """The seeded model: ``torch.manual_seed(SEED)`` then default PyTorch initialisation."""
    torch.manual_seed(SEED)
    return DRCRNet(**CONFIG).eval()


def make_input() -> np.ndarray:
    """Fixed input in [0, 1), float32, from numpy's seeded generator (independent of torch's RNG)."""
    return np.random.default_rng(SEED).random(SHAPE, dtype=np.float32)


def main() -> None:
    model = make_model()
    x = make_input()
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    np.savez_compressed(OUT, seed=np.int64(SEED), x=x, y=y, torch_version=np.array(torch.__version__))
    print(f"wrote {OUT}: x {x.shape}, y {y.shape}, |y| max {np.abs(y).max():.4f}")


if __name__ == "__main__":
    main()
