"""DRCR Net (Li et al., CVPR Workshops 2022), laid out exactly as the authors' checkpoint expects.

Module names, registration order and parameter shapes follow the reference implementation
(github.com/jojolee6513/DRCR-net, ``train/DRCR.py``) so that the released NTIRE 2022 checkpoint loads
unchanged; see ``shared/spec/drcr_net.md`` for the description this file is written from. Two quirks
are kept on purpose because the released weights were trained with them: the misspelt attribute
``denosing`` and the quarter-scale NPM branch that reuses the half-scale ``conv2_*`` convolutions
(``conv4_33``/``conv4_11`` exist but are never called).

The file reads top-down: small building blocks first, the network last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DRCRNet",
    "receptive_radius",
    "CRM",
    "DRCRBlock",
    "NPM",
    "ReflectConv",
    "ConvLayer",
    "LRELU_SLOPE",
    "CRM_REDUCTION",
]

LRELU_SLOPE = 0.2
"""Slope of every LeakyReLU in the network (spec §1)."""

CRM_REDUCTION = 8
"""Channel re-calibration hidden width is ``channels // CRM_REDUCTION`` (spec §1)."""


def receptive_radius(n_blocks: int) -> int:
    """Pixels on each side of an output pixel that can change it, once every CRM's mean is fixed (tiles
    run with the whole image's means): 2 stem convolutions, 14 in the NPM (its quarter-scale branch: the
    4×4 pooling cell, two 3×3 convolutions at quarter scale, the bilinear upsampling, then ``conv_cat``),
    6 per block (the chain ``conv1 … conv6``) and 2 at the tail. Equals the support of the gradient of
    one output pixel, whatever its position in the 4×4 pooling grid (``tests/unit/test_net.py``)."""
    return 18 + 6 * n_blocks


class ReflectConv(nn.Module):
    """Reflection pad by 1, then a 3×3 convolution without bias (the reference's ``Conv3x3``).

    Used for the stem, head, tail and output convolutions. Keys: ``conv2d.weight``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reflection_pad = nn.ReflectionPad2d(1)
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d(self.reflection_pad(x))


class ConvLayer(nn.Module):
    """Zero pad by 1, 3×3 convolution with bias, LeakyReLU(0.2) (the reference's ``Conv2dLayer``).

    Keys: ``conv2d.weight``, ``conv2d.bias``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d(1)
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=0, bias=True)
        self.activation = nn.LeakyReLU(LRELU_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv2d(self.pad(x)))


