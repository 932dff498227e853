"""Deepen a trained DRCR Net without changing what it computes, so that a larger configuration starts
from the smaller one's outputs instead of from scratch (function-preserving growth, as Net2Net's
"deeper" operator).

A DRCR block returns ``conv6(...) + se2(se1(x))``. An appended block whose ``conv6`` is zero and whose
two re-calibration gates end in a zero linear layer returns ``sigmoid(0)² · x = x / 4`` exactly, for any
input and any tile statistics. Everything after the last block (``tail_conv2D``, a bias-free convolution,
then a PReLU and the bias-free output convolution) is positively homogeneous, so multiplying
``tail_conv2D``'s weight by 4 per appended block undoes that scale. Both factors are powers of two, which
floating point multiplies exactly (barring underflow), so the deepened network computes what the original
does (bit for bit on trained 2-block weights grown to 4). The appended blocks' other convolutions keep
their seeded random initialisation and start learning as soon as ``conv6`` moves off zero (its gradient is
not zero: LeakyReLU's slope at 0 is 0.2). A gate's first two layers get no gradient until its zeroed last
layer moves, so appended gates learn late: after 2,000 iterations (``jobs/default_weights_b3.toml``) the
appended block's gates stayed near 0.5 (last-layer weights ≤ 0.10 in magnitude, against 0.75–0.86 in the
other blocks), and the grown network scored what the 2-block one trained the same way did (README
"Weights").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

from drcr_model.checkpoint import CheckpointError, infer_config, load_state_dict
from drcr_model.net import DRCRNet

__all__ = ["APPENDED_BLOCK_SCALE", "load_deepened"]

APPENDED_BLOCK_SCALE = 0.25
"""What an appended block multiplies its input by at the start: two gates of ``sigmoid(0)``."""

#: Tensors of an appended block set to zero: the last convolution and each gate's last linear layer.
_ZEROED = ("conv6.conv2d.weight", "conv6.conv2d.bias", "se1.fc.4.weight", "se2.fc.4.weight")


def load_deepened(net: DRCRNet, state_dict: Mapping[str, torch.Tensor], *, source: str = "<checkpoint>") -> int:
    """Load a checkpoint of fewer blocks into ``net``, appending blocks that leave its output unchanged.

    ``net`` keeps its own (seeded) initialisation for the appended blocks except the tensors that make them
    a scaled identity. The checkpoint must match ``net`` in every other dimension. Returns the number of
    blocks appended (0: same depth, loaded as it is).

    Raises:
        CheckpointError: the checkpoint differs from ``net`` in anything but depth, or is deeper.
    """
    have = infer_config(state_dict, source=source)
    want = dict(net.config)
    others = {k: f"checkpoint {have[k]}, model {want[k]}" for k in want if k != "n_blocks" and have[k] != want[k]}
    if others or have["n_blocks"] > want["n_blocks"]:
        raise CheckpointError(
            f"{source}: DRCRNet{tuple(have.values())} cannot be deepened into DRCRNet{tuple(want.values())}: "
            + (f"{others} differ (only n_blocks may)" if others else "it has more blocks")
        )
    small = DRCRNet(**have)
    load_state_dict(small, state_dict, source=source)
    merged: OrderedDict[str, torch.Tensor] = OrderedDict(net.state_dict())
    merged.update(small.state_dict())
    appended = want["n_blocks"] - have["n_blocks"]
    for i in range(have["n_blocks"], want["n_blocks"]):
        for name in _ZEROED:
            merged[f"backbone.{i}.{name}"] = torch.zeros_like(merged[f"backbone.{i}.{name}"])
    tail = "tail_conv2D.conv2d.weight"
    merged[tail] = merged[tail] * (1 / APPENDED_BLOCK_SCALE) ** appended
    net.load_state_dict(merged, strict=True)
    return appended