class CRM(nn.Module):
    """Channel re-calibration module: global average pool → 3 bias-free linears → sigmoid gate.

    Keys: ``fc.0.weight`` [r, C], ``fc.2.weight`` [r, r], ``fc.4.weight`` [C, r] with r = C // 8.
    The pooling is over the whole spatial extent of the input, which is why a tile needs the whole
    image's mean supplied (``mean``) to equal whole-image inference (:mod:`drcr_model.recalibration`).

    Args:
        channels: feature channels C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels // CRM_REDUCTION
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def gate(self, mean: torch.Tensor) -> torch.Tensor:
        """Per-channel gate [B, C] in (0, 1) from the input's spatial mean [B, C] (or [C], broadcast)."""
        return self.fc(mean)

    def forward(self, x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, C, H, W] times its gate; ``mean`` replaces the pooled mean of ``x`` when given."""
        b, c = x.shape[:2]
        m = self.avg_pool(x).view(b, c) if mean is None else mean
        return x * self.gate(m).view(-1, c, 1, 1)


class DRCRBlock(nn.Module):
    """Dense residual channel re-calibration block (spec §3.3).

    ``x1..x3`` encoder convs, ``x4 = conv4([x3, se1(x)])``, ``x5 = conv5([x2, x4])``,
    ``out = conv6([x1, x5]) + se2(se1(x))``; every conv is followed by LeakyReLU(0.2).

    Args:
        channels: feature channels C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvLayer(channels, channels)
        self.conv2 = ConvLayer(channels, channels)
        self.conv3 = ConvLayer(channels, channels)
        self.conv4 = ConvLayer(2 * channels, channels)
        self.conv5 = ConvLayer(2 * channels, channels)
        self.conv6 = ConvLayer(2 * channels, channels)
        self.se1 = CRM(channels)
        self.se2 = CRM(channels)

    def forward(self, x: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """``mean`` [B, C] or [C]: the spatial mean of ``x`` to use instead of pooling ``x`` (tiles).

        Both CRMs then follow from it: ``se2`` pools ``se1(x) = x · g1``, whose mean is ``g1 · mean``.
        """
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        x3 = self.conv3(x2)
        if mean is None:
            r, r_mean = self.se1(x), None
        else:
            g1 = self.se1.gate(mean)
            r, r_mean = x * g1.view(-1, x.shape[1], 1, 1), g1 * mean
        x4 = self.conv4(torch.cat([x3, r], dim=1))
        x5 = self.conv5(torch.cat([x2, x4], dim=1))
        return self.conv6(torch.cat([x1, x5], dim=1)) + self.se2(r, r_mean)


class NPM(nn.Module):
    """Non-local purification module: three scales (1, 1/2, 1/4), fused, residual (spec §3.2).

    The quarter-scale branch deliberately reuses ``conv2_33``/``conv2_11`` as the reference does;
    ``conv4_33``/``conv4_11`` are registered (the checkpoint holds them) but never used.

    Args:
        channels: feature channels C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.activation = nn.LeakyReLU(LRELU_SLOPE, inplace=False)
        self.in_channel = channels
        c = channels
        self.conv0_33 = nn.Conv2d(c, c, 3, 1, 1)
        self.conv0_11 = nn.Conv2d(c, c, 1, 1, 0)
        self.conv_0_cat = nn.Conv2d(2 * c, c, 3, 1, 1)
        self.conv2_33 = nn.Conv2d(c, c, 3, 1, 1)
        self.conv2_11 = nn.Conv2d(c, c, 1, 1, 0)
        self.conv_2_cat = nn.Conv2d(2 * c, c, 3, 1, 1)
        self.conv4_33 = nn.Conv2d(c, c, 3, 1, 1)
        self.conv4_11 = nn.Conv2d(c, c, 1, 1, 0)
        self.conv_4_cat = nn.Conv2d(2 * c, c, 3, 1, 1)
        self.conv_cat = nn.Conv2d(3 * c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.activation
        p2 = F.avg_pool2d(x, kernel_size=2, stride=2)
        p4 = F.avg_pool2d(p2, kernel_size=2, stride=2)
        a0 = act(self.conv_0_cat(torch.cat([self.conv0_33(x), self.conv0_11(x)], dim=1)))
        a2 = act(self.conv_2_cat(torch.cat([self.conv2_33(p2), self.conv2_11(p2)], dim=1)))
        # Reference quirk (spec §3.2 step 4): the quarter scale uses conv2_*, not conv4_*.
        a4 = act(self.conv_4_cat(torch.cat([self.conv2_33(p4), self.conv2_11(p4)], dim=1)))
        a2 = F.interpolate(a2, scale_factor=2, mode="bilinear", align_corners=False)
        a4 = F.interpolate(a4, scale_factor=4, mode="bilinear", align_corners=False)
        return x + act(self.conv_cat(torch.cat([a0, a2, a4], dim=1)))


class DRCRNet(nn.Module):
    """DRCR Net: RGB [B, in_channels, H, W] → spectral cube [B, out_channels, H, W].

    H and W must be multiples of 4 (at least 4); use :func:`drcr_model.reconstruct` for any size.
    The NTIRE 2022 entry and the released checkpoint use the defaults here (3 → 31, 100 channels,
    10 blocks, 9,478,482 parameters); the reference constructor's own defaults (200, 8) were not used.

    Args:
        in_channels: input channels (3 for RGB).
        out_channels: output spectral bands (31 for 400–700 nm at 10 nm).
        channels: feature width C everywhere.
        n_blocks: number of DRCR blocks N.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 31, channels: int = 100, n_blocks: int = 10) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("n_blocks", n_blocks)):
            if int(value) < 1:
                raise ValueError(f"DRCRNet: {name} must be >= 1, got {value!r}")
        if channels < CRM_REDUCTION:
            raise ValueError(
                f"DRCRNet: channels must be >= {CRM_REDUCTION} (CRM width is channels // 8), got {channels!r}"
            )
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "channels": channels,
            "n_blocks": n_blocks,
        }
        self.input_conv2D = ReflectConv(in_channels, channels)
        self.input_prelu2D = nn.PReLU()
        self.head_conv2D = ReflectConv(channels, channels)
        self.denosing = NPM(channels)
        self.backbone = nn.ModuleList([DRCRBlock(channels) for _ in range(n_blocks)])
        self.tail_conv2D = ReflectConv(channels, channels)
        self.output_prelu2D = nn.PReLU()
        self.output_conv2D = ReflectConv(channels, out_channels)

    def forward(self, x: torch.Tensor, means: torch.Tensor | None = None) -> torch.Tensor:
        """RGB [B, 3, H, W] → cube [B, bands, H, W].

        ``means`` [n_blocks, C] (or [n_blocks, B, C]): each block's input mean to use in place of pooling
        the input, e.g. the whole image's when ``x`` is a tile of it (:mod:`drcr_model.recalibration`).
        """
        f = self.trunk(x)
        for i, block in enumerate(self.backbone):
            f = block(f, None if means is None else means[i])
        return self.output_conv2D(self.output_prelu2D(self.tail_conv2D(f)))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and NPM: RGB [B, 3, H, W] → the first block's input [B, C, H, W] (no re-calibration yet)."""
        h, w = x.shape[-2:]
        if h % 4 or w % 4 or h < 4 or w < 4:
            raise ValueError(
                f"DRCRNet needs H and W to be multiples of 4 (>= 4), got {h}x{w}; "
                "use drcr_model.reconstruct(..., mode='pad' or 'authors') for other sizes"
            )
        return self.denosing(self.head_conv2D(self.input_prelu2D(self.input_conv2D(x))))

    def macs_per_pixel(self) -> int:
        """Multiply-accumulates per output pixel from the closed form in spec §1 (CRM cost excluded)."""
        c, n = self.config["channels"], self.config["n_blocks"]
        # head + tail 18·C², NPM 28 + 28/4 + 28/16 + 27 = 63.75·C², each block 81·C².
        return int((81.75 + 81 * n) * c * c + 9 * self.config["in_channels"] * c + 9 * self.config["out_channels"] * c)
